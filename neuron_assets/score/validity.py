"""Scorer validity: does a scorer rank a feature's true description above false ones?

A score is only worth what its scorer can tell apart. This module measures that on
*validity puzzles*: token sequences with true activations, one true description and
several false ones of known kinds:

- ``too_broad``: a hypernym that also covers what does not fire ("computer terminology");
- ``too_narrow``: one member of what fires, quoted alone (``only the word "not"``);
- ``wrong_tokens``: frequent words of the same sequences that never fire, quoted;
- ``neighbour``: another puzzle's true description.

For every scorer it reports the share of puzzles whose true description scores highest
(ties share the credit, so a scorer that cannot tell descriptions apart scores exactly
chance, 1 / (1 + false descriptions)) and the mean margin (true minus the best false).

The project's puzzles are split once, half of each family each way (by a hash of the
puzzle's name): the ``fit`` half is the only one anything is tuned on (the semantic
calibration, the choice of the demo's selector), the ``heldout`` half is only reported on,
and its figures are the ones stored beside every score (``scorer_validity``, shown by
`show`, the report and the UI). An outside puzzle file is held out whole.

Puzzle sets:

- the project's own (:func:`project_puzzles`): exact-rule puzzles generated from the corpus
  (:func:`neuron_assets.explain.puzzles.generate_puzzles`: word sets, the token after a
  context, character classes, position) and concept puzzles (:data:`CONCEPTS`: the words
  of a concept fire, and the description names the concept, not its words);
- any file in OpenAI's puzzle layout (:func:`load_openai_puzzles`), as an outside check:
  ``{name: {"explanation": str, "sentences": [[token | [token, activation], ...], ...],
  "false_explanations": [str, ...]}}``, a bare token meaning activation 0.

The semantic simulator's calibration is fitted on the project's fit half only
(:mod:`neuron_assets.score.calibration`); an outside file is never used for tuning.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from neuron_assets.types import (
    ActivationRecord,
    Exemplar,
    Sample,
    FeatureExemplars,
    FeatureId,
    FeatureStats,
    Polarity,
    Split,
)

TOO_BROAD, TOO_NARROW, WRONG_TOKENS, NEIGHBOUR = "too_broad", "too_narrow", "wrong_tokens", "neighbour"
FIT, HELDOUT = "fit", "heldout"  # the two halves of the project's puzzles
FALSE_KINDS = (TOO_BROAD, TOO_NARROW, WRONG_TOKENS, NEIGHBOUR)
ACTIVATION = 10.0
WINDOW = 32  # tokens per concept-puzzle sentence
CONTEXT_BEFORE = 8  # tokens kept before a sentence's first firing token
FIRING_SENTENCES = 6
QUIET_SENTENCES = 3
MIN_FIRING = 3  # a concept that fires in fewer corpus sequences is left out
SIGNIFICANCE_Z = 2.0  # "a clear margin": the true-first rate beats chance by this many standard errors


class PuzzleFileError(ValueError):
    """A puzzle file that cannot be read; the message names the file, the puzzle and the fix."""


@dataclass(frozen=True)
class FalseDescription:
    kind: str  # one of FALSE_KINDS, or "given" for a file's false explanations
    text: str


@dataclass(frozen=True)
class ValidityPuzzle:
    """Sequences with true activations (>= 0), the true description and false ones."""

    name: str
    family: str  # "rule", "concept", or the file's stem
    description: str
    false_descriptions: tuple[FalseDescription, ...]
    records: tuple[ActivationRecord, ...]
    split: str = HELDOUT  # FIT: may be tuned on; HELDOUT: only reported on

    @property
    def descriptions(self) -> list[str]:
        """The true description first, then the false ones."""
        return [self.description, *(f.text for f in self.false_descriptions)]

    @property
    def chance(self) -> float:
        return 1.0 / (1 + len(self.false_descriptions))

    def as_feature(self) -> FeatureExemplars:
        """The puzzle as the pipeline's scorers read a feature: sequences that fire are its
        val top exemplars, quiet ones its val random sequences."""
        exemplars = []
        firing = sorted((r for r in self.records if r.activations.max(initial=0) > 0),
                        key=lambda r: -float(r.activations.max()))
        for rank, record in enumerate(firing):
            exemplars.append(Exemplar(Split.VAL, Sample.TOP, rank, float(record.activations.max()), record))
        quiet = [r for r in self.records if not r.activations.max(initial=0) > 0]
        for rank, record in enumerate(quiet):
            exemplars.append(Exemplar(Split.VAL, Sample.RANDOM, rank, 0.0, record))
        peak = max((float(r.activations.max(initial=0)) for r in self.records), default=0.0)
        return FeatureExemplars(FeatureId(-1, 0, Polarity.POS, kind="puzzle"),
                                FeatureStats(peak, 0.0, 0.0, 0.0), tuple(exemplars))


# -- measuring ------------------------------------------------------------------------------

PuzzleScorer = Callable[[ValidityPuzzle], Sequence[float]]
"""One score per description of a puzzle (``puzzle.descriptions`` order: true first)."""


@dataclass(frozen=True)
class ValidityRow:
    """How one scorer did on one puzzle set."""

    puzzle_set: str
    scorer: str  # "correlation/<simulator>", "embedding", ...
    split: str  # FIT or HELDOUT
    puzzles: int
    true_first: float  # share of puzzles whose true description scores highest (ties share)
    chance: float  # the share a scorer blind to descriptions gets
    mean_margin: float  # true minus best false, averaged over puzzles
    beats_chance: bool  # true_first >= chance + SIGNIFICANCE_Z standard errors of chance
    per_family: Mapping[str, float]  # true_first per puzzle family

    def as_dict(self) -> dict:
        return {"puzzle_set": self.puzzle_set, "scorer": self.scorer, "split": self.split, "puzzles": self.puzzles,
                "true_first": self.true_first, "chance": self.chance, "mean_margin": self.mean_margin,
                "beats_chance": self.beats_chance, "per_family": json.dumps(dict(self.per_family), sort_keys=True)}


def measure_validity(puzzles: Sequence[ValidityPuzzle], scorers: Mapping[str, PuzzleScorer],
                     puzzle_set: str = "project", on_scored: Callable[[int], object] | None = None) -> list[ValidityRow]:
    """Every scorer on every puzzle: the true-first share, the chance share and the margin, one
    row per scorer and split of the puzzles (held-out first)."""
    if not puzzles:
        raise ValueError(f"puzzle set '{puzzle_set}' has no puzzles")
    rows = []
    splits = sorted({p.split for p in puzzles}, key=lambda s: s != HELDOUT)
    for name, scorer in scorers.items():
        values_of = {}
        for puzzle in puzzles:
            values_of[id(puzzle)] = np.asarray(scorer(puzzle), dtype=np.float64)
            if on_scored is not None:
                on_scored(1)
        for split in splits:
            rows.append(_measured(puzzle_set, name, split, [p for p in puzzles if p.split == split], values_of))
    return rows


def _measured(puzzle_set: str, name: str, split: str, puzzles, values_of) -> ValidityRow:
    credits, margins, families = [], [], {}
    for puzzle in puzzles:
        values = values_of[id(puzzle)]
        if values.shape != (len(puzzle.descriptions),):
            raise ValueError(f"scorer {name} gave {values.size} scores for {len(puzzle.descriptions)} "
                             f"descriptions of puzzle {puzzle.name}")
        credit = true_first_credit(values)
        credits.append(credit)
        margins.append(float(values[0] - values[1:].max()) if values.size > 1 else 0.0)
        families.setdefault(puzzle.family, []).append(credit)
    return _row(puzzle_set, name, split, puzzles, credits, margins, families)


def true_first_credit(values: np.ndarray) -> float:
    """1 when the first (true) value is the strict maximum, 1/n when n values tie for it, else 0."""
    best = values.max()
    if values[0] < best - 1e-9:
        return 0.0
    return 1.0 / int((values >= best - 1e-9).sum())


def clear_margin(chance: float, n: int) -> float:
    """The true-first share a scorer must reach to beat ``chance`` clearly on ``n`` puzzles."""
    return chance + SIGNIFICANCE_Z * math.sqrt(chance * (1 - chance) / max(n, 1))


def _row(puzzle_set, name, split, puzzles, credits, margins, families) -> ValidityRow:
    chance = float(np.mean([p.chance for p in puzzles]))
    true_first = float(np.mean(credits))
    return ValidityRow(puzzle_set, name, split, len(puzzles), true_first, chance, float(np.mean(margins)),
                       true_first >= clear_margin(chance, len(puzzles)),
                       {family: float(np.mean(values)) for family, values in sorted(families.items())})


def correlation_scorer(simulator) -> PuzzleScorer:
    """Pearson r of the simulator's predictions, exactly as the pipeline's correlation scorer
    computes it on E_val (every sequence of the puzzle)."""
    from neuron_assets.score import CorrelationScorer

    def score(puzzle: ValidityPuzzle) -> list[float]:
        scorer = CorrelationScorer(simulator, top=len(puzzle.records), random_count=len(puzzle.records))
        return [s.value for s in scorer.score(puzzle.as_feature(), puzzle.descriptions, Split.VAL)]

    return score


def embedding_scorer(embed: Callable[[list[str]], np.ndarray]) -> PuzzleScorer:
    """The pipeline's embedding scorer (AUC of firing against quiet sequences)."""
    from neuron_assets.score import EmbeddingScorer

    def score(puzzle: ValidityPuzzle) -> list[float]:
        scorer = EmbeddingScorer(embed, top=len(puzzle.records), random_count=len(puzzle.records))
        return [s.value for s in scorer.score(puzzle.as_feature(), puzzle.descriptions, Split.VAL)]

    return score


