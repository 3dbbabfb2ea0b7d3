"""What a candidate_descriptions table says about itself: counts, tokens, cost, examples,
and which features lack some of their k candidates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import polars as pl

from neuron_assets.config import ExplainConfig
from neuron_assets.markdown import markdown_table


@dataclass(frozen=True)
class CandidateSummary:
    rows: int
    features: int
    described: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None  # None when no price is configured
    mean_latency_s: float
    examples_markdown: str
    failures_markdown: str


def summarize_candidates(frame: pl.DataFrame, config: ExplainConfig, examples: int = 8) -> CandidateSummary:
    described = frame.filter(pl.col("description").is_not_null())
    prompt_tokens = int(frame["prompt_tokens"].sum() or 0)
    completion_tokens = int(frame["completion_tokens"].sum() or 0)
    priced = config.usd_per_million_prompt_tokens or config.usd_per_million_completion_tokens
    cost = (prompt_tokens * config.usd_per_million_prompt_tokens
            + completion_tokens * config.usd_per_million_completion_tokens) / 1e6
    return CandidateSummary(
        rows=frame.height,
        features=frame.select([c for c in ("layer", "polarity", "neuron") if c in frame.columns]).n_unique()
        if frame.height else 0,  # a neuron index repeats across layers and polarities
        described=described.height,
        failed=frame.height - described.height,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cost_usd=cost if priced else None,
        mean_latency_s=float(frame["latency_s"].mean() or 0.0) if frame.height else 0.0,
        examples_markdown=_table(described.sort("neuron", "candidate").head(examples),
                                 ["neuron", "candidate", "prompt_format", "puzzle", "description"]),
        failures_markdown=_table(_failure_counts(frame).head(10), ["failure", "len"]),
    )


def incomplete_features(frame: pl.DataFrame, neurons: Iterable[int], k: int) -> list[int]:
    """Neurons lacking one of candidates 0..k-1 as a description or a recorded failure."""
    settled = frame.filter(pl.col("description").is_not_null() | pl.col("failure").is_not_null())
    have = settled.group_by("neuron").agg(pl.col("candidate").unique())
    by_neuron = {row[0]: set(row[1]) for row in have.iter_rows()}
    wanted = set(range(k))
    return sorted(n for n in set(neurons) if not wanted <= by_neuron.get(n, set()))


def _failure_counts(frame: pl.DataFrame) -> pl.DataFrame:
    failed = frame.filter(pl.col("failure").is_not_null())
    return failed.group_by("failure").len().sort("len", "failure", descending=[True, False])


def _table(frame: pl.DataFrame, columns: list[str]) -> str:
    return markdown_table(columns, frame.select(columns).iter_rows()) if frame.height else "(none)"
