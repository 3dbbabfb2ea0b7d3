"""The offline baseline simulator: a fixed rule over the tokens and words a description names.

The rule, applied to every token after the record's fixed prefix:

1. **Terms.** Every quoted span of the description (``"..."``, ``'...'``, backticks,
   ``{{...}}``, curly quotes, ``⟨...⟩`` control-token forms) is a *quoted term*; every word
   (a run of letters and digits) of the description that is not description boilerplate
   (``token``, ``fires``, ``the``, ... see :data:`BOILERPLATE`) is a *word term*; the words
   inside a quoted span are word terms too. All are compared case-folded.
2. **Scores.** A token, case-folded and stripped of whitespace, scores
   - **10** when it equals a term, or its letters and digits alone do (``"cat,"`` -> ``cat``);
   - **6** when it has letters or digits and the whole word it is part of (adjacent tokens
     with no whitespace between them) equals a term (``play`` + ``ing`` for ``playing``);
   - **3** when it and a term share a prefix of at least 4 characters, or one of them is a
     prefix of the other and the shorter has at least 3 (``number`` for ``numbers``);
   - **0** otherwise. The highest level that applies wins.

It needs no model and no training, so it is the control every learned simulator must beat.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from neuron_assets.simulate.base import SimulatedActivations
from neuron_assets.types import ActivationRecord

EXACT, WHOLE_WORD, STEM = 10.0, 6.0, 3.0

QUOTED = re.compile(r"\{\{(.+?)\}\}|\"([^\"]+)\"|“([^”]+)”|‘([^’]+)’|`([^`]+)`|(?<!\w)'([^']+)'(?!\w)|(⟨[^⟩]+⟩)")
WORD = re.compile(r"[^\W_]+", re.UNICODE)

BOILERPLATE = frozenset(
    """
    a an the of and or in on at to for with by as is are be been being was were that this these those
    it its into from about than then there their also not no any all some more most such like e g eg ie
    i mostly often especially typically usually frequently sometimes when where which while after before
    within inside following preceding near around between token tokens word words text texts phrase
    phrases term terms string strings character characters sequence sequences fires fire firing fired
    activates activate activating activation activations neuron neurons feature features mention mentions
    mentioning reference references referring related relating context contexts including include
    includes particular specific various other occurrence occurrences instance instances appearance
    appearances part parts piece pieces kind kinds type types form forms variant variants case cases
    ending endings end beginning start starting strongly weakly highly primarily mainly something things
    thing detects detecting detect responds responding respond pattern patterns
    """.split()
)


class LexicalSimulator:
    """Simulator ``lexical``: see the module docstring for the rule."""

    name = "lexical"

    def simulate(self, descriptions: Sequence[str], records: Sequence[ActivationRecord]) -> SimulatedActivations:
        return [[simulate_lexically(named_terms(description), record) for record in records] for description in descriptions]


@dataclass(frozen=True)
class NamedTerms:
    quoted: frozenset[str]
    words: frozenset[str]

    @property
    def all(self) -> frozenset[str]:
        return self.quoted | self.words


def named_terms(description: str | None) -> NamedTerms:
    """The quoted spans and content words of a description, case-folded."""
    description = description or ""
    quoted: set[str] = set()
    words: set[str] = set()
    for match in QUOTED.finditer(description):
        span = next(group for group in match.groups() if group is not None)
        if span.strip():
            quoted.add(span.strip().casefold())
            words.update(w.casefold() for w in WORD.findall(span))
    for word in WORD.findall(QUOTED.sub(" ", description)):
        folded = word.casefold()
        if folded not in BOILERPLATE:
            words.add(folded)
    return NamedTerms(frozenset(quoted), frozenset(words))


def simulate_lexically(terms: NamedTerms, record: ActivationRecord) -> np.ndarray:
    predicted = np.zeros(len(record.tokens), dtype=np.float32)
    everything = terms.all
    if not everything:
        return predicted
    levels: dict[tuple[str, str, str, str], float] = {}  # a token's shape -> its level, once per shape
    for position, shape in enumerate(token_shapes(tuple(record.tokens), record.prefix_len), record.prefix_len):
        level = levels.get(shape)
        if level is None:
            level = levels[shape] = _token_level(shape, everything, terms.words)
        predicted[position] = level
    return predicted


@lru_cache(maxsize=4096)
def token_shapes(tokens: tuple[str, ...], start: int) -> tuple[tuple[str, str, str, str], ...]:
    """Per token from ``start``: what the rule compares with the terms (the token and the
    whole word it is part of, case-folded and stripped, and their letters and digits), made
    once per record: the k candidates of a feature and every scoring call share them."""
    words = _whole_words(tokens, start)
    shapes = []
    for position in range(start, len(tokens)):
        folded = tokens[position].strip().casefold()
        word = words[position]
        shapes.append((folded, "".join(WORD.findall(folded)), word.strip().casefold(),
                       "".join(WORD.findall(word.casefold()))))
    return tuple(shapes)


def _token_level(shape: tuple[str, str, str, str], everything: frozenset[str], words: frozenset[str]) -> float:
    folded, core, word, word_core = shape
    if not folded:
        return 0.0
    if folded in everything or (core and core in everything):
        return EXACT
    if not core:  # punctuation and symbols count only when quoted exactly
        return 0.0
    if word in everything or word_core in everything:
        return WHOLE_WORD
    if any(_shares_stem(core, term) for term in words):
        return STEM
    return 0.0


def _shares_stem(a: str, b: str) -> bool:
    shorter, longer = sorted((a, b), key=len)
    if len(shorter) >= 3 and longer.startswith(shorter):
        return True
    return len(shorter) >= 4 and a[:4] == b[:4]


def _whole_words(tokens: Sequence[str], start: int) -> list[str]:
    """For each position, the word it belongs to: tokens joined until whitespace."""
    words = [""] * len(tokens)
    position = start
    while position < len(tokens):
        stop = position + 1
        while stop < len(tokens) and tokens[stop] and not tokens[stop][0].isspace():
            stop += 1
        word = "".join(tokens[position:stop])
        for i in range(position, stop):
            words[i] = word
        position = stop
    return words