# -- the project's puzzle set ------------------------------------------------------------------


@dataclass(frozen=True)
class Concept:
    name: str
    description: str  # names the concept, never lists its words
    broader: str  # a too-broad description
    words: frozenset[str]  # case-folded whole words that fire


def _concept(name: str, description: str, broader: str, words: str) -> Concept:
    return Concept(name, description, broader, frozenset(words.split()))


CONCEPTS: tuple[Concept, ...] = (
    _concept("negation", "negation words that deny or exclude something", "short English function words",
             "not no never cannot without nor neither nothing nobody"),
    _concept("numbers", "numbers, written as digits or as number words", "words about amounts",
             "zero one two three four five six seven eight nine ten hundred thousand million "
             "0 1 2 3 4 5 6 7 8 9 10 16 32 64 100 255 256 1000"),
    _concept("keywords", "Python statement keywords that open or control a block of code", "programming terminology",
             "def class return import yield while try except raise pass break continue lambda elif finally"),
    _concept("builtin_types", "names of Python's built-in data types", "programming terminology",
             "int str list dict tuple float bool bytes set frozenset bytearray complex"),
    _concept("errors", "words about errors and exceptions", "technical computing vocabulary",
             "error errors exception exceptions warning warnings traceback fail fails failed failure"),
    _concept("files", "words about files and folders on disk", "computer terminology",
             "file files path paths directory directories filename filenames folder folders"),
    _concept("modal_verbs", "modal verbs expressing possibility or obligation", "verbs",
             "can must should will would may might could shall"),
    _concept("pronouns", "personal pronouns", "short common English words",
             "it they you we he she them us i me him her"),
    _concept("time", "words about time and dates", "words about measurement",
             "time times date dates second seconds day days year years month months hour hours minute minutes "
             "timeout clock"),
    _concept("networking", "computer networking terms", "computer terminology",
             "socket sockets server servers host hosts port ports connection connections protocol protocols http "
             "url network"),
    _concept("booleans", "the boolean truth values", "Python values and constants", "true false"),
    _concept("ordinals", "words that give a position in an order", "adjectives",
             "first second third last next previous final"),
    _concept("concurrency", "words about running work concurrently", "computer terminology",
             "thread threads threading process processes lock locks queue async await concurrent parallel"),
    _concept("input_output", "verbs for reading and writing data", "verbs",
             "read reads write writes open opens close closes print input output load save"),
    _concept("strings", "words about text strings and characters", "programming terminology",
             "string strings character characters text unicode ascii substring"),
    _concept("arithmetic", "words for arithmetic operations", "words about mathematics",
             "add addition subtract subtraction multiply multiplication divide division remainder modulo sum product"),
    _concept("arguments", "words about the arguments a function takes", "programming terminology",
             "argument arguments parameter parameters keyword keywords default defaults"),
    _concept("callables", "words for functions and methods", "programming terminology",
             "function functions method methods callable callables call calls"),
    _concept("objects", "words about objects and their attributes", "programming terminology",
             "object objects instance instances attribute attributes"),
    _concept("inheritance", "words about class inheritance", "words about families",
             "subclass subclasses superclass inherit inherits inherited inheritance derived"),
    _concept("iteration", "words about iterating over items", "programming terminology",
             "iterate iterates iteration iterator iterators loop loops generator generators"),
    _concept("memory", "words about computer memory", "computer terminology",
             "memory buffer buffers allocate allocated allocation garbage"),
    _concept("security", "words about security and secrets", "computer terminology",
             "password passwords secret secrets secure security encrypt encryption"),
    _concept("operating_systems", "names of operating systems and platforms", "computer terminology",
             "windows linux unix posix macos platform platforms"),
    _concept("databases", "words about databases and queries", "computer terminology",
             "database databases sql query queries table tables row rows column columns"),
    _concept("markup", "words about markup languages", "computer terminology",
             "html xml tag tags element elements markup"),
    _concept("compression", "words about compressing data", "computer terminology",
             "compress compressed compression decompress zip gzip archive archives"),
    _concept("testing", "words about testing code", "programming terminology",
             "test tests testing assert assertion assertions doctest unittest"),
    _concept("logging", "words about logging messages", "computer terminology",
             "log logs logging logger loggers debug"),
    _concept("encodings", "words about encoding and decoding data", "computer terminology",
             "encode encodes encoding encodings decode decodes decoding utf codec codecs"),
    _concept("sorting", "words about putting things in order", "verbs",
             "sort sorted sorting reverse reversed ascending descending"),
    _concept("copying", "words about copying", "verbs", "copy copies copied copying deepcopy clone"),
    _concept("randomness", "words about randomness", "words about measurement",
             "random randomly seed shuffle shuffled"),
    _concept("size_words", "adjectives of size", "adjectives",
             "large larger largest small smaller smallest big bigger huge tiny"),
    _concept("emptiness", "words meaning empty or absent values", "Python values and constants",
             "empty none null void blank"),
    _concept("mutability", "words about changing a value", "verbs",
             "mutable immutable modify modifies modified change changes changed"),
    _concept("speed", "words about speed and performance", "adjectives",
             "fast faster fastest slow slower quick quickly speed performance efficient"),
    _concept("versions", "words about software versions", "words about time and dates",
             "version versions release releases deprecated"),
    _concept("packages", "words about modules and packages", "programming terminology",
             "module modules package packages library libraries"),
    _concept("terminals", "words about terminals and screens", "computer terminology",
             "terminal terminals console screen display keyboard"),
    _concept("punctuation_names", "names of punctuation marks", "words about text",
             "comma commas colon semicolon bracket brackets parenthesis parentheses quote quotes"),
    _concept("text_units", "units of written text", "words about text",
             "line lines sentence sentences paragraph paragraphs"),
    _concept("comparison", "words about comparing values", "verbs",
             "equal equals less greater compare compares comparison comparisons"),
    _concept("number_bases", "names of number bases", "words about amounts",
             "hex hexadecimal binary octal decimal"),
    _concept("regular_expressions", "words about regular expressions", "programming terminology",
             "regex regular expression expressions match matches matching"),
    _concept("scope", "words about variable scope and namespaces", "programming terminology",
             "global globals local locals nonlocal scope scopes namespace namespaces"),
    _concept("dictionaries", "words about mappings from keys to values", "programming terminology",
             "key keys value values mapping mappings dictionary dictionaries"),
    _concept("names", "words about names", "words about text", "name names named rename renamed"),
    _concept("start_stop", "words about starting and stopping", "verbs",
             "start starts started stop stops stopped begin begins finish finished"),
    _concept("users", "words for people who use software", "short common English words",
             "user users person people programmer programmers developer developers"),
    _concept("questions", "question words", "short common English words", "what why how who whom whose"),
    _concept("quantities", "words for vague quantities", "short common English words", "many few several"),
    _concept("frequency", "adverbs of frequency", "adverbs", "always sometimes often usually rarely"),
    _concept("permissions", "words about permission", "words about law", "allow allowed allows permission permissions"),
    _concept("creation", "words about creating things", "verbs", "create creates created creating new"),
    _concept("deletion", "words about deleting things", "verbs", "delete deletes deleted remove removes removed"),
    _concept("results", "words for the results of a computation", "nouns", "result results"),
    _concept("examples", "words for examples", "nouns", "example examples sample samples"),
    _concept("documentation", "words about documentation and comments", "words about text",
             "documentation docs docstring docstrings comment comments"),
    _concept("lengths", "words about sizes and counts", "words about measurement",
             "length lengths size sizes count counts"),
    _concept("math_functions", "names of mathematical functions", "words about mathematics",
             "sin cos tan sqrt exp floor ceil abs round"),
    _concept("data_formats", "names of data file formats", "computer terminology", "json csv yaml toml pickle"),
    _concept("addresses", "words about network addresses", "computer terminology", "address addresses ip ipv4 ipv6"),
    _concept("events", "words about events and their handlers", "programming terminology",
             "event events callback callbacks handler handlers"),
    _concept("images", "words about images", "nouns", "image images pixel pixels picture"),
)

