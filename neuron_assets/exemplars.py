"""Exemplars: per feature and polarity, the sequences that show what the feature does.

A streaming pass over the corpus, all requested layers at once, keeps on the model's device:

- the top-k sequences per split by per-sequence max (pos) or min (neg) activation;
- a uniform reservoir of *activating* sequences per split, from which activation-quantile
  (decile) samples are drawn at the end, as delphi's quantile sampler does;
- a uniform sample of *quiet* sequences per split (the non-activating examples of
  detection and fuzzing);
- n random sequences per split, the same for every feature;
- running sums for mean / std / fraction active, and a uniform sample of train tokens,
  the same for every feature, for approximate quantiles.

Memory is O(features x (k x seq_len + token sample)), independent of corpus size. The pass
is planned before it reads (:func:`plan_exemplar_pass`): a split's state is allocated on the
device when its first batch arrives and moves to host memory when it is done, so the device
holds one split; when even that exceeds the device budget (``exemplars.device_memory_gb``)
the features are split into groups and the corpus is read once per group, each pass
stopping after the group's deepest layer. Per-batch work runs over slices of the feature
axis, and top-k merges only the features a batch can change. The fixed prefix of each
sequence and the padding never count. Long runs checkpoint (a folder that grows with the
work done) and resume.

A sequence *activates* a feature x polarity when its extreme exceeds the threshold
``activating_fraction * max(train max, 0)``; otherwise it is quiet. The pass reads train
first, so for val and test the train max is final and both samples are exact uniform
samples (there they keep the first sequences of a split read in a random order, so a full
sample admits nothing more; see :func:`_batch_keys`). While train is read the threshold uses
the train max so far, which only grows: the reservoir admits every sequence above the
running threshold (a superset of the finally activating ones) and drops, at the end,
members at or below the final threshold, so the quantile samples stay uniform over the
finally activating sequences; the quiet sample admits only sequences at or below the
running threshold, so every train quiet sequence is quiet by the final threshold too (a
conservative sample: it can miss train sequences that were read before the max grew past
1/fraction times their extreme).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from neuron_assets.config import ExemplarsConfig, FeaturesConfig
from neuron_assets.plan import KEPT_ACT_BYTES, exemplar_state_bytes, exemplar_table_bytes
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
POSITION_BINS = 10  # position bins of the positional filter


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
    plan: ExemplarPlan | None = None,
    on_tables=None,
    measured: dict | None = None,
    saes: dict[int, SaeLatents] | None = None,
) -> dict[tuple[int, Polarity], tuple[pl.DataFrame, pl.DataFrame]]:
    """(layer, polarity) -> (exemplars table, neuron_stats table), from one pass over the corpus
    per group of the plan (one group, one pass, unless the state exceeds the device budget).

    ``saes[layer]``, when given, adds latents of an SAE over that layer's site to the layer's
    feature axis (:func:`feature_axis`): the same hook that reads the neurons encodes the
    site's input with the SAE, so top-k, samples and statistics treat a latent as a neuron.
    Rows carry the feature's kind (``feature_kind`` in exemplars, whose ``kind`` is the
    exemplar's; ``kind`` in the stats) and its index within that kind.

    ``sequences`` needs only seq_id, split, token_ids, prefix_len and n_tokens. ``plan`` is
    :func:`plan_exemplar_pass`'s (made here when None). ``checkpoint`` is a folder the run
    saves its progress to and resumes from when it is there and matches this run: every
    ``config.checkpoint_every`` batches the split being read, each finished split and each
    finished group once. ``on_batch(n_done)`` is called after each batch, counted over all
    passes (progress reporting; it may raise to stop the run). ``on_tables(layer, polarity,
    exemplars, stats)``, when given, receives each layer's tables as soon as its last group is
    done, and nothing is kept for the return value. ``measured``, when given, is filled with
    the state sizes the run reached (bytes), to hold against the plan.
    """
    if sequences.height == 0:
        raise ValueError("the sequences table is empty; build the corpus first (the 'corpus' asset)")
    subject.check_layers(list(neurons))
    saes = saes or {}
    widths = {layer: subject.neurons_per_layer(layer) for layer in neurons}
    axis = feature_axis(neurons, saes, widths.__getitem__)
    corpus = _Corpus(sequences, subject.tokenizer)
    batches = _plan_batches(corpus.splits, batch_size, seed)
    random_ids = _random_sequence_ids(sequences, config.random_per_split, seed)
    signature = _signature(subject.name, sequences, axis, polarities, config, batch_size, seed, saes)
    if plan is None:
        plan = plan_exemplar_pass(axis, polarities, config, corpus.seq_len, batch_size, subject.device, subject.dtype)
    resume = _load_checkpoint(checkpoint, signature) if checkpoint is not None else None
    if resume is not None and resume.groups != plan.group_neurons():
        plan = plan.regrouped(resume.groups)  # a resumed run keeps the grouping its checkpoint was made with
    if checkpoint is not None and resume is None:
        _start_checkpoint(checkpoint, signature, plan)

    collected: dict = {}
    emit = on_tables or (lambda layer, polarity, ex, st: collected.__setitem__((layer, polarity), (ex, st)))
    layers = _LayerAssembler(axis, lambda layer, polarity, ex, st: emit(layer, polarity,
                                                                           *_label_kinds(ex, st, widths[layer])))
    report = _Measured(measured)
    bar = tqdm(total=len(plan.groups) * len(batches), desc="activations", unit="batch", disable=not progress)
    for group_no, group in enumerate(plan.groups):
        if resume is not None and group_no in resume.finished:
            layers.add(_read_group_tables(checkpoint, group_no))
            bar.update(len(batches))
            continue
        state = _PassState(group.neurons, polarities, config, corpus.seq_len, random_ids, subject.device, subject.dtype)
        start = 0
        if resume is not None and resume.group == group_no:
            start = state.restore(checkpoint, resume, subject.device)
            bar.update(start)
        neuron_index = {  # None reads a whole layer without a copy
            layer: None if idx == list(range(widths[layer])) else torch.tensor(idx, dtype=torch.long)
            for layer, idx in group.neurons.items()
        }
        with_latents = {layer: idx for layer, idx in group.neurons.items() if layer in saes and idx[-1] >= widths[layer]}
        for batch_no in range(start, len(batches)):
            split, rows = batches[batch_no]
            batch = corpus.batch(rows)
            readers = {layer: _site_reader(idx, widths[layer], saes[layer], batch.counted)
                       for layer, idx in with_latents.items()}
            per_layer = (subject.activations(batch.ids, batch.mask, neuron_index, readers) if readers
                         else subject.activations(batch.ids, batch.mask, neuron_index))
            state.update(split, per_layer, batch, _batch_keys(seed, batch_no, len(rows), corpus.seq_len, split))
            del per_layer
            report.observe(state)
            bar.update(1)
            done = batch_no + 1
            if done == len(batches) or batches[done][0] != split:
                state.finish_split(split)  # a finished split's exemplars wait in host memory
                if checkpoint is not None:
                    _save_split(checkpoint, signature, group_no, done, split, state, report.observe_checkpoint)
            elif checkpoint is not None and done % config.checkpoint_every == 0:
                _save_progress(checkpoint, signature, group_no, done, split, state, report.observe_checkpoint)
            if on_batch is not None:
                on_batch(group_no * len(batches) + done)
        # A finished group's tables are kept for a resumed run, but for the last group's: the
        # checkpoint goes once they are built, and a run killed before rebuilds them from its splits.
        keep = checkpoint is not None and group_no < len(plan.groups) - 1
        for key, pair in state.tables(corpus, config, seed):  # one layer x polarity at a time: host memory stays bounded
            report.observe_tables(key[0], pair)
            if keep:
                _save_group_table(checkpoint, group_no, key, pair, report.observe_checkpoint)
            layers.add({key: pair})
        del state
        if keep:
            _finish_group(checkpoint, signature, group_no)
    bar.close()
    report.finish(plan)
    if checkpoint is not None:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return collected


SAE_KIND = "sae"
NEURON_KIND = "neuron"


@dataclass(frozen=True)
class SaeLatents:
    """The latents of one layer's SAE that the exemplar pass reads beside the layer's neurons."""

    sae: object  # neuron_assets.features.sae.SparseAutoencoder over the layer's neuron site
    latents: list[int]  # sorted latent indices
    identity: str  # what tells this SAE from another (its stored metadata), for checkpoints


def feature_axis(neurons: dict[int, list[int]], saes: dict[int, SaeLatents], width_of) -> dict[int, list[int]]:
    """layer -> positions on the layer's feature axis: its neurons (0 .. width-1), then its
    SAE's latents (latent j at width + j). The pass, its plan and its groups work on these
    positions; the tables name each feature by kind and index within the kind."""
    axis = {}
    for layer, indices in neurons.items():
        width = width_of(layer)
        latents = saes[layer].latents if layer in saes else []
        axis[layer] = list(indices) + [width + j for j in latents]
    return axis


def _site_reader(positions: list[int], width: int, latents: SaeLatents, counted: torch.Tensor):
    """The hook's reader of a layer whose group holds SAE latents: the chosen neurons and the
    chosen latents of the encoded site input, side by side, in the site's dtype. Only the
    counted tokens are encoded (a top-k SAE computes every latent of a token, so the prefix
    and the padding would cost as much); the others read 0, and nothing reads them."""
    index = torch.tensor(positions, dtype=torch.long)
    neuron_index, latent_index = index[index < width], index[index >= width] - width
    sae = latents.sae
    sae_device = next(sae.parameters()).device

    def read(hidden: torch.Tensor) -> torch.Tensor:
        parts = []
        if neuron_index.numel():
            parts.append(hidden.index_select(-1, neuron_index.to(hidden.device)))
        if latent_index.numel():
            mask = counted.to(hidden.device)
            encoded = sae.encode(hidden[mask].to(sae_device, torch.float32)).index_select(-1, latent_index.to(sae_device))
            full = hidden.new_zeros((*hidden.shape[:-1], latent_index.numel()))
            full[mask] = encoded.to(hidden.device, hidden.dtype)
            parts.append(full)
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    return read


def _label_kinds(exemplars: pl.DataFrame, stats: pl.DataFrame, width: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Feature-axis positions -> (kind, index within the kind)."""
    def labelled(frame: pl.DataFrame, column: str, after: str) -> pl.DataFrame:
        if frame.height == 0 or frame["neuron"].max() < width:  # neurons only: no per-row choice
            frame = frame.with_columns(pl.lit(NEURON_KIND).alias(column), pl.col("neuron").cast(pl.Int32))
        else:
            latent = pl.col("neuron") >= width
            frame = frame.with_columns(
                pl.when(latent).then(pl.lit(SAE_KIND)).otherwise(pl.lit(NEURON_KIND)).alias(column),
                pl.when(latent).then(pl.col("neuron") - width).otherwise(pl.col("neuron")).cast(pl.Int32).alias("neuron"))
        order = list(frame.columns)
        order.remove(column)
        order.insert(order.index(after) + 1, column)
        return frame.select(order)

    return labelled(exemplars, "feature_kind", "polarity"), labelled(stats, "kind", "polarity")


