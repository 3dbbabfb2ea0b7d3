"""The simulate-and-score stages as plain functions: read the store, compute, write the store.

Dagster assets (neuron_assets.defs.score_assets) and the CLI call these; tests call them
directly. Tables written:

- ``simulator_training_data`` (one file): every fold's held-out, stage-1 and stage-2 rows;
- ``simulator_checkpoints`` (one file, one row per trained simulator, appended): where each
  checkpoint is, its fold, the features it trained on, its loss curve summary and held-out
  correlation;
- ``description_scores`` (per layer x polarity): every candidate x scorer on val, with the
  shuffled controls;
- ``neuron_descriptions`` (per layer x polarity): the best candidate by val, its test
  score, and its shuffled control's val and test scores.

Both score tables carry, per row, the simulator's version and ``simulator_saw_feature``:
whether that simulator trained on the row's feature. Cross-fitting (simulate.training.folds)
scores each feature with the fold simulator that never saw it, so it is false on every row;
:func:`leaked_rows` counts the rows where it is not (the assets' check fails on any).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import polars as pl

from neuron_assets.config import Config
from neuron_assets.exemplars import load_feature_exemplars
from neuron_assets.score import JUDGE_SCORERS, CorrelationScorer, ScoringContext, Scorer, build_scorers, judged_candidates
from neuron_assets.select import (
    SCORES_SCHEMA,
    rows_of,
    ShuffledControl,
    score_candidates,
    select_best,
    selected_by_feature,
    shuffled_controls,
)
from neuron_assets.simulate import FINETUNED, build_simulator, needs_checkpoint, simulator_names
from neuron_assets.simulate.folds import feature_key, fold_of
from neuron_assets.store import MissingTableError, Store, with_lineage
from neuron_assets.types import ExemplarKind, FeatureExemplars, FeatureId, Polarity, Split

TRAINING_TABLE = "simulator_training_data"
CHECKPOINTS_TABLE = "simulator_checkpoints"
SCORES_TABLE = "description_scores"
DESCRIPTIONS_TABLE = "neuron_descriptions"
CANDIDATES_TABLE = "candidate_descriptions"

Log = Callable[[str], object]


def _quiet(_: str) -> None:
    return None


# -- reading upstream tables ---------------------------------------------------------------


def read_candidates(store: Store, layer: int, polarity: Polarity) -> dict[FeatureId, list[str | None]]:
    """Feature -> its candidates' descriptions by candidate number (None where one failed)."""
    frame = store.read(CANDIDATES_TABLE, layer, polarity.value).select("neuron", "candidate", "description")
    out: dict[FeatureId, list[str | None]] = {}
    for row in frame.sort("neuron", "candidate").iter_rows(named=True):
        slots = out.setdefault(FeatureId(layer, row["neuron"], polarity), [])
        slots += [None] * (row["candidate"] + 1 - len(slots))
        slots[row["candidate"]] = row["description"]
    return out


def candidate_partitions(store: Store, config: Config) -> list[tuple[int, Polarity]]:
    """The (layer, polarity) partitions with candidate descriptions, within the config's polarities."""
    wanted = set(config.features.polarities)
    return [(layer, Polarity(p)) for layer, p in store.partitions(CANDIDATES_TABLE) if p in wanted]


# -- simulator training data and checkpoint ------------------------------------------------


@dataclass(frozen=True)
class TrainingDataWritten:
    path: Path
    rows: int
    features: dict[str, int]  # role -> features
    partitions: int


def make_simulator_training_data(config: Config, run_id: str, log: Log = _quiet) -> TrainingDataWritten:
    """The simulator's training rows. The features are picked first from cheap columns
    (candidates, ``neuron_stats``' max, which neurons have train top exemplars), seeded;
    then only the picked features' exemplars are loaded (a few hundred, at any model size)."""
    from neuron_assets.simulate.training import TRAINING_DATA_SCHEMA, plan_training_data, training_roles

    store = Store(config.root)
    candidates: dict[FeatureId, list[str | None]] = {}
    usable: list[FeatureId] = []
    partitions = candidate_partitions(store, config)
    for layer, polarity in partitions:
        described = read_candidates(store, layer, polarity)
        candidates.update(described)
        usable += _usable_features(store, layer, polarity, described)
    roles = training_roles(usable, config.simulate.training)
    picked = {feature for fold_roles in roles.values() for feature in fold_roles}
    candidates = {feature: candidates[feature] for feature in picked}
    features: list[FeatureExemplars] = []
    for layer, polarity in partitions:
        wanted = {f.index for f in picked if f.layer == layer and f.polarity == polarity}
        if wanted:
            features += load_feature_exemplars(store, layer, polarity, sorted(wanted))
    frame = plan_training_data(features, candidates, config.simulate.training, roles) if features else \
        pl.DataFrame(schema=TRAINING_DATA_SCHEMA)
    frame = with_lineage(frame, config.subject.model, config.hash, run_id)
    path = store.write(TRAINING_TABLE, frame)
    counts = frame.group_by("fold", "role").agg(pl.struct("layer", "polarity", "neuron").n_unique().alias("n"))
    by_role = {f"fold {row['fold']} {row['role']}": row["n"] for row in counts.sort("fold", "role").iter_rows(named=True)}
    log(f"simulator training data: {frame.height} rows from {len(partitions)} partitions, features {by_role}")
    return TrainingDataWritten(path, frame.height, by_role, len(partitions))


