"""The ``semantic`` simulator: an offline simulator that reads the description's language.

The lexical rule rewards a description for the tokens it lists, so an explainer that lists
tokens is graded by its own vocabulary. This simulator instead asks a sentence-embedding
model (MiniLM, which the package ships) how close in meaning each piece of the text is to
the description, so "negation words" predicts ``not`` and ``never`` without naming them.

For a description ``d`` and the records of one call:

1. **Units.** Each record's text after its prefix is cut into *units* by characters: runs
   of letters and digits, and every other non-space character alone. Units are found in
   the text, not in any tokenizer's tokens, so the subject's tokenizer may be anything;
   a subject token takes the highest value of the units its characters overlap.
2. **Similarity.** A unit's meaning is two MiniLM vectors: the unit embedded alone (mean
   pooling, as sentence embeddings are made) and its contextual vector in the record
   (MiniLM run over the record's text; the mean of the last hidden states of the word
   pieces that overlap the unit, aligned by character offsets). The description is
   embedded as a sentence. The unit's similarity is
   ``w * cos(d, alone) + (1 - w) * cos(d, in context)``.
3. **Calibration.** Similarities are z-scored per description over every unit of the
   call (so a description is judged by which units it singles out, not by its overall
   closeness to the text), then mapped to 0..10 by ``10 * sigmoid(slope * (z - offset))``.
   ``w``, ``slope`` and ``offset`` are fitted on the fit half of the project's validity
   puzzles (:func:`neuron_assets.score.calibration.fit_calibration`, over
   :func:`neuron_assets.score.validity.project_puzzles`), for each simulator of this module
   on its own, and shipped as ``<simulator>_calibration.json`` next to this module.
4. **Quoted tokens.** A token the description quotes scores 10 by the lexical rule
   (:mod:`neuron_assets.simulate.lexical`, quoted spans only); a quoted token that the
   description places ``after`` / ``following`` (``before`` / ``preceding``) marks the
   token after (before) each of its occurrences instead. The prediction is the higher of
   this and the calibrated similarity.

Predictions depend on the records simulated together (step 3), as the correlation they are
scored by is computed over the same records concatenated. Unit and record vectors are
cached by text (bounded), so the k candidates of a feature share one pass over its exemplars.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from neuron_assets.embedding import BATCH_SIZE, UnitLayout, sentence_encoder
from neuron_assets.simulate.base import MAX_ACTIVATION, SimulatedActivations
from neuron_assets.simulate.lexical import BOILERPLATE, QUOTED, WORD, NamedTerms, simulate_lexically
from neuron_assets.types import ActivationRecord

def calibration_file(simulator: str) -> Path:
    """Where the shipped calibration of simulator ``semantic`` or ``hybrid`` lives."""
    return Path(__file__).with_name(f"{simulator}_calibration.json")

UNIT = re.compile(r"[^\W_]+|[^\w\s]|_", re.UNICODE)
SHIFT_AFTER = re.compile(r"\b(?:after|following|follows|preceded\s+by)\s+(?:an?\s+|the\s+)?(?:token\s+|word\s+)?$",
                         re.IGNORECASE)
SHIFT_BEFORE = re.compile(r"\b(?:before|preceding|precedes|followed\s+by)\s+(?:an?\s+|the\s+)?(?:token\s+|word\s+)?$",
                          re.IGNORECASE)


@dataclass(frozen=True)
class SemanticCalibration:
    """The monotone map from similarity to 0..10, fitted on the project's puzzle set."""

    context_weight: float = 0.5  # 1 - w: share of the contextual similarity
    slope: float = 2.0
    offset: float = 2.0  # in standard deviations of the description's similarities
    fitted_on: str = ""  # what it was fitted on, for people
    true_first: float | None = None  # the fit's true-first share on that set

    @classmethod
    def shipped(cls, simulator: str = "semantic") -> SemanticCalibration:
        path = calibration_file(simulator)
        return cls.read(path) if path.is_file() else cls()

    @classmethod
    def read(cls, path: Path) -> SemanticCalibration:
        return cls(**json.loads(Path(path).read_text()))

    def write(self, path: Path) -> None:
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)

    def activations(self, similarity: np.ndarray, mean: float, std: float) -> np.ndarray:
        z = (similarity - mean) / std if std > 1e-9 else np.zeros_like(similarity)
        return (MAX_ACTIVATION / (1.0 + np.exp(-self.slope * (z - self.offset)))).astype(np.float32)


