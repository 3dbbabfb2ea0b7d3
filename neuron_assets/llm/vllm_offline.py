"""The ``vllm`` backend: vLLM's offline engine (``LLM``) on a GPU box.

Every round is one call with every pending prompt and one ``SamplingParams`` per request
(its own seed), so vLLM schedules them all; prefix caching is on, so a shared system
message and puzzle are computed once. Prompt logprobs come from ``prompt_logprobs``. The
engine is built once per process (:mod:`neuron_assets.runtime`) and shared by the explainer
and the judge. vLLM is imported when the backend is built: CPU installs do not need it.
"""

from __future__ import annotations

import time
from pathlib import Path
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
from neuron_assets.llm.tokens import ChatTokenCounter, chat_token_ids, encode_at_offsets, single_token_ids


class VLLMOfflineLLM:
    backend = "vllm"
    count_tokens_exactly = True

    def __init__(self, settings: LLMSettings, top_logprobs: int = 20):
        self.settings = settings
        self.model = settings.model
        self.top_logprobs = top_logprobs
        self.engine = shared_engine(settings)
        self.tokenizer = self.engine.get_tokenizer()
        self.count_chat_tokens = ChatTokenCounter(self.tokenizer)

    def generate(self, requests: Sequence[tuple[Request, int]], on_reply: OnReply | None = None) -> list[Reply]:
        from vllm import SamplingParams

        if not requests:
            return []
        params = [SamplingParams(temperature=r.temperature, max_tokens=r.max_tokens, seed=r.seed) for r, _ in requests]
        started = time.perf_counter()
        chats = [i for i, (r, _) in enumerate(requests) if r.messages is not None]
        plain = [i for i, (r, _) in enumerate(requests) if r.messages is None]
        outputs: dict[int, object] = {}
        if chats:
            done = self.engine.chat([[dict(m) for m in requests[i][0].messages] for i in chats],
                                    [params[i] for i in chats], use_tqdm=False)
            outputs.update(zip(chats, done))
        if plain:
            done = self.engine.generate([requests[i][0].prompt for i in plain], [params[i] for i in plain],
                                        use_tqdm=False)
            outputs.update(zip(plain, done))
        share = (time.perf_counter() - started) / len(requests)
        replies = [_reply(outputs[i], share) for i in range(len(requests))]
        for i, reply in enumerate(replies if on_reply is not None else ()):
            on_reply(i, reply)
        return replies

    def continuation_logprobs(self, requests: Sequence[LogprobRequest], max_attempts: int = 1) -> list[LogprobReply]:
        encoded = [encode_at_offsets(self.tokenizer, r.prompt, r.offsets) for r in requests]
        return self._prompt_logprobs(encoded, [r.continuations for r in requests])

    def choice_logprobs(self, requests: Sequence[ChoiceRequest], max_attempts: int = 1) -> list[LogprobReply]:
        """The chat template's prompt with one choice appended as a placeholder: vLLM's
        prompt logprobs at the placeholder are the distribution after the prompt (the top
        ``top_logprobs`` and the placeholder itself, so one choice is always read)."""
        encoded = []
        for request in requests:
            ids = chat_token_ids(self.tokenizer, request.messages)
            wanted = [t for t in single_token_ids(self.tokenizer, request.choices) if t is not None]
            placeholder = wanted[0] if wanted else (self.tokenizer.eos_token_id or 0)
            encoded.append((ids + [placeholder], [len(ids)]))
        return self._prompt_logprobs(encoded, [r.choices for r in requests])

    def _prompt_logprobs(self, encoded: list[tuple[list[int], list[int]]],
                         continuations: list[tuple[str, ...]]) -> list[LogprobReply]:
        from vllm import SamplingParams, TokensPrompt

        if not encoded:
            return []
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=self.top_logprobs)
        started = time.perf_counter()
        outputs = self.engine.generate([TokensPrompt(prompt_token_ids=ids) for ids, _ in encoded], params,
                                       use_tqdm=False)
        share = (time.perf_counter() - started) / len(encoded)
        replies = []
        for wanted_strings, (ids, positions), output in zip(continuations, encoded, outputs):
            wanted = single_token_ids(self.tokenizer, wanted_strings)
            table = np.full((len(positions), len(wanted_strings)), -np.inf)
            per_position = output.prompt_logprobs or []
            for row, position in enumerate(positions):
                # prompt_logprobs[p]: the distribution of token p given the tokens before it
                alternatives = per_position[position] if position < len(per_position) else None
                for column, token_id in enumerate(wanted):
                    if alternatives and token_id in alternatives:
                        table[row, column] = alternatives[token_id].logprob
            replies.append(LogprobReply(table, None, len(ids), share))
        return replies


def shared_engine(settings: LLMSettings):
    """The vLLM engine of the model and engine options, built once per process."""
    if not settings.model:
        raise LLMUnavailable(f"{settings.setting}.model is required for the vllm backend (a local model folder or a "
                             "Hugging Face name in the local cache)")
    try:
        from vllm import LLM
    except ImportError:
        raise LLMUnavailable("the vllm backend needs vLLM: pip install 'neuron-assets[gpu]'") from None
    from neuron_assets.builtin_models import BuiltinModelError, resolve_builtin

    try:
        model = resolve_builtin(settings.model)
    except BuiltinModelError as err:
        raise LLMUnavailable(str(err)) from None
    options = {"enable_prefix_caching": True, "seed": settings.seed, **settings.engine_kwargs}
    key = runtime.cache_key("vllm", model, settings.allow_download, options)
    return runtime.shared(key, lambda: LLM(model=local_model_path(model, settings.allow_download, settings.setting),
                                           **options))


def local_model_path(name: str, allow_download: bool = False, setting: str = "explain") -> str:
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
        raise LLMUnavailable(
            f"{setting}.model '{name}' is neither a local folder nor in the local Hugging Face cache: download it "
            f"first (huggingface-cli download {name}), or set {setting}.allow_download: true"
        ) from None


def _reply(output, seconds: float) -> Reply:
    completion = output.outputs[0] if output.outputs else None
    prompt_tokens = len(output.prompt_token_ids or ())
    if completion is None:
        return Reply(None, prompt_tokens, 0, seconds, failure="the engine returned no completion")
    return Reply(completion.text, prompt_tokens, len(completion.token_ids), seconds, 1, completion.finish_reason)
