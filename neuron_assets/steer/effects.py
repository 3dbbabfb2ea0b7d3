"""Effects of a description: does the feature it describes do anything, and what the
description says? A causal check beside the input-side scores, one row per selected
description (table ``description_effects``, per layer x polarity).

- *Ablation effect*: on the feature's own top test exemplars, the mean change in next-token
  loss (``ablation_loss_delta``, ablated minus intact, nats per token) and the mean KL(intact
  || ablated) when the feature is ablated (set to 0) at the exemplar's counted tokens: how
  much the model uses it where it fires.
- *Output agreement*: the feature set to its q99 (times ``strength``) on a fixed set of
  neutral prompts, greedy continuations; with e() the sentence encoder of search,
  ``agreement`` = mean over prompts of cos(e(steered) - e(baseline), e(description)), and
  ``control_agreement`` the same with the control description (another feature's, as the
  input-side scores use): a description that says what the feature does beats its control.
- *Promoted tokens* (the logit lens table ``output_tokens``): cos(e(the top promoted tokens),
  e(description)) and its control, and the share of those tokens the description names.

Cost, per feature: 2 forward passes over its ``exemplars`` sequences (one batch), and
``n_tokens`` decoding steps per prompt shared with ``batch_size`` - 1 other features (each row
of a batch steers one feature); the baselines of the prompts are generated once.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from neuron_assets.store import Store, with_lineage
from neuron_assets.types import FeatureId, Partition, Polarity, Split

from neuron_assets.steer.generate import continue_prompt, prompt_ids, stop_ids, uses_chat
from neuron_assets.steer.intervene import TokenWindow
from neuron_assets.steer.request import SteerFeature, SteerRequest
from neuron_assets.steer.select import SelectedFeature

EFFECTS_TABLE = "description_effects"
NEUTRAL_PROMPTS = ("Tell me about your day.", "Write one sentence about anything you like.",
                   "What should I do this weekend?", "Describe a place you know well.")  # the production presets
Log = Callable[[str], None]


@dataclass(frozen=True)
class EffectsSettings:
    exemplars: int = 5  # top test exemplars per feature for the ablation effect
    prompts: tuple[str, ...] = NEUTRAL_PROMPTS
    n_tokens: int = 16  # tokens generated per prompt for the output agreement
    strength: float = 1.0  # the steered value: q99 times this
    batch_size: int = 8  # features steered side by side, one a row
    output_tokens: int = 10  # promoted tokens compared with the description

    @classmethod
    def of(cls, section) -> "EffectsSettings":
        """From the config's ``effects`` section."""
        return cls(section.exemplars, tuple(section.prompts), section.n_tokens, section.strength, section.batch_size,
                   section.output_tokens)


@dataclass(frozen=True)
class FeatureEffect:
    feature: FeatureId
    ablation_loss_delta: float | None
    ablation_kl: float | None
    ablation_tokens: int
    steer_value: float
    agreement: float | None
    control_agreement: float | None
    changed_share: float  # share of prompts whose steered continuation differs from the baseline
    output_token_similarity: float | None
    output_token_control: float | None
    output_token_overlap: float | None


def row_hooks(sites: dict, rows: list[SelectedFeature | None], window: TokenWindow, sae_for, mode: str = "set"):
    """Hooks that steer row r of the batch by feature ``rows[r]`` alone (None: row untouched),
    at the window's positions: a neuron set to its value, an SAE latent moved to it along its
    decoder direction. Returns the handles."""
    by_layer: dict[int, list[tuple[int, SelectedFeature]]] = {}
    for r, chosen in enumerate(rows):
        if chosen is not None:
            by_layer.setdefault(chosen.feature.layer, []).append((r, chosen))
    handles = []
    for layer, members in by_layer.items():
        neurons = [(r, s) for r, s in members if s.feature.kind == "neuron"]
        latents = [(r, s) for r, s in members if s.feature.kind == "sae"]
        sae = sae_for(layer) if latents else None

        def hook(module, args, neurons=neurons, latents=latents, sae=sae):
            hidden = args[0].clone()
            where = window.mask(hidden.device)  # (B, T)
            for r, s in neurons:
                current = hidden[r, :, s.feature.index]
                target = current + s.value if mode == "add" else torch.full_like(current, s.value)
                hidden[r, :, s.feature.index] = torch.where(where[r], target, current)
            for r, s in latents:
                direction = (sae.W_dec.detach()[s.feature.index] / sae.input_scale).float()
                x = hidden[r].float()
                amount = torch.full(x.shape[:1], s.value, device=x.device)
                if mode != "add":
                    z = sae.encode(x.to(direction.device))[:, s.feature.index].to(x.device)
                    amount = amount - z
                delta = amount[:, None] * direction.to(x.device)[None, :]
                hidden[r] = torch.where(where[r][:, None], x + delta, x).to(hidden.dtype)
            return (hidden, *args[1:])

        handles.append(sites[layer].register_forward_pre_hook(hook))
    return handles


