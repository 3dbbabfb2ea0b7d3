"""Simulators: a description and token sequences in, predicted activations (0-10) out.

Backends are chosen by name (``simulate.backend``) from :data:`SIMULATORS`:

- ``lexical``: an offline rule over the tokens and words a description names;
- ``semantic``: offline, reads language: MiniLM similarity of the description to each
  piece of the text alone and in context, calibrated on the project's validity puzzles,
  with the lexical rule for the tokens the description quotes;
- ``hybrid``: ``lexical`` for a description that names quoted tokens and nothing else,
  ``semantic`` for any other (the demo's selector);
- ``finetuned``: Transluce's fine-tuned 11-class per-token simulator (a checkpoint that
  :mod:`neuron_assets.simulate.training` trains);
- ``prompted``: Bills et al.'s all-at-once logprob simulator (a local model or an
  OpenAI-compatible completions endpoint).

torch and transformers are imported only when a backend that needs them is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from neuron_assets.config import Config
from neuron_assets.simulate.base import (
    MAX_ACTIVATION,
    NUM_CLASSES,
    SimulatedActivations,
    Simulator,
    discretize,
    expected_value,
)
from neuron_assets.simulate.lexical import LexicalSimulator


class SimulatorUnavailable(RuntimeError):
    """A simulator that cannot be built with this configuration; the message says how to fix it."""


def _lexical(config: Config, checkpoint: Path | None) -> Simulator:
    return LexicalSimulator()


def _semantic(config: Config, checkpoint: Path | None) -> Simulator:
    from neuron_assets.simulate.semantic import SemanticSimulator

    settings = config.simulate.semantic
    try:
        return SemanticSimulator(settings.model, settings.device, settings.batch_size, batch_tokens=settings.batch_tokens)
    except (OSError, ValueError) as err:
        raise SimulatorUnavailable(f"the semantic simulator cannot load simulate.semantic.model "
                                   f"'{settings.model}': {err}") from None


def _hybrid(config: Config, checkpoint: Path | None) -> Simulator:
    from neuron_assets.simulate.semantic import HybridSimulator

    settings = config.simulate.semantic
    try:
        return HybridSimulator(settings.model, settings.device, settings.batch_size, batch_tokens=settings.batch_tokens)
    except (OSError, ValueError) as err:
        raise SimulatorUnavailable(f"the hybrid simulator cannot load simulate.semantic.model "
                                   f"'{settings.model}': {err}") from None


def _finetuned(config: Config, checkpoint: Path | None) -> Simulator:
    from neuron_assets.simulate.finetuned import SimulatorLoadError, load_checkpoint

    settings = config.simulate.finetuned
    path = settings.checkpoint or checkpoint
    if path is None:
        raise SimulatorUnavailable(
            "the finetuned simulator has no checkpoint: materialize simulator_checkpoint first "
            "(neuron-assets run), or set simulate.finetuned.checkpoint to a trained simulator folder"
        )
    try:
        return load_checkpoint(path, settings.input_format, settings.device, settings.dtype, settings.batch_size,
                               settings.max_length)
    except SimulatorLoadError as err:
        raise SimulatorUnavailable(str(err)) from None


def _prompted(config: Config, checkpoint: Path | None) -> Simulator:
    from neuron_assets.simulate.prompted import LOGPROB_SOURCES, PromptedSimulator

    settings = config.simulate.prompted
    try:
        source = LOGPROB_SOURCES[settings.backend](settings)
    except ValueError as err:
        raise SimulatorUnavailable(str(err)) from None
    return PromptedSimulator(source, settings.placeholder)


@dataclass(frozen=True)
class SimulatorBackend:
    """A registry entry: how to build the simulator, and what it needs from the pipeline."""

    build: Callable[[Config, Path | None], Simulator]
    needs_gpu: bool = False  # scoring with it runs in the gpu pool
    trained_here: bool = False  # it needs the checkpoint that simulator_checkpoint trains

    def __call__(self, config: Config, checkpoint: Path | None) -> Simulator:
        return self.build(config, checkpoint)


SIMULATORS: dict[str, SimulatorBackend] = {
    "lexical": SimulatorBackend(_lexical),
    "semantic": SimulatorBackend(_semantic),
    "hybrid": SimulatorBackend(_hybrid),
    "finetuned": SimulatorBackend(_finetuned, needs_gpu=True, trained_here=True),
    "prompted": SimulatorBackend(_prompted, needs_gpu=True),
}


FINETUNED = "finetuned"


def simulator_names(config: Config) -> list[str]:
    """The simulators scored: simulate.backend (it selects), then simulate.compare_with."""
    return list(dict.fromkeys([config.simulate.backend, *config.simulate.compare_with]))


def needs_checkpoint(config: Config) -> bool:
    """Whether a scored simulator is one that simulator_checkpoint trains (and no trained
    checkpoint is given in simulate.finetuned.checkpoint)."""
    trained = any(SIMULATORS[name].trained_here for name in simulator_names(config) if name in SIMULATORS)
    return trained and not config.simulate.finetuned.checkpoint


def needs_gpu(config: Config) -> bool:
    """Whether a scored simulator wants the gpu pool."""
    return any(SIMULATORS[name].needs_gpu for name in simulator_names(config) if name in SIMULATORS)


def build_simulator(config: Config, checkpoint: str | Path | None = None, name: str | None = None) -> Simulator:
    """Simulator ``name`` (default: simulate.backend); ``checkpoint`` is the trained fine-tuned
    one, when there is one."""
    name = name or config.simulate.backend
    try:
        factory = SIMULATORS[name]
    except KeyError:
        raise SimulatorUnavailable(f"unknown simulator '{name}' in simulate.backend or simulate.compare_with; "
                                   f"known: {', '.join(SIMULATORS)}") from None
    return factory(config, Path(checkpoint) if checkpoint else None)


__all__ = [
    "MAX_ACTIVATION", "NUM_CLASSES", "SIMULATORS", "LexicalSimulator", "SimulatedActivations", "Simulator",
    "SimulatorBackend", "SimulatorUnavailable", "build_simulator", "discretize", "expected_value", "needs_checkpoint",
    "needs_gpu", "simulator_names",
]
