"""Reading the exemplar pass's tables back: a layer x polarity's features with their
exemplars, statistics and tokens."""

from __future__ import annotations

import numpy as np
import polars as pl

from neuron_assets.exemplars.stats import STAT_QUANTILES, quantile_column
from neuron_assets.features.selection import NEURON_KIND
from neuron_assets.store import Store
from neuron_assets.types import (
    ActivationRecord,
    Exemplar,
    Sample,
    FeatureExemplars,
    FeatureId,
    FeatureStats,
    Polarity,
    Split,
)


def load_feature_exemplars(store: Store, layer: int, polarity: Polarity, neurons: list[int] | None = None,
                           kind: str | None = None) -> list[FeatureExemplars]:
    """Every feature's exemplars and stats for one layer x polarity (or only ``neurons``, read
    with the filter pushed into the Parquet scan; only features of ``kind`` when given),
    tokens joined in; only the sequences the exemplars use are read, and each sequence's
    tokens are built once. Neurons come before SAE latents."""
    polarity = Polarity(polarity)
    for table, partition in (("exemplars", (layer, polarity.value)), ("neuron_stats", (layer, polarity.value)), ("sequences", ())):
        if not store.exists(table, *partition):
            store.read(table, *partition)  # raises the error that says how to make the table

    def scan(table: str) -> pl.LazyFrame:
        frame = store.scan(table, layer, polarity.value)
        if kind is not None:
            frame = frame.filter(pl.col("kind") == kind)
        return frame if neurons is None else frame.filter(pl.col("neuron").is_in(list(neurons)))

    kind_order = pl.col("kind") != NEURON_KIND  # neurons first
    exemplars = (scan("exemplars")
                 .select("kind", "neuron", "split", "sample", "rank", "bin", "extreme", "seq_id", "activations")
                 .sort(kind_order, "kind", "neuron", "split", "sample", "rank").collect())
    stats = scan("neuron_stats").sort(kind_order, "kind", "neuron").collect()
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
    samples = [Sample(k) for k in exemplars["sample"].to_list()]
    ranks, extremes, bins = exemplars["rank"].to_list(), exemplars["extreme"].to_list(), exemplars["bin"].to_list()
    rows_seq = [seq_index[s] for s in exemplars["seq_id"].to_list()]
    seq_id_list = exemplars["seq_id"].to_list()
    neuron_col = exemplars["neuron"].to_numpy()
    kind_col = exemplars["kind"].to_numpy()
    changes = (neuron_col[1:] != neuron_col[:-1]) | (kind_col[1:] != kind_col[:-1])
    starts = np.flatnonzero(np.r_[True, changes]) if len(neuron_col) else np.array([], dtype=int)
    ends = np.r_[starts[1:], len(neuron_col)].astype(int)
    by_neuron: dict[tuple[str, int], tuple[Exemplar, ...]] = {}
    for lo, hi in zip(starts.tolist(), ends.tolist()):
        by_neuron[(str(kind_col[lo]), int(neuron_col[lo]))] = tuple(
            Exemplar(splits[i], samples[i], ranks[i], extremes[i],
                     ActivationRecord(seq_id_list[i], seq_tokens[rows_seq[i]], seq_ids_tokens[rows_seq[i]],
                                      flat[bounds[i] : bounds[i + 1]], seq_prefix[rows_seq[i]]), bins[i])
            for i in range(lo, hi)
        )
    quantile_columns = [stats[quantile_column(q)].to_list() for q in STAT_QUANTILES]
    features = []
    columns = ("kind", "neuron", "max", "mean", "std", "frac_active")
    for i, (feature_kind, neuron, max_, mean, std, frac) in enumerate(zip(*(stats[c].to_list() for c in columns))):
        quantiles = {q: column[i] for q, column in zip(STAT_QUANTILES, quantile_columns)}
        features.append(FeatureExemplars(FeatureId(layer, neuron, polarity, feature_kind),
                                         FeatureStats(max_, mean, std, frac, quantiles),
                                         by_neuron.get((feature_kind, neuron), ())))
    return features
