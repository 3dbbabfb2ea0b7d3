"""Fit the semantic simulator's calibration on the project's validity puzzles and ship it.

    PYTHONPATH=$PWD python bench/fit_semantic_calibration.py [--config FILE] [--write]

Prints the fitted calibration and its true-first share; --write replaces
neuron_assets/simulate/semantic_calibration.json. Only the project's own puzzles are used
(never an outside puzzle file), so outside files stay a fair check.
"""

from __future__ import annotations

import argparse

from neuron_assets.config import load_config
from neuron_assets.score.calibration import fit_calibration
from neuron_assets.score.validity import project_corpus, project_puzzles
from neuron_assets.simulate.semantic import CALIBRATION_FILE, SemanticSimulator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    config = load_config(args.config)
    puzzles = project_puzzles(project_corpus(config), seed=config.corpus.seed)
    simulator = SemanticSimulator(config.simulate.semantic.model, "cpu")
    sources = "+".join(source.name for source in config.corpus.sources)
    calibration = fit_calibration(puzzles, simulator, f"{len(puzzles)} project puzzles ({sources}, "
                                                      f"{config.subject.model} tokens, seed {config.corpus.seed})")
    print(calibration)
    if args.write:
        calibration.write(CALIBRATION_FILE)
        print(f"wrote {CALIBRATION_FILE}")


if __name__ == "__main__":
    main()
