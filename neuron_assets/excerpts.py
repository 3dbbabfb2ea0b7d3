"""Exemplars as an explainer sees them: display tokens, highlight thresholds, 0-10 scales.

An :class:`Excerpt` is one exemplar ready to be shown: the fixed prefix dropped (it is the
same in every sequence and never highlighted), activations in the polarity's orientation
(never negative), and every token in a display form that cannot break the prompt: special
tokens of chat templates become ``⟨eot_id⟩``, line breaks and tabs become ``\\n`` and ``\\t``.

It sits on the package's ground floor: the explainer's prompts, the simulators' inputs and
the scorers' judge texts all show tokens through it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from neuron_assets.types import ActivationRecord, Polarity

MIN_HIGHLIGHTED = 3  # Transluce: lower the threshold until at least this many token positions are marked
HIGHLIGHT_LADDER = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
"""The highlight thresholds a prompt tries, as fractions of the highest activation among the
exemplars it shows, highest first (see :func:`highlight_threshold`)."""

# Token shapes that some model family uses as a control token. A literal one inside a prompt
# is parsed as that control token by the explainer's tokenizer (a `<|eot_id|>` in a user
# message ends the turn), so every one is shown with brackets no tokenizer treats as special.
CONTROL_TOKEN = re.compile(
    r"<\|[^<>|\s]{1,48}\|>"  # <|eot_id|>, <|im_start|>, <|endoftext|>
    r"|</?s>|<unk>|<pad>|<mask>|<bos>|<eos>|<start_of_turn>|<end_of_turn>|<think>|</think>"
    r"|\[/?INST\]|\[(?:CLS|SEP|PAD|MASK|UNK|BOS|EOS)\]"
)
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def show_control_token(token: str) -> str:
    """``<|eot_id|>`` -> ``⟨eot_id⟩``, ``[SEP]`` -> ``⟨SEP⟩``: readable, and special to no tokenizer."""
    name = token.strip().strip("<>[]|/") or token.strip()
    return f"⟨{'/' if token.strip().startswith(('</', '[/')) else ''}{name}⟩"


def defuse_control_tokens(text: str) -> str:
    """Every control-token shape in ``text`` rewritten by :func:`show_control_token`."""
    return CONTROL_TOKEN.sub(lambda match: show_control_token(match.group(0)), text)


# Transluce's stand-ins for Llama's four chat special tokens (observatory,
# lib/explanations/explanations/llama_model.py): its tokenizer wrapper writes every string it
# encodes with these, so the released simulator and the distilled explainer never see a chat
# template's own turn markers inside an input. Shared by the simulator's input
# (neuron_assets.simulate.transluce) and the distilled explainer's prompt format
# (neuron_assets.explain.formats).
CHAT_TOKEN_STAND_INS: tuple[tuple[str, str], ...] = (
    ("<|begin_of_text|>", "<||begin_of_text||>"),
    ("<|start_header_id|>", "<||start_header_id||>"),
    ("<|end_header_id|>", "<||end_header_id||>"),
    ("<|eot_id|>", "<||eot_id||>"),
)


def transluce_text(text: str) -> str:
    """``text`` with each of Llama's four chat special tokens written as its stand-in (the
    published tokenizer wrapper does this to every string it encodes)."""
    for original, stand_in in CHAT_TOKEN_STAND_INS:
        text = text.replace(original, stand_in)
    return text


def special_tokens(tokenizer) -> dict[int, str | None]:
    """id -> text (None where the tokenizer cannot say) of a tokenizer's special and
    added-special tokens."""
    ids = [int(i) for i in getattr(tokenizer, "all_special_ids", None) or []]
    texts = list(getattr(tokenizer, "all_special_tokens", None) or [])
    if len(texts) != len(ids):
        convert = getattr(tokenizer, "convert_ids_to_tokens", None)
        texts = [convert(i) for i in ids] if convert else [None] * len(ids)
    found = dict(zip(ids, texts))
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            found[int(token_id)] = getattr(added, "content", None)
    return found


class TokenDisplay:
    """How one subject tokenizer's tokens are written into a prompt."""

    def __init__(self, special_ids: Iterable[int] = ()):
        self.special_ids = frozenset(int(i) for i in special_ids)

    @classmethod
    def for_tokenizer(cls, tokenizer) -> TokenDisplay:
        """Special tokens are the tokenizer's own special and added-special tokens."""
        return cls() if tokenizer is None else cls(special_tokens(tokenizer))

    def show(self, token: str, token_id: int = -1) -> str:
        if token_id in self.special_ids or CONTROL_TOKEN.fullmatch(token.strip() or "-"):
            lead = token[: len(token) - len(token.lstrip())]
            return lead + show_control_token(token)
        for raw, escaped in _ESCAPES.items():
            token = token.replace(raw, escaped)
        return token


