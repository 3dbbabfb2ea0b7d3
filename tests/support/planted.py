"""Planted features for simulator and scorer tests: feature i fires exactly on one word.

Sequences are built from :func:`tests.support.tiny_models.sample_texts`, tokenized into
word and punctuation tokens that carry their leading whitespace (so they concatenate to the
text, as the corpus's tokens do), after a one-token prefix that no score may count.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

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
from tests.support.tiny_models import sample_texts

PREFIX = "<|begin_of_text|>"
TOKEN = re.compile(r"\s*\w+|\s*[^\w\s]")
DESCRIPTION_TEMPLATES = (
    'the word "{w}"',
    '"{w}"',
    "mentions of {w}",
    'the token " {w}"',
    "{w}",
    "the noun {w}",
)


@dataclass(frozen=True)
class PlantedCorpus:
    sequences: dict[Split, list[tuple[str, ...]]]
    random_ids: dict[Split, list[int]]  # positions (in that split) of the random sequences

    def seq_id(self, split: Split, position: int) -> int:
        return 100_000 * list(Split).index(split) + position


def planted_corpus(per_split: int = 160, sentences_per_sequence: int = 3, seed: int = 0, random_per_split: int = 5) -> PlantedCorpus:
    texts = sample_texts(per_split * sentences_per_sequence * 3, seed=seed)
    rng = random.Random(seed)
    sequences, random_ids = {}, {}
    for s, split in enumerate(Split):
        chunk = texts[s * per_split * sentences_per_sequence : (s + 1) * per_split * sentences_per_sequence]
        sequences[split] = [
            (PREFIX, *TOKEN.findall(" ".join(chunk[i : i + sentences_per_sequence])))
            for i in range(0, len(chunk), sentences_per_sequence)
        ]
        random_ids[split] = rng.sample(range(per_split), random_per_split)
    return PlantedCorpus(sequences, random_ids)


def planted_words(corpus: PlantedCorpus, min_sequences: int = 10) -> list[str]:
    """Words of 3+ letters in at least ``min_sequences`` train sequences, in a fixed order."""
    counts: dict[str, int] = {}
    for tokens in corpus.sequences[Split.TRAIN]:
        for word in {t.strip().lower() for t in tokens[1:] if t.strip().isalpha() and len(t.strip()) >= 3}:
            counts[word] = counts.get(word, 0) + 1
    return sorted(w for w, n in counts.items() if n >= min_sequences)


def planted_feature(corpus: PlantedCorpus, word: str, index: int, polarity: Polarity = Polarity.POS, layer: int = 0,
                    top_k: int = 20, seed: int = 0) -> FeatureExemplars:
    """A feature that fires (strength 0.6-1.0, sign by polarity) on ``word`` and is ~0 elsewhere."""
    rng = np.random.default_rng([seed, index])
    exemplars, train_values = [], []
    for split, sequences in corpus.sequences.items():
        records = []
        for position, tokens in enumerate(sequences):
            hits = np.array([i > 0 and t.strip().lower() == word for i, t in enumerate(tokens)])
            values = np.where(hits, rng.uniform(0.6, 1.0, len(tokens)), rng.uniform(0.0, 0.02, len(tokens)))
            values[0] = 3.0  # a huge prefix activation that every score must ignore
            activations = (polarity.sign * values).astype(np.float32)
            records.append(ActivationRecord(corpus.seq_id(split, position), tokens,
                                            tuple(range(len(tokens))), activations, prefix_len=1))
            if split is Split.TRAIN:
                train_values.append(values[1:])
        extremes = [float(r.polarity_activations(polarity)[1:].max()) for r in records]
        order = sorted(range(len(records)), key=lambda i: -extremes[i])[:top_k]
        exemplars += [Exemplar(split, Sample.TOP, rank, extremes[i], records[i]) for rank, i in enumerate(order)]
        exemplars += [Exemplar(split, Sample.RANDOM, rank, extremes[i], records[i])
                      for rank, i in enumerate(corpus.random_ids[split])]
        active = [i for i in sorted(range(len(records)), key=lambda i: -extremes[i]) if extremes[i] > 0.5]
        sampled = active[len(active) // 2 :: max(1, len(active) // 4)][:2]  # from the lower deciles, like delphi
        exemplars += [Exemplar(split, Sample.QUANTILE, rank, extremes[i], records[i]) for rank, i in enumerate(sampled)]
    flat = np.concatenate(train_values)
    stats = FeatureStats(float(flat.max()), float(flat.mean()), float(flat.std()), float((flat > 0).mean()), {})
    return FeatureExemplars(FeatureId(layer, index, polarity), stats, tuple(exemplars))


def planted_candidates(word: str, k: int = 3, seed: int = 0) -> list[str]:
    rng = random.Random(f"{seed}:{word}")
    return [template.format(w=word) for template in rng.sample(DESCRIPTION_TEMPLATES, k)]
