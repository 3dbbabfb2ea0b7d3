"""The offline explainer: a description from exemplar statistics alone, no language model.

Words (subword fragments merged back into the word they belong to) that are active at or
above a threshold are ranked by how much more often they are active than the corpus would
predict (lift over their corpus frequency, weighted by their share of the activity). The
best few are named; the word before them is named too when it is nearly always the same.
A variant of the description comes from another exemplar subset and another threshold.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from neuron_assets.types import ActivationRecord, Polarity

MAX_WORDS = 5
MIN_LIFT = 2.0  # a word is named only if it is at least twice as frequent among active words as in the corpus
MIN_SHARE_OF_BEST = 0.15  # a word is named only if its score is at least this share of the best one's
CONTEXT_SHARE = 0.7  # the preceding word is named when it precedes this share of the occurrences
CONTEXT_MIN_COUNT = 3


class NothingActive(ValueError):
    """The exemplars hold no token at or above the threshold."""


@dataclass(frozen=True)
class WordCounts:
    """How often each word (lower-cased, fragments merged) occurs in a corpus sample."""

    counts: Counter = field(default_factory=Counter)
    total: int = 0

    @classmethod
    def from_records(cls, records: Iterable[ActivationRecord]) -> WordCounts:
        counts: Counter = Counter()
        seen = set()
        for record in records:
            if record.seq_id in seen:
                continue
            seen.add(record.seq_id)
            counts.update(word.key for word in words_of(record.tokens[record.prefix_len :]))
        return cls(counts, sum(counts.values()))

    def without(self, records: Iterable[ActivationRecord]) -> WordCounts:
        """These counts less the words of ``records`` (which must be among the counted ones):
        the corpus frequency outside the exemplars being described."""
        own = WordCounts.from_records(records).counts
        counts = Counter({key: n - own.get(key, 0) for key, n in self.counts.items() if n > own.get(key, 0)})
        return WordCounts(counts, sum(counts.values()))

    def probability(self, key: str) -> float:
        """Add-one smoothed, so a word the sample never saw is rare but not impossible."""
        return (self.counts.get(key, 0) + 1) / (self.total + len(self.counts) + 1)


@dataclass(frozen=True)
class Word:
    start: int  # first token
    stop: int  # one past the last token
    text: str  # stripped

    @property
    def key(self) -> str:
        return self.text.lower()


def describe_by_lift(
    records: Sequence[ActivationRecord],
    polarity: Polarity,
    background: WordCounts,
    threshold: float,
    max_words: int = MAX_WORDS,
) -> str:
    """A concise description naming the words most over-represented among active tokens.

    Raises :class:`NothingActive` when no token reaches ``threshold``.
    """
    active = _active_occurrences(records, polarity, threshold)
    if not active:
        raise NothingActive(f"no token at or above the threshold {threshold:.4g}")
    by_word: dict[str, list[tuple[str, str | None]]] = defaultdict(list)  # key -> [(surface, previous word)]
    for surface, previous in active:
        by_word[surface.lower()].append((surface, previous))
    total = len(active)
    scored = []
    for key, occurrences in by_word.items():
        share = len(occurrences) / total
        lift = share / background.probability(key)
        if lift >= MIN_LIFT:
            scored.append((share * math.log(lift), key))
    if not scored:  # no active word stands out from the corpus: name the most frequent ones
        scored = [(len(o) / total, k) for k, o in by_word.items()]
    scored.sort(key=lambda item: (-item[0], item[1]))
    best = scored[0][0]
    chosen = [key for score, key in scored[:max_words] if score >= MIN_SHARE_OF_BEST * best]
    surfaces = [Counter(s for s, _ in by_word[key]).most_common(1)[0][0] for key in chosen]
    context = _shared_context(chosen, by_word)
    return _render(surfaces, context)


def words_of(tokens: Sequence[str]) -> list[Word]:
    """Tokens grouped into words: a token continues the word before it when neither side of
    their junction is whitespace or punctuation (``" neur" + "ons"``)."""
    words: list[Word] = []
    start = 0
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or not _continues(tokens[i - 1], tokens[i]):
            text = "".join(tokens[start:i]).strip()
            if text:
                words.append(Word(start, i, text))
            start = i
    return words


def _continues(previous: str, token: str) -> bool:
    return bool(previous) and bool(token) and previous[-1].isalnum() and token[0].isalnum()


def _active_occurrences(records, polarity: Polarity, threshold: float) -> list[tuple[str, str | None]]:
    """(word, the word before it) for every word with a token at or above threshold."""
    found = []
    for record in records:
        values = record.polarity_activations(polarity)[record.prefix_len :]
        words = words_of(record.tokens[record.prefix_len :])
        for i, word in enumerate(words):
            if np.max(values[word.start : word.stop]) >= threshold:
                found.append((word.text, words[i - 1].text if i else None))
    return found


def _shared_context(chosen: list[str], by_word) -> str | None:
    """The word before the named words, when one word (case aside) precedes nearly all their
    occurrences and is not itself named."""
    previous = [p for key in chosen for _, p in by_word[key]]
    keys = Counter(p.lower() for p in previous if p is not None)
    if not keys:
        return None
    key, count = keys.most_common(1)[0]
    if key in chosen or count < CONTEXT_MIN_COUNT or count / len(previous) < CONTEXT_SHARE:
        return None
    return Counter(p for p in previous if p is not None and p.lower() == key).most_common(1)[0][0]


def _render(surfaces: list[str], context: str | None) -> str:
    quoted = [f'"{s}"' for s in surfaces]
    listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + f" and {quoted[-1]}"
    if all(any(c.isdigit() for c in s) for s in surfaces):
        text = f"numbers such as {listed}"
    elif all(not any(c.isalnum() for c in s) for s in surfaces):
        text = f"punctuation such as {listed}"
    elif all(s.isalpha() for s in surfaces):
        text = f"the word {listed}" if len(quoted) == 1 else f"the words {listed}"
    else:
        text = f"the token {listed}" if len(quoted) == 1 else f"the tokens {listed}"
    return text + (f', mostly after "{context}"' if context else "")
