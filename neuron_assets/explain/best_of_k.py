"""Best-of-k (Transluce): k candidate descriptions per feature x polarity.

Each candidate's prompt shows its own random 10-20 of the feature's train top exemplars,
in random order, and one puzzle drawn from the pool; LLMs sample at temperature 1. The
best candidate is picked later, by its score on the val split. Every candidate is one row
of ``candidate_descriptions``, a failure included (its reason in ``failure``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from neuron_assets.config import ExplainConfig
from neuron_assets.excerpts import HIGHLIGHT_LADDER, Excerpt, TokenDisplay, excerpt_of
from neuron_assets.explain.backends import (
    CorpusSample,
    Explainer,
    ExplainRequest,
    ExplainResult,
    Prompt,
    make_explainer,
)
from neuron_assets.explain.backends.base import stable_seed
from neuron_assets.explain.formats import (
    ChatMessage,
    PromptBuilder,
    SolvedPuzzle,
    prompt_builder_for,
)
from neuron_assets.explain.puzzles import puzzle_pool
from neuron_assets.types import ActivationRecord, FeatureExemplars, FeatureId, Split

CANDIDATE_SCHEMA: dict[str, pl.DataType] = {
    "layer": pl.Int16,
    "polarity": pl.String,
    "neuron": pl.Int32,
    "candidate": pl.Int16,
    "description": pl.String,  # null when failed
    "backend": pl.String,
    "explainer_model": pl.String,
    "prompt_format": pl.String,  # null for backends that read no prompt
    "exemplar_seq_ids": pl.List(pl.Int64),  # every sequence the candidate was made from, in prompt order
    "puzzle": pl.String,
    "prompt_tokens": pl.Int64,  # summed over attempts
    "completion_tokens": pl.Int64,
    "latency_s": pl.Float64,
    "failure": pl.String,  # null when a description was made
    "attempts": pl.Int16,
}
MIN_EXCERPT_TOKENS = 8  # an exemplar is never cut shorter than this to fit the context window
CORPUS_SAMPLE = 20_000  # train sequences read for word frequencies and puzzles


class PromptTooLong(ValueError):
    """Even one shortened exemplar does not fit the explainer's context window."""


@dataclass(frozen=True)
class NotSent:
    """A candidate that could not be asked for; recorded as a failure."""

    feature: FeatureId
    candidate: int
    failure: str


def explain_features(
    features: list[FeatureExemplars],
    config: ExplainConfig,
    tokenizer_for_display=None,
    progress: bool = True,
    explainer: Explainer | None = None,
    corpus: Sequence[ActivationRecord] | None = None,
    on_candidates: Callable[[int], object] | None = None,
) -> pl.DataFrame:
    """k candidate descriptions for every feature: the ``candidate_descriptions`` columns
    without lineage (model, config_hash, run_id).

    ``on_candidates(n)`` is called as every n more candidates are settled (progress reporting).

    ``tokenizer_for_display`` is the subject model's tokenizer: its special tokens are shown
    as ``⟨name⟩``. ``explainer`` defaults to the configured backend, built here. ``corpus``
    is a sample of train sequences (activations unused) for word frequencies and puzzles;
    default: the features' train exemplars, which over-represent what the features respond to.
    """
    explainer = explainer or make_explainer(config)
    corpus = CorpusSample(_unique_by_seq_id(corpus)) if corpus is not None else corpus_sample(features)
    builder = prompt_builder_for(config)
    display = TokenDisplay.for_tokenizer(tokenizer_for_display)
    puzzles = [p.solved(display) for p in puzzle_pool(config, corpus.records)] if explainer.reads_prompts else []
    rows: list[dict] = []
    with tqdm(total=len(features) * config.k, disable=not progress, unit="candidate",
              desc=f"explain ({explainer.backend})") as bar:
        def settled(n: int = 1) -> None:
            bar.update(n)
            if on_candidates is not None:
                on_candidates(n)

        for start in range(0, len(features), config.features_per_call):
            planned = [
                plan_candidate(feature, candidate, config, builder, puzzles, display, explainer)
                for feature in features[start : start + config.features_per_call]
                for candidate in range(config.k)
            ]
            requests = [p for p in planned if isinstance(p, ExplainRequest)]
            results = iter(explainer.explain(requests, corpus, settled))
            for item in planned:
                if isinstance(item, ExplainRequest):
                    rows.append(candidate_row(item, next(results), explainer))
                else:
                    rows.append(not_sent_row(item, explainer, builder.name if explainer.reads_prompts else None))
                    settled(1)
    return pl.DataFrame(rows, schema=CANDIDATE_SCHEMA)