def plan_exemplar_pass(
    neurons: dict[int, list[int]],
    polarities: list[Polarity],
    config: ExemplarsConfig,
    seq_len: int,
    batch_size: int,
    device,
    dtype,
    budget_bytes: int | None = None,
) -> ExemplarPlan:
    """How the pass will hold its state: bytes per feature, the device budget, and the groups
    of features read in one pass each (as few as fit the budget, each whole layers where a
    layer fits, in layer order).

    The budget is ``budget_bytes``, else ``exemplars.device_memory_gb``, else 90% of what is
    free on a GPU (after the model is loaded) or 80% of the available host memory on CPU.
    """
    device = torch.device(device)
    act_bytes = torch.empty((), dtype=dtype).element_size()
    sizes = exemplar_state_bytes(config, seq_len, act_bytes, len(polarities))
    if budget_bytes is not None:
        budget, source = int(budget_bytes), "given"
    elif config.device_memory_gb is not None:
        budget, source = int(config.device_memory_gb * 1e9), "exemplars.device_memory_gb"
    else:
        budget, source = _free_memory(device)
    # The device holds the split being read and the train statistics; on CPU the host is the
    # device, so finished splits count against the same budget. Each feature also costs its
    # captured activations of one batch.
    resident = sizes.stats + sizes.split * (len(Split) if device.type == "cpu" else 1)
    per_feature = resident + batch_size * seq_len * act_bytes
    widest = max((len(v) for v in neurons.values()), default=0)
    fixed = sizes.fixed + CHUNK_TEMPORARIES * min(CHUNK_BYTES, batch_size * seq_len * widest * 4)
    capacity = (budget - fixed) // per_feature
    total = sum(len(v) for v in neurons.values())
    if capacity < 1:
        raise ValueError(
            f"the exemplar pass cannot fit one feature in {budget / 1e9:.2f} GB ({source}): a feature needs "
            f"{per_feature / 1e6:.2f} MB plus {fixed / 1e9:.2f} GB of fixed buffers. Fix: raise "
            "exemplars.device_memory_gb, lower subject.batch_size, exemplars.quantile_reservoir or "
            "exemplars.stats_token_sample, or free device memory"
        )
    groups = _pack_groups(neurons, int(capacity))
    return ExemplarPlan(
        features=total, polarities=len(polarities), seq_len=seq_len, batch_size=batch_size, device=str(device),
        act_bytes=act_bytes, budget_bytes=budget, budget_source=source, split_state_bytes=sizes.split,
        stats_bytes=sizes.stats, resident_bytes=resident, per_feature_bytes=per_feature, fixed_bytes=fixed,
        table_bytes=exemplar_table_bytes(config, seq_len, len(polarities)), groups=tuple(PassGroup(g) for g in groups),
    )


@dataclass(frozen=True)
class PassGroup:
    """The features one pass reads: layer -> neuron indices; the pass stops after its deepest layer."""

    neurons: dict[int, list[int]]

    @property
    def features(self) -> int:
        return sum(len(v) for v in self.neurons.values())

    @property
    def deepest(self) -> int:
        return max(self.neurons)


@dataclass(frozen=True)
class ExemplarPlan:
    """The exemplar pass's memory plan, computed before reading (all sizes in bytes)."""

    features: int
    polarities: int
    seq_len: int
    batch_size: int
    device: str
    act_bytes: int
    budget_bytes: int
    budget_source: str
    split_state_bytes: int  # per feature: one split, all polarities (top-k, reservoir, random)
    stats_bytes: int  # per feature: running sums and the train token sample
    resident_bytes: int  # per feature on the device: the split being read and the stats (all splits on CPU)
    per_feature_bytes: int  # resident + one batch of captured activations
    fixed_bytes: int  # buffers that do not grow with features: token-sample keys, chunk temporaries
    table_bytes: int  # per feature: its exemplar and stats rows, every polarity, as built on the host
    groups: tuple[PassGroup, ...]

    @property
    def passes(self) -> int:
        return len(self.groups)

    @property
    def peak_device_bytes(self) -> int:
        """The collector's own peak on the device (model weights and forward workspace aside)."""
        return self.fixed_bytes + max(g.features for g in self.groups) * self.per_feature_bytes

    @property
    def feature_state_bytes(self) -> int:
        """One feature's whole state: every split and the stats (finished, on the host)."""
        return len(Split) * self.split_state_bytes + self.stats_bytes

    @property
    def state_bytes(self) -> int:
        """The whole state of all features, all splits: what the pass holds once, over all groups."""
        return self.features * self.feature_state_bytes

    @property
    def peak_host_bytes(self) -> int:
        """Host memory at the end of a group's pass: its finished splits, and the tables of the
        layers built at once (TABLE_WORKERS) beside the one the caller is writing."""
        return max(self.host_bytes(g) for g in self.groups)

    def host_bytes(self, group: PassGroup) -> int:
        """One group's host peak: finished splits of its features, tables of its widest layers."""
        in_flight = sorted((len(v) for v in group.neurons.values()), reverse=True)[: TABLE_WORKERS + 1]
        return group.features * self.feature_state_bytes + sum(in_flight) * self.table_bytes

    def group_neurons(self) -> list[dict[int, list[int]]]:
        return [g.neurons for g in self.groups]

    def regrouped(self, groups: list[dict[int, list[int]]]) -> ExemplarPlan:
        return replace(self, groups=tuple(PassGroup(g) for g in groups))

    def describe(self) -> str:
        """A few lines for the log and the asset's metadata."""
        gb = 1e9
        lines = [
            f"exemplar pass plan: {self.features} features x {self.polarities} polarities on {self.device}, "
            f"budget {self.budget_bytes / gb:.2f} GB ({self.budget_source})",
            f"  state per feature: {self.split_state_bytes / 1e3:.1f} kB per split, {self.stats_bytes / 1e3:.1f} kB stats; "
            f"{self.state_bytes / gb:.2f} GB for all features and splits",
            f"  {self.passes} pass{'es' if self.passes > 1 else ''} over the corpus; device peak "
            f"{self.peak_device_bytes / gb:.2f} GB (state + captured activations), host {self.peak_host_bytes / gb:.2f} GB "
            "(finished splits + tables being built)",
        ]
        for i, group in enumerate(self.groups):
            layers = sorted(group.neurons)
            span = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"
            lines.append(f"  pass {i + 1}: {span}, {group.features} features, stops after layer {group.deepest}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "groups"}
        fields.update(passes=self.passes, peak_device_bytes=self.peak_device_bytes, state_bytes=self.state_bytes,
                      peak_host_bytes=self.peak_host_bytes,
                      groups=[{"layers": sorted(g.neurons), "features": g.features, "deepest": g.deepest} for g in self.groups])
        return fields


def _free_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9), f"90% of the {free / 1e9:.1f} GB free on {device}"
    import psutil

    available = psutil.virtual_memory().available
    return int(available * 0.8), f"80% of the {available / 1e9:.1f} GB of available host memory"