def _usable_features(store: Store, layer: int, polarity: Polarity,
                     described: dict[FeatureId, list[str | None]]) -> list[FeatureId]:
    """Features with a candidate, a positive max and train top exemplars (read without exemplars' rows)."""
    with_candidate = {f.index for f, options in described.items() if any(options)}
    for table in ("neuron_stats", "exemplars"):
        if not store.exists(table, layer, polarity.value):
            store.read(table, layer, polarity.value)  # raises MissingTableError, which says what to materialize
    positive = set(pl.scan_parquet(store.path("neuron_stats", layer, polarity.value))
                   .filter(pl.col("max") > 0).select("neuron").collect()["neuron"].to_list())
    with_top = set(pl.scan_parquet(store.path("exemplars", layer, polarity.value))
                   .filter((pl.col("split") == Split.TRAIN.value) & (pl.col("kind") == ExemplarKind.TOP.value))
                   .select(pl.col("neuron").unique()).collect()["neuron"].to_list())
    return [FeatureId(layer, n, polarity) for n in sorted(with_candidate & positive & with_top)]


@dataclass(frozen=True)
class CheckpointWritten:
    trained: bool  # False when the configured simulator needs no training
    reason: str = ""
    version: str | None = None  # the fold versions joined by '+'
    paths: tuple[Path, ...] = ()  # one checkpoint per fold
    heldout_correlation: float | None = None  # mean over the folds' held-out features
    heldout_shuffled_correlation: float | None = None
    stage1_heldout_correlation: float | None = None
    loss_curve: dict[str, list[float]] = field(default_factory=dict)  # "<stage> fold <f>" -> losses
    steps: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    resumed: bool = False
    folds: int = 0


def make_simulator_checkpoint(config: Config, run_id: str, log: Log = _quiet, on_step=None) -> CheckpointWritten:
    """Train (or resume, or find already trained) one fine-tuned simulator per fold on the
    stored training data; record each in ``simulator_checkpoints``. ``on_step(stage, step,
    total, loss)`` follows every training step."""
    if not needs_checkpoint(config):
        reason = (f"simulate.finetuned.checkpoint is set ({config.simulate.finetuned.checkpoint})"
                  if config.simulate.finetuned.checkpoint else
                  f"no scored simulator is finetuned (simulate.backend {config.simulate.backend}, compare_with "
                  f"{config.simulate.compare_with})")
        return CheckpointWritten(False, reason + "; nothing to train")
    from neuron_assets.simulate.alignment import control_token_forms
    from neuron_assets.simulate.training import STAGE1, STAGE2, train_crossfit
    from neuron_assets.subject import load_tokenizer

    store = Store(config.root)
    frame = store.read(TRAINING_TABLE).drop("model", "config_hash", "run_id", strict=False)
    if "fold" not in frame.columns:
        raise ValueError("simulator_training_data was written before cross-fitting (no fold column); "
                         "re-materialize simulator_training_data")
    added = control_token_forms(_special_tokens(load_tokenizer(config.subject)))
    trained = train_crossfit(frame, config.simulate.finetuned, config.simulate.training,
                             store.checkpoint_dir / "simulator", added, log=log, on_step=on_step)
    rows, last, first = [], [], []
    for fold in trained:
        heldout = fold.heldout.get(STAGE2) or fold.heldout[STAGE1]
        last.append(heldout)
        first.append(fold.heldout[STAGE1])
        rows.append({
            "version": fold.version, "path": str(fold.path), "fold": fold.fold, "folds": fold.folds,
            "trained_features": list(fold.trained_features), "backbone": config.simulate.finetuned.backbone,
            "head": config.simulate.finetuned.head, "alignment": config.simulate.finetuned.alignment,
            "stage1_steps": fold.steps.get(STAGE1, 0), "stage2_steps": fold.steps.get(STAGE2, 0),
            "final_loss": (fold.loss_curve.get(STAGE2) or fold.loss_curve[STAGE1])[-1],
            "heldout_correlation": heldout.described, "heldout_shuffled_correlation": heldout.shuffled,
            "heldout_features": heldout.features, "stage2_changed": fold.stage2_changed,
            "train_seconds": fold.seconds, "created_at": datetime.now(timezone.utc).replace(tzinfo=None),
            "simulate_hash": simulate_hash(config),
        })
    _append_checkpoint_rows(store, with_lineage(pl.DataFrame(rows), config.subject.model, config.hash, run_id))
    return CheckpointWritten(
        True, "", "+".join(f.version for f in trained), tuple(f.path for f in trained),
        _weighted_mean([(h.described, h.features) for h in last]), _weighted_mean([(h.shuffled, h.features) for h in last]),
        _weighted_mean([(h.described, h.features) for h in first]),
        {f"{stage} fold {f.fold}": curve for f in trained for stage, curve in f.loss_curve.items()},
        {f"{stage} fold {f.fold}": n for f in trained for stage, n in f.steps.items()},
        sum(f.seconds for f in trained), any(f.resumed for f in trained), len(trained),
    )


