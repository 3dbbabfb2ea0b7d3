"""Checks that need only the config and the subject model's config.json, run before any work.

:func:`validate_config` is called at the start of the corpus stage (and of ``neuron-assets
run``), so a layer out of range, a sample larger than a layer, a sequence longer than the
model's positions, a site regex that matches nothing or a device this machine lacks is
reported in seconds, naming the key and the fix, instead of after the corpus is tokenized.
The model is built as a skeleton on the meta device (no weights read, no memory used) to see
its module names and layer widths.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from neuron_assets.config import Config, ConfigError


@dataclass(frozen=True)
class ModelShape:
    """What the checks learned about the subject model."""

    num_layers: int
    neurons: dict[int, int]  # layer -> neurons in that layer
    max_positions: int | None  # None when the model's config does not say


def validate_config(config: Config) -> ModelShape:
    """Raise ConfigError (or SubjectError, for a model that cannot be found) on the first
    problem; return the model's shape when every check passes."""
    for key, device in _devices_in_use(config):
        check_device(device, key)
    _check_sources(config)
    model_config = _model_config(config)
    shape = _model_shape(config, model_config)
    _check_features(config, shape)
    if shape.max_positions is not None and config.corpus.seq_len > shape.max_positions:
        raise ConfigError(
            f"corpus.seq_len is {config.corpus.seq_len} but {config.subject.model} reads at most "
            f"{shape.max_positions} positions (max_position_embeddings); lower corpus.seq_len to {shape.max_positions} or less"
        )
    return shape


def check_storage_root(config: Config) -> Path:
    """Create the storage root (the local folder of a URL root) if needed and check that this
    user can write there; return it. Raises ConfigError naming the root and the setting."""
    root = config.root
    fix = "set storage.root in the config (or NEURON_ASSETS_HOME) to a folder you can write"
    if root.exists() and not root.is_dir():
        raise ConfigError(f"the storage root {root} is a file, not a folder; {fix}")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocking = next((parent for parent in root.parents if parent.exists() and not parent.is_dir()), None)
        why = f"{blocking} is a file" if blocking else (err.strerror or str(err))
        raise ConfigError(f"the storage root {root} cannot be created ({why}); {fix}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"the storage root {root} is not writable by this user ({err.strerror or err}); {fix}, "
                          "or make this one writable") from None
    return root


def check_device(name: str, key: str) -> None:
    """A torch device name that exists on this machine ('auto' always does)."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{key} '{name}' is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return
    if device.type == "meta":
        raise ConfigError(f"{key} 'meta' holds no data; use auto, cpu, cuda or cuda:N")
    backend = getattr(torch, device.type, None) if device.type != "mps" else torch.backends.mps
    available = bool(backend is not None and backend.is_available())
    if not available:
        build = "a CPU-only build" if device.type == "cuda" and torch.version.cuda is None else f"torch {torch.__version__}"
        raise ConfigError(f"{key} is '{name}' but this machine has no {device.type} device ({build}); "
                          f"set {key}: auto (or cpu), or run where a {device.type} device is present")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ConfigError(f"{key} is '{name}' but this machine has {count} {device.type} device(s) "
                          f"({device.type}:0-{device.type}:{count - 1}); pick one of those or auto")


# -- the checks ----------------------------------------------------------------------------


def _devices_in_use(config: Config) -> list[tuple[str, str]]:
    """(key, device) of every stage this config runs on a torch device of its own."""
    devices = [("subject.device", config.subject.device)]
    simulators = {config.simulate.backend, *config.simulate.compare_with}
    if config.explain.backend == "transformers":
        devices.append(("explain.device", config.explain.device))
    if "finetuned" in simulators:
        devices.append(("simulate.finetuned.device", config.simulate.finetuned.device))
    if "prompted" in simulators and config.simulate.prompted.backend == "transformers":
        devices.append(("simulate.prompted.device", config.simulate.prompted.device))
    return devices


def _check_sources(config: Config) -> None:
    for i, source in enumerate(config.corpus.sources):
        if source.kind == "builtin":
            continue
        key = f"corpus.sources[{i}].path"
        path = Path(source.path).expanduser()
        if not source.path:
            raise ConfigError(f"{key} is empty for source '{source.name}' ({source.kind}); set it to a file or folder")
        if not path.exists():
            raise ConfigError(f"{key}: {path} does not exist (source '{source.name}'); fix the path")
        if source.kind in ("jsonl", "parquet") and not path.is_file():
            raise ConfigError(f"{key}: {path} is a folder, and a {source.kind} source reads one file; name the file")


def _model_config(config: Config):
    from transformers import AutoConfig

    from neuron_assets.subject import SubjectError, model_not_found_message, resolve_model_path

    path = resolve_model_path(config.subject.model)
    try:
        model_config = AutoConfig.from_pretrained(path, local_files_only=not config.subject.allow_download,
                                                  trust_remote_code=config.subject.trust_remote_code)
    except (OSError, ValueError) as err:
        raise SubjectError(model_not_found_message(config.subject, err)) from None
    return model_config


def _model_shape(config: Config, model_config) -> ModelShape:
    """Layers and widths from a weightless skeleton of the model (the meta device)."""
    from transformers import AutoModel

    from neuron_assets.subject import SubjectModel, find_sites

    with torch.device("meta"):
        skeleton = AutoModel.from_config(model_config, trust_remote_code=config.subject.trust_remote_code)
    sites = find_sites(skeleton, config.subject.site)  # names the modules seen when nothing matches
    view = SubjectModel(name=config.subject.model, model=skeleton, tokenizer=None, sites=sites,
                        device=torch.device("meta"), dtype=torch.float32)
    text_config = getattr(model_config, "text_config", None) or model_config
    positions = next((getattr(text_config, a) for a in ("max_position_embeddings", "n_positions")
                      if isinstance(getattr(text_config, a, None), int)), None)
    return ModelShape(num_layers=len(sites), neurons={layer: view.neurons_per_layer(layer) for layer in sites},
                      max_positions=positions)


def _check_features(config: Config, shape: ModelShape) -> None:
    features = config.features
    last = shape.num_layers - 1
    layers = sorted(shape.neurons) if features.layers == "all" else sorted(set(features.layers))
    missing = [layer for layer in layers if layer not in shape.neurons]
    if missing:
        raise ConfigError(f"features.layers: layer {missing[0]} is out of range; {config.subject.model} has "
                          f"{shape.num_layers} layers (0-{last}); list layers from 0 to {last}, or write layers: all")
    for layer in layers:
        width = shape.neurons[layer]
        if isinstance(features.neurons, list):
            bad = [n for n in features.neurons if n >= width]
            if bad:
                raise ConfigError(f"features.neurons: neuron {bad[0]} is out of range; layer {layer} has {width} "
                                  f"neurons (0-{width - 1}); list neurons below {width}")
        elif features.neurons != "all" and features.neurons.sample > width:
            raise ConfigError(f"features.neurons.sample is {features.neurons.sample} but layer {layer} has only "
                              f"{width} neurons; lower sample to {width} or less, or write neurons: all")
