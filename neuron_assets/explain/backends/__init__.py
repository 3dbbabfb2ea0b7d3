"""Explainer backends, chosen by name (``explain.backend``) from :data:`EXPLAINERS`.

The LLM backends (openai, vllm, transformers) are one explainer over
:mod:`neuron_assets.llm`; heavy packages are imported when a backend is built, so a CPU
install never needs vLLM.
"""

from __future__ import annotations

from typing import Callable

from neuron_assets.config import ExplainConfig
from neuron_assets.explain.backends.base import (
    ChatTokenCounter,
    CorpusSample,
    Explainer,
    ExplainerUnavailable,
    ExplainRequest,
    ExplainResult,
    Prompt,
)
from neuron_assets.explain.backends.llm_explainer import OpenAIExplainer, TransformersExplainer, VLLMExplainer
from neuron_assets.explain.backends.statistical import StatisticalExplainer

EXPLAINERS: dict[str, Callable[[ExplainConfig], Explainer]] = {
    StatisticalExplainer.backend: StatisticalExplainer,
    OpenAIExplainer.backend: OpenAIExplainer,
    VLLMExplainer.backend: VLLMExplainer,
    TransformersExplainer.backend: TransformersExplainer,
}


def make_explainer(config: ExplainConfig) -> Explainer:
    try:
        build = EXPLAINERS[config.backend]
    except KeyError:
        known = ", ".join(EXPLAINERS)
        raise ExplainerUnavailable(f"unknown explain.backend '{config.backend}'; known: {known}") from None
    return build(config)


__all__ = [
    "EXPLAINERS", "ChatTokenCounter", "CorpusSample", "Explainer", "ExplainerUnavailable", "ExplainRequest",
    "ExplainResult", "Prompt", "make_explainer",
]
