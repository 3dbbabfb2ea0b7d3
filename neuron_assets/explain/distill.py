"""Moved to the package :mod:`neuron_assets.distill` (above score/, which its evaluation uses).
Kept only for the names ``neuron_assets.stages`` still imports from here; delete once it
imports them from :mod:`neuron_assets.distill`."""

from neuron_assets.distill import (
    BASE,
    DISTILLED,
    DistillError,
    best_descriptions,
    build_examples,
    curve_frame,
    distill_explain_config,
    distill_explainer,
    evaluate_explainers,
    heldout_rank,
    load_base_tokenizer,
    read_distilled,
    split_features,
)

__all__ = [
    "BASE", "DISTILLED", "DistillError", "best_descriptions", "build_examples", "curve_frame",
    "distill_explain_config", "distill_explainer", "evaluate_explainers", "heldout_rank", "load_base_tokenizer",
    "read_distilled", "split_features",
]