def _pack_groups(neurons: dict[int, list[int]], capacity: int) -> list[dict[int, list[int]]]:
    """Whole layers in order while they fit; a layer wider than the capacity is cut in pieces."""
    groups: list[dict[int, list[int]]] = []
    current: dict[int, list[int]] = {}
    used = 0
    for layer in sorted(neurons):
        indices = neurons[layer]
        if used + len(indices) > capacity and current:
            groups.append(current)
            current, used = {}, 0
        if len(indices) <= capacity:
            current[layer] = list(indices)
            used += len(indices)
            continue
        pieces = -(-len(indices) // capacity)
        size = -(-len(indices) // pieces)
        for lo in range(0, len(indices), size):
            groups.append({layer: list(indices[lo : lo + size])})
    if current:
        groups.append(current)
    return groups


def checkpoint_name(model: str, sequences: pl.DataFrame, neurons: dict[int, list[int]], polarities: list[Polarity],
                    config: ExemplarsConfig, batch_size: int, seed: int, saes: dict[int, SaeLatents] | None = None,
                    width_of=None) -> str:
    """A folder name unique to what a run collects, so runs over other layers never share it
    (``width_of``, layer -> neuron count, is needed with ``saes``)."""
    axis = feature_axis(neurons, saes, width_of) if saes else neurons
    return f"exemplars-{_signature(model, sequences, axis, polarities, config, batch_size, seed, saes)[:16]}"


SEQUENCE_COLUMNS = ["seq_id", "split", "token_ids", "prefix_len", "n_tokens"]
"""The columns of `sequences` the exemplar pass reads (token strings are never read)."""


def load_feature_exemplars(store: Store, layer: int, polarity: Polarity, neurons: list[int] | None = None,
                           kind: str | None = None) -> list[FeatureExemplars]:
    """Every feature's exemplars and stats for one layer x polarity (or only ``neurons``, read
    with the filter pushed into the Parquet scan; only features of ``kind`` when given),
    tokens joined in; only the sequences the exemplars use are read, and each sequence's
    tokens are built once. Neurons come before SAE latents; tables written before features
    had kinds read as neurons."""
    polarity = Polarity(polarity)
    for table, partition in (("exemplars", (layer, polarity.value)), ("neuron_stats", (layer, polarity.value)), ("sequences", ())):
        if not store.exists(table, *partition):
            store.read(table, *partition)  # raises the error that says how to make the table

    def scan(table: str, kind_column: str) -> pl.LazyFrame:
        frame = with_feature_kind(store.scan(table, layer, polarity.value), kind_column)
        if kind is not None:
            frame = frame.filter(pl.col(kind_column) == kind)
        return frame if neurons is None else frame.filter(pl.col("neuron").is_in(list(neurons)))

    kind_order = pl.col("feature_kind") != NEURON_KIND  # neurons first
    exemplars = (scan("exemplars", "feature_kind")
                 .select("feature_kind", "neuron", "split", "kind", "rank", "bin", "extreme", "seq_id", "activations")
                 .sort(kind_order, "feature_kind", "neuron", "split", "kind", "rank").collect())
    stats = scan("neuron_stats", "kind").sort(pl.col("kind") != NEURON_KIND, "kind", "neuron").collect()
    sequences = (
        store.scan("sequences")
        .select("seq_id", "tokens", "token_ids", "prefix_len")
        .filter(pl.col("seq_id").is_in(exemplars["seq_id"].unique().implode()))
        .collect()
    )
    # One ActivationRecord field set per sequence, shared by all its exemplars; activations
    # as views into one flat float32 array.
    seq_index = {seq_id: i for i, seq_id in enumerate(sequences["seq_id"].to_list())}
    seq_tokens = [tuple(t) for t in sequences["tokens"].to_list()]
    seq_ids_tokens = [tuple(t) for t in sequences["token_ids"].to_list()]
    seq_prefix = sequences["prefix_len"].to_list()
    lengths = exemplars["activations"].list.len().to_numpy()
    flat = exemplars["activations"].explode().to_numpy().astype(np.float32)
    bounds = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64).tolist()
    splits = [Split(s) for s in exemplars["split"].to_list()]
    kinds = [ExemplarKind(k) for k in exemplars["kind"].to_list()]
    ranks, extremes, bins = exemplars["rank"].to_list(), exemplars["extreme"].to_list(), exemplars["bin"].to_list()
    rows_seq = [seq_index[s] for s in exemplars["seq_id"].to_list()]
    seq_id_list = exemplars["seq_id"].to_list()
    neuron_col = exemplars["neuron"].to_numpy()
    kind_col = exemplars["feature_kind"].to_numpy()
    changes = (neuron_col[1:] != neuron_col[:-1]) | (kind_col[1:] != kind_col[:-1])
    starts = np.flatnonzero(np.r_[True, changes]) if len(neuron_col) else np.array([], dtype=int)
    ends = np.r_[starts[1:], len(neuron_col)].astype(int)
    by_neuron: dict[tuple[str, int], tuple[Exemplar, ...]] = {}
    for lo, hi in zip(starts.tolist(), ends.tolist()):
        by_neuron[(str(kind_col[lo]), int(neuron_col[lo]))] = tuple(
            Exemplar(splits[i], kinds[i], ranks[i], extremes[i],
                     ActivationRecord(seq_id_list[i], seq_tokens[rows_seq[i]], seq_ids_tokens[rows_seq[i]],
                                      flat[bounds[i] : bounds[i + 1]], seq_prefix[rows_seq[i]]), bins[i])
            for i in range(lo, hi)
        )
    quantile_columns = [stats[_quantile_column(q)].to_list() for q in STAT_QUANTILES]
    features = []
    columns = ("kind", "neuron", "max", "mean", "std", "frac_active")
    for i, (feature_kind, neuron, max_, mean, std, frac) in enumerate(zip(*(stats[c].to_list() for c in columns))):
        quantiles = {q: column[i] for q, column in zip(STAT_QUANTILES, quantile_columns)}
        features.append(FeatureExemplars(FeatureId(layer, neuron, polarity, feature_kind),
                                         FeatureStats(max_, mean, std, frac, quantiles),
                                         by_neuron.get((feature_kind, neuron), ())))
    return features


def with_feature_kind(frame, column: str = "kind"):
    """A per-feature table (frame or lazy frame) with its kind column; tables written before
    features had kinds hold only neurons."""
    names = frame.collect_schema().names() if isinstance(frame, pl.LazyFrame) else frame.columns
    return frame if column in names else frame.with_columns(pl.lit(NEURON_KIND).alias(column))


# -- the streaming state ------------------------------------------------------------------

CHUNK_BYTES = 256 * 2**20
"""Per-batch work is done over slices of the feature axis whose (batch, tokens, features)
float32 size is at most this, so temporaries stay bounded whatever the model's width."""
CHUNK_TEMPORARIES = 3  # chunk-sized temporaries alive at once (gathered rows, comparison masks, casts)


@dataclass
class _FeatureLayout:
    """The selected neurons of a group's layers side by side on one feature axis."""

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

    NAMES = ("keys", "extremes", "seq_ids", "acts")

    @classmethod
    def fresh(cls, features: int, k: int, seq_len: int, device, dtype) -> _KeptSequences:
        kept = cls()
        kept.keys = torch.full((features, k), -torch.inf, device=device)
        kept.extremes = torch.full((features, k), -torch.inf, device=device)
        kept.seq_ids = torch.full((features, k), -1, dtype=torch.long, device=device)
        # Slots are written before they are read (an empty slot's key is -inf and it is never
        # shown), so the large buffer is left uninitialized rather than zeroed.
        kept.acts = torch.empty((features, k, seq_len), dtype=dtype, device=device)
        return kept

    def offer(self, cols: slice, keys, extremes, seq_ids, chunk: _Chunk) -> None:
        """keys, extremes: (B, Fc) for the features ``cols``; seq_ids: (B,); chunk: the
        batch's activations of those features.

        Only features where some candidate beats the k-th kept key are merged. The kept set
        is unordered (ranks come at the end): a candidate that enters takes the slot of one
        that leaves, so only entering token rows are copied.
        """
        kept = self.keys[cols]
        beats = (keys > kept.amin(dim=1)).any(dim=0)
        rows = beats.nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        k = kept.shape[1]
        all_keys = torch.cat([kept[rows], keys[:, rows].T], dim=1)  # (R, k + B)
        chosen = torch.zeros_like(all_keys, dtype=torch.bool)
        chosen.scatter_(1, all_keys.topk(k, dim=1, sorted=False).indices, True)
        # Row by row, the leaving slots and the entering candidates are equally many, and
        # nonzero() lists both in row-major order, so they pair up.
        leave_row, leave_slot = (~chosen[:, :k]).nonzero(as_tuple=True)
        enter_row, enter_seq = chosen[:, k:].nonzero(as_tuple=True)
        if enter_row.numel() == 0:
            return
        local = rows[enter_row]
        # Both sides through flat indices: index_select and index_copy_ are several times
        # faster on CPU than indexing with two index tensors.
        slot = (cols.start + rows[leave_row]) * k + leave_slot
        pair = enter_seq * keys.shape[1] + local
        self.keys.view(-1).index_copy_(0, slot, keys.reshape(-1).index_select(0, pair))
        self.extremes.view(-1).index_copy_(0, slot, extremes.reshape(-1).index_select(0, pair))
        self.seq_ids.view(-1).index_copy_(0, slot, seq_ids.index_select(0, enter_seq))
        self.acts.view(-1, self.acts.shape[2]).index_copy_(0, slot, chunk.rows(enter_seq, local))

    def rows(self, cols: slice) -> _KeptSequences:
        part = _KeptSequences()
        for name in self.NAMES:
            setattr(part, name, getattr(self, name)[cols])
        return part

    def ranked(self) -> _Block:
        """The members ordered by key, largest first, as a block whose activations stay where
        they are (the slot map names each member's slot; only the valid rows are ever copied)."""
        order = self.keys.argsort(dim=1, descending=True, stable=True)
        keys = self.keys.gather(1, order)
        return _Block(None, None, self.seq_ids.gather(1, order), self.extremes.gather(1, order), self.acts,
                      torch.isfinite(keys), None, order)

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.NAMES]

    def state(self) -> dict:
        return {name: getattr(self, name).cpu() for name in self.NAMES}

    @classmethod
    def restore(cls, saved: dict, device) -> _KeptSequences:
        kept = cls()
        for name in cls.NAMES:
            setattr(kept, name, saved[name].to(device))
        return kept


