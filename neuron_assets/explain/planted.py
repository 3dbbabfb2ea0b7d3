"""Planted features: a known rule turned into exemplars, to check an explainer end to end.

A planted feature fires (with some spread) on a chosen set of words and stays near zero
elsewhere; its exemplars and stats are built the way the exemplars stage builds them, so an
explainer that works should name the planted words. Tests and benchmarks use these.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Sequence

import numpy as np

from neuron_assets.types import (
    ActivationRecord,
    Exemplar,
    Sample,
    FeatureExemplars,
    FeatureId,
    FeatureStats,
    Polarity,
    Split,
)

WORD_OR_MARK = re.compile(r"\s*\w+|\s*[^\w\s]|\s+$")
QUANTILES = (0.5, 0.9, 0.99, 0.999)


def word_tokens(text: str) -> tuple[str, ...]:
    """Whole words and punctuation marks, each with its leading whitespace (they concatenate
    to the text)."""
    return tuple(WORD_OR_MARK.findall(text))


def planted_feature(
    texts: Sequence[str],
    fires_on: Iterable[str] | Callable[[Sequence[str], int], bool],
    layer: int = 0,
    index: int = 0,
    polarity: Polarity = Polarity.POS,
    seed: int = 0,
    top_k: int = 20,
    random_per_split: int = 5,
    prefix: Sequence[str] = (),
    special_ids: dict[str, int] | None = None,
    tokenize: Callable[[str], Sequence[str]] = word_tokens,
) -> FeatureExemplars:
    """A feature active on the words ``fires_on`` (case-insensitive) or where the rule
    ``fires_on(tokens, position)`` holds; its exemplars from ``texts``.

    Texts are dealt round-robin to train, val and test; ``prefix`` tokens (e.g. a chat
    header) start every sequence and never fire. Active tokens get 4-8 (times the polarity's
    sign); the rest get small noise of the other sign, so they count as inactive.
    """
    rng = np.random.default_rng(seed)
    if callable(fires_on):
        rule = fires_on
    else:
        words = {w.strip().lower() for w in fires_on}
        rule = lambda tokens, i: tokens[i].strip().lower() in words  # noqa: E731
    vocab: dict[str, int] = dict(special_ids or {})
    records: list[ActivationRecord] = []
    for seq_id, text in enumerate(texts):
        tokens = tuple(prefix) + tuple(tokenize(text))
        ids = tuple(vocab.setdefault(t, len(vocab) + 1000) for t in tokens)
        fire = np.array([i >= len(prefix) and rule(tokens, i) for i in range(len(tokens))])
        values = np.where(fire, rng.uniform(4.0, 8.0, len(tokens)), -np.abs(rng.normal(0.0, 0.05, len(tokens))))
        records.append(ActivationRecord(seq_id, tokens, ids, (polarity.sign * values).astype(np.float32), len(prefix)))
    by_split = {split: records[i :: len(Split)] for i, split in enumerate(Split)}
    exemplars: list[Exemplar] = []
    for split, chosen in by_split.items():
        extremes = [float(r.polarity_activations(polarity)[r.prefix_len :].max(initial=0.0)) for r in chosen]
        order = np.argsort(extremes, kind="stable")[::-1][:top_k]
        exemplars += [Exemplar(split, Sample.TOP, rank, extremes[i], chosen[i]) for rank, i in enumerate(order)]
        drawn = rng.choice(len(chosen), size=min(random_per_split, len(chosen)), replace=False)
        exemplars += [Exemplar(split, Sample.RANDOM, rank, extremes[i], chosen[i])
                      for rank, i in enumerate(drawn)]
    train = np.concatenate([r.polarity_activations(polarity)[r.prefix_len :] for r in by_split[Split.TRAIN]])
    oriented = np.concatenate([polarity.sign * r.activations[r.prefix_len :] for r in by_split[Split.TRAIN]])
    stats = FeatureStats(
        max=float(oriented.max()), mean=float(oriented.mean()), std=float(oriented.std()),
        frac_active=float((train > 0).mean()), quantiles={q: float(np.quantile(oriented, q)) for q in QUANTILES},
    )
    return FeatureExemplars(FeatureId(layer, index, polarity), stats, tuple(exemplars))
