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

Every encoder builds a pair from two parts made once each: the description's part (its
tokens) and the record's part (the input's tokens and where each subject token is read
among them), so a feature's exemplars are tokenized and aligned once for all k candidates
and for every scoring call (:meth:`PairEncoder.join`). ``char_offsets`` tokenizes the two
texts apart; that gives the tokens of the whole text wherever the backbone's tokenizer
starts a new piece at `` ## Input:``, which it checks for every description against the
whole text (a probe record) and falls back to the whole text where it does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from neuron_assets.excerpts import CONTROL_TOKEN, defuse_control_tokens, show_control_token
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
    """``encode(d, r) == join(description_part(d), record_part(r), r)``; the parts are what
    a caller caches (one per description, one per record)."""

    name: str

    def encode(self, description: str, record: ActivationRecord) -> EncodedPair: ...

    def description_part(self, description: str): ...

    def record_part(self, record: ActivationRecord): ...

    def join(self, described, recorded, record: ActivationRecord) -> EncodedPair: ...


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
    PROBE = "x"  # the record text a description's split is checked with

    def __init__(self, tokenizer, max_length: int):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("alignment char_offsets needs a fast (Rust) tokenizer for character offsets")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._lead, self._trail = _template_specials(tokenizer)

    def encode(self, description: str, record: ActivationRecord) -> EncodedPair:
        return self.join(self.description_part(description), self.record_part(record), record)

    def encode_whole(self, description: str, record: ActivationRecord) -> EncodedPair:
        """The pair from its whole text tokenized at once: the reference the split parts
        equal, and the fallback where they cannot."""
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

    def description_part(self, description: str) -> _DescribedText:
        text = DESCRIPTION_HEAD + description_text(description)
        ids = self._tokenize(text, specials=False)[0]
        probe = self._tokenize(text + INPUT_HEAD + self.PROBE)[0]
        tail = self._tokenize(INPUT_HEAD + self.PROBE, specials=False)[0]
        return _DescribedText(description, ids, probe == self._lead + ids + tail + self._trail)

    def record_part(self, record: ActivationRecord) -> _RecordText:
        shown = input_tokens(record)
        text = INPUT_HEAD + "".join(shown)
        ids, offsets, special = self._tokenize(text, specials=False)
        read = last_subtoken_positions(token_spans(shown, start=len(INPUT_HEAD)), offsets, special,
                                       input_start=len(INPUT_HEAD))
        return _RecordText(ids, read)

    def join(self, described: _DescribedText, recorded: _RecordText, record: ActivationRecord) -> EncodedPair:
        head = described.ids
        too_long = len(self._lead) + len(head) + len(recorded.ids) + len(self._trail) > self.max_length
        if too_long or not described.splits:  # a description to cut (rare), or a tokenizer that merges here
            return self.encode_whole(described.description, record)
        ids = self._lead + head + recorded.ids + self._trail
        shift = len(self._lead) + len(head)
        read_at = np.full(len(record.tokens), NOT_READ, dtype=np.int64)
        read_at[record.prefix_len :] = np.where(recorded.read != NOT_READ, recorded.read + shift, NOT_READ)
        read_at[read_at >= self.max_length] = NOT_READ
        return EncodedPair(tuple(ids[: self.max_length]), read_at)

    def _tokenize(self, text: str, specials: bool = True):
        encoded = self.tokenizer(
            text, add_special_tokens=specials, return_offsets_mapping=True, return_special_tokens_mask=True,
            verbose=False
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


@dataclass(frozen=True, eq=False)
class _DescribedText:
    description: str
    ids: list[int]  # DESCRIPTION_HEAD + the description, without the template's special tokens
    splits: bool  # whether its tokens followed by a record's are the whole text's tokens


@dataclass(frozen=True, eq=False)
class _RecordText:
    ids: list[int]  # INPUT_HEAD + the record's text after its prefix
    read: np.ndarray  # per token after the prefix: its position among ids, or NOT_READ


def _template_specials(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text ([CLS] / [SEP], a BOS)."""
    bare = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return [], []  # never splits: every description's probe fails and the whole text is used


class SubjectIdsEncoder:
    """The backbone shares the subject's tokenizer: the subject's own ids follow the head."""

    name = "subject_ids"

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._closing = {tokenizer.sep_token_id, tokenizer.eos_token_id} - {None}
        self.input_head_ids = list(tokenizer(INPUT_HEAD, add_special_tokens=False)["input_ids"])

    def encode(self, description: str, record: ActivationRecord) -> EncodedPair:
        return self.join(self.description_part(description), self.record_part(record), record)

    def description_part(self, description: str) -> list[int]:
        ids = list(self.tokenizer(DESCRIPTION_HEAD + description_text(description), add_special_tokens=True)["input_ids"])
        while ids and ids[-1] in self._closing:
            ids.pop()
        return ids

    def record_part(self, record: ActivationRecord) -> list[int]:
        return [int(i) for i in record.token_ids[record.prefix_len :]]

    def join(self, described: list[int], body: list[int], record: ActivationRecord) -> EncodedPair:
        room = self.max_length - len(body) - len(self.input_head_ids)
        if len(described) > room:  # cut the description, keeping its first (BOS) token
            described = described[: max(room, min(1, len(described)))]
        head = described + self.input_head_ids
        read_at = np.full(len(record.tokens), NOT_READ, dtype=np.int64)
        positions = np.arange(len(head), len(head) + len(body))
        positions[positions >= self.max_length] = NOT_READ
        read_at[record.prefix_len :] = positions
        return EncodedPair(tuple((head + body)[: self.max_length]), read_at)


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
    positions = np.full(len(spans), NOT_READ, dtype=np.int64)
    if not usable or not len(spans):
        return positions
    index, starts, ends = (np.array(column, dtype=np.int64) for column in zip(*usable))
    a, b = (np.array(column, dtype=np.int64)[:, None] for column in zip(*spans))
    overlapping = (starts < b) & (ends > a)  # (spans, usable backbone tokens)
    before = starts < np.maximum(b, a + 1)
    last = len(usable) - 1
    positions = np.where(overlapping.any(1), index[last - overlapping[:, ::-1].argmax(1)],
                         np.where(before.any(1), index[last - before[:, ::-1].argmax(1)], NOT_READ))
    return positions.astype(np.int64)