RULE_WORD_SETS, RULE_CONTEXTS = 28, 14  # rule puzzles of each kind tried (those that fire survive)

RULE_BROADER = {
    "before": "words in the middle of a sentence",
    "word_set": "common English words",
    "after": "words in the middle of a sentence",
    "char_class": "any token of the text",
    "position": "tokens at the edges of the text",
}


def project_puzzles(corpus: Sequence[ActivationRecord], seed: int = 0) -> list[ValidityPuzzle]:
    """The project's validity set from corpus sequences (their prefixes dropped): the
    exact-rule puzzles, then the concept puzzles, each with one false description of every
    kind in :data:`FALSE_KINDS`. Sequence ids are renumbered so that no two windows share one."""
    from neuron_assets.explain.puzzles import generate_puzzles

    rng = random.Random(seed)
    rules = generate_puzzles(corpus, seed=seed, word_sets=RULE_WORD_SETS, contexts=RULE_CONTEXTS, more_classes=True)
    drafts = [("rule", p.name, p.description, RULE_BROADER.get(p.name.split(":")[0], "any token of the text"),
               p.records) for p in rules]
    sequences = _sequences(corpus)
    for concept in CONCEPTS:
        records = _concept_records(concept, sequences, rng)
        if records is not None:
            drafts.append(("concept", concept.name, concept.description, concept.broader, records))
    puzzles = []
    for i, (family, name, description, broader, records) in enumerate(drafts):
        neighbour = _neighbour(drafts, i)
        falses = (
            FalseDescription(TOO_BROAD, broader),
            FalseDescription(TOO_NARROW, _narrower(records)),
            FalseDescription(WRONG_TOKENS, _wrong_tokens(records)),
            FalseDescription(NEIGHBOUR, neighbour),
        )
        puzzles.append(ValidityPuzzle(name, family, description, falses, records, _split_of(drafts, i)))
    return _renumbered(puzzles)


