"""The ``openai`` backend: OpenAI's API, or any OpenAI-compatible server (vLLM's) via base_url.

Requests of a round run concurrently, at most ``concurrency`` in flight. Transport failures
(timeouts, dropped connections, 408/409/429/5xx) are retried by the openai client itself,
which honours the server's Retry-After and otherwise backs off exponentially from
``backoff_s``; each request's retries come out of its attempt budget. A 400 is recorded and
not retried; a 401/403/404 (a wrong key, model or URL) stops the run with an error naming
the setting to fix. The API key is read from the environment when a round starts and kept
nowhere else; anything that looks like a key is masked in messages. A round runs through
:func:`neuron_assets.llm.interrupts.run_coroutine`: Ctrl-C cancels every request in flight
and stops the run at once.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import os
import random
import time
from typing import Sequence

import numpy as np
import openai

from neuron_assets.llm.base import (
    ChoiceRequest,
    LLMConfigurationError,
    LLMSettings,
    LLMUnavailable,
    LogprobReply,
    LogprobRequest,
    OnReply,
    Reply,
    Request,
    mask_secrets,
)
from neuron_assets.llm.interrupts import run_coroutine
from neuron_assets.llm.tokens import ChatTokenCounter, load_local_tokenizer, local_model_dir

NO_KEY = "EMPTY"  # what a local server without --api-key accepts
MAX_BACKOFF_S = 60.0
MAX_TOP_LOGPROBS = 20  # the most alternatives OpenAI's chat API (and vLLM's server, by default) returns
REFUSED = {401: "the API key", 403: "the API key", 404: "the model name or the URL"}


class OpenAILLM:
    backend = "openai"

    def __init__(self, settings: LLMSettings, top_logprobs: int = 20):
        where = settings.setting
        if not settings.model:
            raise LLMUnavailable(f"{where}.model is required for the openai backend (e.g. gpt-4o-mini, or the "
                                 "name a vLLM server serves)")
        if settings.base_url is None and not os.environ.get(settings.api_key_env):
            raise LLMUnavailable(f"the openai backend needs an API key in ${settings.api_key_env} "
                                 f"({where}.api_key_env), or {where}.base_url pointing at an OpenAI-compatible server")
        self.settings = settings
        self.model = settings.model
        self.top_logprobs = top_logprobs
        tokenizer = load_local_tokenizer(settings.tokenizer or local_model_dir(settings.model), f"{where}.tokenizer")
        self.count_chat_tokens = ChatTokenCounter(tokenizer)
        self.count_tokens_exactly = tokenizer is not None

    # -- chat and completions ------------------------------------------------------------------

    def generate(self, requests: Sequence[tuple[Request, int]], on_reply: OnReply | None = None) -> list[Reply]:
        """One attempt at every request; ``on_reply(i, reply)`` as each one is answered."""
        return run_coroutine(lambda: self._all(self._generate_one, requests, on_reply))

    async def _generate_one(self, client, request: Request, budget: int) -> Reply:
        started = time.perf_counter()
        options = dict(model=self.model, temperature=request.temperature,
                       extra_body=dict(self.settings.extra_body) or None)
        if request.seed is not None:
            options["seed"] = request.seed
        client = client.with_options(max_retries=max(0, budget - 1))
        try:
            if request.messages is not None:
                raw = await client.chat.completions.with_raw_response.create(
                    messages=[dict(m) for m in request.messages], max_completion_tokens=request.max_tokens, **options)
            else:
                raw = await client.completions.with_raw_response.create(prompt=request.prompt,
                                                                        max_tokens=request.max_tokens, **options)
        except openai.APIError as err:
            return self._failed(err, started)
        attempts = getattr(raw, "retries_taken", 0) + 1
        try:
            response = raw.parse()
            choice = response.choices[0]
            text = choice.message.content if request.messages is not None else choice.text
        except (openai.APIError, ValueError, TypeError, AttributeError, IndexError) as err:
            return Reply(None, seconds=time.perf_counter() - started, attempts=attempts,
                         failure=f"malformed response: {mask_secrets(err)}")
        usage = getattr(response, "usage", None)
        prompt_tokens = getattr(usage, "prompt_tokens", None)
        if prompt_tokens is None:  # a server that reports no usage: our own count
            prompt_tokens = (self.count_chat_tokens(request.messages) if request.messages is not None
                             else -(-len(request.prompt.encode()) // 3))
        return Reply(text, int(prompt_tokens), int(getattr(usage, "completion_tokens", None) or 0),
                     time.perf_counter() - started, attempts, getattr(choice, "finish_reason", None))

    # -- prompt logprobs -----------------------------------------------------------------------

    def continuation_logprobs(self, requests: Sequence[LogprobRequest], max_attempts: int = 1) -> list[LogprobReply]:
        """``POST /v1/completions`` with ``echo=True, logprobs=N``: the top-N alternatives at
        every prompt token. Each offset is read at the token that covers it; if the server's
        tokenizer merged it with text before it, alternatives spelling that text followed by
        the continuation are read instead. Continuations outside the top N are -inf."""
        return run_coroutine(lambda: self._all(self._logprobs_one, [(r, max_attempts) for r in requests]))

    async def _logprobs_one(self, client, request: LogprobRequest, budget: int) -> LogprobReply:
        started = time.perf_counter()
        client = client.with_options(max_retries=max(0, budget - 1))
        try:
            raw = await client.completions.with_raw_response.create(
                model=self.model, prompt=request.prompt, max_tokens=1, temperature=0.0, echo=True,
                logprobs=self.top_logprobs, extra_body=dict(self.settings.extra_body) or None)
        except openai.APIError as err:
            failed = self._failed(err, started)
            return LogprobReply(None, failed.failure, 0, failed.seconds, failed.attempts)
        attempts = getattr(raw, "retries_taken", 0) + 1
        try:
            response = raw.parse()
            table = _echoed_logprobs(response.choices[0].logprobs, request)
        except (openai.APIError, ValueError, TypeError, AttributeError, IndexError) as err:
            return LogprobReply(None, f"malformed response: {mask_secrets(err)}", 0, time.perf_counter() - started,
                                attempts)
        usage = getattr(response, "usage", None)
        return LogprobReply(table, None, int(getattr(usage, "prompt_tokens", None) or 0), time.perf_counter() - started,
                            attempts)

    # -- the first answer token's logprobs --------------------------------------------------------

    def choice_logprobs(self, requests: Sequence[ChoiceRequest], max_attempts: int = 1) -> list[LogprobReply]:
        """``POST /v1/chat/completions`` for one token with ``logprobs=True, top_logprobs=N``
        (OpenAI's API and vLLM's server both give them): each choice's log-probability is
        read among the top N alternatives of the answer's first token (alternatives that
        differ only in surrounding whitespace are added up). A server that gives no logprobs
        answers with a failure, which the caller can ask again as plain chat."""
        return run_coroutine(lambda: self._all(self._choice_one, [(r, max_attempts) for r in requests]))

    async def _choice_one(self, client, request: ChoiceRequest, budget: int) -> LogprobReply:
        started = time.perf_counter()
        client = client.with_options(max_retries=max(0, budget - 1))
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model=self.model, messages=[dict(m) for m in request.messages], max_completion_tokens=1,
                temperature=0.0, logprobs=True, top_logprobs=min(self.top_logprobs, MAX_TOP_LOGPROBS),
                extra_body=dict(self.settings.extra_body) or None)
        except openai.APIError as err:
            failed = self._failed(err, started)
            return LogprobReply(None, failed.failure, 0, failed.seconds, failed.attempts)
        attempts = getattr(raw, "retries_taken", 0) + 1
        try:
            response = raw.parse()
            table = _first_token_logprobs(response.choices[0].logprobs, request.choices)
        except (openai.APIError, ValueError, TypeError, AttributeError, IndexError) as err:
            return LogprobReply(None, f"no logprobs: {mask_secrets(err)}", 0, time.perf_counter() - started, attempts)
        usage = getattr(response, "usage", None)
        prompt_tokens = getattr(usage, "prompt_tokens", None)
        if prompt_tokens is None:
            prompt_tokens = self.count_chat_tokens(request.messages)
        return LogprobReply(table, None, int(prompt_tokens), time.perf_counter() - started, attempts,
                            completion_tokens=int(getattr(usage, "completion_tokens", None) or 0))

    # -- the round --------------------------------------------------------------------------------

    async def _all(self, one, items, on_reply: OnReply | None = None):
        settings = self.settings
        client = _client_class(settings.backoff_s)(
            api_key=os.environ.get(settings.api_key_env) or NO_KEY, base_url=settings.base_url,
            timeout=settings.timeout_s, max_retries=0)
        slots = asyncio.Semaphore(settings.concurrency)
        refused: list[LLMConfigurationError] = []

        async def bounded(index, request, budget):
            async with slots:
                if refused:  # every later request would be refused too
                    return None
                try:
                    reply = await one(client, request, budget)
                except LLMConfigurationError as err:
                    refused.append(err)
                    return None
            if on_reply is not None:
                on_reply(index, reply)
            return reply

        async with client:
            results = await asyncio.gather(*(bounded(i, r, b) for i, (r, b) in enumerate(items)))
        if refused:
            raise refused[0]
        return list(results)

    def _failed(self, err: openai.APIError, started: float) -> Reply:
        attempts = _retries_taken(err) + 1
        seconds = time.perf_counter() - started
        if isinstance(err, openai.APIStatusError):
            message = mask_secrets(_error_message(err))
            if err.status_code in REFUSED:
                self._refuse(err.status_code, message)
            # a 5xx or 429 here has used up the client's retries; a 400 will not change
            return Reply(None, seconds=seconds, attempts=attempts, retryable=False,
                         failure=f"HTTP {err.status_code}: {message}")
        if isinstance(err, openai.APIConnectionError):  # timeouts included; retried by the client already
            return Reply(None, seconds=seconds, attempts=attempts, retryable=False,
                         failure=f"{err.__class__.__name__}: {mask_secrets(err)}")
        return Reply(None, seconds=seconds, attempts=attempts, failure=f"malformed response: {mask_secrets(err)}")

    def _refuse(self, status: int, message: str):
        where = self.settings.setting
        url = self.settings.base_url or "OpenAI's API"
        fix = (f"the key in ${self.settings.api_key_env} ({where}.api_key_env)" if status in (401, 403)
               else f"{where}.model and {where}.base_url")
        raise LLMConfigurationError(
            f"{url} refused model '{self.model}' with HTTP {status}: {message}. Check {fix}")


def _echoed_logprobs(logprobs, request: LogprobRequest) -> np.ndarray:
    if logprobs is None or not logprobs.tokens:
        raise ValueError("the response has no prompt logprobs (does the server support echo with logprobs?)")
    shift = _prompt_start(logprobs.tokens, request.prompt)
    offsets = [o - shift for o in logprobs.text_offset]
    table = np.full((len(request.offsets), len(request.continuations)), -np.inf)
    for row, offset in enumerate(request.offsets):
        j = bisect.bisect_right(offsets, offset) - 1
        alternatives = logprobs.top_logprobs[j] if 0 <= j < len(logprobs.top_logprobs) else None
        if not alternatives:
            continue
        lead = request.prompt[offsets[j] : offset] if offsets[j] < offset else ""
        for column, text in enumerate(request.continuations):
            value = alternatives.get(lead + text)
            if value is not None and math.isfinite(value):
                table[row, column] = value
    return table


def _first_token_logprobs(logprobs, choices: Sequence[str]) -> np.ndarray:
    """(1, len(choices)): each choice's log-probability among the answer's first token's
    alternatives (the token itself included), -inf where it is not among them."""
    content = getattr(logprobs, "content", None)
    if not content:
        raise ValueError("the response has no logprobs (does the server give logprobs for chat completions?)")
    first = content[0]
    alternatives = {first.token: first.logprob}
    for alternative in first.top_logprobs or ():
        alternatives.setdefault(alternative.token, alternative.logprob)
    table = np.full((1, len(choices)), -np.inf)
    for column, choice in enumerate(choices):
        found = [v for token, v in alternatives.items() if token.strip() == choice and v is not None and math.isfinite(v)]
        if found:
            table[0, column] = float(np.logaddexp.reduce(found))
    return table


def _prompt_start(tokens: Sequence[str], prompt: str) -> int:
    """Where the prompt begins in the text the offsets count: vLLM counts a BOS token's text
    (``<|begin_of_text|>``) though it does not echo it."""
    found = "".join(tokens).find(prompt[:32])
    return max(found, 0)


def _client_class(backoff_s: float):
    """openai's async client with its retry delay starting at ``backoff_s`` (its own default
    is 0.5 s); a server's Retry-After still wins."""

    class Client(openai.AsyncOpenAI):
        def _calculate_retry_timeout(self, remaining_retries, options, response_headers=None):
            retry_after = self._parse_retry_after_header(response_headers)
            if retry_after is not None and 0 < retry_after <= MAX_BACKOFF_S:
                return retry_after
            retries = options.get_max_retries(self.max_retries) - remaining_retries
            return min(MAX_BACKOFF_S, backoff_s * 2.0 ** min(retries, 30)) * (1 - 0.25 * random.random())

    return Client


def _retries_taken(err: openai.APIError) -> int:
    """How many times the client retried before giving up: it numbers every request it sends."""
    request = getattr(err, "request", None)
    try:
        return int(request.headers.get("x-stainless-retry-count", 0))
    except (AttributeError, TypeError, ValueError):
        return 0


def _error_message(err: openai.APIStatusError) -> str:
    """The server's own message (``{"error": {"message": ...}}``), else the client's."""
    body = err.body
    if isinstance(body, dict):
        inner = body.get("error")
        message = inner.get("message") if isinstance(inner, dict) else body.get("message")
        if message:
            return str(message)
    return err.message
