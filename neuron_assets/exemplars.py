"""Exemplars: per feature and polarity, the sequences that show what the feature does.

One streaming pass over the corpus, all layers at once, keeps on the model's device:

- the top-k sequences per split by per-sequence max (pos) or min (neg) activation;
- a uniform reservoir of *activating* sequences per split, from which activation-quantile
  (decile) samples are drawn at the end, as delphi's quantile sampler does;
- n random sequences per split, the same for every feature;
- running sums for mean / std / fraction active, and a uniform sample of train tokens,
  the same for every feature, for approximate quantiles.

Memory is O(features x (k x seq_len + token sample)), independent of corpus size; the split
being read stays on the device and finished splits move to host memory. The fixed prefix of
each sequence and the padding never count. Long runs checkpoint and resume.
"""

from __future__ import annotations

import hashlib
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from neuron_assets.config import ExemplarsConfig, FeaturesConfig
from neuron_assets.store import Store, atomic_path, set_aside
from neuron_assets.subject import SubjectError, SubjectModel
from neuron_assets.types import (
    ActivationRecord,
    Exemplar,
    ExemplarKind,
    FeatureExemplars,
    FeatureId,
    FeatureStats,
    Polarity,
    Split,
)

STAT_QUANTILES = (0.5, 0.9, 0.99, 0.999)


class Interrupted(RuntimeError):
    """Raised by a progress callback to stop a run; the last checkpoint is kept."""


def select_neurons(features: FeaturesConfig, num_layers: int, neurons_per_layer) -> dict[int, list[int]]:
    """layer -> sorted neuron indices, from features.layers and features.neurons.

    ``neurons_per_layer`` is a function layer -> count (layers may differ in width).
    """
    layers = list(range(num_layers)) if features.layers == "all" else sorted(set(features.layers))
    if not layers:
        raise SubjectError("features.layers is empty; list at least one layer or use 'all'")
    for layer in layers:
        if not 0 <= layer < num_layers:
            raise SubjectError(
                f"layer {layer} is out of range: the subject model has {num_layers} layers (0-{num_layers - 1}); "
                "fix features.layers"
            )
    chosen = {}
    for layer in layers:
        width = neurons_per_layer(layer)
        if features.neurons == "all":
            chosen[layer] = list(range(width))
        elif isinstance(features.neurons, list):
            bad = [n for n in features.neurons if not 0 <= n < width]
            if bad:
                raise SubjectError(f"neuron {bad[0]} is out of range: layer {layer} has {width} neurons; fix features.neurons")
            chosen[layer] = sorted(set(features.neurons))
        else:
            draw = random.Random(features.neurons.seed + layer)
            chosen[layer] = sorted(draw.sample(range(width), min(features.neurons.sample, width)))
    return chosen