def _weighted_mean(pairs: list[tuple[float, int]]) -> float:
    total = sum(n for _, n in pairs)
    return float(sum(v * n for v, n in pairs) / total) if total else 0.0


def _special_tokens(tokenizer) -> list[str]:
    from neuron_assets.explain.excerpts import special_tokens

    return sorted({text for text in special_tokens(tokenizer).values() if text})


def _append_checkpoint_rows(store: Store, rows: pl.DataFrame) -> None:
    try:
        existing = store.read(CHECKPOINTS_TABLE)
    except MissingTableError:
        existing = None
    if existing is not None:  # one row per version: a re-materialization of a trained version replaces it
        existing = existing.filter(~pl.col("version").is_in(rows["version"].to_list()))
    frame = rows if existing is None else pl.concat([existing, rows], how="diagonal_relaxed")
    store.write(CHECKPOINTS_TABLE, frame)


SIMULATE_HASH_IGNORES = {"device", "batch_size", "checkpoint", "allow_download"}  # not what the weights depend on


def simulate_hash(config: Config) -> str:
    """A short hash of what a trained simulator depends on in the config: simulate.finetuned
    (less run-time settings) and simulate.training."""
    import hashlib
    import json

    payload = [config.simulate.finetuned.model_dump(mode="json", exclude=SIMULATE_HASH_IGNORES),
               config.simulate.training.model_dump(mode="json")]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def latest_checkpoint(store: Store, config: Config | None = None) -> tuple[str, Path] | None:
    """(version, path) of the most recently trained simulator whose folder still exists; with
    ``config``, only among those trained with its simulate.finetuned and simulate.training."""
    try:
        frame = store.read(CHECKPOINTS_TABLE)
    except MissingTableError:
        return None
    if config is not None:
        if "simulate_hash" not in frame.columns:
            return None
        frame = frame.filter(pl.col("simulate_hash") == simulate_hash(config))
    for row in frame.sort("created_at", descending=True).iter_rows(named=True):
        if (Path(row["path"]) / "simulator.json").is_file():
            return row["version"], Path(row["path"])
    return None


@dataclass(frozen=True)
class FoldCheckpoint:
    fold: int
    version: str
    path: Path
    trained_features: frozenset[str]  # simulate.training.feature_key of each feature it trained on


def latest_fold_checkpoints(store: Store, config: Config) -> dict[int, FoldCheckpoint] | None:
    """Fold -> the most recent trained simulator of that fold under ``config``'s simulator
    settings (simulate_hash, which includes simulate.training.folds); None unless every fold
    has one whose folder still exists."""
    try:
        frame = store.read(CHECKPOINTS_TABLE)
    except MissingTableError:
        return None
    if not {"simulate_hash", "fold", "trained_features"} <= set(frame.columns):
        return None
    found: dict[int, FoldCheckpoint] = {}
    rows = frame.filter(pl.col("simulate_hash") == simulate_hash(config)).sort("created_at", descending=True)
    for row in rows.iter_rows(named=True):
        if row["fold"] not in found and (Path(row["path"]) / "simulator.json").is_file():
            found[row["fold"]] = FoldCheckpoint(row["fold"], row["version"], Path(row["path"]),
                                                frozenset(row["trained_features"] or ()))
    folds = config.simulate.training.folds
    return found if set(found) == set(range(folds)) else None


