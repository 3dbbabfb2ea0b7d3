"""Generation for steering: the prompt's tokens (through the chat template for a chat model),
and a plain decoding loop with the KV cache that tells the token window where it is.

Greedy at temperature 0 (argmax; the first of equal logits); otherwise sampling from
softmax(logits / temperature) with a ``torch.Generator`` seeded with the request's seed, made
afresh for each continuation, so the baseline and the steered run draw the same random numbers.
Each token's logprob is log-softmax of the model's raw logits (no temperature, no penalty).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from neuron_assets.steer.intervene import TokenWindow


@dataclass(frozen=True)
class Continuation:
    """The tokens a run wrote after the prompt, with each one's logprob and the strongest
    alternatives (token, logprob)."""

    text: str
    tokens: tuple[str, ...]
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    top_logprobs: tuple[tuple[tuple[str, float], ...], ...] = field(default=())
    stopped: str = "length"  # length | eos

    def as_dict(self) -> dict:
        return {"text": self.text, "tokens": list(self.tokens), "token_ids": list(self.token_ids),
                "logprobs": list(self.logprobs),
                "top_logprobs": [[{"token": t, "logprob": lp} for t, lp in step] for step in self.top_logprobs],
                "stopped": self.stopped}


def uses_chat(tokenizer, chat: bool | None) -> bool:
    """Whether the prompt goes through the chat template: ``chat`` when set (True needs a
    template), else whenever the tokenizer has one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise ValueError("chat is on but the subject's tokenizer has no chat template; set chat to false "
                         "(or leave it unset: the template is used when there is one)")
    return has_template if chat is None else chat


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """The prompt's token ids: as the user's turn of a chat with the assistant's turn opened,
    or as plain text with the tokenizer's special tokens (a BOS where it adds one)."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def context_length(model) -> int | None:
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def stop_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                   getattr(getattr(model, "config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids


def cache_argument(model) -> dict:
    """A fresh KV cache, under the name this transformers' forward takes it (``cache`` from 5.2x,
    ``past_key_values`` before); it is filled in place."""
    import inspect

    from transformers import DynamicCache

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: DynamicCache(config=model.config)}


@torch.inference_mode()
def continue_prompt(model, tokenizer, ids: list[int], n_tokens: int, temperature: float, seed: int,
                    window: TokenWindow, device, stops: set[int], freq_penalty: float = 0.0,
                    top_logprobs: int = 0) -> list[Continuation]:
    """Up to ``n_tokens`` tokens after ``ids`` for each row of ``window.rows`` (one, in a
    steering run), each row stopping after an end token (kept out of its text). Each row
    samples with its own generator seeded with ``seed``."""
    rows = len(window.rows)
    generators = [torch.Generator(device=device).manual_seed(seed) for _ in range(rows)] if temperature > 0 else []
    current = torch.tensor([ids] * rows, dtype=torch.long, device=device)
    positions = torch.arange(len(ids))
    cache = cache_argument(model)
    chosen = [[] for _ in range(rows)]
    logprobs = [[] for _ in range(rows)]
    tops = [[] for _ in range(rows)]
    counts = None
    done = [False] * rows
    for step in range(n_tokens):
        window.positions = positions
        out = model(input_ids=current, use_cache=True, logits_to_keep=1, **cache)
        logits = out.logits[:, -1].float()  # (rows, vocab)
        log_probs = torch.log_softmax(logits, dim=-1)
        pick = logits
        if freq_penalty:
            counts = torch.zeros_like(logits) if counts is None else counts
            pick = logits - freq_penalty * counts
        if temperature > 0:
            probs = torch.softmax(pick / temperature, dim=-1)
            tokens = [int(torch.multinomial(probs[r], 1, generator=generators[r])) for r in range(rows)]
        else:
            tokens = torch.argmax(pick, dim=-1).tolist()
        best = torch.topk(log_probs, min(top_logprobs, log_probs.shape[-1])) if top_logprobs else None
        for r, token in enumerate(tokens):
            if done[r]:
                continue
            chosen[r].append(token)
            logprobs[r].append(float(log_probs[r, token]))
            if counts is not None:
                counts[r, token] += 1
            if best is not None:
                names = [tokenizer.decode([i]) for i in best.indices[r].tolist()]
                tops[r].append(tuple(zip(names, [float(v) for v in best.values[r]])))
            done[r] = token in stops
        if all(done):
            break
        current = torch.tensor([[t] for t in tokens], dtype=torch.long, device=device)
        positions = torch.tensor([len(ids) + step])
    out = []
    for r in range(rows):
        ended = bool(chosen[r]) and chosen[r][-1] in stops
        shown = chosen[r][:-1] if ended else chosen[r]
        out.append(Continuation(text=tokenizer.decode(shown, skip_special_tokens=True),
                                tokens=tuple(tokenizer.decode([t]) for t in chosen[r]), token_ids=tuple(chosen[r]),
                                logprobs=tuple(logprobs[r]), top_logprobs=tuple(tops[r]),
                                stopped="eos" if ended else "length"))
    return out


@torch.inference_mode()
def next_token_logprobs(model, ids: list[int], window: TokenWindow, device) -> torch.Tensor:
    """(rows, vocab) float32 log-probabilities of the token after ``ids``, one row per row of
    the window."""
    window.positions = torch.arange(len(ids))
    batch = torch.tensor([ids] * len(window.rows), dtype=torch.long, device=device)
    out = model(input_ids=batch, use_cache=False, logits_to_keep=1)
    return torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()
