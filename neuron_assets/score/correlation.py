"""The ``correlation`` scorer (Bills et al., Transluce): Pearson r between a simulator's
predicted activations and the true ones over every token of E_split (the split's top
exemplars plus its random sequences), concatenated; true = relu(a) for pos, relu(-a) for
neg; the fixed prefix is left out. Constant predictions score 0 and are flagged."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from neuron_assets.score.base import (
    CONSTANT_ACTIVATION,
    CONSTANT_PREDICTION,
    NO_EXAMPLES,
    TOO_FEW_TOKENS,
    Score,
    evaluation_records,
)
from neuron_assets.simulate.base import Simulator, simulate_many
from neuron_assets.types import ActivationRecord, FeatureExemplars, Polarity, Split


def pearson_over_tokens(predicted: Sequence[np.ndarray], true: Sequence[np.ndarray]) -> Score:
    """Pearson r of two per-record token series, all records concatenated."""
    if len(predicted) != len(true):
        raise ValueError(f"{len(predicted)} predicted records for {len(true)} true ones")
    p = np.concatenate([np.asarray(x, dtype=np.float64) for x in predicted]) if predicted else np.zeros(0)
    t = np.concatenate([np.asarray(x, dtype=np.float64) for x in true]) if true else np.zeros(0)
    if p.shape != t.shape:
        raise ValueError(f"{p.size} predicted tokens for {t.size} true ones")
    n = int(p.size)
    if n < 2:
        return Score(0.0, (TOO_FEW_TOKENS,), len(true), n)
    p_centered, t_centered = p - p.mean(), t - t.mean()
    p_norm, t_norm = np.sqrt((p_centered**2).sum()), np.sqrt((t_centered**2).sum())
    if not p_norm > 1e-12 * max(1.0, np.abs(p).max()):
        return Score(0.0, (CONSTANT_PREDICTION,), len(true), n)
    if not t_norm > 0:
        return Score(0.0, (CONSTANT_ACTIVATION,), len(true), n)
    r = float((p_centered * t_centered).sum() / (p_norm * t_norm))
    return Score(float(np.clip(r, -1.0, 1.0)), (), len(true), n)


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