# -- description scores and neuron descriptions --------------------------------------------


_last_built: dict = {}


@dataclass
class Scoring:
    """The scorers of one run, built once (the simulators load once for every partition).

    With the fine-tuned simulator trained here, its correlation scorer is a
    :class:`CrossFitScorer`: each feature is scored by the simulator of its own fold, which
    never trained on it."""

    scorers: list[Scorer]
    skipped: dict[str, str]  # scorer -> why it did not run
    simulator_version: str | None  # the fine-tuned simulator's version(s), '+'-joined per fold
    folds: dict[int, FoldCheckpoint] = field(default_factory=dict)  # empty: not cross-fitted
    external_checkpoint: bool = False  # simulate.finetuned.checkpoint: its training features are unknown

    @classmethod
    def build(cls, config: Config, store: Store, judge=None) -> Scoring:
        """The configured scorers on the latest checkpoints; the last one built is reused while
        neither the config nor the checkpoints change (the scores and selection assets of one
        run share the loaded simulators)."""
        names = simulator_names(config)
        folds = {}
        if needs_checkpoint(config):  # none yet: the fine-tuned simulator is unavailable, as it says
            folds = latest_fold_checkpoints(store, config) or {}
        external = FINETUNED in names and bool(config.simulate.finetuned.checkpoint)
        version = ("+".join(folds[f].version for f in sorted(folds)) if folds else
                   (config.simulate.finetuned.checkpoint if FINETUNED in names else None))
        key = (config.model_dump_json(), str(store.root), version, id(judge))
        if _last_built.get("key") != key:
            def simulator(name: str):
                checkpoint = folds[0].path if (name == FINETUNED and folds) else None
                return build_simulator(config, checkpoint, name)

            context = ScoringContext(config, simulator, tuple(names), judge)
            scorers, skipped = build_scorers(config.score, context)
            if folds:
                scorers = [CrossFitScorer.of(s, config, folds) if _is_finetuned_correlation(s) else s for s in scorers]
            _last_built.clear()
            _last_built.update(key=key, scoring=cls(scorers, skipped, version, folds, external))
        return _last_built["scoring"]

    @property
    def selector(self) -> Scorer:
        """The scorer whose val score selects (score.select_by; with the simulate.backend simulator)."""
        return self.scorers[0]

    def provenance(self, feature: FeatureId, simulator: str | None) -> tuple[str | None, bool | None]:
        """(simulator version, whether that simulator trained on ``feature``) for a row scored
        with ``simulator``: a simulator not trained here never saw a feature; a checkpoint
        given in simulate.finetuned.checkpoint has unknown training features (None)."""
        if simulator != FINETUNED:
            return None, False
        if not self.folds:
            return self.simulator_version, None if self.external_checkpoint else False
        fold = self.folds[fold_of(feature, len(self.folds))]
        return fold.version, feature_key(feature) in fold.trained_features


def _is_finetuned_correlation(scorer) -> bool:
    return isinstance(scorer, CorrelationScorer) and scorer.simulator == FINETUNED


class CrossFitScorer:
    """The correlation scorer of the fine-tuned simulator, cross-fitted: a feature of fold f
    is scored by fold f's simulator (trained only on other folds' features)."""

    name = "correlation"
    simulator = FINETUNED

    def __init__(self, by_fold: dict[int, Scorer]):
        self.by_fold = by_fold

    @classmethod
    def of(cls, first: CorrelationScorer, config: Config, folds: dict[int, FoldCheckpoint]) -> CrossFitScorer:
        """From the scorer built on fold 0's simulator, the other folds' on theirs."""
        by_fold = {0: first}
        for fold, checkpoint in folds.items():
            if fold != 0:
                by_fold[fold] = CorrelationScorer(build_simulator(config, checkpoint.path, FINETUNED),
                                                  first.top, first.random_count)
        return cls(by_fold)

    def score(self, feature: FeatureExemplars, descriptions, split: Split):
        return self.by_fold[fold_of(feature.feature, len(self.by_fold))].score(feature, descriptions, split)


