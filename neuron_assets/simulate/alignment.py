"""The fine-tuned simulator's input, and where each subject token is read off it.

The input is Transluce's ``## Neuron Description: {description} ## Input: {tokens}``. The
subject's tokens and the backbone's need not be the same:

- ``subject_ids`` (Transluce: the simulator is fine-tuned from the subject model, so it
  shares its tokenizer): the description part is tokenized, the subject's own token ids
  follow, and subject token i is read at its own position.
- ``char_offsets`` (any backbone): the whole input is one text, tokenized by the backbone
  with character offsets; subject token i is read at the *last* backbone sub-token that
  overlaps its characters. A subject token with no overlapping backbone token (whitespace
  that the backbone drops) is read at the nearest backbone token before it; several subject
  tokens inside one backbone token share it (a training label there is their maximum).

Control tokens of the subject (``<|eot_id|>``, ``[SEP]``) are written in their display form
``⟨eot_id⟩`` in both the description and the input, and the simulator's tokenizer carries
each display form as one added token, so a description that names a special token names
the same embedding the input holds (Transluce's special-token handling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from neuron_assets.explain.excerpts import CONTROL_TOKEN, defuse_control_tokens, show_control_token
from neuron_assets.types import ActivationRecord

DESCRIPTION_HEAD = "## Neuron Description: "
INPUT_HEAD = " ## Input: "
NOT_READ = -1


@dataclass(frozen=True, eq=False)
class EncodedPair:
    """One (description, record) as backbone input ids, and where each subject token is read.

    ``read_at[i]`` is the input position whose prediction is subject token i's, or -1 for
    the record's fixed prefix and for tokens cut off by ``max_length``.
    """

    input_ids: tuple[int, ...]
    read_at: np.ndarray  # int64, shape (len(record.tokens),)


class PairEncoder(Protocol):
    name: str

    def encode(self, description: str, record: ActivationRecord) -> EncodedPair: ...


def simulator_input_text(description: str, record: ActivationRecord) -> str:
    """The input as text, for people and for the golden test."""
    return DESCRIPTION_HEAD + description_text(description) + INPUT_HEAD + "".join(input_tokens(record))


def description_text(description: str | None) -> str:
    """A description with every control-token shape in its display form, one line."""
    return " ".join(defuse_control_tokens(description or "").split())


def input_tokens(record: ActivationRecord) -> list[str]:
    """The record's tokens after its prefix, control tokens in display form."""
    shown = []
    for token in record.tokens[record.prefix_len :]:
        core = token.strip()
        if core and CONTROL_TOKEN.fullmatch(core):
            token = token[: len(token) - len(token.lstrip())] + show_control_token(core)
        shown.append(token)
    return shown


def control_token_forms(special_tokens: Sequence[str]) -> list[str]:
    """The display forms to add to the simulator's tokenizer for a subject's special tokens."""
    forms = {show_control_token(t) for t in special_tokens if t and CONTROL_TOKEN.fullmatch(t.strip())}
    return sorted(forms)


