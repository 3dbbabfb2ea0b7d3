"""Which features a steering run touches, and with what value: explicit ids, a description
query (the search of :mod:`neuron_assets.search`, with filters), a cluster of
``description_clusters``; each feature's value from its ``neuron_stats`` row.

Values are signed activations at the feature's site. A feature's *base* is its given value or
its high quantile (``quantile``, default q99: the first positive of q99, q999 and max, since a
rarely active feature's q99 can be 0), in its polarity's orientation; the value is then
``sign * base * strength`` (set: the activation becomes it; add: it is added). Ablation sets
the activation to 0, or to its signed train-split mean (``neuron_stats.mean`` is stored in the
polarity's orientation, ``sign * mean``; the sign is taken back off).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import polars as pl

from neuron_assets.store import Store
from neuron_assets.types import FeatureId, Polarity

from neuron_assets.steer.request import SteerFeature, SteerRequest

STATS_TABLE = "neuron_stats"
DESCRIPTIONS_TABLE = "neuron_descriptions"
CLUSTERS_TABLE = "description_clusters"
QUANTILE_FALLBACK = ("q99", "q999", "max")  # after the requested column, the first positive of these


@dataclass(frozen=True)
class SelectedFeature:
    """A feature as a run steers it. ``value`` is the signed number the intervention uses: the
    activation it sets (set, ablate) or the amount it adds (add); ``base`` is the value before
    the strength, in the polarity's orientation (the quantile, the given value, or None for an
    ablation). ``active`` is False for a feature whose strength is 0: it is left alone."""

    feature: FeatureId
    value: float
    strength: float
    base: float | None
    base_from: str  # the neuron_stats column, "given", or the ablation ("zero", "mean")
    description: str | None = None
    score: float | None = None  # the description's test score
    match: float | None = None  # the search match (cosine or BM25) when selected by a query
    source: str = "feature"  # feature | cluster | search

    @property
    def active(self) -> bool:
        return self.strength != 0.0

    def as_dict(self) -> dict:
        f = self.feature
        return {"layer": f.layer, "index": f.index, "polarity": f.polarity.value, "kind": f.kind, "value": self.value,
                "strength": self.strength, "base": self.base, "base_from": self.base_from,
                "description": self.description, "score": self.score, "match": self.match, "source": self.source,
                "active": self.active}


@dataclass(frozen=True)
class Candidate:
    """A feature chosen before its value is known."""

    steer: SteerFeature
    description: str | None = None
    score: float | None = None
    match: float | None = None
    source: str = "feature"


def candidates(request: SteerRequest, store: Store, encoder=None) -> list[Candidate]:
    """The request's features: explicit ones, then the cluster's members, then the query's
    hits; a feature (layer, index, kind) chosen twice keeps its first place."""
    chosen = [Candidate(s) for s in request.features]
    if request.cluster is not None:
        chosen += cluster_members(store, request.cluster, request)
    if request.select is not None:
        chosen += search_hits(store, request, encoder)
    seen, unique = set(), []
    for candidate in chosen:
        f = candidate.steer.feature
        if (f.layer, f.index, f.kind) not in seen:
            seen.add((f.layer, f.index, f.kind))
            unique.append(candidate)
    return unique


def _filters_text(request: SteerRequest) -> str:
    parts = [f"layers {','.join(map(str, request.layers))}" if request.layers is not None else "",
             f"polarity {request.polarity}" if request.polarity else "", f"kind {request.kind}" if request.kind else "",
             f"min score {request.min_score:g}" if request.min_score is not None else ""]
    shown = ", ".join(p for p in parts if p)
    return f" with {shown}" if shown else ""


def search_hits(store: Store, request: SteerRequest, encoder=None) -> list[Candidate]:
    """The ``top`` selected descriptions nearest the query that pass the filters: one search
    (:func:`neuron_assets.search.search`) per requested layer, merged by match (cosine and
    BM25 scores come from one index, so they compare across layers); candidate descriptions are
    dropped, and more hits fetched when that leaves fewer than ``top``."""
    from neuron_assets.search import Filters, search

    if not store.partitions(DESCRIPTIONS_TABLE):
        raise LookupError(f"the store under {store.root} has no descriptions (table {DESCRIPTIONS_TABLE}); run "
                          "`neuron-assets run` first, or steer explicit features (--feature 12:345:pos)")
    hits = []
    for layer in request.layers if request.layers is not None else (None,):
        filters = Filters(layer=layer, polarity=request.polarity, min_score=request.min_score, kind=request.kind)
        fetch = request.top * 4 + 50
        while True:
            result = search(store, request.select, top=fetch, mode=request.select_mode, filters=filters,
                            encoder=encoder)
            chosen = [h for h in result.hits if h.source == "selected" and (request.kind is None or h.kind == request.kind)]
            if len(chosen) >= request.top or len(result.hits) < fetch:
                break
            fetch *= 4
        hits += chosen[: request.top]
    hits.sort(key=lambda h: (-h.match, h.layer, h.polarity, h.neuron))
    if not hits:
        how = "no description holds these words (text search); try other words or semantic search" \
            if request.select_mode == "text" else "no description passes the filters"
        raise LookupError(f"the query '{request.select}' matches no feature{_filters_text(request)}: {how}, "
                          "or loosen the filters (layers, polarity, kind, min score)")
    return [Candidate(SteerFeature(FeatureId(h.layer, h.neuron, Polarity(h.polarity), h.kind)), h.description,
                      h.score, h.match, "search") for h in hits[: request.top]]


def read_clusters(store: Store) -> pl.DataFrame:
    """The description_clusters table, whole (one file, or one per layer x polarity)."""
    if store.exists(CLUSTERS_TABLE):
        return store.read(CLUSTERS_TABLE)
    partitions = store.partitions(CLUSTERS_TABLE)
    if not partitions:
        raise LookupError(f"the store under {store.root} has no {CLUSTERS_TABLE} table; run "
                          f"neuron-assets run --select {CLUSTERS_TABLE}")
    return pl.concat([store.read(CLUSTERS_TABLE, layer, polarity) for layer, polarity in partitions],
                     how="diagonal_relaxed")


def cluster_members(store: Store, cluster: int, request: SteerRequest) -> list[Candidate]:
    """The members of one cluster that pass the request's layer, polarity and kind filters."""
    table = read_clusters(store)
    missing = [c for c in ("cluster", "layer", "polarity", "neuron") if c not in table.columns]
    if missing:
        raise ValueError(f"the {CLUSTERS_TABLE} table lacks the column(s) {', '.join(missing)}; re-materialize it "
                         f"(neuron-assets run --select {CLUSTERS_TABLE})")
    if "kind" not in table.columns:
        table = table.with_columns(pl.lit("neuron").alias("kind"))
    members = table.filter(pl.col("cluster") == cluster)
    if members.height == 0:
        ids = table["cluster"].unique().sort()
        shown = f"{ids.min()}-{ids.max()}" if len(ids) else "none"
        raise LookupError(f"no cluster {cluster} in {CLUSTERS_TABLE} (cluster ids: {shown}); list them with "
                          "neuron-assets clusters, or neuron-assets sql \"select * from description_clusters\"")
    if request.layers is not None:
        members = members.filter(pl.col("layer").is_in(list(request.layers)))
    if request.polarity is not None:
        members = members.filter(pl.col("polarity") == request.polarity)
    if request.kind is not None:
        members = members.filter(pl.col("kind") == request.kind)
    if members.height == 0:
        raise LookupError(f"cluster {cluster} has no member{_filters_text(request)}; loosen the filters")
    has = set(members.columns)
    out = []
    order = ["member_rank"] if "member_rank" in has else ["layer", "polarity", "kind", "neuron"]  # nearest the centroid first
    for row in members.sort(order).iter_rows(named=True):
        out.append(Candidate(SteerFeature(FeatureId(int(row["layer"]), int(row["neuron"]), Polarity(row["polarity"]),
                                                    row["kind"] or "neuron")),
                             row.get("description") if "description" in has else None,
                             _number(row.get("test_score", row.get("score"))), None, "cluster"))
    return out


