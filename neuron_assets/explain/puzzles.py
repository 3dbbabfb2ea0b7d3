"""The few-shot puzzle pool: features with a known description and exact activations.

One puzzle, drawn per prompt, is shown before the feature as a solved example (Transluce
found one example beats several). Puzzles are generated from the corpus with known rules,
so each has an exact ground truth: a set of words, the token after a given word, a
character class, a position. A user-supplied JSON file replaces them::

    [{"name": "animals", "description": "animal names",
      "sentences": [[["The", 0], [" cat", 10], [" sat", 0]], ...]}, ...]
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from neuron_assets.config import ExplainConfig
from neuron_assets.excerpts import TokenDisplay, excerpt_of
from neuron_assets.explain.formats import Shown, SolvedPuzzle
from neuron_assets.types import ActivationRecord, Polarity

PUZZLE_ACTIVATION = 10.0
WINDOW = 32  # tokens per puzzle sentence
CONTEXT_BEFORE = 8  # tokens kept before a sentence's first firing token
SENTENCES = 6  # firing sentences per puzzle, plus one quiet sentence when the corpus has one
MIN_SENTENCES = 3


class PuzzleFileError(ValueError):
    """A puzzle file that cannot be read; the message names the puzzle and the problem."""


@dataclass(frozen=True)
class Puzzle:
    name: str
    description: str
    records: tuple[ActivationRecord, ...]  # exact activations, >= 0

    def solved(self, display: TokenDisplay | None = None) -> SolvedPuzzle:
        """As a prompt shows it: firing sentences as positives, quiet ones as negatives, and
        every non-zero activation highlighted (the activations are exact)."""
        excerpts = [excerpt_of(record, Polarity.POS, display) for record in self.records]
        positives = tuple(e for e in excerpts if e.peak > 0)
        negatives = tuple(e for e in excerpts if e.peak <= 0)
        lowest = min((float(e.activations[e.activations > 0].min()) for e in positives), default=PUZZLE_ACTIVATION)
        peak = max((e.peak for e in positives), default=PUZZLE_ACTIVATION)
        return SolvedPuzzle(self.name, Shown(positives, negatives, ladder=(min(1.0, lowest / peak),)), self.description)


def puzzle_pool(config: ExplainConfig, corpus: Sequence[ActivationRecord]) -> list[Puzzle]:
    """The configured puzzle file's puzzles, else puzzles generated from ``corpus``."""
    if not config.few_shot:
        return []
    if config.puzzle_file:
        return load_puzzle_file(config.puzzle_file)
    return generate_puzzles(corpus, seed=config.seed)


def load_puzzle_file(path: str | os.PathLike) -> list[Puzzle]:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PuzzleFileError(f"cannot read puzzle file {path}: {err}") from None
    entries = raw.get("puzzles") if isinstance(raw, dict) else raw
    if not isinstance(entries, list) or not entries:
        raise PuzzleFileError(f"{path}: expected a non-empty list of puzzles (or {{'puzzles': [...]}})")
    return [_puzzle_from_json(entry, i, path) for i, entry in enumerate(entries)]


def puzzles_to_json(puzzles: Sequence[Puzzle]) -> str:
    """The puzzle-file form of ``puzzles`` (to edit generated puzzles into a curated file)."""
    return json.dumps(
        [
            {
                "name": p.name,
                "description": p.description,
                "sentences": [[[t, float(a)] for t, a in zip(r.tokens, r.activations)] for r in p.records],
            }
            for p in puzzles
        ],
        indent=1,
    )


def generate_puzzles(corpus: Sequence[ActivationRecord], seed: int = 0, max_sequences: int = 4000,
                     word_sets: int = 4, contexts: int = 3, more_classes: bool = False) -> list[Puzzle]:
    """Puzzles from known rules applied to corpus token sequences (their prefixes dropped).

    Rules: ``word_sets`` sets of three words, ``contexts`` "token after a frequent token",
    three character classes (digits, capitalized words, punctuation) and "the first token";
    with ``more_classes`` also "the token before a frequent token" (as many as ``contexts``)
    and more character classes (all capitals, underscores, closing brackets). A rule that
    fires in fewer than 3 sequences is left out.
    """
    rng = random.Random(seed)
    sequences = _corpus_sequences(corpus, rng, max_sequences)
    puzzles = []
    for rule in _rules(sequences, rng, word_sets, contexts, more_classes):
        puzzle = _puzzle_from_rule(rule, sequences, rng)
        if puzzle is not None:
            puzzles.append(puzzle)
    return puzzles


# -- rules ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    fires: Callable[[tuple[str, ...], int], bool]  # (tokens, position) -> active
    from_start: bool = False  # sentences start at the sequence's first token


