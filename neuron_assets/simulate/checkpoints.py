"""The record of trained simulators: table ``simulator_checkpoints`` (one row per trained
simulator: its folder, fold, the features it trained on, its loss and held-out correlation)
and how a run finds the checkpoints that match its config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from neuron_assets.config import Config
from neuron_assets.store import MissingTableError, Store

CHECKPOINTS_TABLE = "simulator_checkpoints"


def append_checkpoint_rows(store: Store, rows: pl.DataFrame) -> None:
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
