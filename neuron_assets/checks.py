"""The checks on every table the stages write, as plain functions: each returns :class:`Check`
values (a name, passed, plain metadata). neuron_assets.defs shows them as Dagster asset checks;
a test or a script calls them directly.

A per-feature stage's checks come twice: once over every partition it wrote (``overall``) and
once per partition (``by_partition``: partition key -> that partition's checks), because a
Dagster range run records its returned checks without a partition.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from neuron_assets.score.crossfit import leaked_rows
from neuron_assets.stages.tables import SCORES_TABLE, Written
from neuron_assets.store import Store
from neuron_assets.types import Partition, Split

EQUAL_SPLITS = "equal_splits"
EVERY_FEATURE_HAS_EXEMPLARS = "every_feature_has_exemplars"
EVERY_FEATURE_HAS_K_CANDIDATES = "every_feature_has_k_candidates"
NO_NAN, IN_RANGE, EVERY_FEATURE_SCORED, EVERY_FEATURE_DESCRIBED, NEVER_SAW = (
    "no_nan_scores", "scores_in_range", "every_feature_scored", "every_feature_described",
    "simulator_never_saw_feature")
UNIT_NORM = "vectors_are_unit_length"
SELECTING_BEATS_CHANCE = "selecting_simulator_beats_chance"

NEVER_SAW_DESCRIPTION = ("no row's score comes from a simulator that trained on its feature "
                         "(simulator_saw_feature is false or unknown on every row; cross-fitting)")
DESCRIPTION_SCORE_COLUMNS = ("val_score", "test_score", "control_val_score", "control_test_score")

ByPartition = dict[str, list["Check"]]


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    metadata: dict = field(default_factory=dict)
    warn: bool = False  # a failure is a warning, not an error (the pipeline goes on)


# -- corpus and exemplars -------------------------------------------------------------------


def equal_splits(sizes: pl.DataFrame) -> Check:
    """train, val and test hold as many sequences each; ``sizes``: split, source, len."""
    per_split = sizes.group_by("split").agg(pl.col("len").sum())["len"].to_list()
    return Check(EQUAL_SPLITS, len(set(per_split)) == 1 and len(per_split) == len(Split), {"per_split": str(per_split)})


def every_feature_has_exemplars(store: Store, written: list[Written],
                                partitions: list[Partition]) -> tuple[list[Check], ByPartition]:
    missing = _features_without_exemplars(store, written)
    overall = Check(EVERY_FEATURE_HAS_EXEMPLARS, not missing, {"features_without_top_exemplars": len(missing)})
    return [overall], _missing_by_partition(EVERY_FEATURE_HAS_EXEMPLARS, missing, partitions)


def _features_without_exemplars(store: Store, written: list[Written]) -> list[tuple]:
    missing = []
    for w in written:
        if w.table != "neuron_stats":
            continue
        stats = store.read("neuron_stats", w.layer, w.polarity, columns=["kind", "neuron"])
        top = (store.scan("exemplars", w.layer, w.polarity).filter(pl.col("sample") == "top")
               .select("kind", "neuron").unique().collect())
        missing += [(w.layer, w.polarity, n) for n in stats.join(top, on=["kind", "neuron"], how="anti")["neuron"].to_list()]
    return missing


def _missing_by_partition(name: str, missing: list[tuple], partitions: list[Partition]) -> ByPartition:
    """Per partition: passed when none of its features is among ``missing`` ((layer, polarity, feature))."""
    return {p.key: [Check(name, not any((layer, polarity) == (p.layer, p.polarity.value) for layer, polarity, _ in missing))]
            for p in map(Partition.of, partitions)}


# -- candidate descriptions -----------------------------------------------------------------


def every_feature_has_k_candidates(missing: list[tuple], partitions: list[Partition]) -> tuple[list[Check], ByPartition]:
    """``missing``: (layer, polarity, neuron) of the features with fewer than k candidates."""
    overall = Check(EVERY_FEATURE_HAS_K_CANDIDATES, not missing,
                    {"features_missing_candidates": len(missing), "first_missing": str(missing[:10])})
    return [overall], _missing_by_partition(EVERY_FEATURE_HAS_K_CANDIDATES, missing, partitions)


# -- scores and selected descriptions -------------------------------------------------------


def score_checks(frame: pl.DataFrame, column: str, suffix: str = "") -> list[Check]:
    """No NaN in ``column``, and every value in [-1, 1]."""
    values = frame[column].drop_nulls().to_numpy() if frame.height else np.zeros(0)
    nans = int(np.isnan(values).sum())
    outside = int(((values < -1) | (values > 1)).sum())
    return [Check(NO_NAN, nans == 0, {f"nan_{suffix or column}": nans}),
            Check(IN_RANGE, outside == 0, {f"outside_{suffix or column}": outside})]


def never_saw_check(frame: pl.DataFrame) -> Check:
    """Fails when any row was scored by a simulator that trained on its feature."""
    leaked = leaked_rows(frame)
    unknown = int(frame["simulator_saw_feature"].null_count()) if "simulator_saw_feature" in frame.columns else 0
    return Check(NEVER_SAW, leaked == 0, {"rows_scored_by_a_simulator_that_saw_the_feature": leaked,
                                          "rows_with_unknown_training_features": unknown})


def merge_checks(checks: list[Check]) -> list[Check]:
    """One check per name: passed when all passed, metadata merged."""
    merged: dict[str, tuple[bool, dict]] = {}
    for check in checks:
        passed, metadata = merged.get(check.name, (True, {}))
        merged[check.name] = (passed and check.passed, {**metadata, **check.metadata})
    return [Check(name, passed, metadata) for name, (passed, metadata) in merged.items()]


def description_scores_checks(frame: pl.DataFrame, written: list) -> tuple[list[Check], ByPartition]:
    """``frame``: the description_scores rows of every partition in ``written`` (ScoresWritten)."""
    unscored = [(w.layer, w.polarity, n) for w in written for n in w.unscored]
    overall = score_checks(frame, "score") + [
        Check(EVERY_FEATURE_SCORED, not unscored, {"unscored_features": len(unscored), "first": str(unscored[:10])}),
        never_saw_check(frame)]
    by_partition: ByPartition = {}
    for w in written:
        part = _partition(frame, w)
        by_partition.setdefault(_key(w), []).extend(
            score_checks(part, "score") + [Check(EVERY_FEATURE_SCORED, not w.unscored), never_saw_check(part)])
    return overall, by_partition


def neuron_descriptions_checks(store: Store, frame: pl.DataFrame, written: list) -> tuple[list[Check], ByPartition]:
    """``frame``: the neuron_descriptions rows of every partition in ``written``; every scored
    feature (in description_scores) must have one."""
    scored = pl.concat([store.read(SCORES_TABLE, w.layer, w.polarity).select("layer", "polarity", "neuron")
                        for w in written]).unique()
    missing = scored.join(frame.select("layer", "polarity", "neuron"), on=["layer", "polarity", "neuron"], how="anti")
    overall = merge_checks([c for column in DESCRIPTION_SCORE_COLUMNS for c in score_checks(frame, column, suffix=column)]) + [
        Check(EVERY_FEATURE_DESCRIBED, missing.height == 0, {"features_without_description": missing.height}),
        never_saw_check(frame)]
    by_partition: ByPartition = {}
    for w in written:
        part = _partition(frame, w)
        by_partition.setdefault(_key(w), []).extend(
            [c for column in DESCRIPTION_SCORE_COLUMNS for c in score_checks(part, column)]
            + [Check(EVERY_FEATURE_DESCRIBED, _partition(missing, w).height == 0), never_saw_check(part)])
    return overall, by_partition


def _partition(frame: pl.DataFrame, written) -> pl.DataFrame:
    return frame.filter((pl.col("layer") == written.layer) & (pl.col("polarity") == written.polarity))


def _key(written) -> str:
    return Partition.of((written.layer, written.polarity)).key


# -- embeddings and scorer validity ---------------------------------------------------------


def unit_norm(store: Store, written: list) -> Check:
    """Every description vector has length 1 (cosine similarity is a dot product)."""
    worst = max((_norm_error(store, w.layer, w.polarity) for w in written), default=0.0)
    return Check(UNIT_NORM, worst < 1e-3, {"largest_norm_error": round(worst, 6)})


def _norm_error(store: Store, layer: int, polarity: str) -> float:
    from neuron_assets.search import EMBEDDINGS_TABLE

    frame = store.read(EMBEDDINGS_TABLE, layer, polarity, columns=["embedding"])
    if frame.height == 0:
        return 0.0
    matrix = np.asarray(frame["embedding"].to_numpy(), dtype=np.float32).reshape(frame.height, -1)
    return float(np.abs(np.linalg.norm(matrix, axis=1) - 1.0).max())


def selecting_check(report) -> Check:
    """A warning (not an error: the pipeline still runs) when the selecting simulator of a
    neuron_assets.score.validity.ValidityReport is at chance or could not be measured."""
    row = report.row(report.selecting)
    passed = bool(row is not None and row.beats_chance)
    metadata = {"selecting": report.selecting}
    if row is not None:
        metadata |= {"true_first": round(row.true_first, 3), "chance": round(row.chance, 3),
                     "mean_margin": round(row.mean_margin, 4), "puzzles": row.puzzles}
    else:
        metadata["why"] = report.skipped.get(report.selecting, "not measured")
    return Check(SELECTING_BEATS_CHANCE, passed, metadata, warn=True)