class _Chunk:
    """One batch's activations of a slice of features, (B, T, Fc), with the counted mask;
    rows come out in ``dtype``, the kept sequences' dtype."""

    def __init__(self, acts: torch.Tensor, counted: torch.Tensor, dtype: torch.dtype):
        self.acts, self.counted, self.dtype = acts, counted, dtype
        self._by_feature: torch.Tensor | None = None

    def rows(self, seq: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """(n, T) activations of (sequence, feature) pairs, zero where a token does not count.
        When many pairs are wanted (early in a pass), one masked transpose to (B, Fc, T), cast
        once, makes every row a contiguous copy; a few are gathered from the strided
        activations."""
        if self._by_feature is None and seq.numel() * 8 >= self.acts.shape[0] * self.acts.shape[2]:
            batch, tokens, features = self.acts.shape
            self._by_feature = torch.empty((batch, features, tokens), dtype=self.dtype, device=self.acts.device)
            torch.mul(self.acts.transpose(1, 2), self.counted.unsqueeze(1), out=self._by_feature)
        if self._by_feature is not None:
            batch, features, tokens = self._by_feature.shape
            return self._by_feature.view(batch * features, tokens).index_select(0, seq * features + feature)
        return (self.acts[seq, :, feature] * self.counted[seq]).to(self.dtype)


def kept_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of kept sequences' activations: the subject's where it has KEPT_ACT_BYTES (the
    plan sizes the state by the same rule), else float16, the precision the exemplar tables
    store. A float32 subject (CPU) would otherwise write and hold twice the bytes for digits
    the tables drop."""
    return dtype if dtype.itemsize <= KEPT_ACT_BYTES else torch.float16


class _SplitState:
    """One split's kept sequences for every polarity, and its random sequences' activations."""

    def __init__(self, top, reservoir, random_ids, random_acts, quiet=None):
        self.top: dict[str, _KeptSequences] = top
        self.reservoir: dict[str, _KeptSequences] = reservoir
        self.random_ids: torch.Tensor = random_ids  # (n,), on the host
        self.random_acts: torch.Tensor = random_acts  # (n, F, T)
        self.quiet: dict[str, _KeptSequences] = quiet or {}

    @classmethod
    def fresh(cls, features, polarities, config: ExemplarsConfig, seq_len, random_ids, device, dtype) -> _SplitState:
        kept = kept_dtype(dtype)
        top = {p: _KeptSequences.fresh(features, config.top_k, seq_len, device, kept) for p in polarities}
        reservoir = ({p: _KeptSequences.fresh(features, config.quantile_reservoir, seq_len, device, kept) for p in polarities}
                     if config.per_quantile else {})
        quiet = ({p: _KeptSequences.fresh(features, config.quiet_per_split, seq_len, device, kept) for p in polarities}
                 if config.quiet_per_split else {})
        acts = torch.zeros((len(random_ids), features, seq_len), dtype=dtype, device=device)
        return cls(top, reservoir, random_ids.cpu(), acts, quiet)

    def tensors(self) -> list[torch.Tensor]:
        kept = (*self.top.values(), *self.reservoir.values(), *self.quiet.values())
        return [t for k in kept for t in k.tensors()] + [self.random_acts]

    def state(self) -> dict:
        return {"top": {p: k.state() for p, k in self.top.items()},
                "reservoir": {p: k.state() for p, k in self.reservoir.items()},
                "quiet": {p: k.state() for p, k in self.quiet.items()},
                "random_ids": self.random_ids, "random_acts": self.random_acts.cpu()}

    @classmethod
    def restore(cls, saved: dict, device) -> _SplitState:
        return cls({p: _KeptSequences.restore(v, device) for p, v in saved["top"].items()},
                   {p: _KeptSequences.restore(v, device) for p, v in saved["reservoir"].items()},
                   saved["random_ids"], saved["random_acts"].to(device),
                   {p: _KeptSequences.restore(v, device) for p, v in saved.get("quiet", {}).items()})


class _TokenStats:
    """Running sums over every counted train token, and a uniform sample of train tokens (the
    same tokens for every feature, with their token ids and positions after the prefix) for
    approximate quantiles and the positional and unigram filters."""

    SUMS = ("sum", "sumsq", "n_pos", "n_neg", "n_tokens")

    def __init__(self, sums: dict, token_keys, token_values, token_ids, token_positions):
        self.sums, self.token_keys, self.token_values = sums, token_keys, token_values
        self.token_ids, self.token_positions = token_ids, token_positions  # -1: not known (an older checkpoint)

    @classmethod
    def fresh(cls, features, sample_size, device, dtype) -> _TokenStats:
        sums = {name: torch.zeros(features, dtype=torch.float64, device=device) for name in cls.SUMS[:-1]}
        sums["n_tokens"] = torch.zeros((), dtype=torch.float64, device=device)
        return cls(sums, torch.full((sample_size,), -torch.inf, device=device),
                   torch.zeros((sample_size, features), dtype=dtype, device=device),
                   torch.full((sample_size,), -1, dtype=torch.long, device=device),
                   torch.full((sample_size,), -1, dtype=torch.long, device=device))

    def entering(self, counted, token_keys):
        """Which batch tokens replace which sample rows: (leaving rows, batch rows, positions,
        keys), or None. Only keys are compared, once per batch for every feature."""
        better = counted & (token_keys > self.token_keys.min())
        if not better.any():
            return None
        size = self.token_keys.shape[0]
        candidates = token_keys[better]
        chosen = torch.zeros(size + candidates.shape[0], dtype=torch.bool, device=candidates.device)
        chosen[torch.cat([self.token_keys, candidates]).topk(size).indices] = True
        leaving = (~chosen[:size]).nonzero().squeeze(1)
        entering = chosen[size:].nonzero().squeeze(1)
        rows, positions = better.nonzero(as_tuple=True)
        return leaving, rows[entering], positions[entering], candidates[entering]

    def update(self, cols: slice, acts, ranges: _CountedRanges, entering) -> None:
        """Fold one (B, T, Fc) chunk of the features ``cols`` in, reading counted tokens only,
        sums accumulated in float64 (:func:`_reduce_tokens`)."""
        for view in ranges.views(acts):
            values = view.float()
            self.sums["sum"][cols] += _reduce_tokens(values)
            self.sums["sumsq"][cols] += _reduce_tokens(values * values)
            self.sums["n_pos"][cols] += _reduce_tokens(view > 0)
            self.sums["n_neg"][cols] += _reduce_tokens(view < 0)
        if entering is not None:
            leaving, rows, positions, _ = entering
            self.token_values[leaving, cols] = acts[rows, positions].to(self.token_values.dtype)

    def commit(self, counted, entering, ids, prefix_len) -> None:
        """After every chunk of a batch: count its tokens, let the entering keys in (with the
        batch's ``ids`` (B, T) and ``prefix_len`` (B,) on the device)."""
        self.sums["n_tokens"] += counted.sum()
        if entering is not None:
            leaving, rows, positions, keys = entering
            self.token_keys[leaving] = keys
            self.token_ids[leaving] = ids[rows, positions]
            self.token_positions[leaving] = positions - prefix_len[rows]

    def tensors(self) -> list[torch.Tensor]:
        return [*self.sums.values(), self.token_keys, self.token_values, self.token_ids, self.token_positions]

    def state(self) -> dict:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "token_keys": self.token_keys.cpu(),
                "token_values": self.token_values.cpu(), "token_ids": self.token_ids.cpu(),
                "token_positions": self.token_positions.cpu()}

    @classmethod
    def restore(cls, saved: dict, device) -> _TokenStats:
        unknown = torch.full(saved["token_keys"].shape, -1, dtype=torch.long)
        return cls({k: v.to(device) for k, v in saved["sums"].items()}, saved["token_keys"].to(device),
                   saved["token_values"].to(device), saved.get("token_ids", unknown).to(device),
                   saved.get("token_positions", unknown).to(device))

    def sample_tokens(self) -> _SampleTokens:
        """The token sample's tokens, the same for every layer: made once when the tables are."""
        finite = torch.isfinite(self.token_keys)
        return _SampleTokens.of(finite, self.token_positions[finite].cpu().numpy(), self.token_ids[finite].cpu().numpy())

    def frames(self, cols: slice, maxima: dict[Polarity, np.ndarray], tokens: _SampleTokens,
               config: ExemplarsConfig) -> dict[Polarity, pl.DataFrame]:
        """The stats rows of the features ``cols`` for each polarity in ``maxima`` (polarity ->
        (F,) largest extreme of the train top-k, the table's max and scale): moments from the
        running sums, quantiles and delphi's filters from the token sample (``tokens``, from
        :meth:`sample_tokens`)."""
        n = max(float(self.sums["n_tokens"]), 1.0)
        mean = self.sums["sum"][cols] / n
        std = (self.sums["sumsq"][cols] / n - mean**2).clamp(min=0).sqrt().float().cpu().numpy()
        sampled = self._sample_columns(cols, maxima, tokens, config)
        frames = {}
        for polarity, top in maxima.items():
            active = self.sums["n_pos"] if polarity is Polarity.POS else self.sums["n_neg"]
            quantiles, mi, distinct = sampled[polarity]
            columns = {"max": top, "mean": (mean * polarity.sign).float().cpu().numpy(), "std": std,
                       "frac_active": (active[cols] / n).float().cpu().numpy()}
            columns.update({_quantile_column(q): quantiles[i] for i, q in enumerate(STAT_QUANTILES)})
            columns.update(n_tokens=np.full(len(top), int(n), dtype=np.int64),
                           scale=top,  # the one activation normalizer (FeatureStats.scale): the train max
                           positional_mi=mi, is_positional=mi > config.positional_mi,
                           unigram_tokens=pl.Series(distinct).fill_nan(None).cast(pl.Int32),
                           is_unigram=np.where(np.isnan(distinct), False, distinct <= config.unigram_tokens))
            frames[polarity] = pl.DataFrame(columns)
        return frames

    def _sample_columns(self, cols: slice, maxima: dict[Polarity, np.ndarray], tokens: _SampleTokens,
                        config: ExemplarsConfig) -> dict:
        """polarity -> (quantiles (len(STAT_QUANTILES), F), positional_mi (F,), unigram
        distinct counts (F,), NaN where not counted), from the token sample, STATS_BLOCK
        features at a time: a block's sample is transposed to (features, tokens) and sorted
        once for both polarities (the q-quantile of -x is minus x's value at the mirrored
        rank). Blocks a few MB wide keep the copies in cache and out of fresh pages, where a
        layer's (F, n) copies are tens of MB each. The filters read the sample's tokens whose
        position is known: all of them, unless the sample comes from an older checkpoint."""
        features = cols.stop - cols.start
        n = len(tokens.known)
        ranks = [round(q * (n - 1)) for q in STAT_QUANTILES]
        out = {polarity: (np.zeros((len(STAT_QUANTILES), features), dtype=np.float32),
                          np.zeros(features, dtype=np.float32), np.full(features, np.nan)) for polarity in maxima}
        if not n:
            return out
        for lo in range(0, features, STATS_BLOCK):
            hi = min(lo + STATS_BLOCK, features)
            strip = self.token_values[:, cols.start + lo : cols.start + hi]
            values = _transposed(strip if tokens.all_finite else strip[tokens.finite])  # (b, n) float32
            ordered = np.sort(values, axis=1)  # a SIMD sort: faster than a partition at 8 ranks
            known, known_ordered = values, ordered
            if not tokens.all_known:
                known = np.ascontiguousarray(values[:, tokens.known])
                known_ordered = np.sort(known, axis=1)
            for polarity, top in maxima.items():
                quantiles, mi, distinct = out[polarity]
                picked = ordered[:, ranks] if polarity is Polarity.POS else -ordered[:, [n - 1 - r for r in ranks]]
                quantiles[:, lo:hi] = picked.T
                mi[lo:hi], distinct[lo:hi] = _filters(known, known_ordered, polarity, top[lo:hi], tokens, config)
        return out


STATS_BLOCK = 256
"""Features per block of the token sample's statistics: (256, 8,192) float32 is 8 MB."""


def _transposed(strip: torch.Tensor, rows: int = 64) -> np.ndarray:
    """(n, b) -> (b, n) float32 on the host, ``rows`` of n at a time: a slab of 64 rows stays
    in cache while it is scattered into columns (torch's one-call transpose of the strided
    strip took 2-3x as long on CPU, for 256 to 1,536 columns of 8,192 rows)."""
    out = torch.empty((strip.shape[1], strip.shape[0]), dtype=torch.float32)
    for lo in range(0, strip.shape[0], rows):
        out[:, lo : lo + rows].copy_(strip[lo : lo + rows].T)
    return out.numpy()


def _filters(values: np.ndarray, ordered: np.ndarray, polarity: Polarity, maxima: np.ndarray, tokens: _SampleTokens,
             config: ExemplarsConfig) -> tuple[np.ndarray, np.ndarray]:
    """delphi's feature filters over a block of features' token sample (``values`` (F, n),
    ``ordered`` the same sorted per feature): ``positional_mi`` (bits) between whether a token
    activates (beyond exemplars.activating_fraction of the train max) and its position after
    the prefix, in POSITION_BINS equal bins; and the number of distinct token ids among the
    strongest 80% of the activating sample tokens (NaN with fewer than 2 x
    exemplars.unigram_tokens of them), from which the stats table flags ``is_positional`` (MI
    above exemplars.positional_mi) and ``is_unigram`` (at most exemplars.unigram_tokens: a
    candidate, which :mod:`neuron_assets.features.unigram` then confirms or clears)."""
    features, n = values.shape
    mi, distinct = np.zeros(features, dtype=np.float32), np.full(features, np.nan)
    if not n:
        return mi, distinct
    signed = values if polarity is Polarity.POS else -values
    active = signed > (config.activating_fraction * np.maximum(maxima, 0.0))[:, None]
    mi = positional_information(active.T, tokens.bins, POSITION_BINS)
    firing = active.sum(1)
    eligible = np.nonzero(firing >= 2 * config.unigram_tokens)[0]
    take = np.ceil(0.8 * firing[eligible]).astype(np.int64)
    if np.isnan(ordered[:, -1]).any():  # NaN sorts last: find the cut among the active tokens alone
        cut = -np.sort(np.where(active[eligible], -signed[eligible], np.float32(np.inf)), axis=1)[
            np.arange(len(eligible)), take - 1]
    else:  # the active tokens are the largest, so the take-th largest of all is the cut
        cut = ordered[eligible, n - take] if polarity is Polarity.POS else -ordered[eligible, take - 1]
    takes, cuts = np.zeros(features, dtype=np.int64), np.full(features, np.inf, dtype=np.float32)
    takes[eligible], cuts[eligible] = take, cut
    distinct[eligible] = _distinct_strongest(signed, active, tokens, takes, cuts)[eligible]
    return mi, distinct


def _reduce_tokens(values: torch.Tensor) -> torch.Tensor:
    """(B, T, F) -> (F,): the sum over tokens, then over sequences, accumulated in float64
    (int32 counts for bool). Two single-axis reductions: on CPU, torch reduces both axes of a
    strided view in one call several times slower (bench/reductions.py). float64 also keeps a
    feature's statistics from depending on how many features share the tensor: a float32 sum
    over one axis changes in its last bits with the tensor's width, and the pass must give the
    same tables however its groups and chunks cut the layers (test_foundation's budget test)."""
    if values.dtype == torch.bool:
        return values.sum(dim=1, dtype=torch.int32).sum(dim=0)
    return values.sum(dim=1, dtype=torch.float64).sum(dim=0)


@dataclass
class _SampleTokens:
    """The token sample's tokens (shared by every feature of a pass): which sample rows are
    filled, which of those have a known position, and of those, the position bins and the
    token ids renumbered to the few the sample holds."""

    finite: torch.Tensor  # (sample size,) bool: filled rows, the n tokens below
    all_finite: bool
    known: np.ndarray  # (n,) bool
    all_known: bool
    bins: np.ndarray  # (n_known,)
    compact: np.ndarray  # (n_known,) index into the distinct ids
    n_ids: int

    @classmethod
    def of(cls, finite: torch.Tensor, positions: np.ndarray, ids: np.ndarray) -> _SampleTokens:
        known = positions >= 0
        positions, ids = positions[known], ids[known]
        bins = (np.minimum(positions * POSITION_BINS // max(int(positions.max()) + 1, 1), POSITION_BINS - 1)
                if positions.size else positions)
        distinct, compact = np.unique(ids, return_inverse=True)
        return cls(finite, bool(finite.all()), known, bool(known.all()), bins, compact, len(distinct))


def _distinct_strongest(values: np.ndarray, active: np.ndarray, tokens: _SampleTokens, take: np.ndarray,
                        cut: np.ndarray, block: int = 256) -> np.ndarray:
    """Per row of ``values`` and ``active`` ((F, n)): the number of distinct token ids among its
    ``take`` strongest active tokens (ties in token order), whose weakest value is ``cut``; 0
    for a row whose ``take`` is 0 (give it a ``cut`` of inf). A block of rows at a time with
    no loop over features: the tokens above the cut are in, and of those equal to it the first
    ones fill the rest. Blocks are views of the rows (a gather of the wanted rows would copy
    them), and the chosen tokens are found through the flat index (numpy's 2-D nonzero took
    about 4x as long). The ids come renumbered to the few the sample holds
    (``tokens.compact``), so a block marks them in a small (rows, distinct ids) table instead
    of hashing (row, id) pairs."""
    out = np.zeros(len(values), dtype=np.float64)
    if not tokens.compact.size:
        return out
    n = values.shape[1]
    for lo in range(0, len(values), block):
        act, vals, edge = active[lo : lo + block], values[lo : lo + block], cut[lo : lo + block, None]
        chosen = act & (vals >= edge)
        ties = act & (vals == edge)
        tie_count = np.count_nonzero(ties, axis=1)
        need = take[lo : lo + block] - (np.count_nonzero(chosen, axis=1) - tie_count)
        over = np.nonzero(tie_count > need)[0]  # rows where not every tie fits: the first ones fill
        if over.size:
            chosen[over] &= ~ties[over] | (np.cumsum(ties[over], axis=1) <= need[over, None])
        row, token = np.divmod(np.flatnonzero(chosen), n)
        marks = np.zeros((len(act), tokens.n_ids), dtype=bool)
        marks[row, tokens.compact[token]] = True
        out[lo : lo + len(act)] = np.count_nonzero(marks, axis=1)
    return out


def positional_information(active: np.ndarray, bins: np.ndarray, n_bins: int) -> np.ndarray:
    """(F,) mutual information in bits between each column of ``active`` (n, F) bool and the
    position bin (n,) of the same tokens."""
    n = active.shape[0]
    exact = np.float32 if n < 2**24 else np.float64
    onehot = np.zeros((n_bins, n), dtype=exact)
    onehot[bins, np.arange(n)] = 1.0
    p_bin = np.bincount(bins, minlength=n_bins).astype(np.float64) / n  # (B,)
    # Counts of 0/1 terms below 2**24 are exact in float32, so this is the float64 count. The
    # product goes through torch, not numpy: OpenBLAS's threads spin for a while after every
    # call, and one call per block of features kept the other core busy for nothing, where
    # the tables' second build thread (TABLE_WORKERS) runs (the build took 1.4x as long).
    counts = torch.mm(torch.from_numpy(onehot), torch.from_numpy(active.astype(exact)))
    joint_on = counts.numpy().astype(np.float64) / n  # (B, F): p(active, bin)
    joint_off = p_bin[:, None] - joint_on
    p_on = joint_on.sum(0)  # (F,)
    mi = np.zeros(active.shape[1])
    for joint, marginal in ((joint_on, p_on), (joint_off, 1.0 - p_on)):
        expected = p_bin[:, None] * marginal[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(joint > 0, joint * np.log2(joint / expected), 0.0)
        mi += terms.sum(0)
    return np.maximum(mi, 0.0).astype(np.float32)


class _PassState:
    """Everything one pass over the corpus keeps for one group of features. A split's state
    is allocated on the device when its first batch arrives and moves to host memory when
    its last batch is done, so the device holds only the split being read (and the train
    statistics while train is read)."""

    def __init__(self, neurons, polarities, config: ExemplarsConfig, seq_len, random_ids, device, dtype):
        self.layout = _FeatureLayout(neurons)
        self.polarities = [Polarity(p) for p in polarities]
        self.config, self.seq_len, self.random_ids = config, seq_len, random_ids
        self.device, self.dtype = device, dtype
        self.splits: dict[str, _SplitState] = {}
        self.stats: _TokenStats | None = None
        self.final_thresholds: dict[str, torch.Tensor] = {}  # polarity -> (F,), once train is read

    def split_state(self, split: str) -> _SplitState:
        if split not in self.splits:
            self.splits[split] = _SplitState.fresh(self.layout.total, [p.value for p in self.polarities], self.config,
                                                   self.seq_len, self.random_ids[split], self.device, self.dtype)
        if split == Split.TRAIN.value and self.stats is None:
            self.stats = _TokenStats.fresh(self.layout.total, self.config.stats_token_sample, self.device, self.dtype)
        return self.splits[split]

    def update(self, split: str, per_layer: dict[int, torch.Tensor], batch: _Batch, random_keys) -> None:
        """Fold one batch of one split in, layer by layer and chunk by chunk of features."""
        state = self.split_state(split)
        device = self.device
        counted = batch.counted.to(device)
        seq_ids = batch.seq_ids.to(device)
        sequence_keys, token_keys = (key.to(device) for key in random_keys)
        ranges = _CountedRanges(batch.prefix_len, batch.n_tokens, device)
        wanted = state.random_ids
        hits = (batch.seq_ids.unsqueeze(1) == wanted.unsqueeze(0)).nonzero().tolist()
        train = split == Split.TRAIN.value
        entering = self.stats.entering(counted, token_keys) if train else None
        for layer in self.layout.layers:
            acts = per_layer[layer]  # (B, T, F_layer)
            offset, width = self.layout.offsets[layer], acts.shape[-1]
            step = max(1, CHUNK_BYTES // (acts.shape[0] * acts.shape[1] * 4))
            for lo in range(0, width, step):
                chunk = acts[..., lo : lo + step]
                cols = slice(offset + lo, offset + lo + chunk.shape[-1])
                highest, lowest = ranges.extremes(chunk)
                offered = _Chunk(chunk, counted, kept_dtype(self.dtype))
                for polarity in self.polarities:
                    extremes = highest if polarity is Polarity.POS else -lowest
                    state.top[polarity.value].offer(cols, extremes, extremes, seq_ids, offered)
                    reservoir = state.reservoir.get(polarity.value)
                    quiet = state.quiet.get(polarity.value)
                    if reservoir is None and quiet is None:
                        continue
                    threshold = self.threshold(split, polarity, cols)  # (Fc,), after this batch's top offer
                    if reservoir is not None:
                        keys = torch.where(extremes > threshold, sequence_keys.unsqueeze(1), -torch.inf)
                        reservoir.offer(cols, keys, extremes, seq_ids, offered)
                    if quiet is not None:
                        below = (extremes <= threshold) & torch.isfinite(extremes)
                        quiet.offer(cols, torch.where(below, sequence_keys.unsqueeze(1), -torch.inf), extremes,
                                    seq_ids, offered)
                for row, slot in hits:
                    state.random_acts[slot, cols] = (chunk[row] * counted[row].unsqueeze(-1)).T.to(self.dtype)
                if train:
                    self.stats.update(cols, chunk, ranges, entering)
        if train:
            self.stats.commit(counted, entering, batch.ids.to(device), torch.as_tensor(batch.prefix_len, device=device))

    def threshold(self, split: str, polarity: Polarity, cols: slice) -> torch.Tensor:
        """(Fc,) activating threshold of the features ``cols`` on the device: the fraction of
        the train max, read from the train top-k (running while train is read, final after;
        0 where no train sequence was read or the max is not positive)."""
        train = self.splits.get(Split.TRAIN.value)
        if train is None:
            return torch.zeros(cols.stop - cols.start, device=self.device)
        if split != Split.TRAIN.value:  # final: computed once per polarity
            if polarity.value not in self.final_thresholds:
                self.final_thresholds[polarity.value] = _threshold(train.top[polarity.value].extremes,
                                                                   self.config).to(self.device)
            return self.final_thresholds[polarity.value][cols]
        return _threshold(train.top[polarity.value].extremes[cols], self.config)

    def finish_split(self, split: str) -> None:
        self.splits[split] = _SplitState.restore(self.splits[split].state(), "cpu")
        if split == Split.TRAIN.value:
            self.stats = _TokenStats.restore(self.stats.state(), "cpu")

    def restore(self, checkpoint: Path, resume: _Resume, device) -> int:
        """Load the checkpointed group's finished splits and the split in progress; returns
        the number of batches done."""
        for split in resume.finished_splits:
            saved = torch.load(checkpoint / _split_file(resume.group, split), map_location="cpu", weights_only=False)
            self.splits[split] = _SplitState.restore(saved["state"], "cpu")
            if saved["stats"] is not None:
                self.stats = _TokenStats.restore(saved["stats"], "cpu")
        if resume.progress is not None:
            split = resume.progress["split"]
            self.splits[split] = _SplitState.restore(resume.progress["state"], device)
            if resume.progress["stats"] is not None:
                self.stats = _TokenStats.restore(resume.progress["stats"], device)
        return resume.batches_done

    def tensors(self) -> list[torch.Tensor]:
        return [t for s in self.splits.values() for t in s.tensors()] + (self.stats.tensors() if self.stats else [])

    # -- turning the state into tables ------------------------------------------------------

    def tables(self, corpus: _Corpus, config: ExemplarsConfig, seed: int):
        """((layer, polarity), (exemplars, stats)) of this group's features in layer order, one
        at a time, built on the host, so the end-of-pass sorts are one layer wide. Up to
        TABLE_WORKERS layers are built at once in threads (most of the work is numpy and
        polars, single-threaded and outside the GIL), while the caller writes the one before."""
        for split in Split:  # a split the corpus does not have keeps empty exemplars
            if split.value not in self.splits:
                self.split_state(split.value)
                self.finish_split(split.value)
        tokens = self.stats.sample_tokens()
        pool, building = ThreadPoolExecutor(TABLE_WORKERS, thread_name_prefix="exemplar-tables"), deque()
        try:
            for layer in self.layout.layers:
                building.append(pool.submit(self._layer_tables, layer, tokens, corpus, config, seed))
                if len(building) > TABLE_WORKERS:  # the one queued starts as the first is taken
                    yield from building.popleft().result()
            while building:
                yield from building.popleft().result()
        finally:  # an error, or a caller that stops early: layers not started are dropped
            pool.shutdown(cancel_futures=True)

    def _layer_tables(self, layer: int, tokens: _SampleTokens, corpus: _Corpus, config: ExemplarsConfig, seed: int):
        """[((layer, polarity), (exemplars, stats))] of one layer, for every polarity."""
        cols = self.layout.columns(layer)
        train = self.splits[Split.TRAIN.value]
        maxima = {polarity: train.top[polarity.value].extremes[cols].amax(dim=1).cpu().numpy()
                  for polarity in self.polarities}
        stats_frames = self.stats.frames(cols, maxima, tokens, config)  # one sort of the token sample for both polarities
        tables = []
        for polarity in self.polarities:
            blocks = []
            threshold = _threshold(train.top[polarity.value].extremes[cols], config)
            for split in Split:
                state = self.splits[split.value]
                blocks.append(replace(state.top[polarity.value].rows(cols).ranked(), kind=ExemplarKind.TOP, split=split))
                reservoir = state.reservoir.get(polarity.value)
                if reservoir is not None:  # train members at or below the final threshold leave
                    kept = reservoir.rows(cols)
                    blocks.append(_quantile_block(_keeping(kept, kept.extremes > threshold.unsqueeze(1)), split, config,
                                                  seed))
                quiet = state.quiet.get(polarity.value)
                if quiet is not None:
                    kept = quiet.rows(cols)
                    ranked = _keeping(kept, kept.extremes <= threshold.unsqueeze(1)).ranked()  # a no-op check
                    blocks.append(replace(ranked, kind=ExemplarKind.QUIET, split=split))
                blocks.append(_random_block(state, cols, split, polarity, corpus))
            stats = stats_frames[polarity].with_columns(
                pl.Series("neuron", self.layout.neurons[layer], dtype=pl.Int32),
                pl.lit(layer, dtype=pl.Int16).alias("layer"),
                pl.lit(polarity.value).alias("polarity"),
            )
            exemplars = _exemplar_frame(blocks, self.layout.neurons[layer], layer, polarity, corpus.n_tokens_of)
            tables.append(((layer, polarity), (exemplars, stats.select("layer", "polarity", "neuron",
                                                                       pl.exclude("layer", "polarity", "neuron")))))
        return tables


TABLE_WORKERS = 2
"""Layers whose tables are built at once at the end of a pass. Two keep two cores busy (the
build is mostly single-threaded numpy) and hold two layers' tables beside the one the caller
is writing: the plan's host peak counts the three (about 1.3 GB per layer, both polarities,
for configs/llama31_8b_instruct.yaml)."""


class _LayerAssembler:
    """Hands each layer's tables on once every group holding a piece of it is done."""

    def __init__(self, neurons: dict[int, list[int]], emit):
        self.wanted = {layer: len(v) for layer, v in neurons.items()}
        self.parts: dict[tuple, list] = {}
        self.emit = emit

    def add(self, tables: dict) -> None:
        for (layer, polarity), pair in sorted(tables.items(), key=lambda item: (item[0][0], item[0][1].value)):
            parts = self.parts.setdefault((layer, polarity), [])
            parts.append(pair)
            if sum(stats.height for _, stats in parts) < self.wanted[layer]:
                continue
            del self.parts[(layer, polarity)]
            if len(parts) == 1:
                self.emit(layer, polarity, *parts[0])
            else:
                self.emit(layer, polarity, pl.concat([e for e, _ in parts]).sort("neuron", "split", "kind", "rank"),
                          pl.concat([s for _, s in parts]).sort("neuron"))


class _Measured:
    """The state and table sizes a run reached, for holding the plan to account."""

    def __init__(self, target: dict | None):
        self.target = target
        self.peak_device = self.peak_total = self.peak_checkpoint = self.checkpoint_written = 0
        self.layer_tables: dict[int, int] = {}  # layer -> bytes of its tables, every polarity

    def observe(self, state: _PassState) -> None:
        if self.target is None:
            return
        tensors = state.tensors()
        self.peak_total = max(self.peak_total, sum(t.nbytes for t in tensors))
        self.peak_device = max(self.peak_device, sum(t.nbytes for t in tensors if t.device == torch.device(state.device)))

    def observe_tables(self, layer: int, pair: tuple[pl.DataFrame, pl.DataFrame]) -> None:
        """One (layer, polarity)'s exemplars and stats as built, in host memory."""
        if self.target is None:
            return
        self.layer_tables[layer] = self.layer_tables.get(layer, 0) + sum(frame.estimated_size() for frame in pair)

    def observe_checkpoint(self, folder: Path, written: Path) -> None:
        """A file just saved to the checkpoint ``folder``: bytes written, and the folder's size."""
        if self.target is None:
            return
        self.checkpoint_written += written.stat().st_size
        self.peak_checkpoint = max(self.peak_checkpoint, sum(path.stat().st_size for path in folder.iterdir()))

    def finish(self, plan: ExemplarPlan) -> None:
        if self.target is not None:
            self.target.update(peak_device_state_bytes=self.peak_device, peak_state_bytes=self.peak_total,
                               layer_table_bytes=dict(self.layer_tables), peak_checkpoint_bytes=self.peak_checkpoint,
                               checkpoint_written_bytes=self.checkpoint_written, passes=plan.passes)


@dataclass
class _Block:
    """(F, j) arrays of one kind of exemplar in one split, ready to flatten into rows."""

    kind: ExemplarKind
    split: Split
    seq_ids: torch.Tensor
    extremes: torch.Tensor
    acts: torch.Tensor  # (F, j, T), or (F, K, T) read through slots
    valid: torch.Tensor
    bins: torch.Tensor | None
    slots: torch.Tensor | None = None  # (F, j): the slot of acts' second axis each member is in


def _threshold(train_top_extremes: torch.Tensor, config: ExemplarsConfig) -> torch.Tensor:
    """(F,) activating threshold from the train top-k's extremes: fraction * max(max, 0)."""
    return config.activating_fraction * train_top_extremes.amax(dim=1).clamp(min=0).float()


def _keeping(kept: _KeptSequences, keep: torch.Tensor) -> _KeptSequences:
    """A view of kept sequences whose members outside ``keep`` (F, k) count as empty slots."""
    part = kept.rows(slice(None))
    part.keys = torch.where(keep, kept.keys, -torch.inf)
    return part


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
    return _Block(ExemplarKind.QUANTILE, split, reservoir.seq_ids.gather(1, members), reservoir.extremes.gather(1, members),
                  reservoir.acts, valid, bin_index.expand_as(members), members)


def _random_block(state: _SplitState, cols: slice, split: Split, polarity: Polarity, corpus: _Corpus) -> _Block:
    ids = state.random_ids
    acts = state.random_acts[:, cols]  # (n, F, T)
    features = acts.shape[1]
    positions = torch.arange(acts.shape[2])
    prefix = torch.as_tensor(corpus.prefix_of[ids.numpy()], dtype=torch.long)
    lengths = torch.as_tensor(corpus.n_tokens_of[ids.numpy()], dtype=torch.long)
    counted = (positions >= prefix.unsqueeze(1)) & (positions < lengths.unsqueeze(1))  # (n, T)
    signed = acts.float() * polarity.sign
    extremes = signed.masked_fill(~counted.unsqueeze(1), -torch.inf).amax(dim=2) if acts.shape[2] else signed.sum(2)
    return _Block(ExemplarKind.RANDOM, split, ids.unsqueeze(0).expand(features, -1), extremes.T,
                  acts.permute(1, 0, 2), torch.ones(features, len(ids), dtype=torch.bool), None)


def _gather_rows(acts: torch.Tensor, first: np.ndarray, second: np.ndarray, out: torch.Tensor) -> None:
    """out[:] = acts[first, second] for a (F, K, T) host tensor and an (n, T) ``out``: where
    acts is contiguous and of out's dtype, one index_select of a flat view straight into out
    (on CPU several times faster than two index tensors, or than a gather into a fresh
    tensor)."""
    if not acts.is_contiguous():
        out.copy_(acts[torch.as_tensor(first), torch.as_tensor(second)])
        return
    flat, index = acts.view(-1, acts.shape[2]), torch.as_tensor(first * acts.shape[1] + second)
    if acts.dtype == out.dtype:
        torch.index_select(flat, 0, index, out=out)
    else:  # e.g. bfloat16 kept sequences of a GPU run
        out.copy_(flat.index_select(0, index))


FRAME_CHUNK_ROWS = 2**16
"""Rows per Arrow chunk of an exemplars table being built: its buffers (a few MB) are reused
from the heap, where one buffer per table (tens of MB) would be fresh pages, faulted in on
every table."""


def _exemplar_frame(blocks, neuron_ids: list[int], layer: int, polarity: Polarity, n_tokens: np.ndarray) -> pl.DataFrame:
    """The rows of one layer x polarity, ordered by neuron, split, kind and rank, with no sort:
    blocks are taken in (split, kind) order and each block lists its members feature by
    feature (np.nonzero's order), so counting the members of every (feature, block) gives
    each row its place. The table is built in chunks of consecutive features, about
    FRAME_CHUNK_ROWS rows each: a block's activation rows are gathered once per chunk, side by
    side in one float16 buffer, which one gather then puts in the table's order (two gathers:
    on CPU a scatter into place costs several times more)."""
    blocks = sorted(blocks, key=lambda b: (b.split.value, b.kind.value))
    members = [np.nonzero(block.valid.cpu().numpy()) for block in blocks]  # (features, slots), feature-major
    columns = [(block.seq_ids.cpu().numpy(), block.extremes.float().cpu().numpy(),
                None if block.bins is None else block.bins.cpu().numpy(),
                None if block.slots is None else block.slots.cpu().numpy()) for block in blocks]
    n_features, seq_len = len(neuron_ids), blocks[0].acts.shape[-1]
    counts = np.stack([np.bincount(feature, minlength=n_features) for feature, _ in members], axis=1)  # (F, blocks)
    bounds = np.vstack([np.zeros((1, len(blocks)), dtype=np.int64), np.cumsum(counts, axis=0)])  # members before a feature
    neuron = np.asarray(neuron_ids, dtype=np.int32)
    step = max(1, FRAME_CHUNK_ROWS * n_features // max(int(counts.sum()), 1))
    starts = range(0, n_features, step)
    scratch = torch.empty((max((int(counts[f0 : f0 + step].sum()) for f0 in starts), default=0), seq_len), dtype=torch.float16)
    chunks = []
    for f0 in starts:
        f1 = min(f0 + step, n_features)
        part = counts[f0:f1]
        first = (np.cumsum(part) - part.reshape(-1)).reshape(part.shape)  # each (feature, block)'s first row
        total = int(part.sum())
        code, rank = np.empty(total, dtype=np.int8), np.empty(total, dtype=np.int16)
        seq_id, extreme = np.empty(total, dtype=np.int64), np.empty(total, dtype=np.float32)
        bin_values = np.full(total, -1, dtype=np.int16)
        gathered = scratch[:total]  # block by block
        order = np.empty(total, dtype=np.int64)  # the gathered row of each table row
        start = 0
        for b, (block, (features, slots), (seq_ids, extremes, bins, sources)) in enumerate(zip(blocks, members, columns)):
            lo, hi = bounds[f0, b], bounds[f1, b]
            if hi == lo:
                continue
            feature, slot = features[lo:hi], slots[lo:hi]
            dest = first[feature - f0, b] + (np.arange(lo, hi) - bounds[feature, b])
            code[dest], rank[dest] = b, slot
            seq_id[dest], extreme[dest] = seq_ids[feature, slot], extremes[feature, slot]
            if bins is not None:
                bin_values[dest] = bins[feature, slot]
            source = slot if sources is None else sources[feature, slot]
            _gather_rows(block.acts, feature, source, gathered[start : start + hi - lo])
            order[dest] = np.arange(start, start + hi - lo)
            start += hi - lo
        rows = torch.index_select(gathered, 0, torch.from_numpy(order)).numpy()
        lengths = n_tokens[seq_id]
        full = bool((lengths == seq_len).all())  # full windows: every token is kept, no masked copy
        values = rows.reshape(-1) if full else rows[np.arange(seq_len)[None, :] < lengths[:, None]]
        chunks.append(pa.record_batch({
            "layer": pa.array(np.full(total, layer, dtype=np.int16)),
            "neuron": pa.array(np.repeat(neuron[f0:f1], part.sum(1))),
            "block": pa.array(code),
            "rank": pa.array(rank),
            "bin": pa.array(bin_values, mask=bin_values < 0),
            "seq_id": pa.array(seq_id),
            "extreme": pa.array(extreme),
            "activations": pa.LargeListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lengths)])),
                                                         pa.array(values)),
        }))
    # The text columns are made by polars from the block codes: Arrow strings would be
    # converted to polars' string views row by row (a few times the cost of the rest). They
    # are made chunk by chunk so that every column has the same chunks: on a frame whose
    # columns are chunked differently, polars copies the whole table (activations included)
    # into one chunk at the next with_columns or select.
    splits = pl.Series("split", [b.split.value for b in blocks])
    kinds = pl.Series("kind", [b.kind.value for b in blocks])

    def labelled(chunk: pa.RecordBatch) -> pl.DataFrame:
        frame = pl.from_arrow(chunk)
        block = frame["block"]
        return frame.select("layer", pl.lit(polarity.value).alias("polarity"), "neuron", splits.gather(block),
                            kinds.gather(block), "rank", "bin", "seq_id", "extreme", "activations")

    return pl.concat([labelled(chunk) for chunk in chunks], rechunk=False)


