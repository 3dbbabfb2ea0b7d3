"""Selection and evaluation: score every candidate, keep the best by val, report it on test.

- :func:`score_candidates`: every candidate x scorer on one split, plus the *shuffled
  control* of every feature: the description *selected* for another feature of the same
  layer and polarity (:func:`shuffled_controls`), scored the same way. The control says
  what a score is worth: a simulator that predicts from generic properties of the text
  (where anything fires) scores well above 0 even with the wrong description.
- :func:`select_best`: per feature, the candidate with the highest *val* score of one
  scorer (ties: the lower candidate number). Val only selects; test only reports.
- :func:`expected_best_of_k` and :func:`best_of_k_curve`: for every k, the mean *test*
  score of the candidate that val selects among k, estimated without bias from all
  k-subsets of the n scored candidates (order statistics of the val scores), and a
  power-law fit ``mean_best(k) = a * k^b`` (Transluce reports the improvement with k this
  way). Reporting the val score of the val-best would be biased upward by the selection.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import polars as pl

from neuron_assets.numeric import derangement
from neuron_assets.score.base import Score, Scorer
from neuron_assets.types import FeatureExemplars, FeatureId, Split

CANDIDATE = "candidate"
SHUFFLED_CONTROL = "shuffled_control"
CONTROL_CANDIDATE = -1
FEATURES_PER_ROUND = 256  # features scored together (their pairs batched by the simulator)

SCORES_SCHEMA = {
    "layer": pl.Int64, "polarity": pl.String, "neuron": pl.Int64, "candidate": pl.Int64, "role": pl.String,
    "description": pl.String, "source_neuron": pl.Int64, "scorer": pl.String, "simulator": pl.String,
    "split": pl.String, "score": pl.Float64, "flags": pl.List(pl.String), "n_examples": pl.Int64,
    "n_tokens": pl.Int64,
}


@dataclass(frozen=True)
class ShuffledControl:
    source: FeatureId  # the feature the description was written for
    candidate: int
    description: str


def shuffled_controls(
    features: Sequence[FeatureExemplars], selected: Mapping[FeatureId, tuple[int, str]], seed: int = 0
) -> dict[FeatureId, ShuffledControl]:
    """Each feature with a selected description -> the description selected for another such
    feature ((candidate, description) per feature, from :func:`select_best`): a seeded
    derangement within the given features; none when fewer than two have one."""
    described = sorted(f.feature for f in features if f.feature in selected and selected[f.feature][1])
    if len(described) < 2:
        return {}
    rng = random.Random(f"{seed}:{described[0].layer}:{described[0].polarity.value}")
    controls = {}
    for feature, source in derangement(described, rng).items():
        number, description = selected[source]
        controls[feature] = ShuffledControl(source, number, description)
    return controls


def selected_by_feature(best: pl.DataFrame, features: Sequence[FeatureExemplars]) -> dict[FeatureId, tuple[int, str]]:
    """:func:`select_best`'s rows as feature -> (candidate, description)."""
    by_index = {f.feature.index: f.feature for f in features}
    return {by_index[row["neuron"]]: (row["candidate"], row["description"])
            for row in best.iter_rows(named=True) if row["neuron"] in by_index}


def score_candidates(
    features: Sequence[FeatureExemplars],
    candidates: Mapping[FeatureId, Sequence[str | None]],
    scorers: Sequence[Scorer],
    split: Split,
    controls: Mapping[FeatureId, ShuffledControl] | None = None,
    progress=None,
) -> pl.DataFrame:
    """One row per (feature, scored description, scorer); failed (null) candidates are left out,
    and so is a candidate that repeats an earlier one of its feature (:func:`distinct_candidates`):
    scoring it again would cost as much and tell nothing, and best-of-k counts distinct texts.

    Features are scored in rounds of :data:`FEATURES_PER_ROUND`: a scorer with
    ``score_many`` (the correlation scorer) gets a round's features at once, so its
    simulator batches their pairs together."""
    rows = []
    scored = []
    for feature in features:
        options = distinct_candidates(candidates.get(feature.feature, ()))
        control = (controls or {}).get(feature.feature)
        entries = [(c, CANDIDATE, d, feature.feature.index) for c, d in options]
        if control is not None:
            entries.append((CONTROL_CANDIDATE, SHUFFLED_CONTROL, control.description, control.source.index))
        if entries:
            scored.append((feature, entries))
    for start in range(0, len(scored), FEATURES_PER_ROUND):
        round_ = scored[start : start + FEATURES_PER_ROUND]
        items = [(feature, [e[2] for e in entries]) for feature, entries in round_]
        by_scorer = [score_all(scorer, items, split) for scorer in scorers]
        for i, (feature, entries) in enumerate(round_):
            for scorer, scores in zip(scorers, by_scorer):
                rows += [_score_row(feature.feature, entry, scorer, split, score)
                         for entry, score in zip(entries, scores[i])]
            if progress is not None:
                progress(1)
    return pl.DataFrame(rows, schema=SCORES_SCHEMA)


def distinct_candidates(descriptions: Sequence[str | None]) -> list[tuple[int, str]]:
    """(candidate number, text) of each candidate whose text (case and spacing aside) no
    earlier candidate of the feature has; failed (null or empty) candidates are left out."""
    seen, kept = set(), []
    for candidate, text in enumerate(descriptions):
        key = " ".join(text.split()).casefold() if text else ""
        if key and key not in seen:
            seen.add(key)
            kept.append((candidate, text))
    return kept


