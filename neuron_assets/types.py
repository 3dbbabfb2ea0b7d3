"""The data types every stage shares, defined once.

A *feature* is one scalar read off the subject model at each token (an MLP neuron, an SAE
latent). A feature is described separately for each *polarity*: ``pos`` looks at its most
positive activations, ``neg`` at its most negative ones (gated MLPs have both signs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

import numpy as np


class Polarity(str, Enum):
    POS = "pos"
    NEG = "neg"

    @property
    def sign(self) -> int:
        """+1 for pos, -1 for neg: ``sign * activation`` is large where the feature is extreme."""
        return 1 if self is Polarity.POS else -1


class Partition(NamedTuple):
    """One partition of a per-feature asset: a layer and a polarity. Its ``key``, ``"12|pos"``,
    is the partition's name everywhere (Dagster's multi-partition key, resume markers, locks)."""

    layer: int
    polarity: Polarity

    @property
    def key(self) -> str:
        return f"{self.layer}|{Polarity(self.polarity).value}"

    @classmethod
    def of(cls, value) -> "Partition":
        """A Partition from its key (``"12|pos"``), a Dagster MultiPartitionKey, or a
        ``(layer, polarity)`` pair."""
        if isinstance(value, tuple) and len(value) == 2:
            return cls(int(value[0]), Polarity(value[1]))
        by_dimension = getattr(value, "keys_by_dimension", None)
        if by_dimension is not None:
            return cls(int(by_dimension["layer"]), Polarity(by_dimension["polarity"]))
        layer, _, polarity = str(value).partition("|")
        try:
            return cls(int(layer), Polarity(polarity))
        except ValueError:
            raise ValueError(f"not a partition key: {value!r} (a layer and a polarity, e.g. '12|pos')") from None


class Split(str, Enum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"


class Sample(str, Enum):
    """How an exemplar was drawn (column ``sample`` of the exemplars table)."""

    TOP = "top"  # the sequences with the most extreme per-sequence activation
    RANDOM = "random"  # sequences drawn uniformly, the same ones for every feature
    QUANTILE = "quantile"  # activating sequences sampled per decile of their activation
    QUIET = "quiet"  # sequences of this feature that stay at or below its activating threshold


@dataclass(frozen=True, order=True)
class FeatureId:
    layer: int
    index: int
    polarity: Polarity
    kind: str = "neuron"

    def __str__(self) -> str:
        return f"{self.kind} L{self.layer}/{self.index} {self.polarity.value}"


@dataclass(frozen=True, eq=False)
class ActivationRecord:
    """One token sequence with one feature's signed activation at each token.

    ``tokens`` are the token strings, which concatenate to the sequence's text (a token
    carries its leading whitespace). Positions before ``prefix_len`` are a fixed prefix
    (a BOS token, a chat header) that no statistic or top-k counts.
    """

    seq_id: int
    tokens: tuple[str, ...]
    token_ids: tuple[int, ...]
    activations: np.ndarray  # float32, shape (len(tokens),), signed
    prefix_len: int = 0

    def polarity_activations(self, polarity: Polarity) -> np.ndarray:
        """relu(a) for pos, relu(-a) for neg: the quantity a description of that polarity predicts."""
        return np.maximum(self.activations * polarity.sign, 0.0).astype(np.float32)

    @property
    def text(self) -> str:
        return "".join(self.tokens)


@dataclass(frozen=True)
class FeatureStats:
    """Statistics of one feature in one polarity over every counted token of the train split.

    Values are in the polarity's orientation: ``sign * activation``.
    """

    max: float  # the most extreme value, sign * activation
    mean: float
    std: float
    frac_active: float  # share of tokens with sign * activation > 0
    quantiles: dict[float, float] = field(default_factory=dict)  # q -> value, from a token sample

    @property
    def scale(self) -> float:
        """The feature x polarity's one activation normalizer: its train-split max (column
        ``scale`` of neuron_stats). token_activation prompts, the simulator's training labels
        and fuzzing marks all express activations as a share of it."""
        return self.max


@dataclass(frozen=True)
class Exemplar:
    split: Split
    sample: Sample
    rank: int  # 0 = most extreme for TOP; slot for QUANTILE (ascending bins); draw order for RANDOM and QUIET
    extreme: float  # the sequence's most extreme value, sign * activation
    record: ActivationRecord
    bin: int | None = None  # QUANTILE: the activation-quantile bin, 0 = lowest; None for other samples


@dataclass(frozen=True)
class FeatureExemplars:
    """Everything the explain and score stages read about one feature x polarity."""

    feature: FeatureId
    stats: FeatureStats
    exemplars: tuple[Exemplar, ...]
    output_tokens: tuple[str, ...] = ()  # the logit lens's promoted tokens, strongest first (when read)

    def select(self, split: Split, sample: Sample) -> list[Exemplar]:
        chosen = [e for e in self.exemplars if e.split is split and e.sample is sample]
        return sorted(chosen, key=lambda e: e.rank)

    def top(self, split: Split) -> list[Exemplar]:
        return self.select(split, Sample.TOP)

    def random(self, split: Split) -> list[Exemplar]:
        return self.select(split, Sample.RANDOM)

    def quantile(self, split: Split) -> list[Exemplar]:
        return self.select(split, Sample.QUANTILE)

    def quiet(self, split: Split) -> list[Exemplar]:
        return self.select(split, Sample.QUIET)
