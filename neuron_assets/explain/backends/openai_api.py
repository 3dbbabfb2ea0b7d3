"""The ``openai`` backend: OpenAI's API, or any OpenAI-compatible server (vLLM's) via base_url.

Requests run concurrently (at most ``explain.concurrency`` in flight). A 429, a 5xx, a
timeout, a dropped connection or an answer without a description is retried with
exponential backoff, up to ``explain.max_retries`` times; then the candidate is recorded as
failed, with the reason. The API key is read from the environment when the requests are
sent and is kept nowhere else.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import openai

from neuron_assets.config import ExplainConfig
from neuron_assets.explain.backends.base import (
    MAX_BACKOFF_S,
    ChatTokenCounter,
    CorpusSample,
    ExplainerUnavailable,
    ExplainRequest,
    ExplainResult,
    Progress,
    attempt_seed,
    backoff_delay,
    load_local_tokenizer,
    local_model_dir,
)
from neuron_assets.explain.formats import MalformedAnswer, parse_description

RETRYABLE_STATUS = {408, 409, 429}  # and every 5xx
NO_KEY = "EMPTY"  # what a local server without --api-key accepts
API_KEY_LIKE = re.compile(r"\b(?:sk|key|token)-[A-Za-z0-9_*.\-]{6,}", re.IGNORECASE)


class OpenAIExplainer:
    backend = "openai"
    reads_prompts = True
    needs_gpu = False

    def __init__(self, config: ExplainConfig):
        if not config.model:
            raise ExplainerUnavailable("explain.model is required for the openai backend (e.g. gpt-4o-mini, or "
                                       "the name a vLLM server serves)")
        if config.base_url is None and not os.environ.get(config.api_key_env):
            raise ExplainerUnavailable(f"the openai backend needs an API key in ${config.api_key_env} "
                                       "(or explain.base_url pointing at an OpenAI-compatible server)")
        self.config = config
        self.model = config.model
        self.count_tokens = ChatTokenCounter(load_local_tokenizer(config.tokenizer or local_model_dir(config.model)))

    def explain(self, requests: Sequence[ExplainRequest], corpus: CorpusSample, done: Progress) -> list[ExplainResult]:
        return _run_coroutine(lambda: self._explain_all(requests, done))

    async def _explain_all(self, requests: Sequence[ExplainRequest], done: Progress) -> list[ExplainResult]:
        client = openai.AsyncOpenAI(
            api_key=os.environ.get(self.config.api_key_env) or NO_KEY,
            base_url=self.config.base_url,
            timeout=self.config.timeout_s,
            max_retries=0,  # retried here, where a malformed answer is retried too
        )
        slots = asyncio.Semaphore(self.config.concurrency)
        async with client:
            return list(await asyncio.gather(*(self._explain_one(client, slots, r, done) for r in requests)))

    async def _explain_one(self, client, slots: asyncio.Semaphore, request: ExplainRequest,
                           done: Progress) -> ExplainResult:
        rng = random.Random(request.seed)
        prompt_tokens = completion_tokens = 0
        failure, server_wait = "not attempted", 0.0
        async with slots:
            started = time.perf_counter()
            for attempt in range(self.config.max_retries + 1):
                if attempt:
                    await asyncio.sleep(max(server_wait, backoff_delay(attempt, self.config.backoff_s, rng)))
                    server_wait = 0.0
                try:
                    response = await client.chat.completions.create(
                        model=self.model,
                        messages=request.prompt.as_dicts(),
                        temperature=self.config.temperature,
                        max_completion_tokens=self.config.max_tokens,
                        seed=attempt_seed(request.seed, attempt),
                        extra_body=dict(self.config.extra_body) or None,
                    )
                except openai.APIStatusError as err:
                    failure = f"HTTP {err.status_code}: {_short(_error_message(err))}"
                    if err.status_code in RETRYABLE_STATUS or err.status_code >= 500:
                        server_wait = _retry_after(err)
                        continue
                    break
                except openai.APIConnectionError as err:  # timeouts included
                    failure = f"{err.__class__.__name__}: {_short(str(err))}"
                    continue
                except (openai.APIError, ValueError) as err:  # a body that is not a completion
                    failure = f"malformed response: {_short(str(err))}"
                    continue
                usage = getattr(response, "usage", None)
                prompt_tokens += getattr(usage, "prompt_tokens", None) or request.prompt.tokens
                completion_tokens += getattr(usage, "completion_tokens", None) or 0
                try:
                    description = parse_description(_answer_text(response))
                except MalformedAnswer as err:
                    failure = f"malformed answer: {err}"
                    continue
                done(1)
                return ExplainResult(description, None, prompt_tokens, completion_tokens,
                                     time.perf_counter() - started, attempt + 1)
            elapsed = time.perf_counter() - started
        done(1)
        return ExplainResult(None, f"{failure} (after {attempt + 1} attempts)", prompt_tokens, completion_tokens,
                             elapsed, attempt + 1)


def _answer_text(response) -> str | None:
    choices = getattr(response, "choices", None)
    if not choices:
        raise MalformedAnswer("no choices in the response")
    message = getattr(choices[0], "message", None)
    return getattr(message, "content", None)


def _retry_after(err: openai.APIStatusError) -> float:
    """Seconds the server asked us to wait (a numeric Retry-After header), at most MAX_BACKOFF_S."""
    try:
        return min(MAX_BACKOFF_S, max(0.0, float(err.response.headers.get("retry-after", 0))))
    except (TypeError, ValueError, AttributeError):
        return 0.0


def _error_message(err: openai.APIStatusError) -> str:
    """The server's own message (``{"error": {"message": ...}}``), else the client's."""
    body = err.body
    if isinstance(body, dict):
        inner = body.get("error")
        message = inner.get("message") if isinstance(inner, dict) else body.get("message")
        if message:
            return str(message)
    return err.message


def _short(text: str, limit: int = 200) -> str:
    """One line of an error message, with anything that looks like an API key masked (OpenAI
    echoes part of a wrong key in its 401 message)."""
    text = API_KEY_LIKE.sub("***", " ".join(str(text).split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _run_coroutine(make):
    """Run a coroutine to completion, also from code that already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()