@torch.inference_mode()
def ablation_effects(subject, features: Sequence[SelectedFeature], records: Sequence[Sequence], sae_for,
                     batch_rows: int = 16) -> list[tuple[float, float, int]]:
    """Per feature: (mean loss change, mean KL(intact || ablated), tokens) over the counted
    next-token predictions of its ``records`` (ActivationRecords) with the feature set to its
    value (an ablation value) at their counted tokens. Every feature's records are rows of
    shared batches, each row ablated by its own feature (one intact and one ablated pass a
    batch, not a pair of passes a feature)."""
    rows = [(i, record) for i, feature_records in enumerate(records) for record in feature_records]
    sums = [[0.0, 0.0, 0] for _ in features]
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start:start + batch_rows]
        width = max(len(r.token_ids) for _, r in chunk)
        pad = subject.tokenizer.pad_token_id or 0
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (_, record) in enumerate(chunk):
            ids[j, :len(record.token_ids)] = torch.tensor(record.token_ids)
            mask[j, :len(record.token_ids)] = 1
        first = torch.tensor([r.prefix_len for _, r in chunk])
        window = TokenWindow("prompt", width, first, rows=(True,) * len(chunk))
        window.positions = torch.arange(width)

        def logprobs() -> torch.Tensor:
            out = subject.model(input_ids=ids.to(subject.device), attention_mask=mask.to(subject.device),
                                use_cache=False)
            return torch.log_softmax(out.logits[:, :-1].float(), dim=-1).cpu()

        intact = logprobs()
        handles = row_hooks(subject.sites, [features[i] for i, _ in chunk], window, sae_for, mode="set")
        try:
            ablated = logprobs()
        finally:
            for handle in handles:
                handle.remove()
        targets = ids[:, 1:]
        positions = torch.arange(width - 1)[None, :]
        counted = (positions >= first[:, None]) & (mask[:, 1:] == 1)  # predictions of counted tokens' successors
        counted &= positions + 1 < torch.tensor([len(r.token_ids) for _, r in chunk])[:, None]
        loss_change = intact.gather(-1, targets[..., None])[..., 0] - ablated.gather(-1, targets[..., None])[..., 0]
        kl = (intact.exp() * (intact - ablated)).sum(-1)
        for j, (i, _) in enumerate(chunk):
            sums[i][0] += float(loss_change[j][counted[j]].sum())
            sums[i][1] += float(kl[j][counted[j]].sum())
            sums[i][2] += int(counted[j].sum())
    return [(loss / n, kl / n, n) if n else (float("nan"), float("nan"), 0) for loss, kl, n in sums]


