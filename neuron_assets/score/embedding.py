"""The ``embedding`` scorer: the description and each example embedded with the package's
sentence encoder (:mod:`neuron_assets.embedding`); the score is the AUC with which cosine
similarity separates the split's top exemplars from its random sequences."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from neuron_assets.score.base import NO_EXAMPLES, NO_NEGATIVES, Score, plain_text
from neuron_assets.types import FeatureExemplars, Split


class EmbeddingScorer:
    """AUC of cos(description, example) separating the split's top exemplars from its random
    sequences that peak below every one of them. Sequence embeddings are cached by seq_id
    (random sequences are shared by every feature)."""

    name = "embedding"
    simulator = None

    def __init__(self, embed: Callable[[list[str]], np.ndarray], top: int = 20, random_count: int = 5):
        self.embed = embed
        self.top = top
        self.random_count = random_count
        self._cache: dict[int, np.ndarray] = {}

    def score(self, feature: FeatureExemplars, descriptions: Sequence[str], split: Split) -> list[Score]:
        top = feature.top(split)[: self.top]
        positives = [e.record for e in top]
        weakest = min((e.extreme for e in top), default=0.0)
        negatives = [e.record for e in feature.random(split)[: self.random_count]
                     if e.extreme < weakest and e.record.seq_id not in {r.seq_id for r in positives}]
        if not positives or not negatives:
            return [Score(0.5, (NO_NEGATIVES if positives else NO_EXAMPLES,), len(positives) + len(negatives))
                    for _ in descriptions]
        records = positives + negatives
        missing = [r for r in records if r.seq_id not in self._cache]
        if missing:
            for record, vector in zip(missing, self.embed([plain_text(r) for r in missing])):
                self._cache[record.seq_id] = vector
        examples = np.stack([self._cache[r.seq_id] for r in records])
        queries = self.embed([d or "" for d in descriptions])
        labels = np.array([True] * len(positives) + [False] * len(negatives))
        return [Score(roc_auc(examples @ q, labels), (), len(records)) for q in queries]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random positive outranks a random negative (ties count half)."""
    from scipy.stats import rankdata

    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return 0.5
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
