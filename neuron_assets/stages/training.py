"""The fine-tuned simulator's stages: its training rows and its cross-fitted checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from neuron_assets.config import Config
from neuron_assets.exemplars import (
    NEURON_KIND,
    load_feature_exemplars,
)
from neuron_assets.simulate import FINETUNED, needs_checkpoint
from neuron_assets.simulate.checkpoints import append_checkpoint_rows, simulate_hash
from neuron_assets.stages.tables import (
    TRAINING_TABLE,
    Log,
    candidate_partitions,
    quiet,
    read_candidates,
)
from neuron_assets.store import Store, with_lineage
from neuron_assets.subject import load_tokenizer
from neuron_assets.types import Sample, FeatureExemplars, FeatureId, Polarity, Split


@dataclass(frozen=True)
class TrainingDataWritten:
    path: Path
    rows: int
    features: dict[str, int]  # role -> features
    partitions: int


def make_simulator_training_data(config: Config, run_id: str, log: Log = quiet) -> TrainingDataWritten:
    """The simulator's training rows. The features are picked first from cheap columns
    (candidates, ``neuron_stats``' max, which neurons have train top exemplars), seeded;
    then only the picked features' exemplars are loaded (a few hundred, at any model size)."""
    from neuron_assets.simulate.training import TRAINING_DATA_SCHEMA, plan_training_data, training_roles

    store = Store(config.store_root)
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
            features += load_feature_exemplars(store, layer, polarity, sorted(wanted), kind=NEURON_KIND)
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
    """Neurons with a candidate, a positive max and train top exemplars (read without exemplars'
    rows). The simulator trains on neurons only: SAE latents are never in its training data."""
    with_candidate = {f.index for f, options in described.items() if any(options) and f.kind == NEURON_KIND}
    for table in ("neuron_stats", "exemplars"):
        if not store.exists(table, layer, polarity.value):
            store.read(table, layer, polarity.value)  # raises MissingTableError, which says what to materialize
    positive = set(store.scan("neuron_stats", layer, polarity.value)
                   .filter((pl.col("max") > 0) & (pl.col("kind") == NEURON_KIND)).select("neuron").collect()["neuron"].to_list())
    with_top = set(store.scan("exemplars", layer, polarity.value)
                   .filter((pl.col("split") == Split.TRAIN.value) & (pl.col("sample") == Sample.TOP.value)
                           & (pl.col("kind") == NEURON_KIND))
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


def make_simulator_checkpoint(config: Config, run_id: str, log: Log = quiet, on_step=None) -> CheckpointWritten:
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

    store = Store(config.store_root)
    frame = store.read(TRAINING_TABLE).drop("model", "config_hash", "run_id", strict=False)
    if "fold" not in frame.columns:
        raise ValueError("simulator_training_data was written before cross-fitting (no fold column); "
                         "re-materialize simulator_training_data")
    selects = config.simulate.backend == FINETUNED
    check_training_size(frame, config, selects, log)
    added = control_token_forms(_special_tokens(load_tokenizer(config.subject)))
    trained = train_crossfit(frame, config.simulate.finetuned, config.simulate.training,
                             store.checkpoint_dir / "simulator", added, log=log, on_step=on_step)
    if selects and config.simulate.training.selection_checks:
        for fold in trained:
            heldout = fold.heldout.get(STAGE2) or fold.heldout[STAGE1]
            if not heldout.described > heldout.shuffled:
                raise ValueError(
                    f"the simulator of fold {fold.fold} ({fold.path}) does not beat its shuffled control on held-out "
                    f"features (correlation {heldout.described:.3f} against {heldout.shuffled:.3f}), so it may not "
                    "select descriptions: train it on more features (simulate.training.stage1_features, "
                    "exemplars_per_feature), select by another simulator (simulate.backend), or set "
                    "simulate.training.selection_checks: false to select with it anyway")
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
    append_checkpoint_rows(store, with_lineage(pl.DataFrame(rows), config.subject.model, config.hash, run_id))
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
    from neuron_assets.excerpts import special_tokens

    return sorted({text for text in special_tokens(tokenizer).values() if text})


class UndersizedTraining(ValueError):
    """A simulator that would select descriptions, trained on fewer pairs than its backbone needs."""


def check_training_size(frame: pl.DataFrame, config: Config, selects: bool, log: Log) -> None:
    """Refuse (when the simulator selects) or warn loudly (when it is only compared) when a
    fold trains on fewer pairs than :func:`minimum_training_pairs` asks of its backbone."""
    from neuron_assets.simulate.training import backbone_parameters, minimum_training_pairs, training_pairs

    params = backbone_parameters(config.simulate.finetuned)
    minimum = minimum_training_pairs(params)
    per_fold = training_pairs(frame)
    smallest = min((sum(stages.values()) for stages in per_fold.values()), default=0)
    if smallest >= minimum:
        return
    message = (f"the fine-tuned simulator ({config.simulate.finetuned.backbone}, {params / 1e6:,.0f}M weights) trains on "
               f"{smallest:,} pairs in its smallest fold, below the {minimum:,} a backbone of that size needs to be "
               "trusted (simulate.training: stage1_features, stage2_features, exemplars_per_feature)")
    if selects and config.simulate.training.selection_checks:
        raise UndersizedTraining(message + "; it would select every description: raise the training sizes, select "
                                 "by another simulator (simulate.backend), or set simulate.training.selection_checks: "
                                 "false to train it anyway")
    log("WARNING: " + message + ("; it is only compared, not selecting" if not selects else
                                 "; simulate.training.selection_checks is off, so it selects anyway"))