# -- the corpus as the pass reads it ------------------------------------------------------


@dataclass
class _Batch:
    ids: torch.Tensor  # (B, T) token ids, padded
    mask: torch.Tensor  # (B, T) attention mask
    counted: torch.Tensor  # (B, T) bool: tokens after the prefix, before the padding
    seq_ids: torch.Tensor  # (B,)
    prefix_len: np.ndarray  # (B,)
    n_tokens: np.ndarray  # (B,)


class _Corpus:
    """The token ids of every sequence as one padded (N, T) int32 array, built once without a
    Python loop over rows; token strings are never read."""

    def __init__(self, sequences: pl.DataFrame, tokenizer):
        self.seq_len = int(sequences["n_tokens"].max())
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        lengths = sequences["n_tokens"].to_numpy().astype(np.int64)
        flat = sequences["token_ids"].explode().to_numpy().astype(np.int32)
        self.ids = np.full((sequences.height, self.seq_len), pad, dtype=np.int32)
        positions = np.arange(self.seq_len)[None, :] < lengths[:, None]
        self.ids[positions] = flat
        self.lengths = lengths
        self.prefix = sequences["prefix_len"].to_numpy().astype(np.int64)
        self.seq_ids = sequences["seq_id"].to_numpy().astype(np.int64)
        self.splits = sequences["split"].to_numpy()
        self.n_tokens_of = np.zeros(int(self.seq_ids.max()) + 1, dtype=np.int64)
        self.n_tokens_of[self.seq_ids] = lengths
        self.prefix_of = np.zeros_like(self.n_tokens_of)
        self.prefix_of[self.seq_ids] = self.prefix

    def batch(self, rows: np.ndarray) -> _Batch:
        positions = np.arange(self.seq_len)[None, :]
        lengths, prefix = self.lengths[rows], self.prefix[rows]
        mask = positions < lengths[:, None]
        counted = mask & (positions >= prefix[:, None])
        return _Batch(torch.from_numpy(self.ids[rows].astype(np.int64)), torch.from_numpy(mask.astype(np.int64)),
                      torch.from_numpy(counted), torch.from_numpy(self.seq_ids[rows]), prefix, lengths)