def _split_of(drafts, i: int) -> str:
    """FIT or HELDOUT: within each family the puzzles ordered by a hash of their name take
    turns, so each half holds half of every family and a puzzle keeps its half however many
    others a corpus yields."""
    family = drafts[i][0]
    ranked = sorted((j for j in range(len(drafts)) if drafts[j][0] == family),
                    key=lambda j: hashlib.sha256(drafts[j][1].encode()).hexdigest())
    return FIT if ranked.index(i) % 2 == 0 else HELDOUT


def _sequences(corpus: Sequence[ActivationRecord]) -> list[tuple[str, ...]]:
    seen, sequences = set(), []
    for record in sorted(corpus, key=lambda r: r.seq_id):
        if record.seq_id in seen:
            continue
        seen.add(record.seq_id)
        tokens = tuple(record.tokens[record.prefix_len :])
        if tokens:
            sequences.append(tokens)
    return sequences


def _concept_records(concept: Concept, sequences, rng: random.Random) -> tuple[ActivationRecord, ...] | None:
    order = list(range(len(sequences)))
    rng.shuffle(order)
    firing, quiet = [], []
    for index in order:
        tokens = sequences[index]
        hits = [i for i in range(len(tokens)) if _fires(concept, tokens, i)]
        start = max(0, hits[0] - CONTEXT_BEFORE) if hits else 0
        window = tokens[start : start + WINDOW]
        activations = np.array([ACTIVATION if _fires(concept, window, i) else 0.0 for i in range(len(window))],
                               dtype=np.float32)
        if activations.any() and len(firing) < FIRING_SENTENCES:
            firing.append(ActivationRecord(0, window, (-1,) * len(window), activations))
        elif not activations.any() and len(quiet) < QUIET_SENTENCES:
            quiet.append(ActivationRecord(0, window, (-1,) * len(window), activations))
        if len(firing) >= FIRING_SENTENCES and len(quiet) >= QUIET_SENTENCES:
            break
    if len(firing) < MIN_FIRING:
        return None
    chosen = firing + quiet
    rng.shuffle(chosen)
    return tuple(chosen)


