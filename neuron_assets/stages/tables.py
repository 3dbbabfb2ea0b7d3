"""The tables the stages write, and the readers of upstream tables that several stages share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl

from neuron_assets.config import Config
from neuron_assets.exemplars import NEURON_KIND, load_feature_exemplars
from neuron_assets.progress import Progress
from neuron_assets.store import Store
from neuron_assets.types import FeatureExemplars, FeatureId, Partition, Polarity

SEQUENCES_TABLE = "sequences"
CANDIDATES_TABLE = "candidate_descriptions"
TRAINING_TABLE = "simulator_training_data"
SCORES_TABLE = "description_scores"
DESCRIPTIONS_TABLE = "neuron_descriptions"

Log = Callable[[str], object]
OnPartition = Callable[[Partition, list[Path]], object] | None  # told each partition's files once it is written


def quiet(_: str) -> None:
    return None


@dataclass(frozen=True)
class Written:
    table: str
    path: Path
    rows: int
    layer: int | None = None
    polarity: str | None = None


def features_by_kind(features: list[FeatureExemplars]) -> list[tuple[str, list[FeatureExemplars]]]:
    """(kind, its features), neurons first: each stage runs its per-partition work once per
    kind, so a description, a score and a shuffled control stay within a kind. A partition
    with no feature at all still gives one (empty) neuron group."""
    kinds: dict[str, list[FeatureExemplars]] = {NEURON_KIND: []}
    for feature in features:
        kinds.setdefault(feature.feature.kind, []).append(feature)
    return [(kind, of_kind) for kind, of_kind in kinds.items() if of_kind or kind == NEURON_KIND]


def with_kind(frame: pl.DataFrame, kind: str) -> pl.DataFrame:
    """A per-feature table's rows of one kind, with the ``kind`` column beside polarity."""
    frame = frame.with_columns(pl.lit(kind).alias("kind"))
    order = [c for c in frame.columns if c != "kind"]
    order.insert(order.index("polarity") + 1 if "polarity" in order else 0, "kind")
    return frame.select(order)


def read_candidates(store: Store, layer: int, polarity: Polarity) -> dict[FeatureId, list[str | None]]:
    """Feature -> its candidates' descriptions by candidate number (None where one failed)."""
    frame = store.read(CANDIDATES_TABLE, layer, polarity.value).select(
        "kind", "neuron", "candidate", "description")
    out: dict[FeatureId, list[str | None]] = {}
    for row in frame.sort("kind", "neuron", "candidate").iter_rows(named=True):
        slots = out.setdefault(FeatureId(layer, row["neuron"], polarity, row["kind"]), [])
        slots += [None] * (row["candidate"] + 1 - len(slots))
        slots[row["candidate"]] = row["description"]
    return out


def candidate_partitions(store: Store, config: Config) -> list[tuple[int, Polarity]]:
    """The (layer, polarity) partitions with candidate descriptions, within the config's polarities."""
    wanted = set(config.features.polarities)
    return [(layer, Polarity(p)) for layer, p in store.partitions(CANDIDATES_TABLE) if p in wanted]


def read_all(store: Store, table: str) -> pl.DataFrame:
    """Every partition of a per-layer table, concatenated (empty when none is written)."""
    frames = [store.read(table, layer, polarity) for layer, polarity in store.partitions(table)]
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()


def for_each_partition(partitions: list, store: Store, progress: Progress | None, label: str,
                       on_partition: OnPartition, compute) -> list:
    """``compute(partition, on_features)`` for each partition in turn, under a progress task over
    its features (counted from neuron_stats, cheaply); ``on_partition`` hears of each as it is done."""
    progress = progress or Progress([])
    written = []
    for partition in map(Partition.of, partitions):
        layer, polarity = partition.layer, partition.polarity.value
        total = (store.scan("neuron_stats", layer, polarity).select(pl.len()).collect().item()
                 if store.exists("neuron_stats", layer, polarity) else None)
        with progress.task(f"{label} {partition.key}", total, "feature") as task:
            written.append(compute(partition, task.advance))
        if on_partition is not None:
            on_partition(partition, [written[-1].path])
    return written


def exemplars_of_features(store: Store, features: list[FeatureId]) -> list[FeatureExemplars]:
    """The exemplars of just these features, read partition by partition and kind by kind."""
    out: list[FeatureExemplars] = []
    groups: dict[tuple[int, Polarity, str], list[int]] = {}
    for feature in features:
        groups.setdefault((feature.layer, feature.polarity, feature.kind), []).append(feature.index)
    for (layer, polarity, kind), indices in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1].value, item[0][2])):
        out += load_feature_exemplars(store, layer, polarity, sorted(indices), kind=kind)
    return out