class SemanticSimulator:
    """Simulator ``semantic``: see the module docstring."""

    name = "semantic"

    LAYOUT_CACHE = 20_000  # records whose unit layouts are kept

    def __init__(self, model: str = "builtin:all-MiniLM-L6-v2", device: str = "auto", batch_size: int = BATCH_SIZE,
                 calibration: SemanticCalibration | None = None, batch_tokens: int | None = None):
        self.encoder = sentence_encoder(model, device, batch_size, batch_tokens)
        self.calibration = calibration or SemanticCalibration.shipped(self.name)
        self._layouts: OrderedDict = OrderedDict()

    def simulate(self, descriptions: Sequence[str], records: Sequence[ActivationRecord]) -> SimulatedActivations:
        contextual = self.calibration.context_weight > 0
        return self.calibrated(self.similarities(descriptions, records, contextual), self.calibration)

    def predictions(self, raw: RawSimilarities, calibration: SemanticCalibration, descriptions: Sequence[str],
                    records: Sequence[ActivationRecord]) -> SimulatedActivations:
        """What :meth:`simulate` predicts under ``calibration``, from similarities computed once
        (a calibration fit tries many calibrations on one pass)."""
        return self.calibrated(raw, calibration)

    def simulate_many(self, jobs: Sequence[tuple[Sequence[str], Sequence[ActivationRecord]]]) -> list[SimulatedActivations]:
        """:meth:`simulate` of every job; the texts of all jobs are embedded first, in full batches."""
        contextual = self.calibration.context_weight > 0
        layouts = [self.layout(record) for _, records in jobs for record in records]
        self._embed_units(layouts)
        if contextual:
            self.encoder.encode_records(layouts)
        self.encoder.sentences([_description_text(d) for descriptions, _ in jobs for d in descriptions])
        return [self.simulate(descriptions, records) for descriptions, records in jobs]

    def similarities(self, descriptions: Sequence[str], records: Sequence[ActivationRecord],
                     contextual: bool = True) -> RawSimilarities:
        """Everything before calibration, so a fit tries many calibrations on one pass.
        Without ``contextual`` the in-context similarities are zeros (not computed)."""
        layouts = [self.layout(record) for record in records]
        alone = self._embed_units(layouts)
        if contextual:
            self.encoder.encode_records(layouts)
        described = self.encoder.sentences([_description_text(d) for d in descriptions])
        vectors = np.stack(described) if described else np.zeros((0, 1), dtype=np.float32)
        per_record = []  # (units, descriptions) similarities of each record, alone and in context
        for layout in layouts:
            if not layout.unit_texts:
                empty = np.zeros((0, len(descriptions)))
                per_record.append((empty, empty))
                continue
            iso = (np.stack([alone[u] for u in layout.unit_texts]) @ vectors.T).astype(np.float64)
            ctx = (self.encoder.unit_states(layout) @ vectors.T).astype(np.float64) if contextual else np.zeros(iso.shape)
            per_record.append((iso, ctx))
        per_description = [([(iso[:, d], ctx[:, d]) for iso, ctx in per_record], quoted_predictions(description, records))
                           for d, description in enumerate(descriptions)]
        return RawSimilarities(layouts, per_description)

    def layout(self, record: ActivationRecord) -> UnitLayout:
        """The record's :func:`unit_layout`, kept for the next call that has the record."""
        key = (record.prefix_len, tuple(record.tokens))
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = unit_layout(record)
            while len(self._layouts) > self.LAYOUT_CACHE:
                self._layouts.popitem(last=False)
        else:
            self._layouts.move_to_end(key)
        return layout

    def _embed_units(self, layouts: Sequence[UnitLayout]) -> dict[str, np.ndarray]:
        """Unit text -> its vector embedded alone (casefolded), for every unit of ``layouts``."""
        units = sorted({u for layout in layouts for u in layout.unit_texts})
        return dict(zip(units, self.encoder.sentences([u.casefold() for u in units]))) if units else {}

    @staticmethod
    def calibrated(raw: RawSimilarities, calibration: SemanticCalibration) -> SimulatedActivations:
        w = 1.0 - calibration.context_weight
        out = []
        for per_record, quoted in raw.per_description:
            mixed = [w * iso + (1 - w) * ctx for iso, ctx in per_record]
            pooled = np.concatenate(mixed) if mixed else np.zeros(0)
            mean, std = (float(pooled.mean()), float(pooled.std())) if pooled.size else (0.0, 0.0)
            predictions = []
            for layout, similarity, lexical in zip(raw.layouts, mixed, quoted):
                unit_values = calibration.activations(similarity, mean, std)
                predictions.append(np.maximum(layout.token_values(unit_values), lexical))
            out.append(predictions)
        return out