def _fires(concept: Concept, tokens: Sequence[str], i: int) -> bool:
    """A token fires when it is a whole word (or number) of the concept: nothing of the same
    word before or after it."""
    core = tokens[i].strip().casefold()
    if core not in concept.words:
        return False
    before = tokens[i - 1][-1:] if i > 0 else " "
    after = tokens[i + 1][:1] if i + 1 < len(tokens) else " "
    starts = tokens[i][:1].isspace() or not before.isalnum()
    return starts and not after.isalnum()


def _narrower(records: Sequence[ActivationRecord]) -> str:
    """One token of those that fire, quoted alone: the second most frequent (the most
    frequent when only one kind fires), so that it covers part of the activations."""
    counts = Counter(t.strip() for r in records for t, a in zip(r.tokens, r.activations) if a > 0 and t.strip())
    ranked = [t for t, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
    chosen = ranked[1] if len(ranked) > 1 else ranked[0] if ranked else "the"
    return f'only the token "{chosen}"'


def _wrong_tokens(records: Sequence[ActivationRecord]) -> str:
    """The three most frequent words of the sequences that never fire there, quoted."""
    firing = {t.strip().casefold() for r in records for t, a in zip(r.tokens, r.activations) if a > 0}
    counts = Counter(t.strip() for r in records for t in r.tokens
                     if t.strip().isalpha() and len(t.strip()) >= 3 and t.strip().casefold() not in firing)
    words = [t for t, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))][:3] or ["the"]
    quoted = [f'"{w}"' for w in words]
    return "the words " + (", ".join(quoted[:-1]) + f" and {quoted[-1]}" if len(quoted) > 1 else quoted[0])


