"""What every explainer backend shares: its Protocol, requests and results, and the corpus
sample. LLM backends talk to their model through :mod:`neuron_assets.llm`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Protocol, Sequence

from neuron_assets.explain.formats import ChatMessage
from neuron_assets.explain.statistical import WordCounts
from neuron_assets.llm import ChatTokenCounter, LLMUnavailable
from neuron_assets.types import ActivationRecord, FeatureId

__all__ = ["ChatTokenCounter", "CorpusSample", "Explainer", "ExplainerUnavailable", "ExplainRequest", "ExplainResult",
           "Prompt", "stable_seed"]


class ExplainerUnavailable(LLMUnavailable):
    """A backend that cannot start here (missing package, model, key); the message says how to fix it."""


@dataclass(frozen=True)
class Prompt:
    """One fitted prompt and what it shows."""

    messages: tuple[ChatMessage, ...]
    format_name: str  # e.g. highlight, highlight+cot
    puzzle: str | None  # the puzzle's name
    seq_ids: tuple[int, ...]  # every sequence shown, in prompt order
    tokens: int  # as counted with the explainer's tokenizer

    def as_dicts(self) -> list[dict[str, str]]:
        return [m.as_dict() for m in self.messages]


@dataclass(frozen=True)
class ExplainRequest:
    """One candidate description to produce."""

    feature: FeatureId
    candidate: int  # 0..k-1
    seed: int  # sampling seed of this candidate; a retry samples with neuron_assets.llm.attempt_seed
    records: tuple[ActivationRecord, ...]  # the train top exemplars this candidate draws on, in order
    ladder: tuple[float, ...]  # highlight ladder: fractions of the shown maximum (excerpts.HIGHLIGHT_LADDER)
    prompt: Prompt | None = None  # None for backends that read no prompt

    @property
    def seq_ids(self) -> tuple[int, ...]:
        return self.prompt.seq_ids if self.prompt else tuple(r.seq_id for r in self.records)


@dataclass(frozen=True)
class ExplainResult:
    description: str | None  # None when failed
    failure: str | None = None
    prompt_tokens: int = 0  # summed over attempts: what was paid for
    completion_tokens: int = 0
    latency_s: float = 0.0
    attempts: int = 1


@dataclass(frozen=True)
class CorpusSample:
    """Train sequences of the corpus, each once: the background word frequencies of the
    statistical explainer and the source of generated puzzles."""

    records: tuple[ActivationRecord, ...] = ()

    @cached_property
    def word_counts(self) -> WordCounts:
        return WordCounts.from_records(self.records)

    @cached_property
    def seq_ids(self) -> frozenset[int]:
        return frozenset(r.seq_id for r in self.records)


Progress = Callable[[int], object]


class Explainer(Protocol):
    backend: str  # the registry name, stored in the `backend` column
    model: str  # stored as `explainer_model`
    reads_prompts: bool  # False: requests carry no prompt (and nothing is counted)
    needs_gpu: bool  # True: the explainer asset runs in the gpu pool

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Prompt length with the explainer's own tokenizer (chat template included)."""
        ...

    def explain(self, requests: Sequence[ExplainRequest], corpus: CorpusSample, done: Progress) -> list[ExplainResult]:
        """One result per request, in order; a failure is a result, never an exception.
        ``done(n)`` reports n finished requests."""
        ...


def stable_seed(*parts: object) -> int:
    """A seed from ``parts`` that is the same in every process (``hash()`` is salted)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
