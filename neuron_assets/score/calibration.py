"""Fitting the calibration of the ``semantic`` and ``hybrid`` simulators
(:class:`~neuron_assets.simulate.semantic.SemanticCalibration`).

A fit scores candidate calibrations by the correlation scorer on validity puzzles, so it
lives with the scorers, above the simulators it calibrates; ``bench/fit_semantic_calibration.py``
runs it and ships the result as ``simulate/<simulator>_calibration.json``. Only the fit half of
the project's puzzles is ever used: the held-out half stays a fair measure.
"""

from __future__ import annotations

from itertools import product

import numpy as np

from neuron_assets.score.correlation import correlation_score
from neuron_assets.score.validity import FIT, true_first_credit
from neuron_assets.simulate.semantic import SemanticCalibration, SemanticSimulator
from neuron_assets.types import Polarity

CALIBRATION_GRID = {"context_weight": (0.0, 0.25, 0.5, 0.75, 1.0), "slope": (0.5, 1.0, 2.0, 4.0, 8.0),
                    "offset": (0.0, 1.0, 1.5, 2.0, 2.5, 3.0)}


def fit_calibration(puzzles, simulator: SemanticSimulator, fitted_on: str = "") -> SemanticCalibration:
    """The calibration of :data:`CALIBRATION_GRID` under which ``simulator`` (semantic or
    hybrid) ranks the true description of the FIT puzzles among ``puzzles``
    (:class:`neuron_assets.score.validity.ValidityPuzzle`) first most often (ties: the larger
    mean margin, then the earlier grid point). Held-out puzzles are left out here."""
    fitting = [p for p in puzzles if p.split == FIT]
    if not fitting:
        raise ValueError("no puzzle of the fit half to fit a calibration on")
    raws = [simulator.similarities(p.descriptions, p.records) for p in fitting]
    best, best_key = None, None
    for weight, slope, offset in product(*CALIBRATION_GRID.values()):
        calibration = SemanticCalibration(weight, slope, offset)
        credits, margins = [], []
        for puzzle, raw in zip(fitting, raws):
            predicted = simulator.predictions(raw, calibration, puzzle.descriptions, puzzle.records)
            values = np.array([correlation_score(p, puzzle.records, Polarity.POS).value for p in predicted])
            credits.append(true_first_credit(values))
            margins.append(values[0] - values[1:].max())
        key = (round(float(np.mean(credits)), 6), round(float(np.mean(margins)), 6))
        if best_key is None or key > best_key:
            best, best_key = calibration, key
    return SemanticCalibration(best.context_weight, best.slope, best.offset, fitted_on, best_key[0])