def with_provenance(frame: pl.DataFrame, scoring: Scoring) -> pl.DataFrame:
    """``frame`` (rows with layer, polarity, neuron, simulator) with each row's
    ``simulator_version`` and ``simulator_saw_feature``."""
    versions, saw = [], []
    for layer, polarity, neuron, simulator in frame.select("layer", "polarity", "neuron", "simulator").iter_rows():
        version, seen = scoring.provenance(FeatureId(layer, neuron, Polarity(polarity)), simulator)
        versions.append(version)
        saw.append(seen)
    return frame.with_columns(pl.Series("simulator_version", versions, pl.String),
                              pl.Series("simulator_saw_feature", saw, pl.Boolean))


def leaked_rows(frame: pl.DataFrame) -> int:
    """Rows scored by a simulator that trained on their feature (simulator_saw_feature true;
    a table without the column counts every row: nothing says it is clean)."""
    if "simulator_saw_feature" not in frame.columns:
        return frame.height
    return int(frame["simulator_saw_feature"].fill_null(False).sum())


@dataclass(frozen=True)
class ScoresWritten:
    layer: int
    polarity: str
    path: Path
    rows: int
    features: int
    unscored: list[int]  # features with exemplars but no scored candidate
    seconds: float


def make_description_scores(config: Config, layer: int, polarity: Polarity, run_id: str,
                            scoring: Scoring | None = None, log: Log = _quiet, on_features=None) -> ScoresWritten:
    """Every candidate x scorer on val; ``on_features(n)`` as n more features are scored."""
    started = time.perf_counter()
    store = Store(config.root)
    polarity = Polarity(polarity)
    scoring = scoring or Scoring.build(config, store)
    features = load_feature_exemplars(store, layer, polarity)
    candidates = read_candidates(store, layer, polarity)
    # Judges (detection, fuzzing) see only the selector's best score.judge_candidates per feature.
    judges = [s for s in scoring.scorers if s.name in JUDGE_SCORERS and s is not scoring.selector]
    frame = score_candidates(features, candidates, [s for s in scoring.scorers if s not in judges], Split.VAL,
                             progress=on_features)
    if judges:
        judged = judged_candidates(frame, candidates, scoring.selector, config.score.judge_candidates)
        frame = pl.concat([frame, score_candidates(features, judged, judges, Split.VAL)])
    # The control is another feature's *selected* description (by val), scored like the
    # candidates; every candidate is also scored on test by the selector for best_of_k_curve.
    selector = scoring.selector
    selected = selected_by_feature(select_best(frame, selector.name, selector.simulator), features)
    controls = shuffled_controls(features, selected, config.score.control_seed) if config.score.shuffled_control else {}
    frame = pl.concat([frame, score_candidates(features, {}, scoring.scorers, Split.VAL, controls),
                       score_candidates(features, candidates, [selector], Split.TEST, controls)])
    frame = with_lineage(with_provenance(frame, scoring), config.subject.model, config.hash, run_id)
    path = store.write(SCORES_TABLE, frame, layer, polarity.value)
    scored = set(frame["neuron"].unique().to_list()) if frame.height else set()
    unscored = sorted(f.feature.index for f in features if f.feature.index not in scored)
    log(f"layer {layer} {polarity.value}: {frame.height} scores for {len(scored)} features "
        f"({len(unscored)} without candidates)")
    return ScoresWritten(layer, polarity.value, path, frame.height, len(scored), unscored, time.perf_counter() - started)


