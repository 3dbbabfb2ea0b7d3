"""The Dagster code location: every asset, check, job, schedule and sensor of the platform."""

from __future__ import annotations

import dagster as dg

from neuron_assets.config import load_config
from neuron_assets.defs.assets import corpus, exemplar_assets
from neuron_assets.defs.clusters_assets import clusters_assets
from neuron_assets.defs.distill_assets import distill_assets
from neuron_assets.defs.effects_assets import effects_assets
from neuron_assets.defs.executor import select_executor
from neuron_assets.defs.explain_assets import ExplainerResource, explain_assets
from neuron_assets.defs.partitions import layer_polarity_partitions
from neuron_assets.defs.report_assets import neuron_report
from neuron_assets.defs.resources import NeuronAssetsConfig, SubjectModelResource
from neuron_assets.defs.runs import RunSettings
from neuron_assets.defs.sae_assets import sae_assets
from neuron_assets.defs.score_assets import score_definitions
from neuron_assets.defs.search_assets import search_assets
from neuron_assets.defs.validity_assets import scorer_validity


def environment_definitions() -> dg.Definitions:
    """The definitions for $NEURON_ASSETS_CONFIG: the code pointer that the steps of a run on
    other machines (the celery executor's workers) load, each from its own environment."""
    return build_definitions()


def build_definitions(config_path: str | None = None) -> dg.Definitions:
    """Definitions for one config file (default: $NEURON_ASSETS_CONFIG or the embedded demo)."""
    config = load_config(config_path)
    partitions = layer_polarity_partitions(config)
    scoring = score_definitions(partitions, config)
    assets = [corpus, *exemplar_assets(partitions, config), *explain_assets(partitions, config), *scoring["assets"], scorer_validity,
              neuron_report, *search_assets(partitions, config), *clusters_assets(config),
              *effects_assets(partitions, config), *sae_assets(config),
              *distill_assets(config)]
    return dg.Definitions(
        assets=assets,
        executor=select_executor(config, assets),
        jobs=scoring["jobs"],
        schedules=scoring["schedules"],
        sensors=scoring["sensors"],
        resources={
            "settings": NeuronAssetsConfig(config_path=config_path or ""),
            "subject": SubjectModelResource(),
            "explainer": ExplainerResource(),
            "run": RunSettings(),
        },
    )
