"""The scoring stages: every candidate x scorer on val (description_scores), then the best
candidate per feature and its test score (neuron_descriptions)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from neuron_assets.config import Config
from neuron_assets.exemplars import (
    load_feature_exemplars,
)
from neuron_assets.progress import Progress
from neuron_assets.score import JUDGE_SCORERS, Scorer, judged_candidates
from neuron_assets.score.crossfit import Scoring, with_provenance
from neuron_assets.score.select import (
    FEATURES_PER_ROUND,
    rows_of,
    score_all,
    score_candidates,
    select_best,
    selected_by_feature,
    shuffled_controls,
)
from neuron_assets.simulate import FINETUNED
from neuron_assets.stages.tables import (
    CANDIDATES_TABLE,
    DESCRIPTIONS_TABLE,
    SCORES_TABLE,
    Log,
    OnPartition,
    features_by_kind,
    for_each_partition,
    quiet,
    read_candidates,
    with_kind,
)
from neuron_assets.store import MissingTableError, Store, with_lineage
from neuron_assets.types import FeatureExemplars, FeatureId, Partition, Polarity, Split


@dataclass(frozen=True)
class ScoresWritten:
    layer: int
    polarity: str
    path: Path
    rows: int
    features: int
    unscored: list[int]  # features with exemplars but no scored candidate
    seconds: float


def make_description_scores(config: Config, partitions: list[Partition], run_id: str, scoring: Scoring | None = None,
                            progress: Progress | None = None, log: Log = quiet,
                            on_partition: OnPartition = None) -> list[ScoresWritten]:
    """Every candidate x scorer on val, partition by partition, each written (and reported to
    ``on_partition``) as soon as it is done; one progress task per partition."""
    store = Store(config.store_root)
    scoring = scoring or Scoring.build(config, store)
    return for_each_partition(partitions, store, progress, "score", on_partition, lambda partition, on_features:
                              score_partition(config, partition, run_id, scoring, log, on_features))


def score_partition(config: Config, partition: Partition, run_id: str, scoring: Scoring, log: Log = quiet,
                    on_features=None) -> ScoresWritten:
    """One partition's description_scores; ``on_features(n)`` as n more features are scored."""
    layer, polarity = partition
    started = time.perf_counter()
    store = Store(config.store_root)
    all_candidates = read_candidates(store, layer, polarity)
    parts, unscored, scored_features = [], [], 0
    for kind, features in features_by_kind(load_feature_exemplars(store, layer, polarity)):
        candidates = {f: c for f, c in all_candidates.items() if f.kind == kind}
        part = _score_kind(config, scoring, features, candidates, on_features)
        parts.append(with_kind(part, kind))
        scored = set(part["neuron"].unique().to_list()) if part.height else set()
        scored_features += len(scored)
        # features the explain stage left out (explain.flagged_features) have no candidate rows
        unscored += sorted(f.feature.index for f in features if f.feature in candidates and f.feature.index not in scored)
    frame = pl.concat(parts, how="diagonal_relaxed") if len(parts) > 1 else parts[0]
    frame = with_lineage(with_provenance(frame, scoring), config.subject.model, config.hash, run_id)
    path = store.write(SCORES_TABLE, frame, layer, polarity.value)
    log(f"layer {layer} {polarity.value}: {frame.height} scores for {scored_features} features "
        f"({len(unscored)} without candidates)")
    return ScoresWritten(layer, polarity.value, path, frame.height, scored_features, unscored,
                         time.perf_counter() - started)