DESCRIPTIONS_SCHEMA = {
    "layer": pl.Int64, "polarity": pl.String, "neuron": pl.Int64, "candidate": pl.Int64, "description": pl.String,
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


def make_neuron_descriptions(config: Config, layer: int, polarity: Polarity, run_id: str,
                             scoring: Scoring | None = None, log: Log = _quiet, on_features=None) -> DescriptionsWritten:
    """The best candidate by val (score.select_by), then it and its shuffled control on test;
    ``on_features(n)`` as n more features are scored on test."""
    started = time.perf_counter()
    store = Store(config.root)
    polarity = Polarity(polarity)
    scores = store.read(SCORES_TABLE, layer, polarity.value)
    scoring = scoring or Scoring.build(config, store)
    scorer = scoring.selector
    best = select_best(scores, scorer.name, scorer.simulator)
    features = {f.feature.index: f for f in load_feature_exemplars(store, layer, polarity)}
    explainers = _explainers(store, layer, polarity)
    val_provenance = _val_provenance(scores, scorer)
    rows = []
    stale = 0
    for row in best.iter_rows(named=True):
        feature = features.get(row["neuron"])
        if feature is None:
            continue
        val_version, val_saw = val_provenance.get(row["neuron"], (None, None))
        test_version, test_saw = scoring.provenance(feature.feature, scorer.simulator)
        stale += scorer.simulator == FINETUNED and val_version != test_version
        described = [row["description"]] + ([row["control_description"]] if row["control_description"] else [])
        test = scorer.score(feature, described, Split.TEST)
        if on_features is not None:
            on_features(1)
        rows.append({
            "layer": layer, "polarity": polarity.value, "neuron": row["neuron"], "candidate": row["candidate"],
            "description": row["description"], "scorer": scorer.name, "simulator": row["simulator"],
            "val_score": row["val_score"], "test_score": test[0].value, "val_flags": row["val_flags"],
            "test_flags": list(test[0].flags), "control_description": row["control_description"],
            "control_source_neuron": row["control_source_neuron"], "control_val_score": row["control_val_score"],
            "control_test_score": test[1].value if len(test) > 1 else None, "n_candidates": row["n_candidates"],
            **explainers.get((row["neuron"], row["candidate"]), {"explainer_backend": None, "explainer_model": None}),
            "simulator_version": val_version, "test_simulator_version": test_version,
            "simulator_saw_feature": None if val_saw is None or test_saw is None else bool(val_saw or test_saw),
        })
    if stale:
        log(f"layer {layer} {polarity.value}: {stale} features' val scores used another simulator version than "
            "their test scores; re-materialize description_scores to score both with one")
    frame = with_lineage(pl.DataFrame(rows, schema=DESCRIPTIONS_SCHEMA), config.subject.model, config.hash, run_id)
    path = store.write(DESCRIPTIONS_TABLE, frame, layer, polarity.value)
    log(f"layer {layer} {polarity.value}: {frame.height} neuron descriptions")
    return DescriptionsWritten(layer, polarity.value, path, frame.height, frame, time.perf_counter() - started)


def _val_provenance(scores: pl.DataFrame, scorer: Scorer) -> dict[int, tuple[str | None, bool | None]]:
    """neuron -> (simulator version, saw feature) of the selecting scorer's val candidate rows;
    any candidate row that saw the feature marks the feature (its selection was tainted)."""
    if not {"simulator_version", "simulator_saw_feature"} <= set(scores.columns):
        return {}
    rows = rows_of(scores, scorer.name, scorer.simulator).filter(pl.col("split") == Split.VAL.value)
    grouped = rows.group_by("neuron").agg(pl.col("simulator_version").first(), pl.col("simulator_saw_feature").any(),
                                          pl.col("simulator_saw_feature").null_count().alias("unknown"))
    return {n: (v, None if unknown else saw) for n, v, saw, unknown in grouped.iter_rows()}


def _explainers(store: Store, layer: int, polarity: Polarity) -> dict[tuple[int, int], dict]:
    try:
        frame = store.read(CANDIDATES_TABLE, layer, polarity.value)
    except MissingTableError:
        return {}
    columns = [c for c in ("backend", "explainer_model") if c in frame.columns]
    out = {}
    for row in frame.select("neuron", "candidate", *columns).iter_rows(named=True):
        out[(row["neuron"], row["candidate"])] = {"explainer_backend": row.get("backend"),
                                                 "explainer_model": row.get("explainer_model")}
    return out


def read_all(store: Store, table: str) -> pl.DataFrame:
    """Every partition of a per-layer table, concatenated (empty when none is written)."""
    frames = [store.read(table, layer, polarity) for layer, polarity in store.partitions(table)]
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()


__all__ = [
    "CHECKPOINTS_TABLE", "DESCRIPTIONS_SCHEMA", "DESCRIPTIONS_TABLE", "SCORES_SCHEMA", "SCORES_TABLE",
    "TRAINING_TABLE", "CheckpointWritten", "DescriptionsWritten", "Scoring", "ScoresWritten", "ShuffledControl",
    "TrainingDataWritten", "CrossFitScorer", "FoldCheckpoint", "candidate_partitions", "latest_checkpoint",
    "latest_fold_checkpoints", "leaked_rows", "with_provenance", "make_description_scores",
    "make_neuron_descriptions", "make_simulator_checkpoint", "make_simulator_training_data", "read_all",
    "read_candidates", "simulate_hash",
]
