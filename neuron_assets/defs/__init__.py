"""Dagster only: partitions, assets, resources, checks, schedules, definitions.

`dagster dev` (workspace.yaml) loads `defs` from here, for the config named by
$NEURON_ASSETS_CONFIG (default: the embedded demo).
"""

from neuron_assets.defs.definitions import build_definitions

defs = build_definitions()
