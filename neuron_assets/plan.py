"""Plans: what each stage will need (memory, device-hours, disk, explainer tokens, cost)
before a run, from the config and the model's shape alone (no weights are read).
"""

from __future__ import annotations

from dataclasses import dataclass

from neuron_assets.config import ExemplarsConfig

KEPT_SLOT_BYTES = 4 + 4 + 8  # key (float32), extreme (float32), seq_id (int64) per kept sequence
SUM_BYTES = 4 * 8  # sum, sum of squares, positive and negative counts (float64) per feature


@dataclass(frozen=True)
class StateBytes:
    """Bytes the exemplar pass keeps per feature, and buffers shared by all features."""

    split: int  # one split, every polarity: top-k and reservoir slots, random sequences
    stats: int  # running sums and the train token sample
    fixed: int  # the token sample's keys


def exemplar_state_bytes(config: ExemplarsConfig, seq_len: int, act_bytes: int, polarities: int) -> StateBytes:
    """The exemplar collector's state, exactly as it allocates it."""
    slots = config.top_k + (config.quantile_reservoir if config.per_quantile else 0)
    per_slot = KEPT_SLOT_BYTES + seq_len * act_bytes
    split = polarities * slots * per_slot + config.random_per_split * seq_len * act_bytes
    stats = SUM_BYTES + config.stats_token_sample * act_bytes
    return StateBytes(split=split, stats=stats, fixed=config.stats_token_sample * 4)