def score_all(scorer: Scorer, items, split: Split) -> list[list[Score]]:
    """``scorer.score`` of every (feature, descriptions) in ``items``, through ``score_many``
    where the scorer has it (one simulator call batches every feature's pairs)."""
    many = getattr(scorer, "score_many", None)
    if many is not None:
        return many(items, split)
    return [scorer.score(feature, descriptions, split) for feature, descriptions in items]


def _score_row(feature: FeatureId, entry, scorer: Scorer, split: Split, score: Score) -> dict:
    candidate, role, description, source = entry
    return {
        "layer": feature.layer, "polarity": feature.polarity.value, "neuron": feature.index, "candidate": candidate,
        "role": role, "description": description, "source_neuron": source, "scorer": scorer.name,
        "simulator": scorer.simulator, "split": split.value, "score": float(score.value), "flags": list(score.flags),
        "n_examples": score.n_examples, "n_tokens": score.n_tokens,
    }


def rows_of(scores: pl.DataFrame, scorer: str, simulator: str | None = None) -> pl.DataFrame:
    """The rows of one scorer (and, for simulator-based scorers, one simulator)."""
    same_simulator = pl.col("simulator").is_null() if simulator is None else pl.col("simulator") == simulator
    return scores.filter((pl.col("scorer") == scorer) & same_simulator)


def select_best(scores: pl.DataFrame, scorer: str, simulator: str | None = None) -> pl.DataFrame:
    """Per feature, the best candidate by ``scorer`` with ``simulator`` on val (one row each:
    neuron, candidate, description, val_score, val_flags) joined with its shuffled control's
    val score. Rows of other splits never select."""
    scores = rows_of(scores, scorer, simulator)
    if "split" in scores.columns:
        scores = scores.filter(pl.col("split") == Split.VAL.value)
    chosen = scores.filter(pl.col("role") == CANDIDATE)
    best = (
        chosen.sort(["neuron", "score", "candidate"], descending=[False, True, False])
        .group_by("neuron", maintain_order=True)
        .agg(
            pl.col("candidate").first(), pl.col("description").first(), pl.col("score").first().alias("val_score"),
            pl.col("flags").first().alias("val_flags"), pl.len().alias("n_candidates"),
            pl.col("simulator").first(),
        )
    )
    control = scores.filter(pl.col("role") == SHUFFLED_CONTROL).select(
        "neuron", pl.col("description").alias("control_description"),
        pl.col("source_neuron").alias("control_source_neuron"), pl.col("score").alias("control_val_score"),
    )
    return best.join(control, on="neuron", how="left").sort("neuron")


# -- best of k ---------------------------------------------------------------------------------


def expected_best_of_k(values: Sequence[float], k: int, reported: Sequence[float] | None = None) -> float:
    """The mean over all k-subsets of ``values`` of the subset's maximum (exact, no sampling):
    sorted ascending, value i (1-based) is the max of C(i-1, k-1) of the C(n, k) subsets.
    With ``reported``, the mean of the reported value of each subset's best by ``values``
    (ties in ``values``: the earlier one wins, as in :func:`select_best`)."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    if not 1 <= k <= n:
        raise ValueError(f"k={k} with {n} values")
    order = np.lexsort((-np.arange(n), values))  # ascending; among ties the earlier one last (it wins)
    ordered = (values if reported is None else np.asarray(reported, dtype=np.float64))[order]
    weights = np.array([math.comb(i - 1, k - 1) for i in range(1, n + 1)], dtype=np.float64) / math.comb(n, k)
    return float((weights * ordered).sum())


@dataclass(frozen=True)
class BestOfKCurve:
    k: tuple[int, ...]
    mean_best: tuple[float, ...]
    features: tuple[int, ...]  # features with at least k scored candidates
    fit_a: float | None  # mean_best(k) ~ a * k^b, least squares in log-log space
    fit_b: float | None

    def fitted(self, k: float) -> float | None:
        return None if self.fit_a is None else self.fit_a * k**self.fit_b


def best_of_k_curve(scores: pl.DataFrame, scorer: str, simulator: str | None = None) -> BestOfKCurve:
    """For k = 1..n: the mean over features of the test score of the candidate that val selects
    among k candidates (all k-subsets). Candidates without a test score are left out."""
    chosen = rows_of(scores, scorer, simulator).filter(pl.col("role") == CANDIDATE)
    feature = ["layer", "polarity", *(["kind"] if "kind" in chosen.columns else []), "neuron"]  # a latent is not a neuron
    keys = [*feature, "candidate"]
    val = chosen.filter(pl.col("split") == Split.VAL.value).select(*keys, pl.col("score").alias("val"))
    test = chosen.filter(pl.col("split") == Split.TEST.value).select(*keys, pl.col("score").alias("test"))
    paired = val.join(test, on=keys).sort(keys)
    per_feature = [
        (group["val"].to_numpy(), group["test"].to_numpy())
        for _, group in paired.group_by(feature, maintain_order=True)
    ]
    largest = max((v.size for v, _ in per_feature), default=0)
    ks, means, counts = [], [], []
    for k in range(1, largest + 1):
        bests = [expected_best_of_k(v, k, t) for v, t in per_feature if v.size >= k]
        ks.append(k)
        means.append(float(np.mean(bests)))
        counts.append(len(bests))
    fit_a = fit_b = None
    if len(ks) >= 2 and all(m > 0 for m in means):
        fit_b, log_a = np.polyfit(np.log(ks), np.log(means), 1)
        fit_a, fit_b = float(np.exp(log_a)), float(fit_b)
    return BestOfKCurve(tuple(ks), tuple(means), tuple(counts), fit_a, fit_b)
