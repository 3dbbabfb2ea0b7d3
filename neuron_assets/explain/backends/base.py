"""What every explainer backend shares: its Protocol, requests and results, token counting,
the corpus sample, and the retry rules of LLM backends."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Protocol, Sequence

from neuron_assets.explain.formats import ChatMessage, MalformedAnswer, parse_description
from neuron_assets.explain.statistical import WordCounts
from neuron_assets.types import ActivationRecord, FeatureId

MAX_BACKOFF_S = 60.0


class ExplainerUnavailable(RuntimeError):
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
    seed: int  # sampling seed of this candidate; attempt n samples with seed + n
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


def attempt_seed(seed: int, attempt: int) -> int:
    return (seed + 7919 * attempt) % 2**31


def stable_seed(*parts: object) -> int:
    """A seed from ``parts`` that is the same in every process (``hash()`` is salted)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def backoff_delay(attempt: int, base_s: float, rng: random.Random) -> float:
    """Exponential backoff with full-range jitter: base * 2^(attempt-1), halved at random."""
    delay = min(MAX_BACKOFF_S, base_s * 2 ** max(0, attempt - 1))
    return delay * (0.5 + 0.5 * rng.random())


@dataclass
class ChatTokenCounter:
    """Counts a chat prompt's tokens with a Hugging Face tokenizer (its chat template when it
    has one); without a tokenizer, estimates 3 UTF-8 bytes a token, which over-counts
    English text for every common tokenizer, so a fitted prompt still fits."""

    tokenizer: object | None = None
    per_message_overhead: int = 4
    _uses_template: bool = field(init=False, default=False)

    def __post_init__(self):
        self._uses_template = bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def __call__(self, messages: Sequence[ChatMessage]) -> int:
        if self.tokenizer is None:
            return sum(-(-len(m.content.encode()) // 3) + self.per_message_overhead for m in messages) + 2
        if self._uses_template:
            ids = self.tokenizer.apply_chat_template([m.as_dict() for m in messages], add_generation_prompt=True,
                                                     tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            return len(ids)
        return sum(len(self.tokenizer.encode(m.content, add_special_tokens=False)) + self.per_message_overhead
                   for m in messages) + 2


def load_local_tokenizer(name_or_path: str | None):
    """A Hugging Face tokenizer from a local path or the local cache; never downloads."""
    if not name_or_path:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ExplainerUnavailable(
            f"cannot load the tokenizer '{name_or_path}' from a local path or the Hugging Face cache "
            f"({err.__class__.__name__}); set explain.tokenizer to a local tokenizer folder"
        ) from None


def local_model_dir(model: str | None) -> str | None:
    return model if model and Path(model).expanduser().is_dir() else None


@dataclass(frozen=True)
class Generation:
    """One sampled answer of a local model."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float  # this request's share of the batch's time


def explain_in_rounds(
    requests: Sequence[ExplainRequest],
    generate: Callable[[list[tuple[ExplainRequest, int]]], list[Generation]],
    max_retries: int,
    done: Progress,
) -> list[ExplainResult]:
    """Sample every request, parse, and sample the ones without a description again (with
    a new seed), up to ``max_retries`` more rounds; ``generate`` gets (request, attempt) pairs."""
    totals = [[0, 0, 0.0] for _ in requests]  # prompt tokens, completion tokens, seconds
    results: list[ExplainResult | None] = [None] * len(requests)
    failures = ["not attempted"] * len(requests)
    pending = list(range(len(requests)))
    for attempt in range(max_retries + 1):
        if not pending:
            break
        generations = generate([(requests[i], attempt) for i in pending])
        still = []
        for i, generation in zip(pending, generations):
            total = totals[i]
            total[0] += generation.prompt_tokens
            total[1] += generation.completion_tokens
            total[2] += generation.seconds
            try:
                description = parse_description(generation.text)
            except MalformedAnswer as err:
                failures[i] = f"malformed answer: {err}"
                still.append(i)
                continue
            results[i] = ExplainResult(description, None, total[0], total[1], total[2], attempt + 1)
            done(1)
        pending = still
    for i in pending:
        results[i] = ExplainResult(None, f"{failures[i]} (after {max_retries + 1} attempts)", totals[i][0],
                                   totals[i][1], totals[i][2], max_retries + 1)
        done(1)
    return results
