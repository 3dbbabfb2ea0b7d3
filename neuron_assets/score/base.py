"""What every scorer shares: the :class:`Score` it returns, the :class:`Scorer` protocol,
the flags that say why a value is a default, and the examples a score is computed on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from neuron_assets.types import ActivationRecord, FeatureExemplars, Split

# (The correlation's own flags, CONSTANT_PREDICTION, CONSTANT_ACTIVATION and TOO_FEW_TOKENS,
# come with its arithmetic from neuron_assets.numeric.)
NO_EXAMPLES = "no_examples"
NO_NEGATIVES = "no_negatives"
UNANSWERED = "unanswered"


@dataclass(frozen=True)
class Score:
    value: float  # in [-1, 1]; never NaN
    flags: tuple[str, ...] = ()  # why a value is a default (constant predictions, no examples, ...)
    n_examples: int = 0
    n_tokens: int = 0


class Scorer(Protocol):
    name: str
    simulator: str | None  # the simulator a score depends on, stored with it

    def score(self, feature: FeatureExemplars, descriptions: Sequence[str], split: Split) -> list[Score]: ...


class ScorerUnavailable(RuntimeError):
    """A scorer that cannot run with this configuration (no LLM for detection); the message says why."""


def evaluation_records(feature: FeatureExemplars, split: Split, top: int = 20, random_count: int = 5) -> list[ActivationRecord]:
    """E_split: the split's top exemplars, then its random sequences (each sequence once)."""
    chosen = [e.record for e in feature.top(split)[:top]] + [e.record for e in feature.random(split)[:random_count]]
    return list({record.seq_id: record for record in chosen}.values())


def plain_text(record: ActivationRecord) -> str:
    """A record's text after its prefix on one line, control tokens defused (as judges see it)."""
    from neuron_assets.excerpts import defuse_control_tokens

    return defuse_control_tokens("".join(record.tokens[record.prefix_len :]).replace("\n", " "))