def steered_continuations(subject, features: list[SelectedFeature], prompts: Sequence[str], settings: EffectsSettings,
                          sae_for, chat: bool | None = None) -> tuple[list[str], list[list[str]]]:
    """(baseline per prompt, steered[feature][prompt]): greedy, each batch of features side by side."""
    chat = uses_chat(subject.tokenizer, chat)
    stops = stop_ids(subject.model, subject.tokenizer)
    baselines, steered = [], [[] for _ in features]
    for prompt in prompts:
        ids = prompt_ids(subject.tokenizer, prompt, chat)
        bos = getattr(subject.tokenizer, "bos_token_id", None)
        first = 1 if bos is not None and ids[0] == bos else 0
        plain = TokenWindow("both", len(ids), first)
        baselines.append(continue_prompt(subject.model, subject.tokenizer, ids, settings.n_tokens, 0.0, 0, plain,
                                         subject.device, stops)[0].text)
        for start in range(0, len(features), settings.batch_size):
            chunk = features[start:start + settings.batch_size]
            window = TokenWindow("both", len(ids), first, rows=(True,) * len(chunk))
            handles = row_hooks(subject.sites, list(chunk), window, sae_for)
            try:
                texts = continue_prompt(subject.model, subject.tokenizer, ids, settings.n_tokens, 0.0, 0, window,
                                        subject.device, stops)
            finally:
                for handle in handles:
                    handle.remove()
            for i, text in enumerate(texts):
                steered[start + i].append(text.text)
    return baselines, steered


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def token_overlap(tokens: Sequence[str], description: str) -> float | None:
    """The share of promoted tokens (as words of 2+ letters or digits) that the description names."""
    words = set(re.findall(r"\w+", description.lower()))
    names = [t.strip().lower() for t in tokens if len(re.sub(r"\W", "", t)) >= 2]
    if not names:
        return None
    return sum(re.sub(r"\W", "", name) in words for name in names) / len(names)


def partition_effects(steerer, partition: Partition, settings: EffectsSettings, encoder,
                      log: Log = print) -> pl.DataFrame:
    """The description_effects rows of one layer x polarity: every feature with a selected description."""
    from neuron_assets.exemplars import load_feature_exemplars

    layer, polarity = partition.layer, Polarity(partition.polarity)
    store = steerer.store
    if not store.exists("neuron_descriptions", layer, polarity.value):
        log(f"layer {layer} {polarity.value}: no selected descriptions, no effects")
        return pl.DataFrame()
    described = store.read("neuron_descriptions", layer, polarity.value)
    if "kind" not in described.columns:
        described = described.with_columns(pl.lit("neuron").alias("kind"))
    described = described.filter(pl.col("description").is_not_null()).sort("kind", "neuron")
    if described.height == 0:
        return pl.DataFrame()
    rows = list(described.iter_rows(named=True))
    features = [FeatureId(layer, int(r["neuron"]), polarity, r["kind"] or "neuron") for r in rows]
    up = steerer.select(SteerRequest("effects", features=tuple(SteerFeature(f) for f in features),
                                     strength=settings.strength))
    ablate = steerer.select(SteerRequest("effects", features=tuple(SteerFeature(f) for f in features), mode="ablate"))
    subject = steerer.subject

    exemplars = {}
    for kind in sorted({f.kind for f in features}):
        for fe in load_feature_exemplars(store, layer, polarity, [f.index for f in features if f.kind == kind], kind=kind):
            exemplars[(kind, fe.feature.index)] = [e.record for e in fe.top(Split.TEST)[:settings.exemplars]]
    ablation = ablation_effects(subject, ablate, [exemplars.get((a.feature.kind, a.feature.index), []) for a in ablate],
                                steerer.sae_for, settings.batch_size)
    baselines, steered = steered_continuations(subject, up, settings.prompts, settings, steerer.sae_for)

    descriptions = [str(r["description"]) for r in rows]
    controls = [r.get("control_description") for r in rows]
    if any(c is None for c in controls):  # no control in the table: the next feature's description
        controls = [c if c is not None else descriptions[(i + 1) % len(descriptions)] for i, c in enumerate(controls)]
    promoted = read_promoted(store, layer, polarity.value, settings.output_tokens)
    promoted_lists = [promoted.get((f.kind, f.index), []) for f in features]
    texts = descriptions + [str(c) for c in controls] + baselines + [t for per in steered for t in per] + \
        [", ".join(p) for p in promoted_lists]
    vectors = np.asarray(encoder(texts), dtype=np.float32)
    n, p = len(rows), len(baselines)
    e_desc, e_ctrl = vectors[:n], vectors[n:2 * n]
    e_base = vectors[2 * n:2 * n + p]
    e_steer = vectors[2 * n + p:2 * n + p + n * p].reshape(n, p, -1)
    e_prom = vectors[2 * n + p + n * p:]

    out = []
    for i, feature in enumerate(features):
        moved = [e_steer[i, j] - e_base[j] for j in range(p)]
        changed = sum(steered[i][j] != baselines[j] for j in range(p)) / p if p else 0.0
        has_tokens = bool(promoted_lists[i])
        out.append(FeatureEffect(
            feature, *ablation[i], up[i].value,
            float(np.mean([cosine(m, e_desc[i]) for m in moved])) if p else None,
            float(np.mean([cosine(m, e_ctrl[i]) for m in moved])) if p else None, changed,
            cosine(e_prom[i], e_desc[i]) if has_tokens else None, cosine(e_prom[i], e_ctrl[i]) if has_tokens else None,
            token_overlap(promoted_lists[i], descriptions[i]) if has_tokens else None))
    log(f"layer {layer} {polarity.value}: effects of {n} descriptions")
    return effects_frame(out, rows, settings)


