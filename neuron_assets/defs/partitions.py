"""Per-feature assets are partitioned by layer x polarity."""

from __future__ import annotations

import dagster as dg

from neuron_assets.config import Config
from neuron_assets.subject import count_layers
from neuron_assets.types import Polarity


def layer_polarity_partitions(config: Config) -> dg.MultiPartitionsDefinition:
    layers = range(count_layers(config.subject)) if config.features.layers == "all" else sorted(config.features.layers)
    return dg.MultiPartitionsDefinition({
        "layer": dg.StaticPartitionsDefinition([str(layer) for layer in layers]),
        "polarity": dg.StaticPartitionsDefinition(list(config.features.polarities)),
    })


def parse_partition_keys(keys: list) -> list[tuple[int, Polarity]]:
    """'3|pos' (or a MultiPartitionKey) -> (3, Polarity.POS)."""
    parsed = []
    for key in keys:
        by_dimension = getattr(key, "keys_by_dimension", None) or dict(zip(("layer", "polarity"), str(key).split("|")))
        parsed.append((int(by_dimension["layer"]), Polarity(by_dimension["polarity"])))
    return parsed


def partition_key(layer: int, polarity: Polarity | str) -> str:
    return f"{layer}|{Polarity(polarity).value}"


def all_partitions_tags(partitions: dg.PartitionsDefinition) -> dict[str, str]:
    """Run tags that make one run cover every partition (a daemon backfill of a 2-D
    partition set would split it into one run per polarity)."""
    keys = partitions.get_partition_keys()
    return {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}


def layer_range_tags(partitions: dg.MultiPartitionsDefinition, first_layer: int, last_layer: int) -> dict[str, str]:
    """Run tags for layers first..last x every polarity as one run (one forward pass), the tags
    to enter in the Launchpad: the UI's partition dialog would launch one run per polarity."""
    keys = [key for key in partitions.get_partition_keys()
            if first_layer <= int(key.keys_by_dimension["layer"]) <= last_layer]
    if not keys:
        raise ValueError(f"no partitions for layers {first_layer}..{last_layer}")
    return {"dagster/asset_partition_range_start": str(keys[0]), "dagster/asset_partition_range_end": str(keys[-1])}
