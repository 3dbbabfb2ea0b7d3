"""Typed configuration: one YAML file, every field documented, unknown keys are errors.

The defaults are the embedded demo (SmolLM2-135M-Instruct on the documentation text every
Python ships, each window behind the model's chat header),
so ``Config()`` runs on a laptop with no GPU and no network. Load a file with
:func:`load_config`; ``NEURON_ASSETS_CONFIG`` names the file when no path is given and
``NEURON_ASSETS_HOME`` the storage root.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from enum import Enum
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ValidationError, field_validator, model_validator

from neuron_assets.builtin_models import BUILTIN_MINILM, BUILTIN_SMOLLM2  # noqa: F401 (re-exported)
from neuron_assets.config.base import DEFAULT_HOME, REPO_ROOT, ConfigError, LLMEndpointConfig, Section
from neuron_assets.config.data import (
    ChatPrefixConfig,
    CorpusConfig,
    ExemplarsConfig,
    FeaturesConfig,
    NeuronSample,
    SaeConfig,
    SourceConfig,
    StorageConfig,
    SubjectConfig,
)
from neuron_assets.config.models import (
    ClustersConfig,
    DistillConfig,
    EffectsConfig,
    ExplainConfig,
    FinetunedSimulatorConfig,
    PromptedSimulatorConfig,
    PromptFormat,
    ScoreConfig,
    SearchConfig,
    SemanticSimulatorConfig,
    SimulateConfig,
    SimulatorTrainingConfig,
)


# (section, field) of settings that change a stage's speed, not its tables: not in any stage's version.
SPEED_ONLY = {("exemplars", "prefix_cache")}


class Config(Section):
    name: str = "demo"
    """A name for this configuration, shown in the UI and stored in the catalog."""
    storage: StorageConfig = StorageConfig()
    subject: SubjectConfig = SubjectConfig()
    corpus: CorpusConfig = CorpusConfig()
    features: FeaturesConfig = FeaturesConfig()
    exemplars: ExemplarsConfig = ExemplarsConfig()
    explain: ExplainConfig = ExplainConfig()
    simulate: SimulateConfig = SimulateConfig()
    score: ScoreConfig = ScoreConfig()
    search: SearchConfig = SearchConfig()
    clusters: ClustersConfig = ClustersConfig()
    effects: EffectsConfig = EffectsConfig()
    sae: SaeConfig = SaeConfig()
    distill: DistillConfig = DistillConfig()

    @field_validator("name")
    @classmethod
    def _name_is_a_slug(cls, value: str) -> str:
        if not value or any(c in value for c in "/\\ "):
            raise ValueError("name must be non-empty, without spaces or slashes")
        return value

    @model_validator(mode="after")
    def _sae_layers(self) -> "Config":
        if self.sae.latents is not None and self.sae.layers:
            collected = self.features.layers
            missing = [] if collected == "all" else sorted(set(self.sae.layers) - set(collected))
            if missing:
                raise ValueError(f"sae.layers {missing} are not among features.layers {collected}: an SAE's latents "
                                 "are described beside its layer's neurons; add the layer to features.layers, or set "
                                 "sae.latents: null to train the SAE without describing its latents")
        return self

    @property
    def store_root(self) -> Path | str:
        """Where the tables live, from the config, $NEURON_ASSETS_HOME or the default: a
        resolved local folder, or an fsspec URL (open it with ``Store(config.store_root)``)."""
        from neuron_assets.store import is_url

        chosen = str(self.storage.root or os.environ.get("NEURON_ASSETS_HOME") or DEFAULT_HOME)
        if chosen.startswith("file://"):  # a local folder written as a URL
            chosen = chosen[len("file://"):]
        return chosen.rstrip("/") if is_url(chosen) else Path(chosen).expanduser().resolve()

    @property
    def root(self) -> Path:
        """The local folder of this store: the storage root itself, or for a URL root its
        local scratch folder (checkpoints, locks, resume markers, report, search index)."""
        from neuron_assets.store import local_scratch

        root = self.store_root
        return root if isinstance(root, Path) else local_scratch(root)

    @property
    def hash(self) -> str:
        """Short hash of everything that shapes the results (storage location excluded)."""
        return self.sections_hash(*(name for name in type(self).model_fields if name != "storage"))

    def sections_hash(self, *sections: str) -> str:
        """Short hash of some sections: a stage's data version changes only with what it reads.
        Settings that change how fast a stage runs and not what it writes (SPEED_ONLY) are left
        out, so turning one on or off, or a release adding one, leaves finished work up to date."""
        payload = self.model_dump(mode="json", include=set(sections))
        for section, field in SPEED_ONLY:
            payload.get(section, {}).pop(field, None)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Read a YAML config; no path and no $NEURON_ASSETS_CONFIG gives the embedded demo."""
    path = path or os.environ.get("NEURON_ASSETS_CONFIG")
    if not path:
        return Config()
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.y*ml"))[:3]
        raise ConfigError(f"config {path} is a directory; name a YAML file with --config (or NEURON_ASSETS_CONFIG)"
                          + (f", e.g. one of {', '.join(str(path / name) for name in found)}" if found else ""))
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    if raw is None:  # an empty file would otherwise run the whole demo somewhere unexpected
        raise ConfigError(f"{path} is empty; write the sections you want (see configs/demo.yaml), "
                          "or leave out --config to run the embedded demo")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (subject:, corpus:, ...)")
    return config_from_dict(raw, origin=str(path))


def config_from_dict(raw: dict, origin: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_explain_validation_error(err, origin)) from None


def _explain_validation_error(err: ValidationError, origin: str) -> str:
    lines = []
    for problem in err.errors():
        key = ".".join(str(part) for part in problem["loc"])
        if problem["type"] == "extra_forbidden":
            section = _section_at(problem["loc"][:-1])
            known = ", ".join(sorted(section.model_fields)) if section else ""
            lines.append(f"unknown key '{key}'" + (f" (known keys here: {known})" if known else ""))
        else:
            message = problem["msg"].removeprefix("Value error, ")
            lines.append(f"'{key}': {message}" if key else message)  # a check across sections names its keys
    return f"{origin}: " + "; ".join(lines)


def _section_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field_info = model.model_fields.get(str(part))
        if field_info is None:
            return None
        annotation = field_info.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        for c in candidates:  # list[SourceConfig]
            nested += [a for a in getattr(c, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model



def documented_yaml(config: Config | None = None) -> str:
    """The config as YAML with every field's documentation as a comment above it."""
    config = config or Config()
    lines = ["# neuron_assets configuration; every key is optional (defaults = the embedded demo).", ""]
    _document(config, 0, lines)
    return "\n".join(lines) + "\n"


def _document(section: BaseModel, depth: int, lines: list[str]) -> None:
    pad = "  " * depth
    for name, info in type(section).model_fields.items():
        value = getattr(section, name)
        for doc_line in (info.description or "").splitlines():
            lines.append(f"{pad}# {doc_line.strip()}")
        if isinstance(value, BaseModel) and not isinstance(value, NeuronSample):
            lines.append(f"{pad}{name}:")
            _document(value, depth + 1, lines)
            if depth == 0:
                lines.append("")
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            lines.append(f"{pad}{name}:")
            for item in value:
                dumped = yaml.safe_dump([item.model_dump(mode="json")], sort_keys=False).strip().splitlines()
                lines += [f"{pad}  {line}" for line in dumped]
        else:
            lines.append(f"{pad}{name}: {json.dumps(section.model_dump(mode='json')[name])}")  # JSON is YAML