def _rules(sequences: list[tuple[int, tuple[str, ...], tuple[int, ...]]], rng: random.Random, word_sets: int = 4,
           contexts: int = 3, more_classes: bool = False) -> list[Rule]:
    words = Counter()
    followed = Counter()
    for _, tokens, _ in sequences:
        words.update(sorted({_key(t) for i, t in enumerate(tokens) if _is_whole_word(tokens, i) and len(_key(t)) >= 3}))
        followed.update(_key(t) for t in tokens[:-1] if _key(t))
    rules: list[Rule] = []
    frequent = [w for w, _ in words.most_common()]
    candidates = [w for w in frequent[20:] if words[w] >= 2] or frequent
    rng.shuffle(candidates)
    for i in range(word_sets):
        chosen = sorted(candidates[3 * i : 3 * i + 3])
        if len(chosen) == 3:
            rules.append(_word_set_rule(chosen))
    for context, _ in followed.most_common(contexts):
        rules.append(Rule(
            f"after:{context}", f'the token right after "{context}"',
            lambda tokens, i, c=context: i > 0 and _key(tokens[i - 1]) == c and bool(_key(tokens[i])),
        ))
    if more_classes:
        for context, _ in followed.most_common(2 * contexts)[contexts:]:
            rules.append(Rule(
                f"before:{context}", f'the token right before "{context}"',
                lambda tokens, i, c=context: i + 1 < len(tokens) and _key(tokens[i + 1]) == c and bool(_key(tokens[i])),
            ))
        rules += [
            Rule("char_class:all_caps", "words written in capital letters only",
                 lambda tokens, i: _is_whole_word(tokens, i) and len(tokens[i].strip()) >= 2 and tokens[i].strip().isupper()),
            Rule("char_class:underscore", "tokens that contain an underscore", lambda tokens, i: "_" in tokens[i]),
            Rule("char_class:closing", "closing brackets and parentheses",
                 lambda tokens, i: bool(tokens[i].strip()) and set(tokens[i].strip()) <= set(")]}")),
        ]
    rules += [
        Rule("char_class:digit", "tokens that contain a digit", lambda tokens, i: any(c.isdigit() for c in tokens[i])),
        Rule("char_class:capitalized", "words that start with a capital letter",
             lambda tokens, i: _is_whole_word(tokens, i) and tokens[i].strip()[:1].isupper()),
        Rule("char_class:punctuation", "punctuation marks",
             lambda tokens, i: bool(tokens[i].strip()) and not any(c.isalnum() for c in tokens[i])),
        Rule("position:first", "the first token of each excerpt", lambda tokens, i: i == 0, from_start=True),
    ]
    return rules


def _word_set_rule(words: list[str]) -> Rule:
    quoted = [f'"{w}"' for w in words]
    described = ", ".join(quoted[:-1]) + f" and {quoted[-1]}"
    members = frozenset(words)
    return Rule(
        "word_set:" + "|".join(words), f"the words {described}",
        lambda tokens, i: _is_whole_word(tokens, i) and _key(tokens[i]) in members,
    )


def _puzzle_from_rule(rule: Rule, sequences, rng: random.Random) -> Puzzle | None:
    firing, quiet = [], []
    for seq_id, tokens, token_ids in sequences:
        hits = [i for i in range(len(tokens)) if rule.fires(tokens, i)]
        start = 0 if rule.from_start or not hits else max(0, hits[0] - CONTEXT_BEFORE)
        window, window_ids = tokens[start : start + WINDOW], token_ids[start : start + WINDOW]
        activations = np.array([PUZZLE_ACTIVATION if rule.fires(window, i) else 0.0 for i in range(len(window))],
                               dtype=np.float32)
        record = ActivationRecord(seq_id, window, window_ids, activations)
        (firing if activations.any() else quiet).append(record)
        if len(firing) >= SENTENCES and quiet:
            break
    if len(firing) < MIN_SENTENCES:
        return None
    chosen = firing[:SENTENCES] + quiet[:1]
    rng.shuffle(chosen)
    return Puzzle(rule.name, rule.description, tuple(chosen))


def _corpus_sequences(corpus: Sequence[ActivationRecord], rng: random.Random, limit: int):
    unique = {}
    for record in corpus:
        if record.seq_id not in unique and len(record.tokens) > record.prefix_len:
            ids = record.token_ids if len(record.token_ids) == len(record.tokens) else (-1,) * len(record.tokens)
            unique[record.seq_id] = (record.seq_id, tuple(record.tokens[record.prefix_len :]),
                                     tuple(ids[record.prefix_len :]))
    sequences = [unique[k] for k in sorted(unique)]
    rng.shuffle(sequences)
    return sequences[:limit]


def _key(token: str) -> str:
    return token.strip().lower()


def _is_whole_word(tokens: Sequence[str], i: int) -> bool:
    """An alphabetic token that starts a word (whitespace before it, or the first token) and
    that the next token does not continue."""
    token = tokens[i]
    if not token.strip().isalpha():
        return False
    starts = i == 0 or token[:1].isspace() or not tokens[i - 1][-1:].isalnum()
    following = tokens[i + 1] if i + 1 < len(tokens) else " "
    ends = not following[:1].isalnum()
    return starts and ends


def _puzzle_from_json(entry, index: int, path: Path) -> Puzzle:
    where = f"{path}: puzzle {index}"
    if not isinstance(entry, dict) or not {"name", "description", "sentences"} <= set(entry):
        raise PuzzleFileError(f"{where}: needs the keys name, description, sentences")
    sentences = entry["sentences"]
    if not isinstance(sentences, list) or not sentences:
        raise PuzzleFileError(f"{where} ({entry['name']}): sentences must be a non-empty list")
    records = []
    for j, sentence in enumerate(sentences):
        try:
            tokens = tuple(str(token) for token, _ in sentence)
            activations = np.array([float(value) for _, value in sentence], dtype=np.float32)
        except (TypeError, ValueError):
            raise PuzzleFileError(
                f"{where} ({entry['name']}), sentence {j}: expected [[token, activation], ...]") from None
        if not tokens or (activations < 0).any():
            raise PuzzleFileError(f"{where} ({entry['name']}), sentence {j}: empty, or a negative activation")
        records.append(ActivationRecord(-1 - j, tokens, (-1,) * len(tokens), activations))
    if not any(r.activations.any() for r in records):
        raise PuzzleFileError(f"{where} ({entry['name']}): no sentence has a non-zero activation")
    return Puzzle(str(entry["name"]), str(entry["description"]), tuple(records))