def _number(value) -> float | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else float(value)


class FeatureTables:
    """neuron_stats and neuron_descriptions rows of the features at hand, read one partition
    (layer x polarity) at a time, once."""

    def __init__(self, store: Store):
        self.store = store
        self._stats: dict[tuple[int, str], dict[tuple[str, int], dict]] = {}
        self._descriptions: dict[tuple[int, str], dict[tuple[str, int], dict]] = {}

    def stats(self, feature: FeatureId) -> dict | None:
        key = (feature.layer, feature.polarity.value)
        if key not in self._stats:
            self._stats[key] = self._rows(STATS_TABLE, *key)
        return self._stats[key].get((feature.kind, feature.index))

    def description(self, feature: FeatureId) -> dict | None:
        key = (feature.layer, feature.polarity.value)
        if key not in self._descriptions:
            self._descriptions[key] = self._rows(DESCRIPTIONS_TABLE, *key)
        return self._descriptions[key].get((feature.kind, feature.index))

    def _rows(self, table: str, layer: int, polarity: str) -> dict[tuple[str, int], dict]:
        if not self.store.exists(table, layer, polarity):
            return {}
        frame = self.store.read(table, layer, polarity)
        if "kind" not in frame.columns:
            frame = frame.with_columns(pl.lit("neuron").alias("kind"))
        return {(row["kind"], int(row["neuron"])): row for row in frame.iter_rows(named=True)}


