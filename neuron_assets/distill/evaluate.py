"""Evaluating the distilled explainer (:func:`evaluate_explainers`): on held-out features, k
candidates from the base and from the distilled explainer with the same prompts, scored by
the run's selecting scorer on val and test; per k, the mean over features of the *test*
score of the val-best among k (all k-subsets, :func:`~neuron_assets.score.select.best_of_k_curve`):
Transluce's Figure 5. A candidate without a usable description counts as 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import polars as pl

from neuron_assets.config import ExplainConfig
from neuron_assets.types import FeatureExemplars, FeatureId, Split

BASE, DISTILLED = "base", "distilled"
NO_DESCRIPTION = "no_description"

Log = Callable[[str], object]


@dataclass(frozen=True)
class ExplainerCurve:
    explainer: str  # base or distilled
    model: str
    k: tuple[int, ...]
    mean_best_test: tuple[float, ...]  # test score of the val-best among k, mean over features
    mean_best_val: tuple[float, ...]  # val score of the val-best (biased upward by the selection)
    features: tuple[int, ...]
    failed_candidates: int
    candidates: int


CURVE_SCHEMA = {"explainer": pl.String, "model": pl.String, "k": pl.Int64, "mean_best_test": pl.Float64,
                "mean_best_val": pl.Float64, "features": pl.Int64}


def evaluate_explainers(
    features: Sequence[FeatureExemplars],
    explainers: Mapping[str, Callable[[], object]],
    explain: ExplainConfig,
    scorer,
    corpus=None,
    display_tokenizer=None,
    log: Log = print,
    on_candidates: Callable[[int], object] | None = None,
    release: Callable[[], object] | None = None,
) -> tuple[list[ExplainerCurve], pl.DataFrame]:
    """Per explainer (name -> a function that builds it): k = explain.k candidates for every
    feature with the same prompts, then each scored by ``scorer`` on val and test. Returns
    the curves and every candidate's scores (columns of ``description_scores`` plus
    ``explainer``, ``kind`` and ``failure``: why a candidate has no description). ``release()`` runs after each explainer's candidates (frees its model)."""
    from neuron_assets.explain.best_of_k import explain_features
    from neuron_assets.score.select import CANDIDATE, SCORES_SCHEMA, score_candidates

    kinds: dict[str, list[FeatureExemplars]] = {}
    for feature in features:
        kinds.setdefault(feature.feature.kind, []).append(feature)
    candidates: dict[tuple[str, str], pl.DataFrame] = {}
    models = {}
    for name, build in explainers.items():
        explainer = build()
        models[name] = explainer.model
        log(f"evaluation: {explain.k} candidates for {len(features)} held-out features from the {name} explainer "
            f"({explainer.model})")
        for kind, group in kinds.items():
            candidates[(name, kind)] = explain_features(group, explain, tokenizer_for_display=display_tokenizer,
                                                        progress=False, explainer=explainer, corpus=corpus,
                                                        on_candidates=on_candidates)
        del explainer
        if release is not None:
            release()
    scored = []
    for (name, kind), frame in candidates.items():
        group = kinds[kind]
        by_key = {(f.feature.layer, f.feature.polarity.value, f.feature.index): f.feature for f in group}
        options: dict[FeatureId, list[str | None]] = {}
        failed = []
        for row in frame.iter_rows(named=True):
            fid = by_key[(row["layer"], row["polarity"], row["neuron"])]
            options.setdefault(fid, [None] * explain.k)[row["candidate"]] = row["description"]
            if row["description"] is None:
                failed.append((fid, row["candidate"], row["failure"]))
        parts = [score_candidates(group, options, [scorer], split) for split in (Split.VAL, Split.TEST)]
        nothing = [{"layer": f.layer, "polarity": f.polarity.value, "neuron": f.index, "candidate": c, "role": CANDIDATE,
                    "description": None, "source_neuron": f.index, "scorer": scorer.name, "simulator": scorer.simulator,
                    "split": split.value, "score": 0.0, "flags": [NO_DESCRIPTION], "n_examples": 0, "n_tokens": 0,
                    "failure": why}
                   for f, c, why in failed for split in (Split.VAL, Split.TEST)]
        part = pl.concat([*(p.with_columns(pl.lit(None, pl.String).alias("failure")) for p in parts),
                          pl.DataFrame(nothing, schema={**SCORES_SCHEMA, "failure": pl.String})])
        scored.append(part.with_columns(pl.lit(name).alias("explainer"), pl.lit(kind).alias("kind")))
    scores = pl.concat(scored) if scored else pl.DataFrame()
    curves = [_curve(name, models[name], scores.filter(pl.col("explainer") == name)) for name in explainers]
    return curves, scores


def _curve(name: str, model: str, scores: pl.DataFrame) -> ExplainerCurve:
    """For k = 1..n: over features with at least k candidates, the mean test (and val) score
    of the val-best among k, over all k-subsets (exact order statistics)."""
    from neuron_assets.score.select import CANDIDATE, expected_best_of_k

    keys = ["explainer", "kind", "layer", "polarity", "neuron", "candidate"]
    chosen = scores.filter(pl.col("role") == CANDIDATE)
    val = chosen.filter(pl.col("split") == Split.VAL.value).select(*keys, pl.col("score").alias("val"),
                                                                   pl.col("flags"))
    test = chosen.filter(pl.col("split") == Split.TEST.value).select(*keys, pl.col("score").alias("test"))
    paired = val.join(test, on=keys).sort(keys)
    per_feature = [(g["val"].to_numpy(), g["test"].to_numpy())
                   for _, g in paired.group_by(keys[:-1], maintain_order=True)]
    largest = max((v.size for v, _ in per_feature), default=0)
    ks, tests, vals, counts = [], [], [], []
    for k in range(1, largest + 1):
        eligible = [(v, t) for v, t in per_feature if v.size >= k]
        ks.append(k)
        tests.append(float(np.mean([expected_best_of_k(v, k, t) for v, t in eligible])))
        vals.append(float(np.mean([expected_best_of_k(v, k) for v, _ in eligible])))
        counts.append(len(eligible))
    failed = int(paired.filter(pl.col("flags").list.contains(NO_DESCRIPTION)).height)
    return ExplainerCurve(name, model, tuple(ks), tuple(tests), tuple(vals), tuple(counts), failed, paired.height)


def curve_frame(curves: Sequence[ExplainerCurve]) -> pl.DataFrame:
    rows = [{"explainer": c.explainer, "model": c.model, "k": k, "mean_best_test": t, "mean_best_val": v, "features": n}
            for c in curves for k, t, v, n in zip(c.k, c.mean_best_test, c.mean_best_val, c.features)]
    return pl.DataFrame(rows, schema=CURVE_SCHEMA)