def _neighbour(drafts, i: int) -> str:
    """The true description of the next puzzle of the same family (the next one at all
    when the family has one puzzle)."""
    family = drafts[i][0]
    same = [j for j in range(len(drafts)) if drafts[j][0] == family]
    pool = same if len(same) > 1 else list(range(len(drafts)))
    if len(pool) < 2:
        return "the word \"the\""
    position = pool.index(i) if i in pool else 0
    return drafts[pool[(position + 1) % len(pool)]][2]


def _renumbered(puzzles: Sequence[ValidityPuzzle]) -> list[ValidityPuzzle]:
    out, next_id = [], 0
    for puzzle in puzzles:
        records = []
        for record in puzzle.records:
            records.append(ActivationRecord(next_id, tuple(record.tokens), tuple(record.token_ids),
                                            np.asarray(record.activations, dtype=np.float32)))
            next_id += 1
        out.append(ValidityPuzzle(puzzle.name, puzzle.family, puzzle.description, puzzle.false_descriptions,
                                  tuple(records), puzzle.split))
    return out


# -- OpenAI's puzzle layout ----------------------------------------------------------------------


def load_openai_puzzles(path: str | os.PathLike) -> list[ValidityPuzzle]:
    """Puzzles in OpenAI's layout (neuron-explainer's ``puzzles.json``)::

        {"name": {"explanation": "...", "false_explanations": ["...", ...],
                  "sentences": [["The", [" cat", 10], ...], ...]}, ...}

    A bare token has activation 0. Every error names the file, the puzzle and the fix.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise PuzzleFileError(f"cannot read puzzle file {path}: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PuzzleFileError(f"puzzle file {path} is not JSON: {err}") from None
    if not isinstance(raw, dict) or not raw:
        raise PuzzleFileError(f"{path}: expected a non-empty JSON object {{name: {{explanation, sentences, "
                              "false_explanations}}, ...}} (OpenAI's puzzle layout)")
    puzzles = [_openai_puzzle(str(name), entry, path) for name, entry in raw.items()]
    return _renumbered(puzzles)


def _openai_puzzle(name: str, entry, path: Path) -> ValidityPuzzle:
    where = f"{path}: puzzle '{name}'"
    if not isinstance(entry, dict):
        raise PuzzleFileError(f"{where}: expected an object with explanation, sentences, false_explanations")
    missing = [key for key in ("explanation", "sentences", "false_explanations") if key not in entry]
    if missing:
        raise PuzzleFileError(f"{where}: missing {', '.join(missing)}")
    explanation = entry["explanation"]
    falses = entry["false_explanations"]
    if not isinstance(explanation, str) or not explanation.strip():
        raise PuzzleFileError(f"{where}: explanation must be a non-empty string")
    if not isinstance(falses, list) or not falses or not all(isinstance(f, str) and f.strip() for f in falses):
        raise PuzzleFileError(f"{where}: false_explanations must be a non-empty list of non-empty strings")
    sentences = entry["sentences"]
    if not isinstance(sentences, list) or not sentences:
        raise PuzzleFileError(f"{where}: sentences must be a non-empty list of token lists")
    records = tuple(_openai_sentence(sentence, f"{where}, sentence {j}") for j, sentence in enumerate(sentences))
    if not any(r.activations.any() for r in records):
        raise PuzzleFileError(f"{where}: no token has a non-zero activation (write active tokens as [token, value])")
    return ValidityPuzzle(name, path.stem, explanation.strip(),
                          tuple(FalseDescription("given", f.strip()) for f in falses), records)


def _openai_sentence(sentence, where: str) -> ActivationRecord:
    if not isinstance(sentence, list) or not sentence:
        raise PuzzleFileError(f"{where}: expected a non-empty list of tokens")
    tokens, activations = [], []
    for k, item in enumerate(sentence):
        if isinstance(item, str):
            tokens.append(item)
            activations.append(0.0)
            continue
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                or isinstance(item[1], bool) or not isinstance(item[1], (int, float))):
            raise PuzzleFileError(f"{where}, token {k}: expected a token string or [token, activation], got {item!r}")
        value = float(item[1])
        if not math.isfinite(value) or value < 0:
            raise PuzzleFileError(f"{where}, token {k}: activation {item[1]!r} must be a finite number >= 0")
        tokens.append(item[0])
        activations.append(value)
    return ActivationRecord(0, tuple(tokens), (-1,) * len(tokens), np.array(activations, dtype=np.float32))



# -- the project's report: every simulator and scorer on the puzzle sets ---------------------------

VALIDITY_TABLE = "scorer_validity"


@dataclass(frozen=True)
class ValidityReport:
    rows: tuple[ValidityRow, ...]
    selecting: str  # the scorer whose correlation selects: correlation/<simulate.backend>
    skipped: Mapping[str, str]  # scorer -> why it was not measured here

    def row(self, scorer: str, puzzle_set: str = "project", split: str = HELDOUT) -> ValidityRow | None:
        return next((r for r in self.rows if r.scorer == scorer and r.puzzle_set == puzzle_set and r.split == split),
                    None)

    @property
    def selecting_beats_chance(self) -> bool | None:
        """Whether the selecting simulator beats chance clearly on the project's held-out
        puzzles (None: not measured)."""
        row = self.row(self.selecting)
        return None if row is None else row.beats_chance


def validate_scorers(config, corpus: Sequence[ActivationRecord] | None = None,
                     puzzle_files: Sequence[str | os.PathLike] = (), log: Callable[[str], None] = lambda _: None,
                     simulators: Mapping[str, object] | None = None, progress=None) -> ValidityReport:
    """Every simulator that can run here (lexical, semantic, finetuned when a checkpoint
    exists, prompted when configured, and the configured backend) through the correlation
    scorer, and the embedding scorer, on the project's puzzles from ``corpus`` (default: the
    stored ``sequences`` table, else the configured corpus tokenized by the subject's
    tokenizer) and on each file in OpenAI's layout. ``simulators`` replaces the built ones
    (name -> simulator), for tests; ``progress`` (a neuron_assets.progress.Progress) counts
    the puzzles scored."""
    from neuron_assets.progress import Progress

    sets = {"project": project_puzzles(corpus if corpus is not None else project_corpus(config),
                                       seed=config.corpus.seed)}
    for path in puzzle_files:
        sets[Path(path).name] = load_openai_puzzles(path)
    skipped: dict[str, str] = {}
    built = dict(simulators) if simulators is not None else _build_simulators(config, skipped, log)
    scorers: dict[str, PuzzleScorer] = {f"correlation/{name}": correlation_scorer(sim) for name, sim in built.items()}
    if "embedding" in config.score.scorers and simulators is None:
        from neuron_assets.embedding import sentence_encoder

        scorers["embedding"] = embedding_scorer(sentence_encoder(config.score.embedding_model))
    rows: list[ValidityRow] = []
    total = sum(len(puzzles) for puzzles in sets.values()) * len(scorers)
    with (progress or Progress([])).task(f"scorer validity ({len(scorers)} scorers)", total, "puzzle") as task:
        for set_name, puzzles in sets.items():
            log(f"scorer validity: {len(puzzles)} puzzles in set {set_name}, {len(scorers)} scorers")
            if not puzzles:  # a corpus too small for any rule or concept to fire in 3 sequences
                skipped[f"puzzle set {set_name}"] = "no puzzles: the corpus is too small for any puzzle rule"
                continue
            rows += measure_validity(puzzles, scorers, set_name, on_scored=task.advance)
    return ValidityReport(tuple(rows), f"correlation/{config.simulate.backend}", skipped)


def _build_simulators(config, skipped: dict[str, str], log) -> dict[str, object]:
    from neuron_assets.simulate import SIMULATORS, SimulatorUnavailable, build_simulator

    checkpoint = None
    if config.simulate.finetuned.checkpoint is None:
        from neuron_assets.simulate.checkpoints import latest_checkpoint
        from neuron_assets.store import Store

        found = latest_checkpoint(Store(config.store_root), config)
        checkpoint = found[1] if found else None
    wanted = ["lexical", "semantic", "hybrid", config.simulate.backend, *config.simulate.compare_with, "finetuned"]
    if config.simulate.prompted.model:
        wanted.append("prompted")
    built = {}
    for name in dict.fromkeys(wanted):
        if name not in SIMULATORS:
            continue
        try:
            built[name] = build_simulator(config, checkpoint, name)
        except (SimulatorUnavailable, ValueError, OSError) as err:
            skipped[f"correlation/{name}"] = str(err)
            log(f"scorer validity: correlation/{name} skipped: {err}")
    return built


def project_corpus(config) -> list[ActivationRecord]:
    """The run's corpus as records (its stored sequences, else built from the config): what
    :func:`project_puzzles` cuts the project's puzzles from."""
    from neuron_assets.explain.best_of_k import corpus_from_sequences
    from neuron_assets.store import Store

    store = Store(config.store_root)
    if store.exists("sequences"):
        sequences = store.read("sequences")
    else:
        from neuron_assets.corpus import build_sequences
        from neuron_assets.subject import load_tokenizer

        sequences = build_sequences(config.corpus, load_tokenizer(config.subject))
    return corpus_from_sequences(sequences, seed=config.corpus.seed)


