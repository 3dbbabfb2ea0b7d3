"""The one place where an unusable answer is asked again.

Transport failures (timeouts, dropped connections, 429, 5xx) are retried inside a backend
(the openai client's own retries, honouring Retry-After); what reaches this loop is an
answer that came back but that ``parse`` rejects, or a response that is not an answer at
all. Such a request is sampled again with a new seed, in rounds (a round is one batched
call: every pending request at once), until it parses or its attempts are spent. Every
attempt's tokens are summed: they were paid for (an answer from the answer cache,
:mod:`neuron_assets.llm.cache`, costs 0 and is counted in ``Answer.cached``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

from neuron_assets.llm.base import LLM, Answer, Parser, Reply, Request, attempt_seed


def ask(llm: LLM, requests: Sequence[Request], parse: Parser, max_attempts: int,
        done: Callable[[int], object] = lambda n: None) -> list[Answer]:
    """One :class:`Answer` per request, in order: ``parse(reply)``'s value, or the reason
    the last attempt failed. ``done(n)`` reports n finished requests."""
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    totals = [_Totals() for _ in requests]
    answers: list[Answer | None] = [None] * len(requests)
    pending = list(range(len(requests)))
    while pending:
        batch = [(_reseeded(requests[i], totals[i].attempts), max_attempts - totals[i].attempts) for i in pending]
        replies = llm.generate(batch)
        still = []
        for i, reply in zip(pending, replies):
            total = totals[i]
            total.add(reply)
            try:
                value, failure = _parsed(reply, parse), None
            except ValueError as err:
                value, failure = None, str(err)
            if failure is None:
                answers[i] = total.answer(value, None, reply.text)
                done(1)
            elif reply.retryable and total.attempts < max_attempts:
                total.last_failure = failure
                still.append(i)
            else:
                answers[i] = total.answer(None, f"{failure} (after {total.attempts} attempts)", reply.text)
                done(1)
        pending = still
    return answers  # type: ignore[return-value]


def _parsed(reply: Reply, parse: Parser) -> object:
    if reply.failure is not None:
        raise ValueError(reply.failure)
    try:
        return parse(reply)
    except ValueError as err:
        raise ValueError(f"malformed answer: {err}") from None


def _reseeded(request: Request, attempt: int) -> Request:
    if request.seed is None or attempt == 0:
        return request
    return dataclasses.replace(request, seed=attempt_seed(request.seed, attempt))


@dataclasses.dataclass
class _Totals:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    attempts: int = 0
    cached: int = 0
    last_failure: str | None = None
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, reply: Reply) -> None:
        self.prompt_tokens += reply.prompt_tokens
        self.completion_tokens += reply.completion_tokens
        self.seconds += reply.seconds
        self.attempts += max(1, reply.attempts)
        self.cached += int(reply.cached)

    def answer(self, value, failure, text) -> Answer:
        return Answer(value, failure, self.prompt_tokens, self.completion_tokens, self.seconds, self.attempts, text,
                      self.cached)