@dataclass(frozen=True, eq=False)
class Excerpt:
    """One sequence as shown to an explainer; ``activations`` are >= 0 (polarity orientation)."""

    seq_id: int
    tokens: tuple[str, ...]  # display forms
    activations: np.ndarray  # float32

    @property
    def peak(self) -> float:
        return float(self.activations.max()) if self.activations.size else 0.0

    def window(self, length: int) -> Excerpt:
        """At most ``length`` whole tokens around the peak, a third of them before it."""
        if len(self.tokens) <= length:
            return self
        peak = int(np.argmax(self.activations))
        start = min(max(0, peak - length // 3), len(self.tokens) - length)
        return self.span(start, start + length)

    def span(self, start: int, stop: int) -> Excerpt:
        return Excerpt(self.seq_id, self.tokens[start:stop], self.activations[start:stop])


def excerpt_of(record: ActivationRecord, polarity: Polarity, display: TokenDisplay | None = None) -> Excerpt:
    """The part of ``record`` after its fixed prefix, in display form."""
    display = display or TokenDisplay()
    start = record.prefix_len
    ids = record.token_ids if len(record.token_ids) == len(record.tokens) else (-1,) * len(record.tokens)
    shown = tuple(display.show(token, token_id) for token, token_id in zip(record.tokens[start:], ids[start:]))
    return Excerpt(record.seq_id, shown, record.polarity_activations(polarity)[start:])


def highlight_threshold(excerpts: Sequence[Excerpt], ladder: Sequence[float] = HIGHLIGHT_LADDER) -> float:
    """Transluce's per-prompt rule: the threshold at which the excerpts shown are highlighted.

    The threshold starts at ``ladder[0]`` times the highest activation among ``excerpts``
    (the exemplars this prompt shows, nothing else) and steps down the ladder until at least
    :data:`MIN_HIGHLIGHTED` token positions are at or above it. The last rung is a floor:
    when even it marks fewer than 3 positions, only those are marked (the peak always is),
    never every positive token. Excerpts with no positive activation mark nothing (inf).
    """
    rungs = check_ladder(ladder)
    peak = max((e.peak for e in excerpts), default=0.0)
    if not peak > 0:
        return math.inf
    values = np.concatenate([np.asarray(e.activations, dtype=np.float64) for e in excerpts])
    for fraction in rungs:
        threshold = fraction * peak
        if int((values >= threshold).sum()) >= MIN_HIGHLIGHTED:
            return float(threshold)
    return float(rungs[-1] * peak)


def check_ladder(ladder: Sequence[float]) -> tuple[float, ...]:
    """A highlight ladder: fractions of the shown maximum in (0, 1], strictly decreasing."""
    rungs = tuple(float(f) for f in ladder)
    if not rungs or any(not 0 < f <= 1 for f in rungs) or any(a <= b for a, b in zip(rungs, rungs[1:])):
        raise ValueError(f"a highlight ladder is fractions of the shown maximum in (0, 1], strictly decreasing "
                         f"(e.g. {HIGHLIGHT_LADDER}); got {rungs}")
    return rungs


def distinct_token_peaks(excerpts: Sequence[Excerpt]) -> dict[str, float]:
    """Each distinct active token (whitespace ignored) -> its highest activation."""
    peaks: dict[str, float] = {}
    for excerpt in excerpts:
        for token, value in zip(excerpt.tokens, excerpt.activations):
            if value > 0:
                key = token_key(token)
                peaks[key] = max(peaks.get(key, 0.0), float(value))
    return peaks


def token_key(token: str) -> str:
    return token.strip() or token


def highlighted_text(excerpt: Excerpt, threshold: float, open_mark: str = "{{", close_mark: str = "}}") -> str:
    """The excerpt's text with every run of tokens at or above ``threshold`` in one pair of
    marks; whitespace at the edges of a run stays outside the marks."""
    parts: list[str] = []
    tokens, active = excerpt.tokens, excerpt.activations >= threshold
    start = 0
    while start < len(tokens):
        stop = start + 1
        while stop < len(tokens) and active[stop] == active[start]:
            stop += 1
        text = "".join(tokens[start:stop])
        if active[start]:
            core = text.strip()
            if core:
                lead = text[: len(text) - len(text.lstrip())]
                trail = text[len(text.rstrip()) :]
                text = f"{lead}{open_mark}{core}{close_mark}{trail}"
            else:
                text = f"{open_mark}{text}{close_mark}"
        parts.append(text)
        start = stop
    return defuse_control_tokens("".join(parts))


def plain_text(excerpt: Excerpt) -> str:
    return defuse_control_tokens("".join(excerpt.tokens))


def scaled_0_to_10(excerpts: Sequence[Excerpt], scale: float | None = None) -> list[list[int]]:
    """Bills et al.'s levels: floor(10 * a / scale), at most 10. ``scale``: the feature's one
    normalizer (FeatureStats.scale, its train max); without one, the max over the excerpts
    shown together (puzzles, which have no stats)."""
    top = scale if scale is not None and scale > 0 else max((e.peak for e in excerpts), default=0.0)
    if top <= 0:
        return [[0] * len(e.tokens) for e in excerpts]
    return [[min(10, int(math.floor(10 * float(a) / top))) for a in e.activations] for e in excerpts]
