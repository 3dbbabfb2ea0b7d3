"""Dagster resources: the typed config and the subject model."""



import dagster as dg

from neuron_assets.config import Config, load_config
from neuron_assets.subject import SubjectModel, load_subject


class NeuronAssetsConfig(dg.ConfigurableResource):
    """The YAML config the assets read; empty path = $NEURON_ASSETS_CONFIG or the embedded demo."""

    config_path: str = ""

    def load(self) -> Config:
        return load_config(self.config_path or None)


class SubjectModelResource(dg.ConfigurableResource):
    """The subject model, loaded on first use into the runtime cache; the stage that used it
    releases it when it ends (neuron_assets.defs.runs), so the next stage gets the memory."""

    def load(self, config: Config) -> "SubjectModel":
        from neuron_assets import runtime

        return runtime.shared(runtime.cache_key("subject", config.subject.model_dump(mode="json")),
                              lambda: load_subject(config.subject))
