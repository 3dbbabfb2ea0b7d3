"""The ``vllm`` backend: vLLM's offline engine on a GPU box.

Every round is one batched ``LLM.chat`` call with one ``SamplingParams`` per request (its
own seed); prefix caching is on, so the shared system message and puzzle are computed once.
vLLM is imported when the backend is built: CPU installs do not need it.
"""

from __future__ import annotations

import time
from typing import Sequence

from neuron_assets.config import ExplainConfig
from neuron_assets.explain.backends.base import (
    ChatTokenCounter,
    CorpusSample,
    ExplainerUnavailable,
    ExplainRequest,
    ExplainResult,
    Generation,
    Progress,
    attempt_seed,
    explain_in_rounds,
)


class VLLMExplainer:
    backend = "vllm"
    reads_prompts = True

    def __init__(self, config: ExplainConfig):
        if not config.model:
            raise ExplainerUnavailable("explain.model is required for the vllm backend (a local model folder or a "
                                       "Hugging Face name in the local cache)")
        try:
            from vllm import LLM
        except ImportError:
            raise ExplainerUnavailable("the vllm backend needs vLLM: pip install 'neuron-assets[gpu]'") from None
        self.config = config
        self.model = config.model
        options = {"enable_prefix_caching": True, "seed": config.seed, **config.engine_kwargs}
        self.llm = LLM(model=config.model, **options)
        self.count_tokens = ChatTokenCounter(self.llm.get_tokenizer())

    def explain(self, requests: Sequence[ExplainRequest], corpus: CorpusSample, done: Progress) -> list[ExplainResult]:
        return explain_in_rounds(requests, self._generate, self.config.max_retries, done)

    def _generate(self, batch: list[tuple[ExplainRequest, int]]) -> list[Generation]:
        from vllm import SamplingParams

        params = [
            SamplingParams(temperature=self.config.temperature, max_tokens=self.config.max_tokens,
                           seed=attempt_seed(request.seed, attempt))
            for request, attempt in batch
        ]
        started = time.perf_counter()
        outputs = self.llm.chat([request.prompt.as_dicts() for request, _ in batch], params, use_tqdm=False)
        share = (time.perf_counter() - started) / max(1, len(batch))
        return [
            Generation(out.outputs[0].text if out.outputs else "", len(out.prompt_token_ids or ()),
                       len(out.outputs[0].token_ids) if out.outputs else 0, share)
            for out in outputs
        ]
