"""Fit the calibration of the semantic or hybrid simulator on the fit half of the project's
validity puzzles and ship it.

    PYTHONPATH=$PWD python bench/fit_semantic_calibration.py [--simulator semantic|hybrid] [--config FILE] [--write]

Prints the fitted calibration, its true-first share on the fit half, and (for people only:
nothing is chosen by it) the held-out half's share; --write replaces
neuron_assets/simulate/<simulator>_calibration.json. Only the project's own puzzles are used
(never an outside puzzle file), and of those only the fit half, so the held-out half and
outside files stay fair checks.
"""

from __future__ import annotations

import argparse

from neuron_assets.config import load_config
from neuron_assets.score.calibration import fit_calibration
from neuron_assets.score.validity import FIT, HELDOUT, correlation_scorer, measure_validity, project_corpus, project_puzzles
from neuron_assets.simulate.semantic import HybridSimulator, SemanticSimulator, calibration_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--simulator", choices=["semantic", "hybrid"], default="hybrid")
    parser.add_argument("--config")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    config = load_config(args.config)
    puzzles = project_puzzles(project_corpus(config), seed=config.corpus.seed)
    kind = HybridSimulator if args.simulator == "hybrid" else SemanticSimulator
    simulator = kind(config.simulate.semantic.model, "cpu")
    sources = "+".join(source.name for source in config.corpus.sources)
    fitting = sum(p.split == FIT for p in puzzles)
    calibration = fit_calibration(puzzles, simulator, f"the fit half ({fitting} of {len(puzzles)}) of the project "
                                                      f"puzzles ({sources}, {config.subject.model} tokens, seed "
                                                      f"{config.corpus.seed})")
    print(calibration)
    fitted = kind(config.simulate.semantic.model, "cpu", calibration=calibration)
    for row in measure_validity(puzzles, {args.simulator: correlation_scorer(fitted)}):
        print(f"{row.split}: true first {row.true_first:.3f} (chance {row.chance:.2f}) per family {dict(row.per_family)}"
              + ("  <- reported only, never fitted on" if row.split == HELDOUT else ""))
    if args.write:
        calibration.write(calibration_file(args.simulator))
        print(f"wrote {calibration_file(args.simulator)}")


if __name__ == "__main__":
    main()
