"""The scoring paths as they were before pairs were batched across features, kept as the
reference the fast paths must equal (tests/test_simulate_fast.py) and beat (bench/simulate.py)."""

from __future__ import annotations

import numpy as np

from neuron_assets.simulate.semantic import (
    RawSimilarities,
    SemanticSimulator,
    _description_text,
    quoted_predictions,
    unit_layout,
)


def semantic_per_pair(simulator: SemanticSimulator, descriptions, records):
    """The semantic simulator's former path: layouts made on every call, one dot product per
    (description, record, unit) in Python."""
    contextual = simulator.calibration.context_weight > 0
    encoder = simulator.encoder
    layouts = [unit_layout(record) for record in records]
    units = sorted({u for layout in layouts for u in layout.unit_texts})
    alone = dict(zip(units, encoder.sentences([u.casefold() for u in units]))) if units else {}
    if contextual:
        encoder.encode_records(layouts)
    described = encoder.sentences([_description_text(d) for d in descriptions])
    per_description = []
    for d, vector in zip(descriptions, described):
        per_record = []
        for layout in layouts:
            iso = np.array([float(alone[u] @ vector) for u in layout.unit_texts], dtype=np.float64)
            ctx = (encoder.unit_states(layout) @ vector).astype(np.float64) if contextual and iso.size \
                else np.zeros(iso.size)
            per_record.append((iso, ctx))
        per_description.append((per_record, quoted_predictions(d, records)))
    return SemanticSimulator.calibrated(RawSimilarities(layouts, per_description), simulator.calibration)


def lexical_per_token(terms, record) -> np.ndarray:
    """The lexical rule's former path: every token's shape made again for every description."""
    from neuron_assets.simulate.lexical import EXACT, STEM, WHOLE_WORD, WORD, _shares_stem, _whole_words

    predicted = np.zeros(len(record.tokens), dtype=np.float32)
    if not terms.all:
        return predicted
    words = _whole_words(record.tokens, record.prefix_len)
    for position in range(record.prefix_len, len(record.tokens)):
        token, word = record.tokens[position], words[position]
        folded = token.strip().casefold()
        if not folded:
            continue
        core = "".join(WORD.findall(folded))
        if folded in terms.all or (core and core in terms.all):
            predicted[position] = EXACT
        elif not core:
            continue
        elif word.strip().casefold() in terms.all or "".join(WORD.findall(word.casefold())) in terms.all:
            predicted[position] = WHOLE_WORD
        elif any(_shares_stem(core, term) for term in terms.words):
            predicted[position] = STEM
    return predicted


class FormerLexical:
    """The lexical rule's former path, patched into the semantic simulator's quoted-token step."""

    def __enter__(self):
        from neuron_assets.simulate import semantic

        self._module, self._saved = semantic, semantic.simulate_lexically
        semantic.simulate_lexically = lexical_per_token
        return self

    def __exit__(self, *exc):
        self._module.simulate_lexically = self._saved