class _CountedRanges:
    """The counted tokens of a batch as runs of rows sharing (prefix, length): a fixed prefix
    and full windows make one run, read as a view of the activations with no mask or copy."""

    def __init__(self, prefix: np.ndarray, lengths: np.ndarray, device):
        self.batch = len(prefix)
        by_range: dict[tuple[int, int], list[int]] = {}
        for row, key in enumerate(zip(prefix.tolist(), lengths.tolist())):
            by_range.setdefault(key, []).append(row)
        self.runs = []
        for (start, stop), rows in by_range.items():
            if stop <= start:
                continue  # nothing counted in these sequences
            contiguous = rows == list(range(rows[0], rows[-1] + 1))
            index = slice(rows[0], rows[-1] + 1) if contiguous else torch.tensor(rows, device=device)
            self.runs.append((index, start, stop))

    def views(self, acts: torch.Tensor):
        for index, start, stop in self.runs:
            yield acts[index, start:stop]

    def extremes(self, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sequence and feature, the max and min over counted tokens, (B, F) float32;
        -inf and +inf where a sequence counts no token."""
        # amax and amin apart: on CPU, torch.aminmax over the token axis is several times
        # slower than the two (bench/reductions.py)
        if len(self.runs) == 1 and self.runs[0][0] == slice(0, self.batch):
            view = next(self.views(acts))
            return view.amax(dim=1).float(), view.amin(dim=1).float()
        shape = (acts.shape[0], acts.shape[2])
        highest = torch.full(shape, -torch.inf, device=acts.device)
        lowest = torch.full(shape, torch.inf, device=acts.device)
        for (index, _, _), view in zip(self.runs, self.views(acts)):
            highest[index], lowest[index] = view.amax(dim=1).float(), view.amin(dim=1).float()
        return highest, lowest


READ_ORDER = "each split in a seeded random order; val and test samples first come"
"""How the pass orders its batches and keys its samples: part of a checkpoint's signature."""


def _plan_batches(splits: np.ndarray, batch_size: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """(split, row indices) per batch; a batch never mixes splits, and each split is read in a
    random order drawn from ``seed`` (what makes val and test's first-come samples uniform,
    :func:`_batch_keys`)."""
    batches = []
    rng = np.random.default_rng(seed)
    for split in Split:
        rows = rng.permutation(np.flatnonzero(splits == split.value))
        batches += [(split.value, rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    return batches


def _batch_keys(seed: int, batch_no: int, batch: int, seq_len: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys of a batch's sequences (the reservoir and quiet samples) and tokens (the token
    sample): a function of (seed, batch) alone, so a resumed run, or a pass over another group
    of features, draws exactly what one uninterrupted pass would.

    Train sequences draw random keys: which of them activate depends on the running
    threshold, so only keys drawn apart from the order keep the sample uniform. In val and
    test the threshold is final, and the key falls with the batch number: the samples keep the
    first sequences read, a uniform sample since each split is read in a random order, and a
    full sample admits nothing more (the merge then costs one comparison per batch, where
    random keys would let about k ln(n/k) more sequences in and out)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch_no)
    sequence_keys = (torch.rand(batch, generator=generator) if split == Split.TRAIN.value
                     else torch.full((batch,), -float(batch_no)))  # exact in float32 to 2**24 batches
    return sequence_keys, torch.rand(batch, seq_len, generator=generator)


def _random_sequence_ids(sequences: pl.DataFrame, per_split: int, seed: int) -> dict[str, torch.Tensor]:
    chosen = {}
    for split in Split:
        ids = sequences.filter(pl.col("split") == split.value)["seq_id"].to_list()
        picked = sorted(random.Random(f"{seed}:random:{split.value}").sample(ids, min(per_split, len(ids))))
        chosen[split.value] = torch.tensor(picked, dtype=torch.long)
    return chosen


def _signature(model, sequences, neurons, polarities, config, batch_size, seed, saes=None) -> str:
    """What makes a run's results: the device budget is left out, since it shapes only how the
    work is grouped (a resumed run keeps its checkpoint's grouping)."""
    digest = hashlib.sha256()
    settings = config.model_dump(exclude={"device_memory_gb", "checkpoint_every"})
    digest.update(repr((model, sorted((k, tuple(v)) for k, v in neurons.items()), [p.value for p in polarities],
                        settings, batch_size, seed, sequences.height)).encode())
    digest.update(READ_ORDER.encode())  # a checkpoint read in another order cannot be resumed in this one
    if saes:  # a run that reads no SAE keeps the signature it always had
        digest.update(repr(sorted((layer, s.identity) for layer, s in saes.items())).encode())
    digest.update(str(sequences.select("seq_id", "token_ids").hash_rows().sum()).encode())
    return digest.hexdigest()


def _quantile_column(q: float) -> str:
    """0.5 -> q50, 0.99 -> q99, 0.999 -> q999."""
    return "q" + f"{q * 100:g}".replace(".", "")


# -- checkpoints --------------------------------------------------------------------------
#
# A checkpoint is a folder that grows with the work done:
#   plan.json                      the run's signature and feature groups
#   group-G.done.parquet files     a finished group's tables, written once
#   group-G.split-S.pt             a finished split of the group in progress, written once
#   group-G.progress.pt            the split being read, rewritten every checkpoint_every batches
# Each file is written atomically; a later file never rewrites an earlier one's content.


@dataclass
class _Resume:
    groups: list[dict[int, list[int]]]
    finished: set[int]  # groups whose tables are saved
    group: int | None  # the group in progress
    finished_splits: list[str]
    progress: dict | None  # the split in progress, when it is ahead of the finished splits
    batches_done: int


def _load_checkpoint(checkpoint: Path, signature: str) -> _Resume | None:
    """What a matching checkpoint folder holds, or None to start the pass afresh: another
    run's checkpoint is set aside as ``<name>.ignored``, and one that cannot be read (a torn
    or foreign file) is set aside as ``<name>.damaged``, renamed and not deleted, with a
    warning that names it."""
    if checkpoint.exists() and not checkpoint.is_dir():
        return _set_aside_damaged(checkpoint, "not a checkpoint folder")
    try:
        return _read_checkpoint(checkpoint, signature)
    except Exception as err:  # json and torch.load raise many types for a damaged file
        return _set_aside_damaged(checkpoint, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")


def _set_aside_damaged(checkpoint: Path, problem: str) -> None:
    aside = set_aside(checkpoint)
    warnings.warn(f"checkpoint {checkpoint} is damaged ({problem}); set it aside as {aside.name} and starting the "
                  "activation pass from the beginning", stacklevel=4)
    return None


def _read_checkpoint(checkpoint: Path, signature: str) -> _Resume | None:
    manifest = checkpoint / "plan.json"
    if not manifest.exists():
        return None
    saved = json.loads(manifest.read_text())
    if saved.get("signature") != signature:
        warnings.warn(f"ignoring checkpoint {checkpoint}: it was made by a different run", stacklevel=3)
        aside = checkpoint.with_name(checkpoint.name + ".ignored")
        shutil.rmtree(aside, ignore_errors=True)
        checkpoint.rename(aside)
        return None
    groups = [{int(layer): neurons for layer, neurons in group.items()} for group in saved["groups"]]
    finished = {g for g in range(len(groups)) if (checkpoint / f"group-{g}.done").exists()}
    group = next((g for g in range(len(groups)) if g not in finished), None)
    finished_splits, progress, done = [], None, 0
    if group is not None:
        for split in Split:
            path = checkpoint / _split_file(group, split.value)
            if path.exists():
                finished_splits.append(split.value)
                done = max(done, torch.load(path, map_location="cpu", weights_only=False)["batches_done"])
        path = checkpoint / f"group-{group}.progress.pt"
        if path.exists():
            candidate = torch.load(path, map_location="cpu", weights_only=False)
            if candidate["batches_done"] > done and candidate["split"] not in finished_splits:
                progress, done = candidate, candidate["batches_done"]
    return _Resume(groups, finished, group, finished_splits, progress, done)


def _start_checkpoint(checkpoint: Path, signature: str, plan: ExemplarPlan) -> None:
    checkpoint.mkdir(parents=True, exist_ok=True)
    groups = [{str(layer): neurons for layer, neurons in g.items()} for g in plan.group_neurons()]
    with atomic_path(checkpoint / "plan.json") as tmp:
        tmp.write_text(json.dumps({"signature": signature, "groups": groups}))


def _split_file(group: int, split: str) -> str:
    return f"group-{group}.split-{split}.pt"


# Each save calls ``observe(folder, file)`` once its file is written and before it replaces
# the one it supersedes: the moment the checkpoint is at its largest (_Measured).


def _save_split(checkpoint: Path, signature: str, group: int, done: int, split: str, state: _PassState,
                observe) -> None:
    """A finished split's state, written once; the split's progress file goes."""
    stats = state.stats.state() if split == Split.TRAIN.value else None
    with atomic_path(checkpoint / _split_file(group, split)) as tmp:
        torch.save({"signature": signature, "batches_done": done, "state": state.splits[split].state(), "stats": stats}, tmp)
        observe(checkpoint, tmp)
    (checkpoint / f"group-{group}.progress.pt").unlink(missing_ok=True)


def _save_progress(checkpoint: Path, signature: str, group: int, done: int, split: str, state: _PassState,
                   observe) -> None:
    """The split being read, in place of its last progress file."""
    stats = state.stats.state() if split == Split.TRAIN.value else None
    with atomic_path(checkpoint / f"group-{group}.progress.pt") as tmp:
        torch.save({"signature": signature, "batches_done": done, "split": split,
                    "state": state.splits[split].state(), "stats": stats}, tmp)
        observe(checkpoint, tmp)


def _save_group_table(checkpoint: Path, group: int, key: tuple[int, Polarity], pair, observe) -> None:
    layer, polarity = key
    for name, frame in zip(("exemplars", "stats"), pair):
        with atomic_path(checkpoint / f"group-{group}.{layer}.{polarity.value}.{name}.parquet") as tmp:
            frame.write_parquet(tmp)
            observe(checkpoint, tmp)


def _finish_group(checkpoint: Path, signature: str, group: int) -> None:
    with atomic_path(checkpoint / f"group-{group}.done") as tmp:
        tmp.write_text(signature)
    for path in checkpoint.glob(f"group-{group}.*.pt"):
        path.unlink()


def _read_group_tables(checkpoint: Path, group: int) -> dict:
    tables = {}
    for path in sorted(checkpoint.glob(f"group-{group}.*.exemplars.parquet")):
        _, layer, polarity, _, _ = path.name.split(".")
        stats = path.with_name(path.name.replace(".exemplars.", ".stats."))
        tables[(int(layer), Polarity(polarity))] = (pl.read_parquet(path), pl.read_parquet(stats))
    return tables
