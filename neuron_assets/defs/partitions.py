"""Per-feature assets are partitioned by layer x polarity: Dagster's view of the core's
partitions (neuron_assets.stages.graph.partitions_of, neuron_assets.types.Partition)."""

from __future__ import annotations

import dagster as dg

from neuron_assets.config import Config
from neuron_assets.stages.graph import partitions_of
from neuron_assets.types import Partition


def layer_polarity_partitions(config: Config) -> dg.MultiPartitionsDefinition:
    partitions = partitions_of(config)
    return dg.MultiPartitionsDefinition({
        "layer": dg.StaticPartitionsDefinition([str(layer) for layer in sorted({p.layer for p in partitions})]),
        "polarity": dg.StaticPartitionsDefinition(list(config.features.polarities)),
    })


def parse_partition_keys(keys: list) -> list[Partition]:
    """The run's partition keys ('3|pos' or MultiPartitionKeys) as Partitions."""
    return [Partition.of(key) for key in keys]


def all_partitions_tags(partitions: dg.PartitionsDefinition) -> dict[str, str]:
    """Run tags that make one run cover every partition (a daemon backfill of a 2-D
    partition set would split it into one run per polarity)."""
    keys = partitions.get_partition_keys()
    return {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}


def layer_range_tags(partitions: dg.MultiPartitionsDefinition, first_layer: int, last_layer: int) -> dict[str, str]:
    """Run tags for layers first..last x every polarity as one run (one forward pass), the tags
    to enter in the Launchpad: the UI's partition dialog would launch one run per polarity."""
    keys = [key for key in partitions.get_partition_keys() if first_layer <= Partition.of(key).layer <= last_layer]
    if not keys:
        raise ValueError(f"no partitions for layers {first_layer}..{last_layer}")
    return {"dagster/asset_partition_range_start": str(keys[0]), "dagster/asset_partition_range_end": str(keys[-1])}
