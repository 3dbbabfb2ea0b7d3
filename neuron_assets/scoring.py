"""The simulate-and-score stages as plain functions: read the store, compute, write the store.

Dagster assets (neuron_assets.defs.score_assets) and the CLI call these; tests call them
directly. Tables written:

- ``simulator_training_data`` (one file): the held-out, stage-1 and stage-2 rows;
- ``simulator_checkpoints`` (one file, one row per trained simulator, appended): where each
  checkpoint is, its loss curve summary and held-out correlation;
- ``description_scores`` (per layer x polarity): every candidate x scorer on val, with the
  shuffled controls;
- ``neuron_descriptions`` (per layer x polarity): the best candidate by val, its test
  score, and its shuffled control's val and test scores.
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
from neuron_assets.score import JUDGE_SCORERS, ScoringContext, Scorer, build_scorers, judged_candidates
from neuron_assets.select import (
    SCORES_SCHEMA,
    ShuffledControl,
    score_candidates,
    select_best,
    selected_by_feature,
    shuffled_controls,
)
from neuron_assets.simulate import FINETUNED, build_simulator, needs_checkpoint, simulator_names
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
    candidates = {feature: candidates[feature] for feature in roles}
    features: list[FeatureExemplars] = []
    for layer, polarity in partitions:
        wanted = {f.index for f in roles if f.layer == layer and f.polarity == polarity}
        if wanted:
            features += load_feature_exemplars(store, layer, polarity, sorted(wanted))
    frame = plan_training_data(features, candidates, config.simulate.training, roles) if features else \
        pl.DataFrame(schema=TRAINING_DATA_SCHEMA)
    frame = with_lineage(frame, config.subject.model, config.hash, run_id)
    path = store.write(TRAINING_TABLE, frame)
    counts = frame.group_by("role").agg(pl.struct("layer", "polarity", "neuron").n_unique().alias("n"))
    by_role = {row["role"]: row["n"] for row in counts.iter_rows(named=True)}
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
    version: str | None = None
    path: Path | None = None
    heldout_correlation: float | None = None
    heldout_shuffled_correlation: float | None = None
    stage1_heldout_correlation: float | None = None
    loss_curve: dict[str, list[float]] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    resumed: bool = False


def make_simulator_checkpoint(config: Config, run_id: str, log: Log = _quiet, on_step=None) -> CheckpointWritten:
    """Train (or resume, or find already trained) the fine-tuned simulator on the stored
    training data; record it in ``simulator_checkpoints``. ``on_step(stage, step, total,
    loss)`` follows every training step."""
    if not needs_checkpoint(config):
        reason = (f"simulate.finetuned.checkpoint is set ({config.simulate.finetuned.checkpoint})"
                  if config.simulate.finetuned.checkpoint else
                  f"no scored simulator is finetuned (simulate.backend {config.simulate.backend}, compare_with "
                  f"{config.simulate.compare_with})")
        return CheckpointWritten(False, reason + "; nothing to train")
    from neuron_assets.simulate.alignment import control_token_forms
    from neuron_assets.simulate.training import STAGE1, STAGE2, train_simulator
    from neuron_assets.subject import load_tokenizer

    store = Store(config.root)
    frame = store.read(TRAINING_TABLE).drop("model", "config_hash", "run_id", strict=False)
    added = control_token_forms(_special_tokens(load_tokenizer(config.subject)))
    trained = train_simulator(frame, config.simulate.finetuned, config.simulate.training,
                              store.checkpoint_dir / "simulator", added, log=log, on_step=on_step)
    last = trained.heldout.get(STAGE2) or trained.heldout[STAGE1]
    row = {
        "version": trained.version, "path": str(trained.path), "backbone": config.simulate.finetuned.backbone,
        "head": config.simulate.finetuned.head, "alignment": config.simulate.finetuned.alignment,
        "stage1_steps": trained.steps.get(STAGE1, 0), "stage2_steps": trained.steps.get(STAGE2, 0),
        "final_loss": (trained.loss_curve.get(STAGE2) or trained.loss_curve[STAGE1])[-1],
        "heldout_correlation": last.described, "heldout_shuffled_correlation": last.shuffled,
        "heldout_features": last.features, "stage2_changed": trained.stage2_changed,
        "train_seconds": trained.seconds, "created_at": datetime.now(timezone.utc).replace(tzinfo=None),
        "simulate_hash": simulate_hash(config),
    }
    _append_checkpoint_row(store, with_lineage(pl.DataFrame([row]), config.subject.model, config.hash, run_id))
    return CheckpointWritten(
        True, "", trained.version, trained.path, last.described, last.shuffled, trained.heldout[STAGE1].described,
        trained.loss_curve, trained.steps, trained.seconds, trained.resumed,
    )


def _special_tokens(tokenizer) -> list[str]:
    from neuron_assets.explain.excerpts import special_tokens

    return sorted({text for text in special_tokens(tokenizer).values() if text})


def _append_checkpoint_row(store: Store, row: pl.DataFrame) -> None:
    try:
        existing = store.read(CHECKPOINTS_TABLE)
    except MissingTableError:
        existing = None
    if existing is not None:  # one row per version: a re-materialization of a trained version replaces it
        existing = existing.filter(pl.col("version") != row["version"][0])
    frame = row if existing is None else pl.concat([existing, row], how="diagonal_relaxed")
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


# -- description scores and neuron descriptions --------------------------------------------


_last_built: dict = {}


@dataclass
class Scoring:
    """The scorers of one run, built once (the simulator loads once for every partition)."""

    scorers: list[Scorer]
    skipped: dict[str, str]  # scorer -> why it did not run
    simulator_version: str | None

    @classmethod
    def build(cls, config: Config, store: Store, judge=None) -> Scoring:
        """The configured scorers on the latest checkpoint; the last one built is reused while
        neither the config nor the checkpoint changes (the scores and selection assets of one
        run share the loaded simulator)."""
        names = simulator_names(config)
        checkpoint = latest_checkpoint(store, config) if needs_checkpoint(config) else None
        version = checkpoint[0] if checkpoint else (config.simulate.finetuned.checkpoint if FINETUNED in names else None)
        key = (config.model_dump_json(), str(store.root), version, id(judge))
        if _last_built.get("key") != key:
            def simulator(name: str):
                return build_simulator(config, checkpoint[1] if checkpoint else None, name)

            context = ScoringContext(config, simulator, tuple(names), judge)
            scorers, skipped = build_scorers(config.score, context)
            _last_built.clear()
            _last_built.update(key=key, scoring=cls(scorers, skipped, version))
        return _last_built["scoring"]

    @property
    def selector(self) -> Scorer:
        """The scorer whose val score selects (score.select_by; with the simulate.backend simulator)."""
        return self.scorers[0]


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
    frame = with_lineage(frame.with_columns(pl.lit(scoring.simulator_version, pl.String).alias("simulator_version")),
                         config.subject.model, config.hash, run_id)
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
    "simulator_version": pl.String, "test_simulator_version": pl.String,
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
    val_version = scores["simulator_version"][0] if "simulator_version" in scores.columns and scores.height else None
    if scorer.simulator == FINETUNED and val_version != scoring.simulator_version:
        log(f"layer {layer} {polarity.value}: val scores used simulator {val_version}, test uses "
            f"{scoring.simulator_version}; re-materialize description_scores to score both with one")
    rows = []
    for row in best.iter_rows(named=True):
        feature = features.get(row["neuron"])
        if feature is None:
            continue
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
            "simulator_version": val_version, "test_simulator_version": scoring.simulator_version,
        })
    frame = with_lineage(pl.DataFrame(rows, schema=DESCRIPTIONS_SCHEMA), config.subject.model, config.hash, run_id)
    path = store.write(DESCRIPTIONS_TABLE, frame, layer, polarity.value)
    log(f"layer {layer} {polarity.value}: {frame.height} neuron descriptions")
    return DescriptionsWritten(layer, polarity.value, path, frame.height, frame, time.perf_counter() - started)


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
    "TrainingDataWritten", "candidate_partitions", "latest_checkpoint", "make_description_scores",
    "make_neuron_descriptions", "make_simulator_checkpoint", "make_simulator_training_data", "read_all",
    "read_candidates", "simulate_hash",
]
