"""The ``vllm`` backend: vLLM's offline engine on a GPU box.

Every round is one batched ``LLM.chat`` call with one ``SamplingParams`` per request (its
own seed); prefix caching is on, so the shared system message and puzzle are computed once.
vLLM is imported when the backend is built: CPU installs do not need it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
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


def local_model_path(name: str, allow_download: bool = False) -> str:
    """A local folder as is; else the hub name's snapshot in the local Hugging Face cache (or
    the name itself, for vLLM to download, with ``allow_download``)."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return str(folder)
    if allow_download:
        return name
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(name, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        raise ExplainerUnavailable(
            f"explain.model '{name}' is neither a local folder nor in the local Hugging Face cache: download it "
            f"first (huggingface-cli download {name}), or set explain.allow_download: true"
        ) from None


_ENGINES: dict[str, object] = {}


def shared_engine(config: ExplainConfig):
    """The vLLM engine of explain.model and explain.engine_kwargs, built once per process: the
    explainer and the detection/fuzzing judge (neuron_assets.score.VLLMJudge) share it."""
    if not config.model:
        raise ExplainerUnavailable("explain.model is required for the vllm backend (a local model folder or a "
                                   "Hugging Face name in the local cache)")
    try:
        from vllm import LLM
    except ImportError:
        raise ExplainerUnavailable("the vllm backend needs vLLM: pip install 'neuron-assets[gpu]'") from None
    options = {"enable_prefix_caching": True, "seed": config.seed, **config.engine_kwargs}
    key = json.dumps([config.model, config.allow_download, options], sort_keys=True, default=str)
    if key not in _ENGINES:
        _ENGINES[key] = LLM(model=local_model_path(config.model, config.allow_download), **options)
    return _ENGINES[key]


class VLLMExplainer:
    backend = "vllm"
    reads_prompts = True
    needs_gpu = True

    def __init__(self, config: ExplainConfig):
        self.llm = shared_engine(config)
        self.config = config
        self.model = config.model
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
