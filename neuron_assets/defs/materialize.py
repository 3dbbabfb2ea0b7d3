"""Materializing a config's assets in-process, as `neuron-assets run` does: every layer x
polarity partition in one run (range tags), recorded in the Dagster instance the UI reads."""

import os
from pathlib import Path

import dagster as dg

from neuron_assets.config import load_config
from neuron_assets.defs.definitions import build_definitions
from neuron_assets.defs.partitions import all_partitions_tags

def materialize_config(config_path: str | None, select: list[str] | None = None) -> None:
    """Run the selected assets (default: all) of a config; raise RuntimeError with the first
    step's error message when the run fails."""
    config = load_config(config_path)
    defs = build_definitions(config_path)
    assets = list(defs.assets)
    if select:
        known = {a.key.to_user_string() for a in assets}
        unknown = set(select) - known
        if unknown:
            raise ValueError(f"unknown asset(s) {sorted(unknown)}; the assets are {sorted(known)}")
        assets = [a for a in assets if a.key.to_user_string() in select]
    partitions = next(a.partitions_def for a in defs.assets if a.partitions_def is not None)
    home = Path(os.environ.get("DAGSTER_HOME") or config.root)  # the instance `neuron-assets ui` opens
    home.mkdir(parents=True, exist_ok=True)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        result = dg.materialize(
            assets,
            instance=instance,
            resources=defs.resources,
            tags=all_partitions_tags(partitions),
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
            raise_on_error=False,
        )
    if not result.success:
        failure = next((e for e in result.all_events if e.is_step_failure), None)
        raise RuntimeError(failure.step_failure_data.error.message.strip() if failure else "the run failed")


def partition_count(config_path: str | None) -> int:
    defs = build_definitions(config_path)
    return len(next(a.partitions_def for a in defs.assets if a.partitions_def is not None).get_partition_keys())
