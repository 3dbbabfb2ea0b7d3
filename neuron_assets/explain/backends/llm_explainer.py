"""The LLM explainer backends ``openai``, ``vllm`` and ``transformers``: one explainer over
the LLM client layer (:mod:`neuron_assets.llm`), which picks the model's backend.

Each candidate is one chat request with its own seed. An answer without a usable
description (no ``[DESCRIPTION]:`` line, an empty one, one cut off at ``explain.max_tokens``)
is sampled again, with a new seed, up to ``explain.max_retries`` more times (the layer's
one retry loop); then the candidate is a failure row with the reason. Tokens are the
server's counts where it reports them, summed over every attempt. With an answer cache
(:meth:`LLMExplainer.with_answer_cache`), an answer already paid for is read from it and
costs 0 tokens.
"""

from __future__ import annotations

import copy
from typing import Sequence

from neuron_assets.config import ExplainConfig
from neuron_assets.explain.backends.base import (
    CorpusSample,
    ExplainerUnavailable,
    ExplainRequest,
    ExplainResult,
    Progress,
)
from neuron_assets.explain.formats import ANSWER_TAG, MalformedAnswer, parse_description, restore_chat_tokens
from neuron_assets.llm import (
    AnswerCache,
    LLMUnavailable,
    Reply,
    Request,
    ask,
    open_llm,
    settings_from_explain,
    with_answer_cache,
)


class LLMExplainer:
    backend: str
    reads_prompts = True
    needs_gpu: bool

    def __init__(self, config: ExplainConfig):
        if not config.model:
            raise ExplainerUnavailable(
                f"explain.model is required for the {self.backend} backend (e.g. gpt-4o-mini or the name a vLLM "
                "server serves for openai; a local folder or builtin:SmolLM2-135M-Instruct for vllm and transformers)")
        try:
            self.llm = open_llm(settings_from_explain(config, self.backend))
        except LLMUnavailable as err:
            raise ExplainerUnavailable(str(err)) from None
        self.config = config
        self.model = config.model
        self.count_tokens = self.llm.count_chat_tokens

    def with_answer_cache(self, cache: AnswerCache) -> LLMExplainer:
        """This explainer (the same loaded model) with every answer kept in, and served from, ``cache``."""
        cached = copy.copy(self)
        cached.llm = with_answer_cache(self.llm, cache)
        return cached

    def explain(self, requests: Sequence[ExplainRequest], corpus: CorpusSample, done: Progress) -> list[ExplainResult]:
        calls = [Request(messages=tuple(r.prompt.as_dicts()), max_tokens=self.config.max_tokens,
                         temperature=self.config.temperature, seed=r.seed) for r in requests]
        answers = ask(self.llm, calls, self.parse_answer, self.config.max_retries + 1, done)
        return [ExplainResult(a.value, a.failure, a.prompt_tokens, a.completion_tokens, a.latency_s, a.attempts)
                for a in answers]

    def parse_answer(self, reply: Reply) -> str:
        """The description, or MalformedAnswer; an answer cut at max_tokens counts only when
        its description line ended before the cut."""
        limit = f"the answer hit explain.max_tokens ({self.config.max_tokens})"
        try:
            description = parse_description(reply.text)
        except MalformedAnswer as err:
            raise MalformedAnswer(f"{err}; {limit}" if reply.truncated else str(err)) from None
        if reply.truncated:
            tail = reply.text[reply.text.lower().rfind(ANSWER_TAG.lower()) + len(ANSWER_TAG) :].lstrip()
            if "\n" not in tail:
                raise MalformedAnswer(f"description cut off: {limit}")
        return restore_chat_tokens(description)


class OpenAIExplainer(LLMExplainer):
    """OpenAI's API, or any OpenAI-compatible server (vLLM's) via explain.base_url."""

    backend = "openai"
    needs_gpu = False


class VLLMExplainer(LLMExplainer):
    """vLLM's offline engine on a GPU box."""

    backend = "vllm"
    needs_gpu = True


class TransformersExplainer(LLMExplainer):
    """A small local instruct model through Hugging Face generate."""

    backend = "transformers"
    needs_gpu = True