def base_value(stats: dict, quantile: str) -> tuple[float, str]:
    """The feature's high value in its polarity's orientation: the requested column, else the
    first positive of q99, q999 and max."""
    for column in (quantile, *QUANTILE_FALLBACK):
        value = stats.get(column)
        if value is not None and np.isfinite(value) and value > 0:
            return float(value), column
    return 0.0, quantile


def valued(candidates_: Sequence[Candidate], request: SteerRequest, tables: FeatureTables,
           check: Callable[[FeatureId], None]) -> list[SelectedFeature]:
    """Each candidate with its value (see the module's docstring), its description and score;
    ``check`` refuses a feature the model does not have (layer or index out of range)."""
    out = []
    for candidate in candidates_:
        steer = candidate.steer
        feature = steer.feature
        check(feature)
        strength = request.strength * steer.strength
        sign = feature.polarity.sign
        description, score = candidate.description, candidate.score
        if description is None and (row := tables.description(feature)) is not None:
            description, score = row.get("description"), _number(row.get("test_score"))
        stats = None
        needs_stats = (request.mode != "ablate" and steer.value is None) or \
            (request.mode == "ablate" and request.ablate_with == "mean")
        if needs_stats and strength != 0.0:
            stats = tables.stats(feature)
            if stats is None:
                what = "its train mean (ablate_with mean)" if request.mode == "ablate" else "its default value"
                fix = "use ablate_with zero" if request.mode == "ablate" else \
                    "give its value explicitly (SteerFeature(value=...), or \"value\" in JSON)"
                raise LookupError(f"feature {feature_text(feature)} has no row in {STATS_TABLE} (layer {feature.layer}, "
                                  f"{feature.polarity.value}), so {what} is unknown: it is not among the features the "
                                  f"exemplar pass read; pick a described feature (neuron-assets search) or {fix}")
        if request.mode == "ablate":
            mean = sign * float(stats["mean"]) if stats is not None else 0.0
            value, base, base_from = (mean if request.ablate_with == "mean" else 0.0), None, request.ablate_with
        else:
            if steer.value is not None:
                base, base_from = steer.value, "given"
            elif stats is not None:
                base, base_from = base_value(stats, request.quantile)
            else:
                base, base_from = None, request.quantile  # strength 0: off, no value needed
            value = sign * (base or 0.0) * strength
        out.append(SelectedFeature(feature, float(value), float(strength), base, base_from, description, score,
                                   candidate.match, candidate.source))
    return out


def feature_text(feature: FeatureId) -> str:
    suffix = "" if feature.kind == "neuron" else f":{feature.kind}"
    return f"{feature.layer}:{feature.index}:{feature.polarity.value}{suffix}"
