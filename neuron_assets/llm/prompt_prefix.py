"""The fixed prompt prefix of the LLM tiers, computed once: the key/value cache the transformers
backend keeps across calls.

The prompted simulator's prompts all begin with the same instructions and solved example, the
judges' with the same system turn and solved examples; only the end differs. The backend's
logprob pass keeps the key/value cache of the prefixes it has seen (at most
:data:`PREFIXES_KEPT`, the most recently used), and runs a batch of prompts as the tokens after
the longest prefix they share with a kept one, at the positions after it, against that cache
(expanded to the batch's rows). A batch whose prompts share a prefix no kept one covers (at
least :data:`MIN_SHARED_TOKENS` tokens) computes it once and keeps it; for a single prompt that
prefix is the prompt itself but its last wanted position, so the next prompt finds the part
they share. The logprobs are the full pass's, to float rounding.

vLLM does the same with its automatic prefix caching (``enable_prefix_caching``), which the
offline engine turns on (:mod:`neuron_assets.llm.vllm_offline`), as vLLM's server does by default.
"""

from __future__ import annotations

from collections import OrderedDict

from neuron_assets.runtime import cache_argument

MIN_SHARED_TOKENS = 16
"""A shared prefix shorter than this is run with the prompts (too little to save)."""
PREFIXES_KEPT = 4
"""Prefixes kept at once (the simulator's, detection's, fuzzing's, and one more)."""


class PromptPrefixes:
    """Key/value caches of prompt prefixes for one causal LM, reused across calls."""

    def __init__(self, lm):
        self.lm = lm
        self.argument = cache_argument(lm)
        self.kept: OrderedDict[tuple[int, ...], list] = OrderedDict()
        self.tokens_reused = self.prefix_tokens_run = 0

    @property
    def usable(self) -> bool:
        return self.argument is not None

    def logits(self, input_ids, mask, shared: int):
        """(logits of the tokens run, the number of leading tokens not run) for right-padded
        ``input_ids`` and ``mask`` (rows, width) on the model's device, whose rows all begin
        with the same ``shared`` tokens (the prefix may only cover those)."""
        candidate = tuple(input_ids[0, :shared].tolist())
        best, length = None, 0
        for ids in self.kept:
            common = _common_length(ids, candidate)
            if common > length:
                best, length = ids, common
        if length < MIN_SHARED_TOKENS:
            if len(candidate) < MIN_SHARED_TOKENS or not self.usable:
                return self.lm(input_ids=input_ids, attention_mask=mask).logits, 0
            best, length = candidate, len(candidate)
            self.kept[best] = self._compute(input_ids[:1, :length])
            while len(self.kept) > PREFIXES_KEPT:
                self.kept.popitem(last=False)
        self.kept.move_to_end(best)
        past = self._expanded(self.kept[best], length, input_ids.shape[0])
        self.tokens_reused += length * input_ids.shape[0]
        import torch

        positions = torch.arange(length, input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        out = self.lm(input_ids=input_ids[:, length:], attention_mask=mask,
                      position_ids=positions.expand(input_ids.shape[0], -1), use_cache=True, **{self.argument: past})
        return out.logits, length

    def _compute(self, prefix):
        """Per layer (keys, values) of one row's ``prefix``, from the base model (no LM head)."""
        import torch
        from transformers import DynamicCache

        base = getattr(self.lm, "base_model", self.lm)
        cache = DynamicCache(config=self.lm.config)
        base(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True,
             **{cache_argument(base) or self.argument: cache})
        self.prefix_tokens_run += prefix.shape[1]
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _expanded(self, layers, length: int, rows: int):
        from transformers import DynamicCache

        data = [(keys[..., :length, :].expand(rows, *keys.shape[1:-2], length, keys.shape[-1]),
                 values[..., :length, :].expand(rows, *values.shape[1:-2], length, values.shape[-1]))
                for keys, values in layers]
        return DynamicCache(ddp_cache_data=data, config=self.lm.config)


def _common_length(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def shared_length(rows: list[list[int]], positions: list[list[int]]) -> int:
    """Leading tokens every row shares and no wanted logit needs: below each row's first
    wanted position minus one (the logits at p - 1 predict the token at p) and its last token."""
    first = rows[0]
    limit = min(min(min(p) - 1 for p in positions), min(len(ids) - 1 for ids in rows))
    length = min(len(first), max(limit, 0))
    for ids in rows[1:]:
        length = _common_length(tuple(first[:length]), tuple(ids[:length]))
    return length
