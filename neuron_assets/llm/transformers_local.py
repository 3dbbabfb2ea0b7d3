"""The ``transformers`` backend: a local model through Hugging Face ``generate``, and one
forward pass for prompt logprobs.

Generation runs one request at a time with its own seed, so an answer does not depend on
what else is in the batch. Logprob prompts are batched (right padding), and the prefix they
share (the prompted simulator's instructions and solved example, a judge's system turn and
solved examples) is run once and its key/value cache kept across calls
(:mod:`neuron_assets.llm.prompt_prefix`; ``prefix_cache = False`` on the instance runs every
prompt whole). The model is loaded
once per process (:mod:`neuron_assets.runtime`), whoever asks: the explainer, the judge and
the prompted simulator share it. Only local folders, ``builtin:`` models and the local
Hugging Face cache are read.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from neuron_assets import runtime
from neuron_assets.llm.base import (
    ChoiceRequest,
    LLMSettings,
    LLMUnavailable,
    LogprobReply,
    LogprobRequest,
    OnReply,
    Reply,
    Request,
)
from neuron_assets.llm.prompt_prefix import PromptPrefixes, shared_length
from neuron_assets.llm.tokens import ChatTokenCounter, chat_token_ids, encode_at_offsets, single_token_ids


class TransformersLLM:
    backend = "transformers"
    count_tokens_exactly = True

    def __init__(self, settings: LLMSettings):
        if not settings.model:
            raise LLMUnavailable(f"{settings.setting}.model is required for the transformers backend (a local model "
                                 "folder, builtin:SmolLM2-135M-Instruct, or a Hugging Face name in the local cache)")
        self.settings = settings
        self.model = settings.model
        self.lm, self.tokenizer, self.device = load_shared_causal_lm(settings)
        self.count_chat_tokens = ChatTokenCounter(self.tokenizer)
        self.context_window = _context_window(self.lm, self.tokenizer)
        self.prefix_cache = True
        self.prefixes = PromptPrefixes(self.lm)

    def generate(self, requests: Sequence[tuple[Request, int]], on_reply: OnReply | None = None) -> list[Reply]:
        replies = []
        for i, (request, _) in enumerate(requests):
            replies.append(self._generate_one(request))
            if on_reply is not None:
                on_reply(i, replies[-1])
        return replies

    def continuation_logprobs(self, requests: Sequence[LogprobRequest], max_attempts: int = 1) -> list[LogprobReply]:
        encoded = [encode_at_offsets(self.tokenizer, r.prompt, r.offsets) for r in requests]
        return self._logprob_tables(encoded, [r.continuations for r in requests])

    def choice_logprobs(self, requests: Sequence[ChoiceRequest], max_attempts: int = 1) -> list[LogprobReply]:
        """The distribution after the chat template's opened assistant turn, read at the choices."""
        encoded = []
        for request in requests:
            ids = chat_token_ids(self.tokenizer, request.messages)
            encoded.append((ids, [len(ids)]))  # the token after the prompt: logits of its last position
        return self._logprob_tables(encoded, [r.choices for r in requests])

    def _logprob_tables(self, encoded: list[tuple[list[int], list[int]]],
                        continuations: list[tuple[str, ...]]) -> list[LogprobReply]:
        out: list[LogprobReply | None] = [None] * len(encoded)
        fitting = []  # (index, ids, positions) of the prompts that fit the context
        for i, (ids, positions) in enumerate(encoded):
            if len(ids) > self.context_window:
                out[i] = LogprobReply(None, f"prompt of {len(ids)} tokens exceeds the model's context of "
                                            f"{self.context_window} tokens", len(ids))
            else:
                fitting.append((i, ids, positions))
        size = max(1, self.settings.batch_size)
        for start in range(0, len(fitting), size):
            chunk = fitting[start : start + size]
            began = time.perf_counter()
            tables = self._forward_logprobs([(ids, positions) for _, ids, positions in chunk],
                                            [continuations[i] for i, _, _ in chunk])
            share = (time.perf_counter() - began) / len(chunk)
            for (i, ids, _), table in zip(chunk, tables):
                out[i] = LogprobReply(table, None, len(ids), share)
        return out  # type: ignore[return-value]

    def _forward_logprobs(self, encoded: list[tuple[list[int], list[int]]],
                          continuations: list[tuple[str, ...]]) -> list[np.ndarray]:
        """One right-padded forward pass; at each position p, the distribution predicted at p - 1
        (p may be one past the prompt: the token that would follow it)."""
        import torch

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, (ids, _) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        shared = shared_length([ids for ids, _ in encoded], [positions for _, positions in encoded]) if self.prefix_cache else 0
        with torch.inference_mode():
            if shared:
                logits, start = self.prefixes.logits(input_ids.to(self.device), mask.to(self.device), shared)
            else:
                logits, start = self.lm(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits, 0
        tables = []
        for row, ((_, positions), wanted) in enumerate(zip(encoded, continuations)):
            logprobs = torch.log_softmax(logits[row, torch.as_tensor(positions) - 1 - start].float(), dim=-1).cpu().numpy()
            table = np.full((len(positions), len(wanted)), -np.inf)
            for column, token_id in enumerate(single_token_ids(self.tokenizer, wanted)):
                if token_id is not None:
                    table[:, column] = logprobs[:, token_id]
            tables.append(table)
        return tables

    def _generate_one(self, request: Request) -> Reply:
        import torch

        started = time.perf_counter()
        if request.messages is not None:
            ids = chat_token_ids(self.tokenizer, request.messages)
        else:
            ids = self.tokenizer(request.prompt, add_special_tokens=True)["input_ids"]
        if len(ids) + request.max_tokens > self.context_window:
            return Reply(None, failure=f"prompt of {len(ids)} tokens plus max_tokens {request.max_tokens} exceeds "
                                       f"the model's context of {self.context_window} tokens", retryable=False)
        input_ids = torch.tensor([ids], device=self.device)
        sampling = request.temperature > 0
        if request.seed is not None:
            torch.manual_seed(request.seed)
        eos = self.tokenizer.eos_token_id
        with torch.inference_mode():
            output = self.lm.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=request.max_tokens,
                do_sample=sampling,
                temperature=request.temperature if sampling else None,
                top_p=None,
                top_k=None,
                pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos,
            )
        new = output[0, len(ids) :].tolist()
        stops = _stop_ids(self.lm, eos)
        ended = bool(new) and new[-1] in stops
        finish = "stop" if ended or len(new) < request.max_tokens else "length"
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return Reply(text, len(ids), len(new), time.perf_counter() - started, 1, finish)