def collect_exemplars(
    subject: SubjectModel,
    sequences: pl.DataFrame,
    neurons: dict[int, list[int]],
    polarities: list[Polarity],
    config: ExemplarsConfig,
    batch_size: int,
    seed: int = 0,
    checkpoint: Path | None = None,
    progress: bool = True,
    on_batch=None,
) -> dict[tuple[int, Polarity], tuple[pl.DataFrame, pl.DataFrame]]:
    """(layer, polarity) -> (exemplars table, neuron_stats table), from one pass over the corpus.

    ``checkpoint`` is a file the run saves its state to every ``config.checkpoint_every``
    batches and resumes from when it is there and matches this run. ``on_batch(n_done)`` is
    called after each batch (progress reporting; it may raise to stop the run).
    """
    if sequences.height == 0:
        raise ValueError("the sequences table is empty; build the corpus first (the 'corpus' asset)")
    subject.check_layers(list(neurons))
    layout = _FeatureLayout(neurons)
    seq_len = int(sequences["n_tokens"].max())
    batches = _plan_batches(sequences, batch_size)
    random_ids = _random_sequence_ids(sequences, config.random_per_split, seed)
    signature = _signature(subject.name, sequences, neurons, polarities, config, batch_size, seed)

    state = _CollectorState.fresh(layout.total, polarities, config, seq_len, random_ids, subject.device, subject.dtype)
    start = 0
    saved = load_checkpoint(checkpoint, signature) if checkpoint is not None else None
    if saved is not None:
        state = _CollectorState.from_saved(saved["state"], subject.device)
        start = saved["batches_done"]
        for split in {batches[i][0] for i in range(start)} - {batches[start][0]}:
            state.offload(split)  # finished before the checkpoint: back to host memory

    neuron_index = {  # None reads a whole layer without a copy
        layer: None if idx == list(range(subject.neurons_per_layer(layer))) else torch.tensor(idx, dtype=torch.long)
        for layer, idx in neurons.items()
    }
    bar = tqdm(total=len(batches), initial=start, desc="activations", unit="batch", disable=not progress)
    for batch_no in range(start, len(batches)):
        split, rows = batches[batch_no]
        ids, mask, counted, seq_ids = _batch_tensors(sequences, rows, seq_len, subject.tokenizer)
        per_layer = subject.activations(ids, mask, neuron_index)
        acts = torch.cat([per_layer[layer] for layer in layout.layers], dim=-1)  # (B, T, F)
        counted = counted.to(acts.device)
        acts = acts.masked_fill(~counted.unsqueeze(-1), 0)
        state.update(split, acts, counted, seq_ids.to(acts.device), _batch_keys(seed, batch_no, len(rows), seq_len))
        bar.update(1)
        done = batch_no + 1
        if done == len(batches) or batches[done][0] != split:
            state.offload(split)  # a finished split's exemplars wait in host memory
        if checkpoint is not None and done % config.checkpoint_every == 0 and done < len(batches):
            with atomic_path(checkpoint) as tmp:
                torch.save({"signature": signature, "batches_done": done, "state": state.to_saved()}, tmp)
        if on_batch is not None:
            on_batch(done)
    bar.close()

    tables = state.tables(layout, sequences, polarities, config, seed)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return tables