def report_frame(report: ValidityReport):
    """The report as the ``scorer_validity`` table's rows (without lineage)."""
    import polars as pl

    rows = [dict(r.as_dict(), selecting=r.scorer == report.selecting) for r in report.rows]
    schema = {"puzzle_set": pl.String, "scorer": pl.String, "split": pl.String, "puzzles": pl.Int32,
              "true_first": pl.Float64,
              "chance": pl.Float64, "mean_margin": pl.Float64, "beats_chance": pl.Boolean, "per_family": pl.String,
              "selecting": pl.Boolean}
    return pl.DataFrame(rows, schema=schema)


def report_table(report: ValidityReport) -> tuple[list[str], list[list]]:
    """Header and rows for people (the CLI's table, the asset's markdown)."""
    header = ["puzzle set", "split", "scorer", "puzzles", "true first", "chance", "clear margin", "mean margin",
              "beats chance"]
    body = [[r.puzzle_set, r.split, r.scorer + (" (selects)" if r.scorer == report.selecting else ""), r.puzzles,
             f"{r.true_first:.2f}", f"{r.chance:.2f}", f"{clear_margin(r.chance, r.puzzles):.2f}",
             f"{r.mean_margin:+.3f}", "yes" if r.beats_chance else "no"] for r in report.rows]
    return header, body


