"""Fitting the ``semantic`` simulator's calibration (:class:`~neuron_assets.simulate.semantic.SemanticCalibration`).

A fit scores candidate calibrations by the correlation scorer on validity puzzles, so it
lives with the scorers, above the simulator it calibrates; ``bench/fit_semantic_calibration.py``
runs it and ships the result as ``simulate/semantic_calibration.json``.
"""

from __future__ import annotations

from itertools import product

import numpy as np

from neuron_assets.score.correlation import correlation_score
from neuron_assets.score.validity import true_first_credit
from neuron_assets.simulate.semantic import SemanticCalibration, SemanticSimulator
from neuron_assets.types import Polarity

CALIBRATION_GRID = {"context_weight": (0.0, 0.25, 0.5, 0.75, 1.0), "slope": (0.5, 1.0, 2.0, 4.0, 8.0),
                    "offset": (0.0, 1.0, 1.5, 2.0, 2.5, 3.0)}


def fit_calibration(puzzles, simulator: SemanticSimulator, fitted_on: str = "") -> SemanticCalibration:
    """The calibration of :data:`CALIBRATION_GRID` whose correlation ranks the true description
    of ``puzzles`` (:class:`neuron_assets.score.validity.ValidityPuzzle`) first most often (ties: the
    larger mean margin, then the earlier grid point). Fit on the project's puzzles only."""
    raws = [simulator.similarities(p.descriptions, p.records) for p in puzzles]
    best, best_key = None, None
    for weight, slope, offset in product(*CALIBRATION_GRID.values()):
        calibration = SemanticCalibration(weight, slope, offset)
        credits, margins = [], []
        for puzzle, raw in zip(puzzles, raws):
            values = np.array([correlation_score(p, puzzle.records, Polarity.POS).value
                               for p in SemanticSimulator.calibrated(raw, calibration)])
            credits.append(true_first_credit(values))
            margins.append(values[0] - values[1:].max())
        key = (round(float(np.mean(credits)), 6), round(float(np.mean(margins)), 6))
        if best_key is None or key > best_key:
            best, best_key = calibration, key
    return SemanticCalibration(best.context_weight, best.slope, best.offset, fitted_on, best_key[0])