def load_checkpoint(checkpoint: Path, signature: str) -> dict | None:
    """The saved state of this run, or None to start the pass afresh: a checkpoint of another
    run is ignored, and one that cannot be read (a torn or foreign file) is set aside, renamed
    and not deleted, with a warning that names it."""
    if not checkpoint.exists():
        return None
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if not isinstance(saved, dict) or not {"signature", "batches_done", "state"} <= saved.keys():
            raise ValueError("not a checkpoint of the exemplars stage")
    except Exception as err:  # torch.load raises many types for a damaged file
        aside = set_aside(checkpoint)
        warnings.warn(f"checkpoint {checkpoint} is damaged ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                      f"set it aside as {aside.name} and starting the activation pass from the beginning", stacklevel=3)
        return None
    if saved["signature"] != signature:
        warnings.warn(f"ignoring checkpoint {checkpoint}: it was made by a different run", stacklevel=3)
        return None
    return saved


def checkpoint_name(model: str, sequences: pl.DataFrame, neurons: dict[int, list[int]], polarities: list[Polarity],
                    config: ExemplarsConfig, batch_size: int, seed: int) -> str:
    """A file name unique to what a run collects, so runs over other layers never share it."""
    return f"exemplars-{_signature(model, sequences, neurons, polarities, config, batch_size, seed)[:16]}.pt"


def load_feature_exemplars(store: Store, layer: int, polarity: Polarity, neurons: list[int] | None = None) -> list[FeatureExemplars]:
    """Every feature's exemplars and stats for one layer x polarity (or only ``neurons``),
    tokens joined in; only the sequences the exemplars use are read."""
    polarity = Polarity(polarity)

    def scan(table: str, *partition) -> pl.LazyFrame:
        if not store.exists(table, *partition):
            store.read(table, *partition)  # raises the error that says how to make the table
        frame = pl.scan_parquet(store.path(table, *partition))
        return frame if neurons is None or not partition else frame.filter(pl.col("neuron").is_in(neurons))

    exemplars = scan("exemplars", layer, polarity.value).collect()
    stats = scan("neuron_stats", layer, polarity.value).collect()
    scan("sequences")
    sequences = (
        pl.scan_parquet(store.path("sequences"))
        .select("seq_id", "tokens", "token_ids", "prefix_len")
        .filter(pl.col("seq_id").is_in(exemplars["seq_id"].unique().implode()))
        .collect()
    )
    tokens_of = {row[0]: (tuple(row[1]), tuple(row[2]), row[3]) for row in sequences.iter_rows()}
    by_neuron: dict[int, list[Exemplar]] = {}
    for row in exemplars.select("neuron", "split", "kind", "rank", "extreme", "seq_id", "activations").iter_rows():
        neuron, split, kind, rank, extreme, seq_id, activations = row
        tokens, token_ids, prefix_len = tokens_of[seq_id]  # shared by every exemplar of the sequence
        record = ActivationRecord(seq_id, tokens, token_ids, np.asarray(activations, dtype=np.float32), prefix_len)
        by_neuron.setdefault(neuron, []).append(Exemplar(Split(split), ExemplarKind(kind), rank, extreme, record))
    features = []
    for row in stats.sort("neuron").iter_rows(named=True):
        quantiles = {q: row[_quantile_column(q)] for q in STAT_QUANTILES}
        feature_stats = FeatureStats(row["max"], row["mean"], row["std"], row["frac_active"], quantiles)
        features.append(FeatureExemplars(FeatureId(layer, row["neuron"], polarity), feature_stats,
                                         tuple(by_neuron.get(row["neuron"], ()))))
    return features


# -- the streaming state ------------------------------------------------------------------


@dataclass
class _FeatureLayout:
    """All selected neurons of all layers side by side on one feature axis."""

    neurons: dict[int, list[int]]
    layers: list[int] = field(init=False)
    offsets: dict[int, int] = field(init=False)
    total: int = field(init=False)

    def __post_init__(self):
        self.layers = sorted(self.neurons)
        self.offsets, position = {}, 0
        for layer in self.layers:
            self.offsets[layer] = position
            position += len(self.neurons[layer])
        self.total = position

    def columns(self, layer: int) -> slice:
        return slice(self.offsets[layer], self.offsets[layer] + len(self.neurons[layer]))


class _KeptSequences:
    """Per feature, the k sequences with the largest key, with their per-token activations.

    Top-k uses the sequence's extreme as key; the uniform reservoir uses a random key (and
    -inf for sequences that do not activate), which makes the same merge a sampler.
    """

    def __init__(self, features: int, k: int, seq_len: int, device, dtype):
        self.keys = torch.full((features, k), -torch.inf, device=device)
        self.extremes = torch.full((features, k), -torch.inf, device=device)
        self.seq_ids = torch.full((features, k), -1, dtype=torch.long, device=device)
        self.acts = torch.zeros((features, k, seq_len), dtype=dtype, device=device)

    def offer(self, keys: torch.Tensor, extremes: torch.Tensor, seq_ids: torch.Tensor, acts: torch.Tensor) -> None:
        """keys, extremes: (B, F); seq_ids: (B,); acts: (B, T, F).

        The kept set is unordered (ranks come at the end): a candidate that enters takes
        the slot of one that leaves, so only entering token rows are copied.
        """
        k = self.keys.shape[1]
        all_keys = torch.cat([self.keys, keys.T.float()], dim=1)  # (F, k + B)
        chosen = torch.zeros_like(all_keys, dtype=torch.bool)
        chosen.scatter_(1, all_keys.topk(k, dim=1).indices, True)
        # Row by row, the leaving slots and the entering candidates are equally many, and
        # nonzero() lists both in row-major order, so they pair up.
        leave_row, leave_slot = (~chosen[:, :k]).nonzero(as_tuple=True)
        enter_row, enter_seq = chosen[:, k:].nonzero(as_tuple=True)
        if enter_row.numel() == 0:
            return
        self.keys[leave_row, leave_slot] = keys.T.float()[enter_row, enter_seq]
        self.extremes[leave_row, leave_slot] = extremes.T.float()[enter_row, enter_seq]
        self.seq_ids[leave_row, leave_slot] = seq_ids[enter_seq]
        self.acts[leave_row, leave_slot] = acts[enter_seq, :, enter_row].to(self.acts.dtype)

    def ranked(self) -> _KeptSequences:
        """A copy ordered by key, largest first."""
        order = self.keys.argsort(dim=1, descending=True, stable=True)
        ranked = _KeptSequences.__new__(_KeptSequences)
        ranked.keys = self.keys.gather(1, order)
        ranked.extremes = self.extremes.gather(1, order)
        ranked.seq_ids = self.seq_ids.gather(1, order)
        ranked.acts = self.acts.gather(1, order.unsqueeze(-1).expand_as(self.acts))
        return ranked

    def state(self) -> dict:
        return {name: getattr(self, name).cpu() for name in ("keys", "extremes", "seq_ids", "acts")}

    @classmethod
    def restore(cls, saved: dict, device) -> _KeptSequences:
        kept = cls.__new__(cls)
        for name, tensor in saved.items():
            setattr(kept, name, tensor.to(device))
        return kept


class _CollectorState:
    def __init__(self):
        self.top: dict[tuple[str, str], _KeptSequences] = {}
        self.reservoir: dict[tuple[str, str], _KeptSequences] = {}
        self.random_ids: dict[str, torch.Tensor] = {}
        self.random_acts: dict[str, torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.token_keys = torch.empty(0)
        self.token_values = torch.empty(0)

    @classmethod
    def fresh(cls, features, polarities, config: ExemplarsConfig, seq_len, random_ids, device, dtype) -> _CollectorState:
        state = cls()
        for split in Split:
            for polarity in polarities:
                key = (split.value, polarity.value)
                state.top[key] = _KeptSequences(features, config.top_k, seq_len, device, dtype)
                if config.per_quantile:
                    state.reservoir[key] = _KeptSequences(features, config.quantile_reservoir, seq_len, device, dtype)
            ids = random_ids[split.value]
            state.random_ids[split.value] = ids.to(device)
            state.random_acts[split.value] = torch.zeros((len(ids), features, seq_len), dtype=dtype, device=device)
        state.sums = {name: torch.zeros(features, dtype=torch.float64, device=device)
                      for name in ("sum", "sumsq", "n_pos", "n_neg")}
        state.sums["n_tokens"] = torch.zeros((), dtype=torch.float64, device=device)
        state.token_keys = torch.full((config.stats_token_sample,), -torch.inf, device=device)
        state.token_values = torch.zeros((config.stats_token_sample, features), dtype=dtype, device=device)
        return state

    def update(self, split: str, acts, counted, seq_ids, random_keys) -> None:
        """Fold one batch (B, T, F) of one split into the state."""
        sequence_keys, token_keys = (key.to(acts.device) for key in random_keys)
        for (key_split, polarity), top in self.top.items():
            if key_split != split:
                continue
            signed = acts if polarity == Polarity.POS.value else -acts
            extremes = signed.masked_fill(~counted.unsqueeze(-1), -torch.inf).amax(dim=1).float()  # (B, F)
            top.offer(extremes, extremes, seq_ids, acts)
            reservoir = self.reservoir.get((split, polarity))
            if reservoir is not None:
                keys = torch.where(extremes > 0, sequence_keys.unsqueeze(1), -torch.inf)
                reservoir.offer(keys, extremes, seq_ids, acts)
        wanted = self.random_ids[split]
        hits = (seq_ids.unsqueeze(1) == wanted.unsqueeze(0)).nonzero()
        for row, slot in hits.tolist():
            self.random_acts[split][slot] = acts[row].T.to(self.random_acts[split].dtype)
        if split == Split.TRAIN.value:
            self._update_stats(acts, counted, token_keys)

    def offload(self, split: str) -> None:
        for key in [key for key in self.top if key[0] == split]:
            self.top[key] = _KeptSequences.restore(self.top[key].state(), "cpu")
            if key in self.reservoir:
                self.reservoir[key] = _KeptSequences.restore(self.reservoir[key].state(), "cpu")
        self.random_acts[split] = self.random_acts[split].cpu()

    def _update_stats(self, acts, counted, token_keys) -> None:
        # acts is zero wherever a token does not count. One sequence at a time keeps the
        # float32 copies at (T, F) rather than (B, T, F).
        for row in acts:
            row = row.float()
            self.sums["sum"] += row.sum(0)
            self.sums["sumsq"] += (row * row).sum(0)
            self.sums["n_pos"] += (row > 0).sum(0)
            self.sums["n_neg"] += (row < 0).sum(0)
        self.sums["n_tokens"] += counted.sum()
        # The sample is one set of tokens for every feature: only keys are compared, and a
        # token that enters overwrites, in place, the row of one that leaves.
        better = counted & (token_keys > self.token_keys.min())
        if better.any():
            size = self.token_keys.shape[0]
            candidates = token_keys[better]
            chosen = torch.zeros(size + candidates.shape[0], dtype=torch.bool, device=candidates.device)
            chosen[torch.cat([self.token_keys, candidates]).topk(size).indices] = True
            leaving = (~chosen[:size]).nonzero().squeeze(1)
            entering = chosen[size:].nonzero().squeeze(1)
            self.token_keys[leaving] = candidates[entering]
            self.token_values[leaving] = acts[better][entering].to(self.token_values.dtype)

    def to_saved(self) -> dict:
        return {
            "top": {k: v.state() for k, v in self.top.items()},
            "reservoir": {k: v.state() for k, v in self.reservoir.items()},
            "random_ids": {k: v.cpu() for k, v in self.random_ids.items()},
            "random_acts": {k: v.cpu() for k, v in self.random_acts.items()},
            "sums": {k: v.cpu() for k, v in self.sums.items()},
            "token_keys": self.token_keys.cpu(),
            "token_values": self.token_values.cpu(),
        }

    @classmethod
    def from_saved(cls, saved: dict, device) -> _CollectorState:
        state = cls()
        state.top = {k: _KeptSequences.restore(v, device) for k, v in saved["top"].items()}
        state.reservoir = {k: _KeptSequences.restore(v, device) for k, v in saved["reservoir"].items()}
        state.random_ids = {k: v.to(device) for k, v in saved["random_ids"].items()}
        state.random_acts = {k: v.to(device) for k, v in saved["random_acts"].items()}
        state.sums = {k: v.to(device) for k, v in saved["sums"].items()}
        state.token_keys = saved["token_keys"].to(device)
        state.token_values = saved["token_values"].to(device)
        return state

    # -- turning the state into tables ------------------------------------------------------

    def tables(self, layout, sequences, polarities, config, seed):
        n_tokens = np.zeros(int(sequences["seq_id"].max()) + 1, dtype=np.int64)
        n_tokens[sequences["seq_id"].to_numpy()] = sequences["n_tokens"].to_numpy()
        prefix = dict(zip(sequences["seq_id"].to_list(), sequences["prefix_len"].to_list()))
        tables = {}
        for polarity in polarities:
            blocks = []
            for split in Split:
                top = self.top[(split.value, polarity.value)].ranked()
                blocks.append(_Block(ExemplarKind.TOP, split, top.seq_ids, top.extremes, top.acts,
                                     torch.isfinite(top.keys), None))
                reservoir = self.reservoir.get((split.value, polarity.value))
                if reservoir is not None:
                    blocks.append(_quantile_block(reservoir, split, config, seed))
                blocks.append(self._random_block(split, polarity, prefix, n_tokens))
            stats = self._stats(polarity)
            for layer in layout.layers:
                columns = layout.columns(layer)
                exemplars = _exemplar_frame(blocks, columns, layout.neurons[layer], layer, polarity, n_tokens)
                stats_frame = stats[columns.start : columns.stop].with_columns(
                    pl.Series("neuron", layout.neurons[layer], dtype=pl.Int32),
                    pl.lit(layer, dtype=pl.Int16).alias("layer"),
                    pl.lit(polarity.value).alias("polarity"),
                )
                tables[(layer, polarity)] = (exemplars, stats_frame.select("layer", "polarity", "neuron", pl.exclude("layer", "polarity", "neuron")))
        return tables

    def _random_block(self, split: Split, polarity: Polarity, prefix: dict, n_tokens: dict) -> _Block:
        ids = self.random_ids[split.value]
        acts = self.random_acts[split.value]  # (n, F, T)
        features = acts.shape[1]
        signed = acts.float() * polarity.sign
        counted = torch.zeros(acts.shape[0], acts.shape[2], dtype=torch.bool, device=acts.device)
        for slot, seq_id in enumerate(ids.tolist()):
            counted[slot, prefix[seq_id] : n_tokens[seq_id]] = True
        extremes = signed.masked_fill(~counted.unsqueeze(1), -torch.inf).amax(dim=2)  # (n, F)
        return _Block(ExemplarKind.RANDOM, split, ids.unsqueeze(0).expand(features, -1), extremes.T,
                      acts.permute(1, 0, 2), torch.ones(features, len(ids), dtype=torch.bool), None)

    def _stats(self, polarity: Polarity) -> pl.DataFrame:
        n = max(float(self.sums["n_tokens"]), 1.0)
        mean = self.sums["sum"] / n
        variance = (self.sums["sumsq"] / n - mean**2).clamp(min=0)
        sample = self.token_values[torch.isfinite(self.token_keys)].float() * polarity.sign
        quantiles = None
        if sample.shape[0]:  # nearest-rank quantiles from one sort; torch.quantile is far slower on wide inputs
            ordered = sample.T.contiguous().sort(dim=1).values  # (F, sample), rows contiguous for the sort
            quantiles = ordered[:, [round(q * (sample.shape[0] - 1)) for q in STAT_QUANTILES]].T
        top = self.top[(Split.TRAIN.value, polarity.value)]
        columns = {
            "max": top.extremes.amax(dim=1).cpu().numpy(),
            "mean": (mean * polarity.sign).float().cpu().numpy(),
            "std": variance.sqrt().float().cpu().numpy(),
            "frac_active": ((self.sums["n_pos"] if polarity is Polarity.POS else self.sums["n_neg"]) / n).float().cpu().numpy(),
        }
        for i, q in enumerate(STAT_QUANTILES):
            columns[_quantile_column(q)] = quantiles[i].cpu().numpy() if quantiles is not None else np.zeros(len(mean))
        columns["n_tokens"] = np.full(len(mean), int(n), dtype=np.int64)
        return pl.DataFrame({name: np.asarray(values) for name, values in columns.items()})


@dataclass
class _Block:
    """(F, j) arrays of one kind of exemplar in one split, ready to flatten into rows."""

    kind: ExemplarKind
    split: Split
    seq_ids: torch.Tensor
    extremes: torch.Tensor
    acts: torch.Tensor  # (F, j, T)
    valid: torch.Tensor
    bins: torch.Tensor | None


def _quantile_block(reservoir: _KeptSequences, split: Split, config: ExemplarsConfig, seed: int) -> _Block:
    """Per feature, ``per_quantile`` sequences from each of ``quantile_bins`` equal-count bins
    of the reservoir's activating sequences, ordered by activation."""
    extremes = torch.where(torch.isfinite(reservoir.keys), reservoir.extremes, torch.inf)
    order = extremes.argsort(dim=1)  # valid members first, lowest activation first
    valid_count = torch.isfinite(reservoir.keys).sum(dim=1, keepdim=True)  # (F, 1)
    bins = config.quantile_bins
    bin_index = torch.arange(bins, device=order.device).repeat_interleave(config.per_quantile)
    within = torch.arange(config.per_quantile, device=order.device).repeat(bins)
    offset = torch.rand(config.per_quantile * bins, generator=torch.Generator().manual_seed(seed)).to(order.device)
    lo = (bin_index * valid_count) // bins
    hi = ((bin_index + 1) * valid_count) // bins
    position = lo + ((within + offset) / config.per_quantile * (hi - lo)).long()
    valid = hi > lo
    position = torch.minimum(position, (hi - 1).clamp(min=0))
    valid &= torch.cat([torch.ones_like(position[:, :1], dtype=torch.bool), position[:, 1:] != position[:, :-1]], dim=1)
    members = order.gather(1, position)
    picked = members.unsqueeze(-1).expand(-1, -1, reservoir.acts.shape[-1])
    return _Block(ExemplarKind.QUANTILE, split, reservoir.seq_ids.gather(1, members), reservoir.extremes.gather(1, members),
                  reservoir.acts.gather(1, picked), valid, bin_index.expand_as(members))


def _exemplar_frame(blocks, columns: slice, neuron_ids: list[int], layer: int, polarity: Polarity, n_tokens: np.ndarray) -> pl.DataFrame:
    parts = []
    neuron_ids = np.asarray(neuron_ids, dtype=np.int32)
    for block in blocks:
        valid = block.valid[columns].cpu().numpy()
        feature, slot = np.nonzero(valid)
        if feature.size == 0:
            continue
        seq_ids = block.seq_ids[columns].cpu().numpy()[feature, slot]
        lengths = n_tokens[seq_ids]
        acts = block.acts[columns].float().cpu().numpy()[feature, slot]  # (rows, T)
        keep = np.arange(acts.shape[1])[None, :] < lengths[:, None]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        activations = pa.ListArray.from_arrays(pa.array(offsets), pa.array(acts[keep].astype(np.float16)))
        bins = block.bins[columns].cpu().numpy()[feature, slot] if block.bins is not None else np.full(len(feature), None)
        parts.append(pa.table({
            "layer": pa.array(np.full(len(feature), layer, dtype=np.int16)),
            "polarity": pa.array([polarity.value] * len(feature)),
            "neuron": pa.array(neuron_ids[feature]),
            "split": pa.array([block.split.value] * len(feature)),
            "kind": pa.array([block.kind.value] * len(feature)),
            "rank": pa.array(slot.astype(np.int16)),
            "bin": pa.array(bins, type=pa.int16()),
            "seq_id": pa.array(seq_ids.astype(np.int64)),
            "extreme": pa.array(block.extremes[columns].float().cpu().numpy()[feature, slot].astype(np.float32)),
            "activations": activations,
        }))
    frame = pl.from_arrow(pa.concat_tables(parts))
    return frame.sort("neuron", "split", "kind", "rank")


# -- batching -----------------------------------------------------------------------------


def _plan_batches(sequences: pl.DataFrame, batch_size: int) -> list[tuple[str, list[int]]]:
    """(split, row indices) per batch; a batch never mixes splits."""
    batches = []
    splits = sequences["split"].to_list()
    for split in Split:
        rows = [i for i, s in enumerate(splits) if s == split.value]
        batches += [(split.value, rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    return batches


def _batch_tensors(sequences: pl.DataFrame, rows: list[int], seq_len: int, tokenizer):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    counted = torch.zeros((len(rows), seq_len), dtype=torch.bool)
    token_ids = sequences["token_ids"]
    prefix_len = sequences["prefix_len"]
    seq_ids = sequences["seq_id"]
    for i, row in enumerate(rows):
        tokens = token_ids[row].to_list()
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
        counted[i, prefix_len[row] : len(tokens)] = True
    return ids, mask, counted, torch.tensor([seq_ids[row] for row in rows], dtype=torch.long)


def _batch_keys(seed: int, batch_no: int, batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random keys for the reservoirs: a function of (seed, batch) alone, so a resumed run
    draws exactly what an uninterrupted one would."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch_no)
    return torch.rand(batch, generator=generator), torch.rand(batch, seq_len, generator=generator)


def _random_sequence_ids(sequences: pl.DataFrame, per_split: int, seed: int) -> dict[str, torch.Tensor]:
    chosen = {}
    for split in Split:
        ids = sequences.filter(pl.col("split") == split.value)["seq_id"].to_list()
        picked = sorted(random.Random(f"{seed}:random:{split.value}").sample(ids, min(per_split, len(ids))))
        chosen[split.value] = torch.tensor(picked, dtype=torch.long)
    return chosen


def _signature(model, sequences, neurons, polarities, config, batch_size, seed) -> str:
    digest = hashlib.sha256()
    digest.update(repr((model, sorted((k, tuple(v)) for k, v in neurons.items()), [p.value for p in polarities],
                        config.model_dump(), batch_size, seed, sequences.height)).encode())
    digest.update(str(sequences.select("seq_id", "token_ids").hash_rows().sum()).encode())
    return digest.hexdigest()


def _quantile_column(q: float) -> str:
    """0.5 -> q50, 0.99 -> q99, 0.999 -> q999."""
    return "q" + f"{q * 100:g}".replace(".", "")
