"""What every simulator is: a description and token sequences in, per-token activations out.

A simulator predicts, from a description alone, how strongly the feature fires at every
token, on the 0-10 scale of Bills et al. and Transluce (10 = the feature's strongest
activation). It never sees the true activations.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from neuron_assets.types import ActivationRecord

MAX_ACTIVATION = 10
NUM_CLASSES = MAX_ACTIVATION + 1  # the values 0, 1, ..., 10

SimulatedActivations = list[list[np.ndarray]]
"""``result[d][r]``: float32 predictions in [0, 10] for every token of record ``r`` under
description ``d``; positions before the record's ``prefix_len`` are 0."""


@runtime_checkable
class Simulator(Protocol):
    name: str

    def simulate(self, descriptions: Sequence[str], records: Sequence[ActivationRecord]) -> SimulatedActivations:
        """Every description against every record (the k candidates of one feature against
        its exemplars, typically): ``result[d][r]`` per token of record r."""
        ...


SimulationJob = tuple[Sequence[str], Sequence[ActivationRecord]]
"""One feature's (descriptions, records), as :meth:`Simulator.simulate` takes them."""


def simulate_many(simulator: Simulator, jobs: Sequence[SimulationJob]) -> list[SimulatedActivations]:
    """``simulator.simulate`` of every job; a simulator with its own ``simulate_many`` (one
    that batches pairs across features) gets them all at once."""
    many = getattr(simulator, "simulate_many", None)
    if many is not None:
        return many(jobs)
    return [simulator.simulate(descriptions, records) for descriptions, records in jobs]


def expected_value(probabilities: np.ndarray) -> np.ndarray:
    """Expected activation under a distribution over the values 0..10 (last axis).

    Rows are normalized first, so unnormalized probabilities (logprobs of only some of the
    values, as an API returns them) are fine; a row with no mass predicts 0.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape[-1] != NUM_CLASSES:
        raise ValueError(f"expected {NUM_CLASSES} values on the last axis, got {probabilities.shape[-1]}")
    mass = probabilities.sum(axis=-1)
    values = np.arange(NUM_CLASSES, dtype=np.float64)
    weighted = (probabilities * values).sum(axis=-1)
    return np.where(mass > 0, weighted / np.where(mass > 0, mass, 1.0), 0.0).astype(np.float32)


def discretize(values: np.ndarray, scale: float) -> np.ndarray:
    """True activations (already in the polarity's orientation, >= 0) as the classes 0..10:
    round(10 * value / scale), clipped. ``scale`` is the feature's max; 0 or less -> all 0."""
    values = np.asarray(values, dtype=np.float64)
    if not scale > 0:
        return np.zeros(values.shape, dtype=np.int64)
    return np.clip(np.rint(MAX_ACTIVATION * np.maximum(values, 0.0) / scale), 0, MAX_ACTIVATION).astype(np.int64)


def zeros_like_records(records: Sequence[ActivationRecord]) -> list[np.ndarray]:
    return [np.zeros(len(record.tokens), dtype=np.float32) for record in records]
