"""What every LLM backend shares: requests and replies, settings, errors, and the Protocol."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np

API_KEY_LIKE = re.compile(r"\b(?:sk|key|token)-[A-Za-z0-9_*.\-]{6,}", re.IGNORECASE)


class LLMUnavailable(RuntimeError):
    """A backend that cannot start here (missing package, model, key); the message says how to fix it."""


class LLMConfigurationError(RuntimeError):
    """The server refused a request for a reason no retry can fix (401, 403, 404, a wrong
    model name); the message names the setting to fix. Raised, never recorded per request."""


@dataclass(frozen=True)
class LLMSettings:
    """How to reach one model. ``setting`` is the config section the values came from
    (``explain``, ``simulate.prompted``), so an error can name the field to fix."""

    backend: str  # a key of neuron_assets.llm.BACKENDS: openai, vllm, transformers
    model: str
    setting: str = "explain"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    tokenizer: str | None = None  # counts prompt tokens for the openai backend
    concurrency: int = 16
    timeout_s: float = 120.0
    backoff_s: float = 1.0
    extra_body: Mapping[str, object] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"
    allow_download: bool = False
    engine_kwargs: Mapping[str, object] = field(default_factory=dict)
    seed: int = 0
    batch_size: int = 4  # prompts per forward pass (transformers logprobs)


@dataclass(frozen=True)
class Request:
    """One chat (``messages``) or completion (``prompt``) call."""

    messages: tuple[Mapping[str, str], ...] | None = None
    prompt: str | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a Request has either messages (chat) or a prompt (completion)")


@dataclass(frozen=True)
class Reply:
    """One answer of one attempt (an attempt may be several HTTP requests: the openai
    client's own transport retries are counted in ``attempts``)."""

    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    attempts: int = 1
    finish_reason: str | None = None  # "length": cut at max_tokens
    failure: str | None = None  # set when no text came back
    retryable: bool = True  # False: asking again cannot help (e.g. HTTP 400)
    cached: bool = False  # True: from the answer cache, paid for by an earlier run (tokens 0 here)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass(frozen=True)
class Answer:
    """The outcome of a request after every attempt: a parsed value, or the failure's reason."""

    value: object | None
    failure: str | None
    prompt_tokens: int  # summed over attempts: what was paid for
    completion_tokens: int
    latency_s: float
    attempts: int
    text: str | None = None  # the last answer's text
    cached: int = 0  # attempts answered from the answer cache (they cost no tokens)

    @property
    def ok(self) -> bool:
        return self.failure is None


@dataclass(frozen=True)
class LogprobRequest:
    """The log-probability of each string in ``continuations`` being the text that starts
    at each character offset in ``offsets`` of ``prompt`` (one forward pass over the prompt).
    Each offset must start a token; a continuation the tokenizer does not spell as one
    token there has log-probability -inf."""

    prompt: str
    offsets: tuple[int, ...]
    continuations: tuple[str, ...]


@dataclass(frozen=True)
class ChoiceRequest:
    """The log-probability of each string in ``choices`` being the first token of the
    assistant's answer to the chat ``messages`` (a judge's "0" or "1"): one decision read
    from the model's distribution, so a model that would not have written a parseable
    answer still gives one. A choice the model's tokenizer does not spell as one token, or
    that is outside a server's top logprobs, has log-probability -inf."""

    messages: tuple[Mapping[str, str], ...]
    choices: tuple[str, ...]


@dataclass(frozen=True)
class LogprobReply:
    """(len(offsets), len(continuations)) natural-log probabilities, -inf where unknown, or a
    failure; for a :class:`ChoiceRequest`, (1, len(choices))."""

    logprobs: np.ndarray | None
    failure: str | None = None
    prompt_tokens: int = 0
    seconds: float = 0.0
    attempts: int = 1
    cached: bool = False  # True: from the answer cache (prompt_tokens 0)
    completion_tokens: int = 0  # a server that generates the token it reports on bills it


class LLM(Protocol):
    """One model behind one backend."""

    backend: str
    model: str
    count_tokens_exactly: bool  # False: count_chat_tokens estimates (no local tokenizer)

    def count_chat_tokens(self, messages: Sequence[Mapping[str, str]]) -> int:
        """The prompt length of a chat in this model's tokens (chat template included)."""
        ...

    def generate(self, requests: Sequence[tuple[Request, int]]) -> list[Reply]:
        """One attempt at every request (with its remaining attempt budget); a failure is a Reply."""
        ...

    def continuation_logprobs(self, requests: Sequence[LogprobRequest], max_attempts: int) -> list[LogprobReply]:
        """One reply per request; a failure is a reply, never an exception."""
        ...

    def choice_logprobs(self, requests: Sequence[ChoiceRequest], max_attempts: int) -> list[LogprobReply]:
        """One reply per request, (1, len(choices)); a failure (a server that gives no
        logprobs) is a reply, never an exception."""
        ...


OnReply = Callable[[int, Reply], object]
"""Called as each request of a round is answered (its index in the round, the reply), so
an answer can be kept before the round ends; a backend's ``generate`` may take it as
``on_reply``."""


Parser = Callable[[Reply], object]  # raises ValueError with the reason when the answer is unusable


def mask_secrets(text: object, limit: int = 200) -> str:
    """One line of an error message, with anything that looks like an API key masked (OpenAI
    echoes part of a wrong key in its 401 message)."""
    text = API_KEY_LIKE.sub("***", " ".join(str(text).split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def attempt_seed(seed: int, attempt: int) -> int:
    """The sampling seed of attempt ``attempt`` (0-based) of a request seeded ``seed``."""
    return (seed + 7919 * attempt) % 2**31
