"""The ``transformers`` backend: a small local instruct model through Hugging Face ``generate``.

One request at a time, each with its own seed, so a candidate's answer does not depend on
what else is in the run. Only local folders or the local cache are read.
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


class TransformersExplainer:
    backend = "transformers"
    reads_prompts = True
    needs_gpu = True

    def __init__(self, config: ExplainConfig):
        if not config.model:
            raise ExplainerUnavailable("explain.model is required for the transformers backend (a local model folder "
                                       "or a Hugging Face name in the local cache)")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.model = config.model
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(config.model, local_files_only=True)
            self.lm = AutoModelForCausalLM.from_pretrained(config.model, local_files_only=True,
                                                           **config.engine_kwargs).to(self.device).eval()
        except OSError as err:
            raise ExplainerUnavailable(f"cannot load '{config.model}' from a local folder or the Hugging Face cache: "
                                       f"{err.__class__.__name__}") from None
        if not getattr(self.tokenizer, "chat_template", None):
            raise ExplainerUnavailable(f"'{config.model}' has no chat template; the transformers backend needs an "
                                       "instruct (chat) model")
        self.count_tokens = ChatTokenCounter(self.tokenizer)

    def explain(self, requests: Sequence[ExplainRequest], corpus: CorpusSample, done: Progress) -> list[ExplainResult]:
        return explain_in_rounds(requests, self._generate, self.config.max_retries, done)

    def _generate(self, batch: list[tuple[ExplainRequest, int]]) -> list[Generation]:
        return [self._generate_one(request, attempt) for request, attempt in batch]

    def _generate_one(self, request: ExplainRequest, attempt: int) -> Generation:
        import torch

        started = time.perf_counter()
        encoded = self.tokenizer.apply_chat_template(request.prompt.as_dicts(), add_generation_prompt=True,
                                                     return_tensors="pt", return_dict=True)
        input_ids = encoded["input_ids"].to(self.device)
        sampling = self.config.temperature > 0
        torch.manual_seed(attempt_seed(request.seed, attempt))
        with torch.no_grad():
            output = self.lm.generate(
                input_ids,
                attention_mask=encoded["attention_mask"].to(self.device),
                max_new_tokens=self.config.max_tokens,
                do_sample=sampling,
                temperature=self.config.temperature if sampling else None,
                top_p=None,
                top_k=None,
                pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                else self.tokenizer.eos_token_id,
            )
        new = output[0, input_ids.shape[1] :]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return Generation(text, int(input_ids.shape[1]), int(new.shape[0]), time.perf_counter() - started)
