"""Failures that say so: per-reason counts of failed candidates, and the rule that a stage
where every feature failed fails the run.

A candidate that fails is a row with its reason (``failure``), e.g. ``APIConnectionError:
Connection error. (after 3 attempts)``. Its *reason* is the part before the first colon
(``APIConnectionError``, ``HTTP 429``, ``malformed answer``), so counts group alike
failures whatever their details.

Policy: when every feature of a stage failed, the stage raises :class:`StageFailed` and the
run exits non-zero. When only some failed, the run finishes (best-of-k scores the features
that have a description) and ends with a loud warning and the per-reason counts, which are
also in the asset's metadata.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

import polars as pl


class StageFailed(RuntimeError):
    """Every feature of a stage failed; nothing downstream can use its output."""

    def __init__(self, message: str, reasons: dict[str, int]):
        super().__init__(message)
        self.reasons = reasons


def failure_reason(failure: str) -> str:
    """``APIConnectionError: Connection error. (after 3 attempts)`` -> ``APIConnectionError``."""
    head = failure.split(":", 1)[0].strip() if ":" in failure else failure.strip()
    head = re.sub(r"\s*\(after \d+ attempts?\)$", "", head)
    return head[:80] or "unknown"


def count_reasons(failures: Iterable[str | None]) -> dict[str, int]:
    """reason -> count, most frequent first."""
    counts = Counter(failure_reason(f) for f in failures if f)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def check_candidates(frame: pl.DataFrame, stage: str = "explain") -> dict[str, int]:
    """Per-reason failure counts of a candidates frame (``description``, ``failure``, ``layer``,
    ``polarity``, ``neuron``); raises :class:`StageFailed` when no feature got a description."""
    reasons = count_reasons(frame["failure"].to_list()) if frame.height else {}
    if frame.height == 0:
        return reasons
    described = frame.filter(pl.col("description").is_not_null())
    if described.height == 0:
        features = frame.select("layer", "polarity", "neuron").n_unique()
        first = frame.filter(pl.col("failure").is_not_null())["failure"].head(1).to_list()
        raise StageFailed(
            f"{stage}: every candidate failed ({frame.height} of {frame.height}, {features} features): "
            f"{format_reasons(reasons)}" + (f". First: {first[0]}" if first else "")
            + ". Nothing was described; check the explainer settings (explain.backend, explain.base_url, "
            "explain.model) and rerun.",
            reasons,
        )
    return reasons


def format_reasons(reasons: dict[str, int]) -> str:
    return ", ".join(f"{reason} x{count}" for reason, count in reasons.items()) or "none"