def load_shared_causal_lm(settings: LLMSettings):
    """(model, tokenizer, device) of ``settings.model``, loaded once per process."""
    from neuron_assets.builtin_models import BuiltinModelError, resolve_builtin

    try:
        path = resolve_builtin(settings.model)
    except BuiltinModelError as err:
        raise LLMUnavailable(str(err)) from None
    device = runtime.choose_device(settings.device)
    options: dict[str, object] = dict(settings.engine_kwargs)
    dtype = runtime.choose_dtype(str(options.pop("dtype", settings.dtype)), device)
    key = runtime.cache_key("transformers", path, str(device), str(dtype), options, settings.allow_download)

    def load():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from neuron_assets.runtime import quiet_transformers

        local = not settings.allow_download
        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
                lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=local, dtype=dtype, **options)
        except (OSError, ValueError) as err:
            raise LLMUnavailable(
                f"cannot load {settings.setting}.model '{settings.model}' from a local folder or the Hugging Face "
                f"cache ({err.__class__.__name__}: {str(err)[:160]})") from None
        return lm.to(device).eval(), tokenizer, device

    return runtime.shared(key, load)


def _context_window(lm, tokenizer) -> int:
    configured = getattr(lm.config, "max_position_embeddings", None)
    limit = getattr(tokenizer, "model_max_length", None)
    candidates = [int(v) for v in (configured, limit) if isinstance(v, int) and 0 < v < 10**7]
    return min(candidates) if candidates else 2048


def _stop_ids(lm, eos) -> set[int]:
    configured = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return {i for i in [*ids, eos] if i is not None}