class CharOffsetEncoder:
    """Any backbone tokenizer (a fast one, for offsets): re-tokenize and align by characters."""

    name = "char_offsets"

    def __init__(self, tokenizer, max_length: int):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("alignment char_offsets needs a fast (Rust) tokenizer for character offsets")
        self.tokenizer = tokenizer
        self.max_length = max_length

    def encode(self, description: str, record: ActivationRecord) -> EncodedPair:
        shown = input_tokens(record)
        head = DESCRIPTION_HEAD + description_text(description) + INPUT_HEAD
        ids, offsets, special = self._tokenize(head + "".join(shown))
        excess = len(ids) - self.max_length
        if excess > 0:
            head = self._shortened_head(head, offsets, special, excess)
            ids, offsets, special = self._tokenize(head + "".join(shown))
        spans = token_spans(shown, start=len(head))
        read_at = np.full(len(record.tokens), NOT_READ, dtype=np.int64)
        read_at[record.prefix_len :] = last_subtoken_positions(spans, offsets, special, input_start=len(head))
        read_at[read_at >= self.max_length] = NOT_READ  # an input longer than max_length loses its tail
        return EncodedPair(tuple(ids[: self.max_length]), read_at)

    def _tokenize(self, text: str):
        encoded = self.tokenizer(
            text, add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True, verbose=False
        )
        return list(encoded["input_ids"]), list(encoded["offset_mapping"]), list(encoded["special_tokens_mask"])

    def _shortened_head(self, head: str, offsets, special, excess: int) -> str:
        """Cut the description (never the input) by ``excess`` backbone tokens."""
        start = len(DESCRIPTION_HEAD)
        stop = len(head) - len(INPUT_HEAD)
        inside = [s for (s, e), sp in zip(offsets, special) if not sp and start <= s < stop]
        keep = max(0, len(inside) - excess)
        cut = inside[keep] if keep < len(inside) else stop
        return head[:cut].rstrip() + INPUT_HEAD


class SubjectIdsEncoder:
    """The backbone shares the subject's tokenizer: the subject's own ids follow the head."""

    name = "subject_ids"

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._closing = {tokenizer.sep_token_id, tokenizer.eos_token_id} - {None}
        self.input_head_ids = list(tokenizer(INPUT_HEAD, add_special_tokens=False)["input_ids"])

    def encode(self, description: str, record: ActivationRecord) -> EncodedPair:
        body = list(record.token_ids[record.prefix_len :])
        described = self._description_ids(description)
        room = self.max_length - len(body) - len(self.input_head_ids)
        if len(described) > room:  # cut the description, keeping its first (BOS) token
            described = described[: max(room, min(1, len(described)))]
        head = described + self.input_head_ids
        read_at = np.full(len(record.tokens), NOT_READ, dtype=np.int64)
        positions = np.arange(len(head), len(head) + len(body))
        positions[positions >= self.max_length] = NOT_READ
        read_at[record.prefix_len :] = positions
        return EncodedPair(tuple((head + body)[: self.max_length]), read_at)

    def _description_ids(self, description: str) -> list[int]:
        ids = list(self.tokenizer(DESCRIPTION_HEAD + description_text(description), add_special_tokens=True)["input_ids"])
        while ids and ids[-1] in self._closing:
            ids.pop()
        return ids


PAIR_ENCODERS = {CharOffsetEncoder.name: CharOffsetEncoder, SubjectIdsEncoder.name: SubjectIdsEncoder}


def token_spans(tokens: Sequence[str], start: int = 0) -> list[tuple[int, int]]:
    """Character span of each token of a concatenation that begins at ``start``."""
    spans, position = [], start
    for token in tokens:
        spans.append((position, position + len(token)))
        position += len(token)
    return spans


def last_subtoken_positions(
    spans: Sequence[tuple[int, int]],
    offsets: Sequence[tuple[int, int]],
    special_mask: Sequence[int],
    input_start: int = 0,
) -> np.ndarray:
    """For each subject token span, the last backbone token overlapping it; else the last
    backbone token that starts before its end (within the input); else -1."""
    usable = [
        (i, s, e) for i, ((s, e), sp) in enumerate(zip(offsets, special_mask)) if not sp and e > s and s >= input_start
    ]
    starts = np.array([s for _, s, _ in usable], dtype=np.int64)
    ends = np.array([e for _, _, e in usable], dtype=np.int64)
    index = np.array([i for i, _, _ in usable], dtype=np.int64)
    positions = np.full(len(spans), NOT_READ, dtype=np.int64)
    if not usable:
        return positions
    for j, (a, b) in enumerate(spans):
        overlapping = np.nonzero((starts < b) & (ends > a))[0]
        if overlapping.size:
            positions[j] = index[overlapping[-1]]
            continue
        before = np.nonzero(starts < max(b, a + 1))[0]
        if before.size:
            positions[j] = index[before[-1]]
    return positions
