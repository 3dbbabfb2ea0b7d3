"""Confirming unigram features in scrambled context (delphi's context-independence filter).

The exemplar pass flags a feature as a unigram *candidate* when at most
``exemplars.unigram_tokens`` distinct tokens carry the strongest 80% of its activating sampled
train tokens. That alone cannot tell a feature that reads a token from one that reads the
token in a context the corpus always gives it (" more" only ever comes after "then 57" in
some corpus; a feature of "more after then" looks like a feature of "more"). So each
candidate is *confirmed* only when its activation survives its top tokens placed in
scrambled context:

- its top tokens are the distinct tokens carrying the most activation mass (the sum of
  activations above the activating threshold) in its train top and quantile exemplars, at
  most :data:`TOP_TOKENS`; its *typical* activation on each is the median over those
  activating occurrences;
- each top token is planted ``exemplars.unigram_contexts`` times into *probe* sequences: a
  real train sequence's prefix (the chat header, when the corpus has one) followed by tokens
  drawn at random from the train split's counted tokens, with tokens planted at every
  :data:`PLANT_SPACING`-th position from :data:`FIRST_PLANT` on (so a planted token's
  nearest predecessors are random tokens); two tokens of one candidate never share a probe,
  so one cannot lend the other its context;
- one forward pass over the probes (in the subject's batch size, stopping after the deepest
  candidate layer) reads every candidate of every layer at the planted positions through the
  site readers the exemplar pass uses (an SAE latent is encoded from the same site input);
  with ``exemplars.prefix_cache`` the probes' shared prefix runs once, as in the exemplar pass
  (:mod:`neuron_assets.features.prefix_cache`);
- ``unigram_survival`` = sum over top tokens of mass x mean probe activation / sum of mass x
  typical activation; the candidate is ``unigram_confirmed`` when it reaches
  ``exemplars.unigram_survival``.

Everything random is drawn from ``seed``: the same corpus and candidates give the same probes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from neuron_assets.config import ExemplarsConfig
from neuron_assets.features.prefix_cache import PrefixCache
from neuron_assets.features.selection import NEURON_KIND
from neuron_assets.features.sites import site_reader
from neuron_assets.types import Polarity

TOP_TOKENS = 3  # top tokens planted per candidate
FIRST_PLANT = 8  # random tokens after the prefix before a probe's first planted token
PLANT_SPACING = 4  # planted tokens are this far apart, so the 3 tokens before each are random
FILLER_SEQUENCES = 4096  # train sequences whose counted tokens are the random tokens drawn from
CONFIRMATION_COLUMNS = {"unigram_survival": pl.Float32, "unigram_confirmed": pl.Boolean}


@dataclass(frozen=True)
class UnigramCandidate:
    """A feature flagged as a unigram candidate, with what its real exemplars say about its top tokens."""

    layer: int
    polarity: Polarity
    kind: str  # "neuron" or "sae"
    index: int  # within its kind
    tokens: tuple[int, ...]  # top tokens, most activation mass first
    typical: tuple[float, ...]  # median activation (times the polarity's sign) where each activates
    mass: tuple[float, ...]  # activation mass each carries

    @property
    def key(self) -> tuple[int, str, str, int]:
        return self.layer, self.polarity.value, self.kind, self.index


def unigram_candidates(exemplars: pl.DataFrame, stats: pl.DataFrame, sequences: pl.DataFrame, layer: int,
                       polarity: Polarity, config: ExemplarsConfig) -> list[UnigramCandidate]:
    """The candidates of one layer x polarity (stats rows with ``is_unigram``), each with its
    top tokens from its train top and quantile exemplars. ``exemplars`` and ``stats`` are the
    collector's tables (``kind`` and ``sample`` columns); ``sequences`` needs seq_id,
    token_ids and prefix_len."""
    polarity = Polarity(polarity)
    flagged = stats.filter(pl.col("is_unigram")).select("kind", "neuron", "max")
    if flagged.height == 0:
        return []
    threshold = config.activating_fraction * pl.col("max").clip(lower_bound=0.0)
    value = pl.col("activations").cast(pl.Float32) * polarity.sign
    tokens = (
        exemplars.lazy()
        .filter((pl.col("split") == "train") & pl.col("sample").is_in(["top", "quantile"]))
        .join(flagged.lazy(), on=["kind", "neuron"])
        .unique(["kind", "neuron", "seq_id"], keep="first", maintain_order=True)  # top and quantile may share one
        .select("kind", "neuron", "max", "seq_id", "activations")
        .join(sequences.lazy().select("seq_id", "token_ids", "prefix_len"), on="seq_id")
        .with_columns(position=pl.int_ranges(0, pl.col("activations").list.len()))
        .explode("activations", "token_ids", "position")
        .filter((pl.col("position") >= pl.col("prefix_len")) & (value > threshold))
        .group_by("kind", "neuron", "token_ids")
        .agg(mass=value.sum(), typical=value.median())
        .sort("kind", "neuron", "mass", "token_ids", descending=[False, False, True, False])
        .group_by("kind", "neuron", maintain_order=True)
        .head(TOP_TOKENS)
        .group_by("kind", "neuron", maintain_order=True)
        .agg("token_ids", "typical", "mass")
        .collect()
    )
    found = {(row["kind"], row["neuron"]): row for row in tokens.iter_rows(named=True)}
    candidates = []
    for kind, index in flagged.select("kind", "neuron").iter_rows():
        row = found.get((kind, index))  # none only when no exemplar shows it activating
        candidates.append(UnigramCandidate(
            layer, polarity, kind, int(index),
            tuple(int(t) for t in row["token_ids"]) if row else (),
            tuple(float(t) for t in row["typical"]) if row else (),
            tuple(float(m) for m in row["mass"]) if row else ()))
    return candidates


@dataclass(eq=False)  # probes are told apart by identity (open probes are removed from a list)
class _Probe:
    prefix: np.ndarray  # the template's prefix token ids
    length: int  # tokens, prefix included
    slots: list[int]  # free positions to plant at
    planted: dict[int, int]  # position -> token id
    owners: set[int]  # candidates whose tokens it holds
    filler: np.ndarray | None = None  # the random tokens after the prefix, drawn once all are packed


def confirm_unigrams(subject, sequences: pl.DataFrame, candidates: list[UnigramCandidate], saes: dict,
                     config: ExemplarsConfig, batch_size: int, seed: int) -> pl.DataFrame:
    """One row per candidate: layer, polarity, kind, neuron, unigram_survival (null when its
    exemplars show no activating token), unigram_confirmed. ``saes`` is the exemplar pass's
    layer -> :class:`neuron_assets.features.selection.SaeLatents`; ``sequences`` needs seq_id, split,
    token_ids, prefix_len and n_tokens."""
    schema = {"layer": pl.Int16, "polarity": pl.String, "kind": pl.String, "neuron": pl.Int32, **CONFIRMATION_COLUMNS}
    if not candidates:
        return pl.DataFrame(schema=schema)
    probes = _probes(sequences, candidates, config.unigram_contexts, seed)
    kept = _mean_planted(subject, probes, candidates, saes, batch_size, PrefixCache(subject, config.prefix_cache))  # candidate -> mean activation per top token
    rows = []
    for number, candidate in enumerate(candidates):
        survival = None
        if candidate.tokens:
            mass, typical = np.asarray(candidate.mass), np.asarray(candidate.typical)
            expected = float((mass * typical).sum())
            survival = float((mass * kept[number]).sum()) / expected if expected > 0 else None
        rows.append({"layer": candidate.layer, "polarity": candidate.polarity.value, "kind": candidate.kind,
                     "neuron": candidate.index, "unigram_survival": survival,
                     "unigram_confirmed": survival is not None and survival >= config.unigram_survival})
    return pl.DataFrame(rows, schema=schema)


def with_confirmation(stats: pl.DataFrame, confirmed: pl.DataFrame | None) -> pl.DataFrame:
    """A layer x polarity's stats with unigram_survival and unigram_confirmed (null where the
    feature is not a candidate) after unigram_tokens, and ``is_unigram`` = confirmed.
    ``confirmed`` None (exemplars.unigram_contexts 0) leaves the candidates flagged, unconfirmed."""
    if confirmed is None:
        frame = stats.with_columns(*(pl.lit(None, dtype=dtype).alias(name) for name, dtype in CONFIRMATION_COLUMNS.items()))
    else:
        frame = (stats.join(confirmed.select("kind", "neuron", *CONFIRMATION_COLUMNS), on=["kind", "neuron"], how="left")
                 .with_columns(is_unigram=pl.col("unigram_confirmed").fill_null(False)))
    order = list(stats.columns)
    at = order.index("unigram_tokens") + 1
    order[at:at] = list(CONFIRMATION_COLUMNS)
    return frame.select(order)


def _probes(sequences: pl.DataFrame, candidates: list[UnigramCandidate], contexts: int, seed: int) -> list[_Probe]:
    """Probe sequences holding every top token ``contexts`` times, packed first-fit."""
    rng = np.random.default_rng([seed, 0x756E69])
    train = sequences.filter(pl.col("split") == "train").sort("seq_id")
    if train.height == 0:
        raise ValueError("the corpus has no train sequences to draw the unigram probes' random context from")
    counted = (train["n_tokens"] - train["prefix_len"]).to_numpy()
    first = min(FIRST_PLANT, max(int(counted.max()) - 1, 0))
    usable = np.flatnonzero(counted > first)
    drawn = rng.choice(usable, size=min(len(usable), FILLER_SEQUENCES), replace=False)
    filler = np.concatenate([np.asarray(ids[prefix:], dtype=np.int64) for ids, prefix in
                             zip(train["token_ids"].gather(drawn).to_list(), train["prefix_len"].gather(drawn).to_list())])
    owners: dict[int, set[int]] = {}
    for number, candidate in enumerate(candidates):
        for token in candidate.tokens:
            owners.setdefault(token, set()).add(number)
    plantings = [token for token in sorted(owners) for _ in range(contexts)]
    rng.shuffle(plantings)
    template_ids, template_prefix = train["token_ids"], train["prefix_len"].to_numpy()
    lengths = train["n_tokens"].to_numpy()
    probes: list[_Probe] = []
    open_probes: list[_Probe] = []
    for token in plantings:
        token = int(token)
        probe = next((p for p in open_probes if token not in p.planted.values() and owners[token].isdisjoint(p.owners)),
                     None)
        if probe is None:
            row = int(rng.choice(usable))
            prefix = int(template_prefix[row])
            ids = np.asarray(template_ids[row][:prefix], dtype=np.int64)
            slots = list(range(prefix + first, int(lengths[row]), PLANT_SPACING))
            probe = _Probe(ids, int(lengths[row]), slots, {}, set())
            probes.append(probe)
            open_probes.append(probe)
        probe.planted[probe.slots.pop(0)] = token
        probe.owners |= owners[token]
        if not probe.slots:
            open_probes.remove(probe)
    for probe in probes:  # the random context, drawn once per probe, which ends at its last planted token
        probe.length = max(probe.planted) + 1
        probe.filler = rng.choice(filler, size=probe.length - len(probe.prefix))
    return probes


def _mean_planted(subject, probes: list[_Probe], candidates: list[UnigramCandidate], saes: dict,
                  batch_size: int, prefix: PrefixCache) -> dict[int, np.ndarray]:
    """candidate number -> its mean activation (times its polarity's sign) where each of its top
    tokens was planted, from one pass over the probes. Only (planted position, candidate)
    pairs of the candidate's own tokens are gathered and summed, batch by batch, so host memory
    is O(candidates x tokens x contexts), not planted positions x candidates."""
    layers = sorted({c.layer for c in candidates if c.tokens})
    if not layers:
        return {}
    widths = {layer: subject.neurons_per_layer(layer) for layer in layers}

    def axis_position(c: UnigramCandidate) -> int:  # the collector's feature axis: latents after the neurons
        return c.index if c.kind == NEURON_KIND else widths[c.layer] + c.index

    positions = {layer: sorted({axis_position(c) for c in candidates if c.layer == layer and c.tokens})
                 for layer in layers}
    column = {layer: {p: i for i, p in enumerate(positions[layer])} for layer in layers}
    # planted positions in the order hidden[planted] reads them: probe by probe, position ascending
    planted_tokens = np.array([probe.planted[p] for probe in probes for p in sorted(probe.planted)], dtype=np.int64)
    rows_of: dict[int, np.ndarray] = {}
    order = np.argsort(planted_tokens, kind="stable")
    tokens, starts = np.unique(planted_tokens[order], return_index=True)
    for token, lo, hi in zip(tokens.tolist(), starts.tolist(), [*starts[1:].tolist(), len(order)]):
        rows_of[token] = order[lo:hi]
    pairs: list[tuple[int, int]] = []  # pair id -> (candidate number, token slot)
    gathers: dict[int, list[tuple[np.ndarray, int, int, int]]] = {layer: [] for layer in layers}
    for number, candidate in enumerate(candidates):
        for slot, token in enumerate(candidate.tokens):
            gathers[candidate.layer].append((rows_of[token], column[candidate.layer][axis_position(candidate)],
                                             len(pairs), candidate.polarity.sign))
            pairs.append((number, slot))
    triplets = {}  # layer -> (rows, columns, pair ids, signs), sorted by row
    for layer, parts in gathers.items():
        rows = np.concatenate([r for r, _, _, _ in parts])
        cols = np.concatenate([np.full(len(r), c, dtype=np.int64) for r, c, _, _ in parts])
        ids = np.concatenate([np.full(len(r), i, dtype=np.int64) for r, _, i, _ in parts])
        signs = np.concatenate([np.full(len(r), sign, dtype=np.float32) for r, _, _, sign in parts])
        by_row = np.argsort(rows, kind="stable")
        triplets[layer] = (rows[by_row], cols[by_row], ids[by_row], signs[by_row])
    sums = np.zeros(len(pairs))
    counts = np.zeros(len(pairs))
    pad = subject.tokenizer.pad_token_id if subject.tokenizer.pad_token_id is not None else 0
    first_row = 0
    for start in range(0, len(probes), batch_size):
        batch = probes[start:start + batch_size]
        width = max(p.length for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        planted = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, probe in enumerate(batch):
            sequence = np.concatenate([probe.prefix, probe.filler])
            for position, token in probe.planted.items():
                sequence[position] = token
                planted[row, position] = True
            ids[row, :probe.length] = torch.from_numpy(sequence)
            mask[row, :probe.length] = 1
        last_row = first_row + int(planted.sum())

        def readers_for(rows, start, planted=planted):  # the batch rows ``rows`` run from token ``start`` on
            return {layer: _candidate_reader(positions[layer], widths[layer], saes.get(layer), planted[rows, start:])
                    for layer in layers}

        prefix_len = np.array([len(probe.prefix) for probe in batch])
        captured = prefix.activations(ids, mask, prefix_len, {layer: None for layer in layers}, readers_for)
        for layer in layers:
            rows, cols, pair_ids, signs = triplets[layer]
            lo, hi = np.searchsorted(rows, [first_row, last_row])
            if hi == lo:
                continue
            at_planted = captured[layer][planted.to(captured[layer].device)]  # (planted tokens, columns), row-major
            device = at_planted.device
            values = at_planted[torch.from_numpy(rows[lo:hi] - first_row).to(device),
                                torch.from_numpy(cols[lo:hi]).to(device)]
            np.add.at(sums, pair_ids[lo:hi], values.float().cpu().numpy() * signs[lo:hi])
            np.add.at(counts, pair_ids[lo:hi], 1)
        first_row = last_row
    means = sums / np.maximum(counts, 1)
    kept: dict[int, list[float]] = {}
    for pair, (number, _) in enumerate(pairs):
        kept.setdefault(number, []).append(float(means[pair]))
    return {number: np.asarray(values) for number, values in kept.items()}


def _candidate_reader(positions: list[int], width: int, latents, planted: torch.Tensor):
    """The site's activations of the candidates, (rows, tokens, columns): neurons by index, SAE
    latents through the site reader the exemplar pass uses (encoding only the planted tokens,
    ``planted`` being the rows' and tokens' mask; the others read 0)."""
    if latents is not None and positions[-1] >= width:
        return site_reader(positions, width, latents, planted)
    index = torch.tensor(positions, dtype=torch.long)
    return lambda hidden: hidden.index_select(-1, index.to(hidden.device))
