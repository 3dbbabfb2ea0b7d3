"""Tokenizer helpers every backend uses: counting a chat's tokens, loading a local tokenizer,
and encoding a prompt so that given character offsets each start a token."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from neuron_assets.llm.base import LLMUnavailable


@dataclass
class ChatTokenCounter:
    """Counts a chat prompt's tokens with a Hugging Face tokenizer (its chat template when it
    has one); without a tokenizer, estimates 3 UTF-8 bytes a token, which over-counts
    English text for every common tokenizer, so a fitted prompt still fits."""

    tokenizer: object | None = None
    per_message_overhead: int = 4
    _uses_template: bool = field(init=False, default=False)

    def __post_init__(self):
        self._uses_template = bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def __call__(self, messages: Sequence) -> int:
        messages = [_as_dict(m) for m in messages]
        if self.tokenizer is None:
            return sum(-(-len(m["content"].encode()) // 3) + self.per_message_overhead for m in messages) + 2
        if self._uses_template:
            return len(chat_token_ids(self.tokenizer, messages))
        return sum(len(self.tokenizer.encode(m["content"], add_special_tokens=False)) + self.per_message_overhead
                   for m in messages) + 2


def chat_token_ids(tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """The ids the model reads for a chat, its assistant turn opened."""
    ids = tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return list(ids)


def load_local_tokenizer(name_or_path: str | None, setting: str = "explain.tokenizer"):
    """A Hugging Face tokenizer from a local path or the local cache; never downloads."""
    if not name_or_path:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise LLMUnavailable(
            f"cannot load the tokenizer '{name_or_path}' from a local path or the Hugging Face cache "
            f"({err.__class__.__name__}); set {setting} to a local tokenizer folder"
        ) from None


def local_model_dir(model: str | None) -> str | None:
    return model if model and Path(model).expanduser().is_dir() else None


def encode_at_offsets(tokenizer, text: str, offsets: Sequence[int]) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and the token index at which each character offset begins.
    When the whole text's tokenization merges an offset into the token before it, the text
    is tokenized piece by piece, split at the offsets."""
    encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, verbose=False)
    starts = {s: i for i, (s, e) in enumerate(encoded["offset_mapping"]) if e > s}
    positions = [starts.get(c) for c in offsets]
    if all(p is not None and p > 0 for p in positions):
        return list(encoded["input_ids"]), positions  # type: ignore[return-value]
    return encode_in_pieces(tokenizer, text, offsets)


def encode_in_pieces(tokenizer, text: str, offsets: Sequence[int]) -> tuple[list[int], list[int]]:
    bounds = [0, *offsets, len(text)]
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    positions = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if i > 0:
            positions.append(len(ids))
        ids += tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
    return ids, positions


def single_token_ids(tokenizer, texts: Sequence[str]) -> list[int | None]:
    """Per text, the id of the one token spelling it; None when it takes several tokens."""
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append(ids[0] if len(ids) == 1 else None)
    return out


def _as_dict(message) -> Mapping[str, str]:
    return message.as_dict() if hasattr(message, "as_dict") else message