def stored_validity(store, scorer: str, puzzle_set: str = "project") -> dict | None:
    """``scorer``'s held-out row of the stored ``scorer_validity`` table (``scorer``:
    ``correlation/<simulator>``, ``embedding``, ...), or None when it was not measured."""
    import polars as pl

    if not store.exists(VALIDITY_TABLE):
        return None
    frame = store.read(VALIDITY_TABLE).filter((pl.col("scorer") == scorer) & (pl.col("puzzle_set") == puzzle_set))
    if "split" in frame.columns:
        frame = frame.filter(pl.col("split") == HELDOUT)
    else:  # written before the puzzles were split: the figures are in-sample
        frame = frame.with_columns(pl.lit("all").alias("split"))
    return frame.row(0, named=True) if frame.height else None


def validity_sentence(scorer: str, row: dict | None) -> str:
    """What a score's reader is told about its scorer: how often it ranks a true description
    first on puzzles nothing was fitted on, against chance."""
    if row is None:
        return (f"{scorer}: validity not measured in this store (materialize scorer_validity, or run "
                "neuron-assets validate-scorers)")
    which = "held-out" if row["split"] == HELDOUT else "in-sample (not held-out)"
    verdict = "clearly above chance" if row["beats_chance"] else "not clearly above chance"
    return (f"{scorer} ranks a true description first on {row['true_first']:.0%} of {row['puzzles']} {which} "
            f"puzzles (chance {row['chance']:.0%}: {verdict})")


def scorer_key(scorer: str, simulator: str | None) -> str:
    """The scorer_validity name of a score row's scorer: correlation/<simulator>, or the scorer."""
    return f"{scorer}/{simulator}" if scorer == "correlation" and simulator else scorer
