"""Dagster resources: the typed config and the subject model, loaded once per process."""


from functools import lru_cache

import dagster as dg

from neuron_assets.config import Config, load_config
from neuron_assets.subject import SubjectModel, load_subject


class NeuronAssetsConfig(dg.ConfigurableResource):
    """The YAML config the assets read; empty path = $NEURON_ASSETS_CONFIG or the embedded demo."""

    config_path: str = ""

    def load(self) -> Config:
        return load_config(self.config_path or None)


class SubjectModelResource(dg.ConfigurableResource):
    """The subject model, loaded on first use and kept for the rest of the process."""

    def load(self, config: Config) -> "SubjectModel":
        return _cached_subject(config.subject)


@lru_cache(maxsize=1)
def _cached_subject(subject_config) -> "SubjectModel":
    return load_subject(subject_config)
