"""Numeric helpers that both the simulators and the scorers use, kept on the ground floor so
simulate/ never imports score/:

- :func:`token_correlation`: Pearson r over token series concatenated, the arithmetic of the
  ``correlation`` score (:func:`neuron_assets.score.correlation.pearson_over_tokens` wraps it
  in a :class:`~neuron_assets.score.base.Score`), which simulator training also uses to
  check itself on held-out features and to re-rank candidates;
- :func:`derangement`: each item -> another one, how a feature gets its *shuffled control*
  (another feature's description) when scores are reported and when a simulator is trained.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Why a correlation is 0 by default (a Score's flags).
CONSTANT_PREDICTION = "constant_prediction"
CONSTANT_ACTIVATION = "constant_activation"
TOO_FEW_TOKENS = "too_few_tokens"


@dataclass(frozen=True)
class Correlation:
    value: float  # in [-1, 1]; never NaN
    flag: str | None  # why the value is a default 0, or None
    n_tokens: int


def token_correlation(predicted: Sequence[np.ndarray], true: Sequence[np.ndarray]) -> Correlation:
    """Pearson r of two per-record token series, all records concatenated; 0 with a flag
    where it is undefined (fewer than 2 tokens, constant predictions or activations)."""
    if len(predicted) != len(true):
        raise ValueError(f"{len(predicted)} predicted records for {len(true)} true ones")
    p = np.concatenate([np.asarray(x, dtype=np.float64) for x in predicted]) if predicted else np.zeros(0)
    t = np.concatenate([np.asarray(x, dtype=np.float64) for x in true]) if true else np.zeros(0)
    if p.shape != t.shape:
        raise ValueError(f"{p.size} predicted tokens for {t.size} true ones")
    n = int(p.size)
    if n < 2:
        return Correlation(0.0, TOO_FEW_TOKENS, n)
    p_centered, t_centered = p - p.mean(), t - t.mean()
    p_norm, t_norm = np.sqrt((p_centered**2).sum()), np.sqrt((t_centered**2).sum())
    if not p_norm > 1e-12 * max(1.0, np.abs(p).max()):
        return Correlation(0.0, CONSTANT_PREDICTION, n)
    if not t_norm > 0:
        return Correlation(0.0, CONSTANT_ACTIVATION, n)
    r = float((p_centered * t_centered).sum() / (p_norm * t_norm))
    return Correlation(float(np.clip(r, -1.0, 1.0)), None, n)


def derangement(items: Sequence, rng: random.Random) -> dict:
    """Each item -> another item: a rotation of a seeded shuffle (empty below two items).
    The mapping iterates in the shuffled order."""
    if len(items) < 2:
        return {}
    order = list(items)
    rng.shuffle(order)
    return {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
