"""Table assembly at the end of a pass: the exemplars and stats tables of each layer x
polarity, built from the pass state, joined across groups and labelled with feature kinds."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from neuron_assets.config import ExemplarsConfig
from neuron_assets.exemplars.batches import Corpus
from neuron_assets.exemplars.plan import TABLE_WORKERS
from neuron_assets.exemplars.state import Block, KeptSequences, PassState, SplitState, activating_threshold
from neuron_assets.exemplars.stats import SampleTokens
from neuron_assets.features.selection import NEURON_KIND, SAE_KIND
from neuron_assets.types import Sample, Polarity, Split


def pass_tables(state: PassState, corpus: Corpus, config: ExemplarsConfig, seed: int):
    """((layer, polarity), (exemplars, stats)) of the pass's group of features in layer order,
    one at a time, built on the host, so the end-of-pass sorts are one layer wide. Up to
    TABLE_WORKERS layers are built at once in threads (most of the work is numpy and polars,
    single-threaded and outside the GIL), while the caller writes the one before."""
    for split in Split:  # a split the corpus does not have keeps empty exemplars
        if split.value not in state.splits:
            state.split_state(split.value)
            state.finish_split(split.value)
    tokens = state.stats.sample_tokens()
    pool, building = ThreadPoolExecutor(TABLE_WORKERS, thread_name_prefix="exemplar-tables"), deque()
    try:
        for layer in state.layout.layers:
            building.append(pool.submit(layer_tables, state, layer, tokens, corpus, config, seed))
            if len(building) > TABLE_WORKERS:  # the one queued starts as the first is taken
                yield from building.popleft().result()
        while building:
            yield from building.popleft().result()
    finally:  # an error, or a caller that stops early: layers not started are dropped
        pool.shutdown(cancel_futures=True)


def layer_tables(state: PassState, layer: int, tokens: SampleTokens, corpus: Corpus, config: ExemplarsConfig,
                 seed: int):
    """[((layer, polarity), (exemplars, stats))] of one layer, for every polarity."""
    cols = state.layout.columns(layer)
    train = state.splits[Split.TRAIN.value]
    maxima = {polarity: train.top[polarity.value].extremes[cols].amax(dim=1).cpu().numpy()
              for polarity in state.polarities}
    stats_frames = state.stats.frames(cols, maxima, tokens, config)  # one sort of the token sample for both polarities
    tables = []
    for polarity in state.polarities:
        blocks = []
        threshold = activating_threshold(train.top[polarity.value].extremes[cols], config)
        for split in Split:
            held = state.splits[split.value]
            blocks.append(replace(held.top[polarity.value].rows(cols).ranked(), sample=Sample.TOP, split=split))
            reservoir = held.reservoir.get(polarity.value)
            if reservoir is not None:  # train members at or below the final threshold leave
                kept = reservoir.rows(cols)
                blocks.append(_quantile_block(_keeping(kept, kept.extremes > threshold.unsqueeze(1)), split, config,
                                              seed))
            quiet = held.quiet.get(polarity.value)
            if quiet is not None:
                kept = quiet.rows(cols)
                ranked = _keeping(kept, kept.extremes <= threshold.unsqueeze(1)).ranked()  # a no-op check
                blocks.append(replace(ranked, sample=Sample.QUIET, split=split))
            blocks.append(_random_block(held, cols, split, polarity, corpus))
        stats = stats_frames[polarity].with_columns(
            pl.Series("neuron", state.layout.neurons[layer], dtype=pl.Int32),
            pl.lit(layer, dtype=pl.Int16).alias("layer"),
            pl.lit(polarity.value).alias("polarity"),
        )
        exemplars = _exemplar_frame(blocks, state.layout.neurons[layer], layer, polarity, corpus.n_tokens_of)
        tables.append(((layer, polarity), (exemplars, stats.select("layer", "polarity", "neuron",
                                                                   pl.exclude("layer", "polarity", "neuron")))))
    return tables


class LayerAssembler:
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
                self.emit(layer, polarity, pl.concat([e for e, _ in parts]).sort("neuron", "split", "sample", "rank"),
                          pl.concat([s for _, s in parts]).sort("neuron"))


def label_kinds(exemplars: pl.DataFrame, stats: pl.DataFrame, width: int) -> tuple[pl.DataFrame, pl.DataFrame]:
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

    return labelled(exemplars, "kind", "polarity"), labelled(stats, "kind", "polarity")


def _keeping(kept: KeptSequences, keep: torch.Tensor) -> KeptSequences:
    """A view of kept sequences whose members outside ``keep`` (F, k) count as empty slots."""
    part = kept.rows(slice(None))
    part.keys = torch.where(keep, kept.keys, -torch.inf)
    return part


def _quantile_block(reservoir: KeptSequences, split: Split, config: ExemplarsConfig, seed: int) -> Block:
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
    return Block(Sample.QUANTILE, split, reservoir.seq_ids.gather(1, members), reservoir.extremes.gather(1, members),
                 reservoir.acts, valid, bin_index.expand_as(members), members)


def _random_block(state: SplitState, cols: slice, split: Split, polarity: Polarity, corpus: Corpus) -> Block:
    ids = state.random_ids
    acts = state.random_acts[:, cols]  # (n, F, T)
    features = acts.shape[1]
    positions = torch.arange(acts.shape[2])
    prefix = torch.as_tensor(corpus.prefix_of[ids.numpy()], dtype=torch.long)
    lengths = torch.as_tensor(corpus.n_tokens_of[ids.numpy()], dtype=torch.long)
    counted = (positions >= prefix.unsqueeze(1)) & (positions < lengths.unsqueeze(1))  # (n, T)
    signed = acts.float() * polarity.sign
    extremes = signed.masked_fill(~counted.unsqueeze(1), -torch.inf).amax(dim=2) if acts.shape[2] else signed.sum(2)
    return Block(Sample.RANDOM, split, ids.unsqueeze(0).expand(features, -1), extremes.T,
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
    blocks are taken in (split, sample) order and each block lists its members feature by
    feature (np.nonzero's order), so counting the members of every (feature, block) gives
    each row its place. The table is built in chunks of consecutive features, about
    FRAME_CHUNK_ROWS rows each: a block's activation rows are gathered once per chunk, side by
    side in one float16 buffer, which one gather then puts in the table's order (two gathers:
    on CPU a scatter into place costs several times more)."""
    blocks = sorted(blocks, key=lambda b: (b.split.value, b.sample.value))
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
    samples = pl.Series("sample", [b.sample.value for b in blocks])

    def labelled(chunk: pa.RecordBatch) -> pl.DataFrame:
        frame = pl.from_arrow(chunk)
        block = frame["block"]
        return frame.select("layer", pl.lit(polarity.value).alias("polarity"), "neuron", splits.gather(block),
                            samples.gather(block), "rank", "bin", "seq_id", "extreme", "activations")

    return pl.concat([labelled(chunk) for chunk in chunks], rechunk=False)