class HybridSimulator(SemanticSimulator):
    """Simulator ``hybrid``: exact where a description is literal, reading language where it
    is not. A *literal* description names tokens and nothing else (``the words "in" and
    "to"``, ``the token "def" after "("``: quoted spans with only filler words around them,
    :func:`is_literal`); it is predicted by the lexical rule over its quoted spans alone
    (:func:`quoted_predictions`, which also places spans said to come after or before
    another), so a description that names a token-exact feature's trigger scores what the
    lexical rule gives it. Every other description is predicted as ``semantic`` predicts it
    (the calibrated similarity, with the quoted tokens at 10): the calibration z-scores each
    description on its own, so the split changes nothing for the others."""

    name = "hybrid"

    def simulate(self, descriptions: Sequence[str], records: Sequence[ActivationRecord]) -> SimulatedActivations:
        literal = [is_literal(d) for d in descriptions]
        worded = [d for d, is_lit in zip(descriptions, literal) if not is_lit]
        read = iter(super().simulate(worded, records) if worded else [])
        return [quoted_predictions(d, records) if is_lit else next(read) for d, is_lit in zip(descriptions, literal)]

    def predictions(self, raw: RawSimilarities, calibration: SemanticCalibration, descriptions: Sequence[str],
                    records: Sequence[ActivationRecord]) -> SimulatedActivations:
        semantic = self.calibrated(raw, calibration)
        return [quoted_predictions(d, records) if is_literal(d) else predicted
                for d, predicted in zip(descriptions, semantic)]


# Words that may stand around the quoted spans of a literal description: the lexical rule's
# boilerplate, and a few that narrow or count without naming anything.
LITERAL_FILLER = BOILERPLATE | frozenset("only just exactly either both each every whenever single alone".split())


def is_literal(description: str | None) -> bool:
    """Whether a description names quoted tokens and nothing else (see :class:`HybridSimulator`)."""
    text = description or ""
    if not any(next(g for g in m.groups() if g is not None).strip() for m in QUOTED.finditer(text)):
        return False
    return all(word.casefold() in LITERAL_FILLER for word in WORD.findall(QUOTED.sub(" ", text)))


# -- units and their alignment to subject tokens ---------------------------------------------


def unit_layout(record: ActivationRecord) -> UnitLayout:
    body = record.tokens[record.prefix_len :]
    text = "".join(body)
    matches = list(UNIT.finditer(text))
    starts = np.array([m.start() for m in matches], dtype=np.int64)
    ends = np.array([m.end() for m in matches], dtype=np.int64)
    token_units: list[tuple[int, ...]] = [()] * record.prefix_len
    position = 0
    for token in body:
        a, b = position, position + len(token)
        token_units.append(tuple(np.nonzero((starts < b) & (ends > a))[0].tolist()) if matches else ())
        position = b
    return UnitLayout(len(record.tokens), text, tuple(m.group(0) for m in matches),
                      tuple((m.start(), m.end()) for m in matches), tuple(token_units))


@dataclass(frozen=True, eq=False)
class RawSimilarities:
    layouts: list[UnitLayout]
    # per description: ([(alone, in_context) similarities per record], [quoted-token predictions per record])
    per_description: list[tuple[list[tuple[np.ndarray, np.ndarray]], list[np.ndarray]]]


# -- quoted tokens ----------------------------------------------------------------------------


def quoted_predictions(description: str, records: Sequence[ActivationRecord]) -> list[np.ndarray]:
    """The lexical rule over the description's quoted spans only; spans the description
    places after (before) something mark the next (previous) token instead."""
    here, after, before = set(), set(), set()
    text = description or ""
    for match in QUOTED.finditer(text):
        span = next(group for group in match.groups() if group is not None).strip()
        if not span:
            continue
        lead = text[: match.start()]
        (after if SHIFT_AFTER.search(lead) else before if SHIFT_BEFORE.search(lead) else here).add(span.casefold())
    out = []
    for record in records:
        predicted = _lexical(here, record)
        if after:
            marked = _lexical(after, record)
            predicted[record.prefix_len + 1 :] = np.maximum(predicted[record.prefix_len + 1 :], marked[record.prefix_len : -1])
        if before:
            marked = _lexical(before, record)
            predicted[record.prefix_len : -1] = np.maximum(predicted[record.prefix_len : -1], marked[record.prefix_len + 1 :])
        out.append(predicted)
    return out


def _lexical(spans: set[str], record: ActivationRecord) -> np.ndarray:
    if not spans:
        return np.zeros(len(record.tokens), dtype=np.float32)
    words = frozenset(w.casefold() for span in spans for w in WORD.findall(span))
    return simulate_lexically(NamedTerms(frozenset(spans), words), record)


def _description_text(description: str | None) -> str:
    return " ".join((description or "").split()) or "nothing"
