"""The explainer stage: prompt formats, the few-shot puzzle pool, explainer backends, best-of-k.

``explain_features(features, config)`` turns every feature's exemplars into k candidate
descriptions (the ``candidate_descriptions`` table, lineage columns aside).
"""

from neuron_assets.config import PromptFormat
from neuron_assets.explain.backends import (
    EXPLAINERS,
    CorpusSample,
    Explainer,
    ExplainerUnavailable,
    ExplainRequest,
    ExplainResult,
    make_explainer,
)
from neuron_assets.explain.best_of_k import (
    CANDIDATE_SCHEMA,
    corpus_from_sequences,
    corpus_sample,
    explain_features,
    fit_prompt,
    plan_candidate,
)
from neuron_assets.explain.formats import ANSWER_TAG, FORMATS, MalformedAnswer, parse_description, prompt_builder_for
from neuron_assets.explain.puzzles import Puzzle, generate_puzzles, load_puzzle_file, puzzle_pool
from neuron_assets.explain.summary import CandidateSummary, incomplete_features, summarize_candidates

__all__ = [
    "ANSWER_TAG", "CANDIDATE_SCHEMA", "EXPLAINERS", "FORMATS", "CandidateSummary", "CorpusSample", "Explainer",
    "ExplainerUnavailable", "ExplainRequest", "ExplainResult", "MalformedAnswer", "PromptFormat", "Puzzle",
    "corpus_from_sequences", "corpus_sample", "explain_features", "fit_prompt", "generate_puzzles",
    "incomplete_features",
    "load_puzzle_file", "make_explainer", "parse_description", "plan_candidate", "prompt_builder_for",
    "puzzle_pool", "summarize_candidates",
]