def read_promoted(store: Store, layer: int, polarity: str, top: int) -> dict[tuple[str, int], list[str]]:
    if not store.exists("output_tokens", layer, polarity):
        return {}
    table = store.read("output_tokens", layer, polarity).filter(pl.col("rank") < top).sort("rank")
    if "kind" not in table.columns:
        table = table.with_columns(pl.lit("neuron").alias("kind"))
    out: dict[tuple[str, int], list[str]] = {}
    for row in table.iter_rows(named=True):
        out.setdefault((row["kind"], int(row["neuron"])), []).append(row["token"])
    return out


def effects_frame(effects: list[FeatureEffect], rows: list[dict], settings: EffectsSettings) -> pl.DataFrame:
    nan = lambda v: None if v is None or (isinstance(v, float) and np.isnan(v)) else v  # noqa: E731
    return pl.DataFrame({
        "kind": [e.feature.kind for e in effects], "neuron": [e.feature.index for e in effects],
        "description": [r["description"] for r in rows], "test_score": [r.get("test_score") for r in rows],
        "ablation_loss_delta": [nan(e.ablation_loss_delta) for e in effects],
        "ablation_kl": [nan(e.ablation_kl) for e in effects], "ablation_tokens": [e.ablation_tokens for e in effects],
        "steer_value": [e.steer_value for e in effects], "agreement": [e.agreement for e in effects],
        "control_agreement": [e.control_agreement for e in effects],
        "agreement_beats_control": [None if e.agreement is None else e.agreement > e.control_agreement for e in effects],
        "changed_share": [e.changed_share for e in effects],
        "output_token_similarity": [e.output_token_similarity for e in effects],
        "output_token_control": [e.output_token_control for e in effects],
        "output_token_overlap": [e.output_token_overlap for e in effects],
        "n_prompts": [len(settings.prompts)] * len(effects), "n_tokens": [settings.n_tokens] * len(effects),
    }, schema_overrides={"test_score": pl.Float64, "ablation_loss_delta": pl.Float64, "ablation_kl": pl.Float64,
                         "agreement": pl.Float64, "control_agreement": pl.Float64,
                         "output_token_similarity": pl.Float64, "output_token_control": pl.Float64,
                         "output_token_overlap": pl.Float64})


@dataclass(frozen=True)
class EffectsWritten:
    layer: int
    polarity: str
    path: Path | None
    rows: int
    seconds: float


def make_description_effects(config, partitions: list, run_id: str, settings: EffectsSettings | None = None,
                             encoder=None, log: Log = print, steerer=None, on_partition=None) -> list[EffectsWritten]:
    """The description_effects stage: each partition's effects, written in turn
    (``on_partition(partition, files)`` hears of each as it is done); settings from the
    config's ``effects`` section unless given."""
    from neuron_assets.steer.steerer import Steerer

    settings = settings or EffectsSettings.of(config.effects)
    steerer = steerer or Steerer(config)
    if encoder is None:
        from neuron_assets.embedding import sentence_encoder

        encoder = sentence_encoder(config.search.embedding_model)
    written = []
    for partition in map(Partition.of, partitions):
        started = time.perf_counter()
        frame = partition_effects(steerer, partition, settings, encoder, log)
        path = None
        if frame.height:
            frame = with_lineage(frame, config.subject.model, config.hash, run_id)
            path = steerer.store.write(EFFECTS_TABLE, frame, partition.layer, Polarity(partition.polarity).value)
        written.append(EffectsWritten(partition.layer, Polarity(partition.polarity).value, path, frame.height,
                                      time.perf_counter() - started))
        if on_partition is not None:
            on_partition(partition, [path] if path is not None else [])
    return written
