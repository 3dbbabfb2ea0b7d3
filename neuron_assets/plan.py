"""Plans: what each stage will need (memory, device-hours, disk, explainer tokens, cost)
before a run, from the config and the model's shape alone (no weights are read).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from neuron_assets.config import Config
from neuron_assets.simulate import needs_checkpoint
from neuron_assets.types import Polarity

# The exemplar pass's own sizes (its state and tables per feature) are in neuron_assets.exemplars.plan.


# -- the model's shape --------------------------------------------------------------------

GATED_MODEL_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "olmo", "olmo2", "phi3"}


@dataclass(frozen=True)
class ModelShape:
    """What a plan needs to know about a transformer: its sizes, read from config.json."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    max_positions: int
    gated: bool  # SiLU-gated MLP (three projections) rather than two
    tied: bool  # the output head shares the embedding matrix
    causal: bool = True

    @classmethod
    def from_config_json(cls, path: str | os.PathLike) -> ModelShape:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise PlanError(f"no model config at {path}; pass --shape with a folder or config.json of the model")
        return cls.from_config_json_dict(json.loads(path.read_text()), str(path))

    @classmethod
    def from_config_json_dict(cls, raw: dict, path: str = "the model config") -> ModelShape:
        raw = raw.get("text_config", raw)

        def first(*names, default=None):
            for name in names:
                if raw.get(name) is not None:
                    return raw[name]
            if default is None:
                raise PlanError(f"{path} has none of {names}; it does not look like a transformer's config.json")
            return default

        hidden = int(first("hidden_size", "n_embd", "d_model"))
        model_type = str(raw.get("model_type", ""))
        heads = int(first("num_attention_heads", "n_head"))
        return cls(
            hidden=hidden,
            intermediate=int(first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
            layers=int(first("num_hidden_layers", "n_layer", "num_layers")),
            vocab=int(first("vocab_size")),
            heads=heads,
            kv_heads=int(first("num_key_value_heads", default=heads)),
            max_positions=int(first("max_position_embeddings", "n_positions", default=2048)),
            gated=model_type in GATED_MODEL_TYPES,
            tied=bool(raw.get("tie_word_embeddings", model_type in ("gpt2", "bert"))),
            causal=model_type not in ("bert", "roberta", "distilbert", "xlm-roberta"),
        )

    @property
    def neurons(self) -> int:
        return self.layers * self.intermediate

    @property
    def layer_params(self) -> int:
        kv = self.hidden // self.heads * self.kv_heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * kv
        return attention + (3 if self.gated else 2) * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def params(self) -> int:
        """All weights, the output head included."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * self.layer_params + self.hidden

    def params_through(self, layer: int) -> int:
        """Weights a forward pass uses up to layer ``layer``'s MLP (no output head)."""
        return self.vocab * self.hidden + (layer + 1) * self.layer_params

    def forward_workspace_bytes(self, batch: int, seq_len: int, act_bytes: int) -> int:
        """Transient memory of one inference forward pass: a layer's MLP intermediates and
        hidden-state copies, and attention scores where the kernel materializes them."""
        tokens = batch * seq_len
        mlp = tokens * self.intermediate * (3 if self.gated else 2) * act_bytes
        hidden = tokens * self.hidden * 6 * act_bytes
        scores = batch * self.heads * seq_len * seq_len * 4
        return mlp + hidden + scores


class PlanError(ValueError):
    """A plan that cannot be made; the message says what is missing."""


def find_model_shape(config: Config, config_path: str | os.PathLike | None = None,
                     shape_path: str | os.PathLike | None = None, model: str | None = None) -> tuple[ModelShape, str]:
    """The shape of ``model`` (default: the subject) and where it was read: ``shape_path``, a
    ``<config>.shape.json`` beside the config file, the model's local folder or builtin
    folder, or the local Hugging Face cache (config.json only, no weights)."""
    model = model or config.subject.model
    candidates: list[Path] = []
    if shape_path:
        candidates.append(Path(shape_path))
    if config_path and model == config.subject.model:
        config_path = Path(config_path)
        candidates.append(config_path.with_name(config_path.stem + ".shape.json"))
    if Path(model).expanduser().exists():
        candidates.append(Path(model).expanduser())
    for candidate in candidates:
        if candidate.exists():
            return ModelShape.from_config_json(candidate), str(candidate)
    if model.startswith("builtin:"):
        from neuron_assets.subject import resolve_model_path

        folder = resolve_model_path(model)
        return ModelShape.from_config_json(folder), folder
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
    except Exception:  # noqa: BLE001 - an odd name is "not cached", said below
        cached = None
    if isinstance(cached, str):
        return ModelShape.from_config_json(cached), cached
    raise PlanError(
        f"the shape of '{model}' is not known here: no config.json in a local folder, the Hugging Face cache, or "
        f"beside the config file. Fix: pass --shape PATH (a model folder or its config.json); the shape alone is "
        "enough, no weights are read"
    )


# -- devices and rates --------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    memory_gb: float
    bf16_tflops: float  # dense peak
    usd_per_hour: float
    memory_gb_per_s: float = 0.0  # weights read per second: the floor of a decoding step of few rows


DEVICES = {
    "h100": DeviceSpec("H100 80GB SXM", 80.0, 989.0, 2.5, 3350.0),
    "h200": DeviceSpec("H200 141GB", 141.0, 989.0, 3.5, 4800.0),
    "a100": DeviceSpec("A100 80GB", 80.0, 312.0, 1.5, 2039.0),
    "cpu": DeviceSpec("CPU", 16.0, 0.1, 0.0, 20.0),
}


@dataclass(frozen=True)
class Rates:
    """Throughput assumptions; each can be replaced by what a user measured."""

    subject_tokens_per_s: float | None = None  # bare forward of the subject; None: from FLOPs at mfu
    mfu: float = 0.55  # share of the device's bf16 peak a well-batched forward pass reaches
    collect_efficiency: float = 0.9  # one collecting pass / the bare forward pass (bench/activations.py)
    explain_prefill_tokens_per_s: float = 20000.0  # vLLM prompt tokens/s for an 8B model on one GPU
    explain_decode_tokens_per_s: float = 3000.0  # vLLM generated tokens/s, batched, 8B, one GPU
    activation_compression: float = 0.87  # zstd on float16 activations (measured, tests/test_plan.py)
    checkpoint_write_bytes_per_s: float = 1.5e9  # torch.save of the pass's state to a local NVMe disk


# -- the plan of every stage --------------------------------------------------------------


@dataclass(frozen=True)
class StagePlan:
    stage: str
    peak_device_bytes: int
    device_hours: float
    disk_bytes: int
    host_bytes: int = 0
    explainer_prompt_tokens: int = 0
    explainer_completion_tokens: int = 0
    usd: float = 0.0
    note: str = ""


@dataclass(frozen=True)
class Plan:
    model: str
    shape_source: str
    device: DeviceSpec
    features: int  # neurons and SAE latents
    polarities: int
    sequences: int
    tokens: int
    exemplar_pass: dict  # the collector's own plan (ExemplarPlan.as_dict), with its checkpoints' peak and written bytes
    stages: tuple[StagePlan, ...]
    reference: dict | None = None  # published costs of the same run, for comparison
    latents: int = 0  # of the features, SAE latents (described in the pos polarity only)

    @property
    def usd(self) -> float:
        return sum(s.usd for s in self.stages)

    @property
    def usd_per_neuron(self) -> float:
        return self.usd / max(self.features, 1)

    def fits(self) -> bool:
        return all(s.peak_device_bytes <= self.device.memory_gb * 1e9 for s in self.stages)

    def as_dict(self) -> dict:
        return {
            "model": self.model, "shape_source": self.shape_source, "device": asdict(self.device),
            "features": self.features, "latents": self.latents, "polarities": self.polarities,
            "sequences": self.sequences, "tokens": self.tokens,
            "exemplar_pass": self.exemplar_pass, "stages": [asdict(s) for s in self.stages],
            "usd": self.usd, "usd_per_neuron": self.usd_per_neuron, "fits_one_device": self.fits(),
            "reference": self.reference,
        }

    def table(self) -> str:
        gb = 1e9
        lines = [
            f"plan for {self.model} ({self.features:,} features"
            + (f" ({self.features - self.latents:,} neurons, {self.latents:,} SAE latents, pos only)" if self.latents else "")
            + f" x {self.polarities} polarities, {self.sequences:,} "
            f"sequences, {_count(self.tokens)} tokens) on one {self.device.name}; shape from {self.shape_source}",
            "",
            f"{'stage':<28} {'peak device GB':>14} {'device-hours':>12} {'disk GB':>9} {'host GB':>8} "
            f"{'explainer Mtok':>14} {'cost $':>10}",
        ]
        for s in self.stages:
            fits = "" if s.peak_device_bytes <= self.device.memory_gb * gb else " !"
            tokens = (s.explainer_prompt_tokens + s.explainer_completion_tokens) / 1e6
            lines.append(f"{s.stage:<28} {s.peak_device_bytes / gb:>12.1f}{fits:<2} {s.device_hours:>12.2f} "
                         f"{s.disk_bytes / gb:>9.2f} {s.host_bytes / gb:>8.1f} {tokens:>14.1f} {s.usd:>10.2f}")
        total_hours = sum(s.device_hours for s in self.stages)
        lines.append(f"{'total':<28} {'':>14} {total_hours:>12.2f} {sum(s.disk_bytes for s in self.stages) / gb:>9.2f} "
                     f"{'':>8} {sum(s.explainer_prompt_tokens + s.explainer_completion_tokens for s in self.stages) / 1e6:>14.1f} "
                     f"{self.usd:>10.2f}")
        lines.append(f"\ncost per feature: ${self.usd_per_neuron:.4f}; every stage fits one {self.device.name}: "
                     f"{'yes' if self.fits() else 'no (marked !)'}")
        passes = self.exemplar_pass
        lines.append(f"exemplar pass: {passes['passes']} pass(es), state {passes['state_bytes'] / gb:.1f} GB in all, "
                     f"device peak {passes['peak_device_bytes'] / gb:.1f} GB of collector state + captured activations")
        for s in self.stages:
            if s.note:
                lines.append(f"  {s.stage}: {s.note}")
        if self.reference:
            lines.append("\nside by side with Transluce's published run (Choi et al., 2024):")
            for key, (ours, theirs) in self.reference.items():
                lines.append(f"  {key:<34} ours {ours:<22} Transluce {theirs}")
        return "\n".join(lines)


def plan_run(config: Config, shape: ModelShape, shape_source: str = "given", device: str = "h100",
             rates: Rates | None = None, explainer_shape: ModelShape | None = None) -> Plan:
    """Predict every stage of ``config`` on one ``device`` (a key of DEVICES)."""
    import torch  # torch, only for the dtype's size and the pass's plan

    from neuron_assets.exemplars.plan import exemplar_rows_per_split, plan_exemplar_pass
    from neuron_assets.features.selection import select_neurons

    rates = rates or Rates()
    spec = DEVICES[device]
    if device == "cpu":
        import psutil

        spec = replace(spec, memory_gb=psutil.virtual_memory().total / 1e9)
    on_gpu = device != "cpu"
    dtype_name = config.subject.dtype if config.subject.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    act_bytes = torch.empty((), dtype=getattr(torch, dtype_name)).element_size()
    polarities = [Polarity(p) for p in config.features.polarities]
    neurons = select_neurons(config.features, shape.layers, lambda layer: shape.intermediate)
    latents = planned_latents(config, neurons, shape)  # layer -> latents described there
    # the collector's feature axis: a layer's latents follow its neurons and, like them, keep
    # state for every polarity; only their pos tables are written and described
    axis = {layer: list(indices) + list(range(shape.intermediate, shape.intermediate + latents.get(layer, 0)))
            for layer, indices in neurons.items()}
    n_latents = sum(latents.values())
    features = sum(len(v) for v in neurons.values()) + n_latents
    described = (features - n_latents) * len(polarities) + (n_latents if Polarity.POS in polarities else 0)
    corpus = config.corpus
    sequences = 3 * corpus.sequences_per_split
    tokens = sequences * corpus.seq_len  # windows are full length but for short documents and chats: an upper bound
    header, header_source = header_tokens(config)
    run_tokens, cache_note = tokens_run(config, shape, sequences, tokens, header, header_source)
    batch = config.subject.batch_size
    gb = 1e9

    # Exemplars: weights and the forward workspace first, the collector gets what is left.
    weights = shape.params_through(shape.layers - 1) * act_bytes  # AutoModel: the base model, no output head
    workspace = shape.forward_workspace_bytes(batch, corpus.seq_len, act_bytes)
    sae_latents_total = sae_latent_count(config, shape)
    # each layer's SAE sits on the device in float32; encoding a batch makes (tokens, latents) temporaries
    sae_resident = len(latents) * sae_param_count(shape.intermediate, sae_latents_total) * 4
    sae_encode = (batch * corpus.seq_len * sae_latents_total * 4 * SAE_ENCODE_TEMPORARIES) if latents else 0
    workspace += sae_resident + sae_encode
    budget = (int(config.exemplars.device_memory_gb * gb) if config.exemplars.device_memory_gb
              else int(spec.memory_gb * gb * 0.9) - weights - workspace)
    exemplar_plan = plan_exemplar_pass(axis, polarities, config.exemplars, corpus.seq_len, batch,
                                       "cuda" if on_gpu else "cpu", getattr(torch, dtype_name), budget_bytes=budget)
    flops_per_s = spec.bf16_tflops * 1e12 * rates.mfu
    pass_seconds = 0.0
    for group in exemplar_plan.groups:
        if rates.subject_tokens_per_s:
            seconds = run_tokens / rates.subject_tokens_per_s * (group.deepest + 1) / shape.layers
        else:
            seconds = run_tokens * 2 * shape.params_through(group.deepest) / flops_per_s
        # a top-k SAE computes every latent of every counted token it encodes
        seconds += sum(tokens * 2 * shape.intermediate * sae_latents_total
                       for layer in group.neurons if layer in latents) / flops_per_s
        pass_seconds += seconds / rates.collect_efficiency
    rows_per_feature = 3 * exemplar_rows_per_split(config.exemplars, corpus.sequences_per_split)  # per feature x polarity
    row_bytes = corpus.seq_len * 2 * rates.activation_compression + ROW_OVERHEAD_BYTES
    lens = config.exemplars.output_tokens  # the logit lens's output_tokens table (a causal LM's)
    files = (2 + (lens > 0)) * len(neurons) * len(polarities)  # exemplars, neuron_stats, output_tokens per partition
    exemplar_disk = int(described * rows_per_feature * row_bytes + described * STATS_ROW_BYTES
                        + described * lens * OUTPUT_TOKEN_ROW_BYTES + files * PARQUET_FILE_BYTES)
    # Checkpoints: a progress save every checkpoint_every batches writes the split being read (the
    # train statistics with it), each finished split is written once, and the tables of every
    # group but the last once. At their largest they hold a group's finished splits beside the
    # last progress file's temporary copy, and the tables of the groups done (an upper bound).
    saves = -(-corpus.sequences_per_split // batch) // config.exemplars.checkpoint_every + 1  # per split
    largest = max(g.features for g in exemplar_plan.groups)
    group_state = largest * exemplar_plan.feature_state_bytes
    kept_tables = int(exemplar_disk * (1 - exemplar_plan.groups[-1].features / exemplar_plan.features))
    progress_copy = largest * exemplar_plan.split_state_bytes if saves > 1 else 0  # no progress save, no copy
    checkpoint_peak = group_state + progress_copy + kept_tables
    checkpoint_written = saves * exemplar_plan.state_bytes + kept_tables
    pass_seconds += checkpoint_written / rates.checkpoint_write_bytes_per_s
    token_ids = sequences * corpus.seq_len * 4 * 2  # int32 ids in the sequences table, and a padded copy of them
    stages = [
        StagePlan("corpus", 0, 0.0, int(sequences * corpus.seq_len * SEQUENCE_BYTES_PER_TOKEN),
                  host_bytes=token_ids, note="tokenizing is CPU work"),
        StagePlan("exemplars", weights + workspace + exemplar_plan.peak_device_bytes, pass_seconds / 3600, exemplar_disk,
                  host_bytes=exemplar_plan.peak_host_bytes + token_ids,
                  note=f"{exemplar_plan.passes} pass(es) over {_count(tokens)} tokens at "
                       + (f"{rates.subject_tokens_per_s:,.0f} tokens/s measured" if rates.subject_tokens_per_s
                          else f"{rates.mfu:.0%} of bf16 peak") + f", collection at {rates.collect_efficiency:.0%} of the bare pass; "
                       f"checkpoints up to {_size(checkpoint_peak)} of scratch disk, {_size(checkpoint_written)} written in "
                       f"all ({checkpoint_written / rates.checkpoint_write_bytes_per_s / 60:.1f} min at "
                       f"{rates.checkpoint_write_bytes_per_s / gb:.1f} GB/s; exemplars.checkpoint_every sets how often); "
                       + cache_note),
    ]
    if config.sae.layers:
        stages.insert(1, _sae_stage(config, shape, spec, rates, act_bytes))
    stages += _explain_and_score_stages(config, shape, explainer_shape, described, spec, rates, act_bytes)
    if config.effects.in_run:
        stages.append(_effects_stage(config, shape, described, spec, rates, act_bytes))
    plan = Plan(model=config.subject.model, shape_source=shape_source, device=spec, features=features,
                polarities=len(polarities), sequences=sequences, tokens=tokens,
                exemplar_pass=dict(exemplar_plan.as_dict(), checkpoint_peak_bytes=checkpoint_peak,
                                   checkpoint_written_bytes=checkpoint_written),
                stages=tuple(_priced(s, spec) for s in stages), latents=n_latents)
    if _is_llama31_8b(shape):
        plan = replace(plan, reference=_transluce_reference(plan))
    return plan


CHAT_TEMPLATE_TOKENS = 30
"""A chat template's own tokens in the header, when the subject's tokenizer is not at hand to
count them (Llama 3.1's, with its knowledge-date system turn and an empty user turn: about 30)."""


def header_tokens(config: Config) -> tuple[int, str]:
    """Tokens of the header before every text window (corpus.chat_prefix, or BOS and
    corpus.prefix), and where the number comes from: counted with the subject's tokenizer when
    it is in the local cache (nothing is downloaded), else estimated."""
    from neuron_assets.corpus import CorpusError, chat_header
    from neuron_assets.subject import SubjectError, load_tokenizer

    corpus = config.corpus
    try:
        tokenizer = load_tokenizer(config.subject.model_copy(update={"allow_download": False}))
        if corpus.chat_prefix is not None:
            return len(chat_header(corpus.chat_prefix, tokenizer)[0]), "counted with the subject's tokenizer"
        text = tokenizer(corpus.prefix, add_special_tokens=False)["input_ids"] if corpus.prefix else []
        return 1 + len(text), "counted with the subject's tokenizer"
    except (SubjectError, CorpusError, OSError, ValueError):
        pass
    where = "estimated: the subject's tokenizer is not in the local cache"
    if corpus.chat_prefix is not None:
        text = (corpus.chat_prefix.system or "") + corpus.chat_prefix.user
        return CHAT_TEMPLATE_TOKENS + math.ceil(len(text) / 4), f"{where}; {CHAT_TEMPLATE_TOKENS} template tokens and the text at 4 characters a token"
    return 1 + math.ceil(len(corpus.prefix or "") / 4), f"{where}; BOS and the prefix at 4 characters a token"


def tokens_run(config: Config, shape: ModelShape, sequences: int, tokens: int, header: int,
               header_source: str) -> tuple[int, str]:
    """The tokens the exemplar pass runs through the model, and a note on the prefix cache:
    with exemplars.prefix_cache on a causal model, the header of every text window is run once
    per pass instead (chats keep theirs, all but a couple of leading special tokens, which
    this counts as run)."""
    corpus = config.corpus
    weights = sum(source.weight for source in corpus.sources)
    text_share = sum(source.weight for source in corpus.sources if not source.messages_field) / weights
    if not config.exemplars.prefix_cache:
        return tokens, f"exemplars.prefix_cache off: the {header}-token header ({header_source}) runs in every sequence"
    if not shape.causal:
        return tokens, "the full pass: an encoder attends both ways, so its header cannot be run once (no prefix cache)"
    skipped = int(sequences * text_share * header)
    return tokens - skipped, (f"prefix cache: the {header}-token header ({header_source}) of the {text_share:.0%} of "
                              f"sequences that are text windows runs once, so {_count(tokens - skipped)} of the "
                              f"{_count(tokens)} tokens are run ({skipped / tokens:.0%} fewer)")


# Sizes on disk (zstd Parquet), measured on the tiny test model's tables (tests/test_plan.py).
ROW_OVERHEAD_BYTES = 8  # per exemplar row beside its activations: extreme, seq_id, rank, bin, ids
STATS_ROW_BYTES = 48  # per neuron_stats row
OUTPUT_TOKEN_ROW_BYTES = 10  # per output_tokens row: token id, logit, the token string
PARQUET_FILE_BYTES = 4800  # per file: footer, schema, page headers and statistics of every column
SEQUENCE_BYTES_PER_TOKEN = 9  # int32 id + the token string, compressed
DESCRIPTION_TOKENS = 40  # a description as the simulator reads it
PROMPT_OVERHEAD_TOKENS = 450  # instructions and answer format of an explainer prompt
COMPLETION_TOKENS = 60  # a description without reasoning
COT_COMPLETION_TOKENS = 400
HIGHLIGHT_MARKUP = 1.25  # {{ }} around activating tokens and line breaks, per exemplar token


def _explain_and_score_stages(config, shape, explainer_shape, described, spec, rates, act_bytes) -> list[StagePlan]:
    """``described``: the feature x polarity pairs that get descriptions (SAE latents: pos only)."""
    gb = 1e9
    explain, sim, score = config.explain, config.simulate, config.score
    seq_len = config.corpus.seq_len
    prompts = described * explain.k
    shown = (explain.exemplars_min + explain.exemplars_max) / 2
    per_prompt = PROMPT_OVERHEAD_TOKENS + shown * seq_len * HIGHLIGHT_MARKUP * (2 if explain.few_shot else 1)
    prompt_tokens = int(prompts * per_prompt)
    completion_tokens = prompts * (COT_COMPLETION_TOKENS if explain.cot else COMPLETION_TOKENS)
    stages = []
    if explain.backend == "statistical":
        stages.append(StagePlan("explain", 0, 0.0, prompts * 200, note="statistical explainer: CPU, no LLM"))
    else:
        api = explain.backend == "openai" and not explain.base_url
        usd = (prompt_tokens * explain.usd_per_million_prompt_tokens
               + completion_tokens * explain.usd_per_million_completion_tokens) / 1e6
        if api:
            stages.append(StagePlan("explain", 0, 0.0, prompts * 200, explainer_prompt_tokens=prompt_tokens,
                                    explainer_completion_tokens=completion_tokens, usd=usd, note="hosted API"))
        else:
            scale = (explainer_shape.params / 8e9) if explainer_shape else 1.0
            hours = (prompt_tokens / rates.explain_prefill_tokens_per_s + completion_tokens / rates.explain_decode_tokens_per_s) * scale / 3600
            utilization = float(explain.engine_kwargs.get("gpu_memory_utilization", 0.9))
            stages.append(StagePlan("explain", int(utilization * spec.memory_gb * gb), hours, prompts * 200,
                                    explainer_prompt_tokens=prompt_tokens, explainer_completion_tokens=completion_tokens,
                                    usd=usd, note=f"vLLM preallocates gpu_memory_utilization={utilization} of the device"))

    # The fine-tuned simulator: Transluce's backbone is the subject itself.
    backbone = shape if sim.finetuned.backbone == config.subject.model else None
    training = sim.training
    # cross-fitting trains one simulator per fold, each on the sizes of simulate.training
    eval_pairs = described * (explain.k * (score.top_exemplars + score.random_exemplars)  # val, every candidate
                                          + 2 * (score.top_exemplars + score.random_exemplars))  # test: best + control
    eval_tokens = eval_pairs * (DESCRIPTION_TOKENS + seq_len)
    if "finetuned" in (sim.backend, *sim.compare_with) and backbone is not None:
        flops_per_s = spec.bf16_tflops * 1e12 * rates.mfu
        params = backbone.params
        full = params * 16  # bf16 weights + fp32 master, gradients and two Adam moments
        lora = params * 2 + int(params * 0.01) * 16  # frozen bf16 weights, ~1% trainable in fp32 with Adam
        batch_tokens = training.batch_size * (DESCRIPTION_TOKENS + seq_len)
        checkpointed = batch_tokens * backbone.hidden * backbone.layers * 2 * 2 + backbone.forward_workspace_bytes(
            training.batch_size, DESCRIPTION_TOKENS + seq_len, 2) * 2
        method, memory = ("full fine-tune", full) if full + checkpointed <= spec.memory_gb * gb else ("LoRA", lora)
        if needs_checkpoint(config):  # no training stage runs when simulate.finetuned.checkpoint is given
            disk = int(params * 2 if method == "full fine-tune" else params * 0.01 * 2)
            for stage in simulator_training_stages(training, seq_len, params, flops_per_s):
                stages.append(replace(stage, peak_device_bytes=memory + checkpointed, disk_bytes=disk,
                                      note=stage.note + f"; {method} with gradient checkpointing (a full fine-tune "
                                      f"with fp32 master weights and Adam needs {full / gb:.0f} GB)"))
        # pairs are batched up to batch_size x max_length padded tokens (simulate.finetuned.batch_size)
        pair_tokens = DESCRIPTION_TOKENS + seq_len
        sim_batch = max(sim.finetuned.batch_size, sim.finetuned.batch_size * sim.finetuned.max_length // pair_tokens)
        stages.append(StagePlan("simulation (scoring)", params * 2 + backbone.forward_workspace_bytes(
            sim_batch, DESCRIPTION_TOKENS + seq_len, 2), eval_tokens * 2 * params / flops_per_s / 3600,
            eval_pairs // max(1, score.top_exemplars + score.random_exemplars) * 64,
            note=f"{eval_pairs / 1e6:,.1f}M (description, exemplar) pairs, {eval_tokens / 1e9:,.1f}B tokens"))
    else:
        if "finetuned" in (sim.backend, *sim.compare_with) and needs_checkpoint(config):
            stages += simulator_training_stages(training, seq_len, _backbone_params(sim.finetuned),
                                                spec.bf16_tflops * 1e12 * rates.mfu)
        stages.append(StagePlan("simulation (scoring)", 0, 0.0, described * explain.k * 64,
                                note=f"{sim.backend} simulator on CPU; {eval_pairs / 1e6:,.2f}M pairs"))
    judges = [s for s in score.scorers if s in ("detection", "fuzzing")]
    if judges and explain.backend != "statistical":
        # score.judge_candidates of each feature (and its shuffled control), one prompt per
        # judge_batch examples of judge_examples activating + judge_quiet quiet ones
        candidates = explain.k if score.judge_candidates == "all" else min(score.judge_candidates, explain.k)
        examples = score.judge_examples + score.judge_quiet
        per_candidate = -(-examples // score.judge_batch)
        calls = described * (candidates + int(score.shuffled_control)) * len(judges) * per_candidate
        prompt = calls * (min(examples, score.judge_batch) * seq_len + PROMPT_OVERHEAD_TOKENS)
        completion = calls * min(examples, score.judge_batch) * 2
        scale = (explainer_shape.params / 8e9) if explainer_shape else 1.0
        hours = 0.0 if explain.backend == "openai" and not explain.base_url else \
            (prompt / rates.explain_prefill_tokens_per_s + completion / rates.explain_decode_tokens_per_s) * scale / 3600
        usd = (prompt * explain.usd_per_million_prompt_tokens + completion * explain.usd_per_million_completion_tokens) / 1e6
        utilization = float(explain.engine_kwargs.get("gpu_memory_utilization", 0.9))
        stages.append(StagePlan("judges (" + ", ".join(judges) + ")", int(utilization * spec.memory_gb * gb) if hours else 0,
                                hours, calls * 16, explainer_prompt_tokens=prompt, explainer_completion_tokens=completion,
                                usd=usd, note=f"{calls / 1e6:,.1f}M judge calls on {candidates} candidate(s) per feature"))
    return stages


# -- SAEs ----------------------------------------------------------------------------------

SAE_ENCODE_TEMPORARIES = 3  # (tokens, latents) float32 arrays alive while a batch is encoded: pre-activations, top-k, result
SAE_TRAIN_TEMPORARIES = 6  # the same in a training step, with their gradients
SAE_ADAM_BYTES = 16  # per float32 parameter: weight, gradient, two Adam moments
SAE_FLOPS_PER_TOKEN = 6  # x parameters: forward and backward of the encoder and the dense decoder


def sae_latent_count(config: Config, shape: ModelShape) -> int:
    """Latents of each layer's SAE: sae.expansion x the site's width (the MLP's intermediate size)."""
    return config.sae.expansion * shape.intermediate


def sae_param_count(d_in: int, d_latent: int) -> int:
    """W_enc, b_enc, W_dec, b_dec."""
    return 2 * d_in * d_latent + d_in + d_latent


def planned_latents(config: Config, neurons: dict[int, list[int]], shape: ModelShape) -> dict[int, int]:
    """layer -> SAE latents described there (sae.latents of each sae.layers layer the run collects)."""
    chosen = config.sae.latents
    if chosen is None or Polarity.POS.value not in config.features.polarities:
        return {}
    total = sae_latent_count(config, shape)
    count = total if chosen == "all" else (len(set(chosen)) if isinstance(chosen, list) else min(chosen.sample, total))
    return {layer: count for layer in sorted(set(config.sae.layers)) if layer in neurons}


def _sae_stage(config: Config, shape: ModelShape, spec: DeviceSpec, rates: Rates, act_bytes: int) -> StagePlan:
    """sae_checkpoint: per layer of sae.layers, stream the site's activations from the subject
    (with its LM head for a causal LM, for the reconstruction score) and train the SAE, or
    load one (sae.path); then measure it on sae.eval_sequences val sequences."""
    sae, corpus = config.sae, config.corpus
    layers = sorted(set(sae.layers))
    d_in, d_latent = shape.intermediate, sae_latent_count(config, shape)
    params = sae_param_count(d_in, d_latent)
    trained = not sae.path
    steps = sae.steps if trained else 0
    trained_tokens = steps * sae.batch_tokens
    batch = config.subject.batch_size
    # the subject: the whole causal LM (head included) for the reconstruction score
    subject = (shape.params if shape.causal else shape.params_through(shape.layers - 1)) * act_bytes
    workspace = shape.forward_workspace_bytes(batch, corpus.seq_len, act_bytes)
    logits = batch * corpus.seq_len * shape.vocab * 4 if shape.causal else 0  # the score's float32 loss
    block = 2 * min(sae.block_sequences, 3 * corpus.sequences_per_split) * corpus.seq_len * d_in * 4  # shuffled once
    step = sae.batch_tokens * (d_latent * SAE_TRAIN_TEMPORARIES + 4 * d_in) * 4
    memory = subject + workspace + max(logits, block + step if trained else 0) + params * (SAE_ADAM_BYTES if trained else 4)
    flops_per_s = spec.bf16_tflops * 1e12 * rates.mfu
    deepest = max(layers)
    eval_tokens = sae.eval_sequences * corpus.seq_len
    if rates.subject_tokens_per_s:
        forward = (trained_tokens + eval_tokens) / rates.subject_tokens_per_s * (deepest + 1) / shape.layers \
            + 2 * eval_tokens / rates.subject_tokens_per_s
    else:
        forward = ((trained_tokens + eval_tokens) * 2 * shape.params_through(deepest)
                   + 2 * eval_tokens * 2 * shape.params) / flops_per_s  # spliced and zero-ablated passes
    seconds = len(layers) * (forward + trained_tokens * SAE_FLOPS_PER_TOKEN * params / flops_per_s)
    # sae.safetensors; a trained one also keeps its resumable state (weights and two Adam moments)
    disk = len(layers) * (params * 4 * (4 if trained else 1) + d_latent * 8 + steps * 20 + 2 * PARQUET_FILE_BYTES)
    how = (f"trains {len(layers)} SAE(s) of {d_latent:,} latents ({sae.expansion}x, {sae.kind}) on "
           f"{trained_tokens:,} tokens each" if trained else f"loads {len(layers)} SAE(s) from {sae.path}")
    return StagePlan("sae_checkpoint", memory, seconds / 3600, disk, note=how)


EFFECTS_PROMPT_TOKENS = 30  # a neutral prompt through a chat template
EFFECTS_ROW_BYTES = 200  # per description_effects row: the description and a dozen numbers


def _effects_stage(config: Config, shape: ModelShape, described: int, spec: DeviceSpec, rates: Rates,
                   act_bytes: int) -> StagePlan:
    """description_effects: per feature, 2 forward passes over its effects.exemplars exemplars
    (intact, ablated); per prompt, a prefill and effects.n_tokens decoding steps for each batch
    of effects.batch_size features (one a row), and the prompt's baseline once per partition. A
    decoding step of a few rows reads every weight once: its floor is the weights over the
    device's memory bandwidth."""
    effects, seq = config.effects, config.corpus.seq_len
    prompts = len(effects.prompts)
    partitions = len(config.features.polarities) * (shape.layers if config.features.layers == "all"
                                                    else len(set(config.features.layers)))
    batches = -(-described // effects.batch_size) + partitions  # the baselines: one row a partition
    ablation_tokens = described * 2 * effects.exemplars * seq
    steered_tokens = (described + partitions) * prompts * (EFFECTS_PROMPT_TOKENS + effects.n_tokens)
    if rates.subject_tokens_per_s:
        compute = (ablation_tokens + steered_tokens) / rates.subject_tokens_per_s
    else:
        compute = (ablation_tokens + steered_tokens) * 2 * shape.params / (spec.bf16_tflops * 1e12 * rates.mfu)
    steps = batches * prompts * effects.n_tokens
    weights = shape.params * act_bytes
    floor = steps * weights / (spec.memory_gb_per_s * 1e9) if spec.memory_gb_per_s else 0.0
    rows = max(effects.exemplars, effects.batch_size)
    logits = 2 * effects.exemplars * seq * shape.vocab * 4  # intact and ablated log-probabilities, float32
    memory = weights + shape.forward_workspace_bytes(rows, seq, act_bytes) + logits
    disk = described * EFFECTS_ROW_BYTES + partitions * PARQUET_FILE_BYTES
    per_feature = 2 * effects.exemplars + prompts * effects.n_tokens / effects.batch_size
    return StagePlan("description_effects", memory, (compute + floor) / 3600, disk,
                     note=f"{described:,} features: {ablation_tokens:,} ablation tokens and {steps:,} decoding steps "
                          f"({per_feature:.1f} passes a feature: {2 * effects.exemplars} exemplar passes, "
                          f"{prompts} x {effects.n_tokens} steps shared by {effects.batch_size} features)")


def _priced(stage: StagePlan, spec: DeviceSpec) -> StagePlan:
    return replace(stage, usd=stage.usd + stage.device_hours * spec.usd_per_hour)


def _is_llama31_8b(shape: ModelShape) -> bool:
    return (shape.hidden, shape.intermediate, shape.layers, shape.vocab) == (4096, 14336, 32, 128256)


TRANSLUCE = {"exemplars_gpu_hours": 64 * 2, "simulation_gpu_hours": 2891, "usd_per_neuron": 0.046}
"""Choi et al. (2024): exemplars about 64 h on 2 A100s; simulation 2,891 GPU-hours; $0.046 per neuron."""


def _transluce_reference(plan: Plan) -> dict:
    by_stage = {s.stage: s for s in plan.stages}
    exemplars = by_stage["exemplars"]
    simulation = by_stage.get("simulation (scoring)")
    return {
        "exemplars (device-hours)": (f"{exemplars.device_hours:.1f} {plan.device.name}-hours",
                                     f"{TRANSLUCE['exemplars_gpu_hours']} A100-hours (64 h on 2 A100)"),
        "simulation (device-hours)": (f"{simulation.device_hours:.0f} {plan.device.name}-hours" if simulation else "-",
                                      f"{TRANSLUCE['simulation_gpu_hours']:,} GPU-hours"),
        "cost per neuron": (f"${plan.usd_per_neuron:.4f}", f"${TRANSLUCE['usd_per_neuron']}"),
    }


def _count(n: float) -> str:
    """A count as people read it: 30,720, 3.1M, 285M, 1.2B."""
    if n < 1e6:
        return f"{n:,.0f}"
    if n < 1e9:
        return f"{n / 1e6:,.1f}M" if n < 1e7 else f"{n / 1e6:,.0f}M"
    return f"{n / 1e9:,.1f}B"


def _size(n: float) -> str:
    """Bytes as people read them: 740 kB, 12 MB, 84.1 GB, 384 GB, 2.1 TB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 100 * scale else f"{n / scale:,.0f} {unit}"
    return f"{n / 1e3:,.0f} kB"


def simulator_training_stages(training, seq_len: int, params: float, flops_per_s: float) -> list[StagePlan]:
    """The fine-tuned simulator's two training stages: pairs and optimizer steps per fold
    simulator (every fold trains its own on these sizes), and the device-hours of all folds
    at 6 x weights FLOPs a token."""
    from neuron_assets.simulate.training import minimum_training_pairs

    out = []
    batch = training.batch_size * training.grad_accum_steps
    per_fold = (training.stage1_features + training.stage2_features) * training.exemplars_per_feature
    minimum = minimum_training_pairs(params)
    for name, features, epochs in (("stage 1", training.stage1_features, training.stage1_epochs),
                                   ("stage 2", training.stage2_features, training.stage2_epochs)):
        pairs = features * training.exemplars_per_feature
        steps = math.ceil(pairs * epochs / batch) if pairs else 0
        tokens = training.folds * pairs * epochs * (DESCRIPTION_TOKENS + seq_len)
        note = (f"{pairs:,} pairs ({features:,} features x {training.exemplars_per_feature} exemplars), {steps:,} steps "
                f"at batch {batch} per fold simulator, x{training.folds} folds")
        if name == "stage 1" and per_fold < minimum:
            note += (f"; below the {minimum:,} pairs per fold a {params / 1e6:,.0f}M-weight backbone needs to select "
                     "(simulate.training.selection_checks)")
        out.append(StagePlan(f"simulator training {name}", 0, tokens * 6 * params / flops_per_s / 3600 if flops_per_s
                             else 0.0, 0, note=note))
    return out


def _backbone_params(finetuned) -> float:
    """A simulator backbone's weights from its config.json (0 when it cannot be read here)."""
    from neuron_assets.simulate.training import backbone_parameters

    try:
        return float(backbone_parameters(finetuned))
    except (OSError, ValueError):
        return 0.0