def _score_kind(config: Config, scoring: Scoring, features: list[FeatureExemplars],
                candidates: dict[FeatureId, list[str | None]], on_features) -> pl.DataFrame:
    """The description_scores rows of one kind's features of a partition."""
    # Judges (detection, fuzzing) see only the selector's best score.judge_candidates per feature.
    judges = [s for s in scoring.scorers if s.name in JUDGE_SCORERS and s is not scoring.selector]
    frame = score_candidates(features, candidates, [s for s in scoring.scorers if s not in judges], Split.VAL,
                             progress=on_features)
    if judges:
        judged = judged_candidates(frame, candidates, scoring.selector, config.score.judge_candidates)
        frame = pl.concat([frame, score_candidates(features, judged, judges, Split.VAL)])
    # The control is another feature's *selected* description (by val), of the same kind,
    # scored like the candidates; every candidate is also scored on test by the selector for
    # best_of_k_curve.
    selector = scoring.selector
    selected = selected_by_feature(select_best(frame, selector.name, selector.simulator), features)
    controls = shuffled_controls(features, selected, config.score.control_seed) if config.score.shuffled_control else {}
    return pl.concat([frame, score_candidates(features, {}, scoring.scorers, Split.VAL, controls),
                      score_candidates(features, candidates, [selector], Split.TEST, controls)])


DESCRIPTIONS_SCHEMA = {
    "layer": pl.Int64, "polarity": pl.String, "kind": pl.String, "neuron": pl.Int64, "candidate": pl.Int64, "description": pl.String,
    "scorer": pl.String, "simulator": pl.String, "val_score": pl.Float64, "test_score": pl.Float64,
    "val_flags": pl.List(pl.String), "test_flags": pl.List(pl.String), "control_description": pl.String,
    "control_source_neuron": pl.Int64, "control_val_score": pl.Float64, "control_test_score": pl.Float64,
    "n_candidates": pl.Int64, "explainer_backend": pl.String, "explainer_model": pl.String,
    "simulator_version": pl.String, "test_simulator_version": pl.String, "simulator_saw_feature": pl.Boolean,
}


@dataclass(frozen=True)
class DescriptionsWritten:
    layer: int
    polarity: str
    path: Path
    rows: int
    frame: pl.DataFrame
    seconds: float


def make_neuron_descriptions(config: Config, partitions: list[Partition], run_id: str, scoring: Scoring | None = None,
                             progress: Progress | None = None, log: Log = quiet,
                             on_partition: OnPartition = None) -> list[DescriptionsWritten]:
    """The best candidate by val (score.select_by), then it and its shuffled control on test,
    partition by partition, each written (and reported to ``on_partition``) as soon as it is done."""
    store = Store(config.store_root)
    scoring = scoring or Scoring.build(config, store)
    return for_each_partition(partitions, store, progress, "test score", on_partition, lambda partition, on_features:
                              describe_partition(config, partition, run_id, scoring, log, on_features))


def describe_partition(config: Config, partition: Partition, run_id: str, scoring: Scoring, log: Log = quiet,
                       on_features=None) -> DescriptionsWritten:
    """One partition's neuron_descriptions; ``on_features(n)`` as n more features are scored on test."""
    layer, polarity = partition
    started = time.perf_counter()
    store = Store(config.store_root)
    all_scores = store.read(SCORES_TABLE, layer, polarity.value)
    explainers = _explainers(store, layer, polarity)
    rows = []
    stale = 0
    for kind, of_kind in features_by_kind(load_feature_exemplars(store, layer, polarity)):
        scores = all_scores.filter(pl.col("kind") == kind)
        kind_rows, kind_stale = _describe_kind(kind, of_kind, scores, scoring, explainers.get(kind, {}), layer,
                                               polarity, on_features)
        rows += kind_rows
        stale += kind_stale
    if stale:
        log(f"layer {layer} {polarity.value}: {stale} features' val scores used another simulator version than "
            "their test scores; re-materialize description_scores to score both with one")
    frame = with_lineage(pl.DataFrame(rows, schema=DESCRIPTIONS_SCHEMA), config.subject.model, config.hash, run_id)
    path = store.write(DESCRIPTIONS_TABLE, frame, layer, polarity.value)
    log(f"layer {layer} {polarity.value}: {frame.height} neuron descriptions")
    return DescriptionsWritten(layer, polarity.value, path, frame.height, frame, time.perf_counter() - started)


