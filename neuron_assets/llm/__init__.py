"""One client layer for every LLM call the project makes: explainers, detection/fuzzing
judges and the prompted simulator all go through it.

- Backends (:data:`BACKENDS`, chosen by name): ``openai`` (OpenAI's API or any
  OpenAI-compatible server, e.g. vLLM's, through the async ``openai`` client with bounded
  concurrency), ``vllm`` (the offline engine, every prompt of a round submitted at once,
  prefix caching), ``transformers`` (local ``generate``; one forward pass for logprobs).
  vLLM and transformers are imported when their backend is built.
- Calls: :meth:`LLM.generate` (chat or completion :class:`Request`\\ s, one attempt each),
  :meth:`LLM.continuation_logprobs` (the log-probability of given strings at given prompt
  offsets: Bills et al.'s simulator reads "0".."10") and :meth:`LLM.choice_logprobs` (the
  log-probability of each allowed first token of a chat answer: a judge's "0" or "1").
- :func:`ask` is the one place where an unusable answer is asked again: it samples with a
  new seed until ``parse`` accepts the answer or the attempts are spent, and returns an
  :class:`Answer` per request: a value, or the failure's reason, with tokens (the server's
  usage where it reports it), latency and attempts summed over every attempt. A
  per-request failure is never an exception; a refused configuration (401, 404, a wrong
  model) raises :class:`LLMConfigurationError` naming the setting to fix.
- :class:`CachedLLM` (:mod:`neuron_assets.llm.cache`) keeps every answer on disk, keyed by
  prompt, model, seed and sampling settings, so a resumed run never pays for one twice.
- A round of requests to a server stops at once on Ctrl-C (:mod:`neuron_assets.llm.interrupts`).
- Loaded models are shared per process through :mod:`neuron_assets.runtime`.
"""

from __future__ import annotations

from typing import Callable

from neuron_assets.llm.base import (
    LLM,
    Answer,
    ChoiceRequest,
    LLMConfigurationError,
    LLMSettings,
    LLMUnavailable,
    LogprobReply,
    LogprobRequest,
    OnReply,
    Parser,
    Reply,
    Request,
    attempt_seed,
    mask_secrets,
)
from neuron_assets.llm.cache import AnswerCache, CachedLLM, with_answer_cache
from neuron_assets.llm.retries import ask
from neuron_assets.llm.tokens import ChatTokenCounter


def _openai(settings: LLMSettings, top_logprobs: int) -> LLM:
    from neuron_assets.llm.openai_api import OpenAILLM

    return OpenAILLM(settings, top_logprobs)


def _vllm(settings: LLMSettings, top_logprobs: int) -> LLM:
    from neuron_assets.llm.vllm_offline import VLLMOfflineLLM

    return VLLMOfflineLLM(settings, top_logprobs)


def _transformers(settings: LLMSettings, top_logprobs: int) -> LLM:
    from neuron_assets.llm.transformers_local import TransformersLLM

    return TransformersLLM(settings)


BACKENDS: dict[str, Callable[[LLMSettings, int], LLM]] = {
    "openai": _openai,
    "vllm": _vllm,
    "transformers": _transformers,
}


def open_llm(settings: LLMSettings, top_logprobs: int = 20) -> LLM:
    """The model ``settings`` describe, behind its backend (``top_logprobs``: alternatives a
    server returns per prompt position, for :meth:`LLM.continuation_logprobs`)."""
    try:
        build = BACKENDS[settings.backend]
    except KeyError:
        raise LLMUnavailable(f"unknown LLM backend '{settings.backend}' in {settings.setting}; known: "
                             f"{', '.join(BACKENDS)}") from None
    return build(settings, top_logprobs)


def settings_from_explain(config, backend: str | None = None) -> LLMSettings:
    """The explain section's model (the explainer's, and the detection/fuzzing judge's)."""
    return settings_from_endpoint(
        config, backend or config.backend, "explain", tokenizer=config.tokenizer, backoff_s=config.backoff_s,
        extra_body=dict(config.extra_body), allow_download=config.allow_download,
        engine_kwargs=dict(config.engine_kwargs), seed=config.seed,
    )


def settings_from_prompted(config) -> LLMSettings:
    """simulate.prompted's model: ``openai_completions`` is the openai backend."""
    backend = "openai" if config.backend == "openai_completions" else config.backend
    return settings_from_endpoint(config, backend, "simulate.prompted", dtype=config.dtype,
                                  batch_size=config.batch_size)


def settings_from_endpoint(endpoint, backend: str, setting: str, **extra) -> LLMSettings:
    """LLMSettings from a config section's endpoint fields (config.LLMEndpointConfig), plus the
    fields only that section has."""
    return LLMSettings(backend=backend, model=endpoint.model or "", setting=setting, base_url=endpoint.base_url,
                       api_key_env=endpoint.api_key_env, concurrency=endpoint.concurrency,
                       timeout_s=endpoint.timeout_s, device=endpoint.device, **extra)


__all__ = [
    "BACKENDS", "LLM", "Answer", "AnswerCache", "CachedLLM", "ChatTokenCounter", "ChoiceRequest",
    "LLMConfigurationError", "LLMSettings", "LLMUnavailable", "LogprobReply", "LogprobRequest", "OnReply", "Parser",
    "Reply", "Request", "ask", "attempt_seed", "mask_secrets", "open_llm", "settings_from_endpoint",
    "settings_from_explain", "settings_from_prompted", "with_answer_cache",
]
