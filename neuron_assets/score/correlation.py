"""The ``correlation`` scorer (Bills et al., Transluce): Pearson r between a simulator's
predicted activations and the true ones over every token of E_split (the split's top
exemplars plus its random sequences), concatenated; true = relu(a) for pos, relu(-a) for
neg; the fixed prefix is left out. Constant predictions score 0 and are flagged."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from neuron_assets.numeric import token_correlation
from neuron_assets.score.base import NO_EXAMPLES, Score, evaluation_records
from neuron_assets.simulate.base import Simulator, simulate_many
from neuron_assets.types import ActivationRecord, FeatureExemplars, Polarity, Split


def pearson_over_tokens(predicted: Sequence[np.ndarray], true: Sequence[np.ndarray]) -> Score:
    """Pearson r of two per-record token series, all records concatenated
    (:func:`neuron_assets.numeric.token_correlation`), as a Score."""
    correlation = token_correlation(predicted, true)
    flags = (correlation.flag,) if correlation.flag else ()
    return Score(correlation.value, flags, len(true), correlation.n_tokens)


def correlation_score(predicted: Sequence[np.ndarray], records: Sequence[ActivationRecord], polarity: Polarity) -> Score:
    """Pearson r over the records' tokens after their prefix; true = the polarity's activations."""
    return pearson_over_tokens(
        [np.asarray(p)[r.prefix_len :] for p, r in zip(predicted, records)],
        [r.polarity_activations(polarity)[r.prefix_len :] for r in records],
    )


class CorrelationScorer:
    name = "correlation"

    def __init__(self, simulator: Simulator, top: int = 20, random_count: int = 5):
        self.simulator_impl = simulator
        self.simulator = simulator.name
        self.top = top
        self.random_count = random_count

    def score(self, feature: FeatureExemplars, descriptions: Sequence[str], split: Split) -> list[Score]:
        return self.score_many([(feature, descriptions)], split)[0]

    def score_many(self, items: Sequence[tuple[FeatureExemplars, Sequence[str]]], split: Split) -> list[list[Score]]:
        """:meth:`score` of every (feature, descriptions), simulated together (a simulator
        that batches across features gets all their pairs at once)."""
        records = [evaluation_records(feature, split, self.top, self.random_count) for feature, _ in items]
        jobs = [(list(descriptions), rs) for (_, descriptions), rs in zip(items, records) if rs]
        simulated = iter(simulate_many(self.simulator_impl, jobs))
        out = []
        for (feature, descriptions), rs in zip(items, records):
            if not rs:
                out.append([Score(0.0, (NO_EXAMPLES,)) for _ in descriptions])
                continue
            out.append([correlation_score(per_record, rs, feature.feature.polarity) for per_record in next(simulated)])
        return out