def _describe_kind(kind: str, features: list[FeatureExemplars], scores: pl.DataFrame, scoring: Scoring,
                   explainers: dict, layer: int, polarity: Polarity, on_features) -> tuple[list[dict], int]:
    """One kind's neuron_descriptions rows of a partition, and how many mixed simulator versions.
    The best candidates and their controls are scored on test in rounds of FEATURES_PER_ROUND
    features through the scorer's ``score_many`` (the simulator batches their pairs together)."""
    scorer = scoring.selector
    best = select_best(scores, scorer.name, scorer.simulator)
    features = {f.feature.index: f for f in features}
    chosen = [(row, features[row["neuron"]]) for row in best.iter_rows(named=True) if row["neuron"] in features]
    tests = []
    for start in range(0, len(chosen), FEATURES_PER_ROUND):
        round_ = chosen[start : start + FEATURES_PER_ROUND]
        items = [(feature, [row["description"]] + ([row["control_description"]] if row["control_description"] else []))
                 for row, feature in round_]
        tests += score_all(scorer, items, Split.TEST)
        if on_features is not None:
            on_features(len(round_))
    val_provenance = _val_provenance(scores, scorer)
    rows = []
    stale = 0
    for (row, feature), test in zip(chosen, tests):
        val_version, val_saw = val_provenance.get(row["neuron"], (None, None))
        test_version, test_saw = scoring.provenance(feature.feature, scorer.simulator)
        stale += scorer.simulator == FINETUNED and val_version != test_version
        rows.append({
            "layer": layer, "polarity": polarity.value, "kind": kind, "neuron": row["neuron"], "candidate": row["candidate"],
            "description": row["description"], "scorer": scorer.name, "simulator": row["simulator"],
            "val_score": row["val_score"], "test_score": test[0].value, "val_flags": row["val_flags"],
            "test_flags": list(test[0].flags), "control_description": row["control_description"],
            "control_source_neuron": row["control_source_neuron"], "control_val_score": row["control_val_score"],
            "control_test_score": test[1].value if len(test) > 1 else None, "n_candidates": row["n_candidates"],
            **explainers.get((row["neuron"], row["candidate"]), {"explainer_backend": None, "explainer_model": None}),
            "simulator_version": val_version, "test_simulator_version": test_version,
            "simulator_saw_feature": None if val_saw is None or test_saw is None else bool(val_saw or test_saw),
        })
    return rows, stale


def _val_provenance(scores: pl.DataFrame, scorer: Scorer) -> dict[int, tuple[str | None, bool | None]]:
    """neuron -> (simulator version, saw feature) of the selecting scorer's val candidate rows;
    any candidate row that saw the feature marks the feature (its selection was tainted)."""
    if not {"simulator_version", "simulator_saw_feature"} <= set(scores.columns):
        return {}
    rows = rows_of(scores, scorer.name, scorer.simulator).filter(pl.col("split") == Split.VAL.value)
    grouped = rows.group_by("neuron").agg(pl.col("simulator_version").first(), pl.col("simulator_saw_feature").any(),
                                          pl.col("simulator_saw_feature").null_count().alias("unknown"))
    return {n: (v, None if unknown else saw) for n, v, saw, unknown in grouped.iter_rows()}


def _explainers(store: Store, layer: int, polarity: Polarity) -> dict[str, dict[tuple[int, int], dict]]:
    """kind -> (neuron, candidate) -> the backend and model that wrote the candidate."""
    try:
        frame = store.read(CANDIDATES_TABLE, layer, polarity.value)
    except MissingTableError:
        return {}
    columns = [c for c in ("backend", "explainer_model") if c in frame.columns]
    out: dict[str, dict] = {}
    for row in frame.select("kind", "neuron", "candidate", *columns).iter_rows(named=True):
        out.setdefault(row["kind"], {})[(row["neuron"], row["candidate"])] = {
            "explainer_backend": row.get("backend"), "explainer_model": row.get("explainer_model")}
    return out