def plan_candidate(
    feature: FeatureExemplars,
    candidate: int,
    config: ExplainConfig,
    builder: PromptBuilder,
    puzzles: Sequence[SolvedPuzzle],
    display: TokenDisplay,
    explainer: Explainer,
) -> ExplainRequest | NotSent:
    """Candidate ``candidate`` of ``feature``: its exemplar subset, its puzzle, its fitted prompt."""
    top = feature.top(Split.TRAIN)
    if not top:
        return NotSent(feature.feature, candidate, "no train top exemplars")
    fid = feature.feature
    seed = stable_seed(config.seed, fid.kind, fid.layer, fid.index, fid.polarity.value, candidate)
    rng = random.Random(seed)
    count = min(len(top), rng.randint(config.exemplars_min, config.exemplars_max))
    records = tuple(e.record for e in rng.sample(top, count))  # a random subset in random order
    request = ExplainRequest(fid, candidate, seed, records, HIGHLIGHT_LADDER)  # per prompt, over what it shows
    if not explainer.reads_prompts:
        return request
    puzzle = rng.choice(puzzles) if puzzles else None
    try:
        prompt = fit_prompt(builder, feature, records, puzzle, display, rng, explainer.count_tokens,
                            config.context_window - config.max_tokens)
    except PromptTooLong as err:
        return NotSent(fid, candidate, str(err))
    return replace(request, prompt=prompt)


def fit_prompt(
    builder: PromptBuilder,
    feature: FeatureExemplars,
    records: Sequence[ActivationRecord],
    puzzle: SolvedPuzzle | None,
    display: TokenDisplay,
    rng: random.Random,
    count_tokens: Callable[[Sequence[ChatMessage]], int],
    budget: int,
) -> Prompt:
    """The prompt with as many of ``records`` as fit in ``budget`` tokens.

    Whole exemplars are dropped from the end (their order is random) down to one, then the
    negatives, then the puzzle; the last exemplar is then shortened, a whole token at a time
    around its peak. Nothing is ever cut inside a token.
    """
    first = builder.show(feature, [excerpt_of(r, feature.feature.polarity, display) for r in records], display, rng)
    positives, negatives = list(first.positives), list(first.negatives)
    while True:
        # everything else the format chose (ladder, scale, output tokens) stays as shown first
        shown = replace(first, positives=tuple(positives), negatives=tuple(negatives))
        messages = builder.messages(shown, puzzle)
        tokens = count_tokens(messages)
        if tokens <= budget:
            return Prompt(tuple(messages), builder.name, puzzle.name if puzzle else None, shown.seq_ids, tokens)
        if len(positives) > 1:
            positives.pop()
        elif negatives:
            negatives.pop()
        elif puzzle is not None:
            puzzle = None
        elif len(positives[0].tokens) > MIN_EXCERPT_TOKENS:
            positives[0] = _shorter(positives[0])
        else:
            raise PromptTooLong(f"the prompt needs {tokens} tokens with a single {len(positives[0].tokens)}-token "
                                f"exemplar; the budget is {budget} (context_window - max_tokens)")


def corpus_sample(features: Sequence[FeatureExemplars]) -> CorpusSample:
    """Every train sequence among the features' exemplars, each once (seq_id order)."""
    return CorpusSample(_unique_by_seq_id(
        e.record for feature in features for e in feature.exemplars if e.split is Split.TRAIN))


def corpus_from_sequences(sequences: pl.DataFrame, limit: int = CORPUS_SAMPLE, seed: int = 0) -> list[ActivationRecord]:
    """Up to ``limit`` train sequences of the ``sequences`` table, as records without activations."""
    train = sequences.filter(pl.col("split") == Split.TRAIN.value)
    if train.height > limit:
        train = train.sample(limit, seed=seed).sort("seq_id")
    return [
        ActivationRecord(row["seq_id"], tuple(row["tokens"]), tuple(row["token_ids"]),
                         np.zeros(len(row["tokens"]), np.float32), row["prefix_len"])
        for row in train.select("seq_id", "tokens", "token_ids", "prefix_len").iter_rows(named=True)
    ]


def _unique_by_seq_id(records: Iterable[ActivationRecord]) -> tuple[ActivationRecord, ...]:
    unique: dict[int, ActivationRecord] = {}
    for record in records:
        unique.setdefault(record.seq_id, record)
    return tuple(unique[k] for k in sorted(unique))


def candidate_row(request: ExplainRequest, result: ExplainResult, explainer: Explainer) -> dict:
    prompt = request.prompt
    return {
        "layer": request.feature.layer,
        "polarity": request.feature.polarity.value,
        "neuron": request.feature.index,
        "candidate": request.candidate,
        "description": result.description,
        "backend": explainer.backend,
        "explainer_model": explainer.model,
        "prompt_format": prompt.format_name if prompt else None,
        "exemplar_seq_ids": list(request.seq_ids),
        "puzzle": prompt.puzzle if prompt else None,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "latency_s": result.latency_s,
        "failure": result.failure,
        "attempts": result.attempts,
    }


def not_sent_row(item: NotSent, explainer: Explainer, prompt_format: str | None) -> dict:
    return {
        "layer": item.feature.layer, "polarity": item.feature.polarity.value, "neuron": item.feature.index,
        "candidate": item.candidate, "description": None, "backend": explainer.backend,
        "explainer_model": explainer.model, "prompt_format": prompt_format, "exemplar_seq_ids": [], "puzzle": None,
        "prompt_tokens": 0, "completion_tokens": 0, "latency_s": 0.0, "failure": item.failure, "attempts": 0,
    }


def _shorter(excerpt: Excerpt) -> Excerpt:
    return excerpt.window(max(MIN_EXCERPT_TOKENS, len(excerpt.tokens) * 3 // 4))
