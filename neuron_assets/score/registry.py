"""Scorers by name (``score.scorers``): :data:`SCORERS` maps a name to a factory that builds
its scorers from a :class:`ScoringContext`; :func:`build_scorers` builds the configured ones,
the selecting scorer first."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from neuron_assets.config import Config, ScoreConfig
from neuron_assets.score.base import Scorer, ScorerUnavailable
from neuron_assets.score.correlation import CorrelationScorer
from neuron_assets.score.delphi import DetectionScorer, FuzzingScorer, Judge, LLMJudge
from neuron_assets.score.embedding import EmbeddingScorer
from neuron_assets.simulate.base import Simulator


@dataclass
class ScoringContext:
    """What scorers are built from. ``simulator_factory(name)`` builds a simulator; it and the
    judge are made on first use."""

    config: Config
    simulator_factory: Callable[[str], Simulator]
    simulators: tuple[str, ...] = ()  # correlation is scored with each; the first selects
    judge: Judge | None = None
    embedder: Callable[[list[str]], np.ndarray] | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # scorer -> why it did not run

    def make_judge(self) -> Judge:
        if self.judge is None:
            explain = self.config.explain
            from neuron_assets.llm import BACKENDS

            if explain.backend not in BACKENDS:
                raise ScorerUnavailable(
                    f"detection and fuzzing need an LLM: explain.backend '{explain.backend}' has none "
                    f"(use one of {', '.join(BACKENDS)}; a vLLM server is the openai backend with base_url)"
                )
            self.judge = LLMJudge(explain, judge_answer_cache(self.config))
        return self.judge

    def make_embedder(self) -> Callable[[list[str]], np.ndarray]:
        if self.embedder is None:
            from neuron_assets.embedding import sentence_encoder

            self.embedder = sentence_encoder(self.config.score.embedding_model)
        return self.embedder


def judge_answer_cache(config: Config):
    """The store's LLM answer cache (``<root>/llm_cache``), so a scoring stage run again pays
    for no judge answer twice; None when explain.answer_cache is off."""
    if not config.explain.answer_cache:
        return None
    from neuron_assets.llm import AnswerCache

    return AnswerCache.under(config.root)


ScorerFactory = Callable[[ScoringContext], list[Scorer]]


def _correlation(context: ScoringContext) -> list[Scorer]:
    """One correlation scorer per simulator; a simulator after the first that cannot be built
    here is left out (the first, which selects, must build)."""
    from neuron_assets.simulate import SimulatorUnavailable

    score = context.config.score
    scorers = []
    for i, name in enumerate(context.simulators):
        try:
            simulator = context.simulator_factory(name)
        except SimulatorUnavailable as err:
            if i == 0:
                raise ScorerUnavailable(str(err)) from None
            context.skipped[f"correlation/{name}"] = str(err)
            continue
        scorers.append(CorrelationScorer(simulator, score.top_exemplars, score.random_exemplars))
    return scorers


def _judge_settings(config: Config) -> dict:
    score = config.score
    return dict(examples=score.judge_examples, batch=score.judge_batch, seed=score.control_seed,
                quiet=score.judge_quiet, fraction=config.exemplars.activating_fraction)


def _detection(context: ScoringContext) -> list[Scorer]:
    return [DetectionScorer(context.make_judge(), **_judge_settings(context.config))]


def _fuzzing(context: ScoringContext) -> list[Scorer]:
    return [FuzzingScorer(context.make_judge(), **_judge_settings(context.config))]


def _embedding(context: ScoringContext) -> list[Scorer]:
    score = context.config.score
    return [EmbeddingScorer(context.make_embedder(), score.top_exemplars, score.random_exemplars)]


SCORERS: dict[str, ScorerFactory] = {
    "correlation": _correlation,
    "detection": _detection,
    "fuzzing": _fuzzing,
    "embedding": _embedding,
}


def build_scorers(config: ScoreConfig, context: ScoringContext) -> tuple[list[Scorer], dict[str, str]]:
    """The configured scorers (the selecting one first), and for each one that cannot run
    here, why it was skipped. The selecting scorer is the first one named score.select_by."""
    unknown = [name for name in config.scorers if name not in SCORERS]
    if unknown:
        raise ScorerUnavailable(f"unknown scorer(s) {', '.join(unknown)} in score.scorers; known: {', '.join(SCORERS)}")
    if config.select_by not in config.scorers:
        raise ScorerUnavailable(f"score.select_by '{config.select_by}' is not in score.scorers {config.scorers}")
    context.skipped = {}
    scorers: list[Scorer] = []
    for name in sorted(dict.fromkeys(config.scorers), key=lambda n: n != config.select_by):
        try:
            scorers += SCORERS[name](context)
        except ScorerUnavailable as err:
            if name == config.select_by:
                raise
            context.skipped[name] = str(err)
    return scorers, dict(context.skipped)
