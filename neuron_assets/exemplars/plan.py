"""The exemplar pass's plan: the bytes its state and tables take per feature, the device
budget, and the groups of features read in one pass each, computed before reading."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from neuron_assets.config import ExemplarsConfig
from neuron_assets.types import Polarity, Split

KEPT_SLOT_BYTES = 4 + 4 + 8  # key (float32), extreme (float32), seq_id (int64) per kept sequence
KEPT_ACT_BYTES = 2  # a kept sequence's activations: float16 (or bfloat16), the tables' precision
SUM_BYTES = 4 * 8  # sum, sum of squares, positive and negative counts (float64) per feature


@dataclass(frozen=True)
class StateBytes:
    """Bytes the exemplar pass keeps per feature, and buffers shared by all features."""

    split: int  # one split, every polarity: top-k and reservoir slots, random sequences
    stats: int  # running sums and the train token sample
    fixed: int  # the token sample's keys


def exemplar_state_bytes(config: ExemplarsConfig, seq_len: int, act_bytes: int, polarities: int) -> StateBytes:
    """The exemplar collector's state, exactly as it allocates it."""
    slots = config.top_k + (config.quantile_reservoir if config.per_quantile else 0) + config.quiet_per_split
    per_slot = KEPT_SLOT_BYTES + seq_len * min(act_bytes, KEPT_ACT_BYTES)
    split = polarities * slots * per_slot + config.random_per_split * seq_len * act_bytes
    stats = SUM_BYTES + config.stats_token_sample * act_bytes
    return StateBytes(split=split, stats=stats, fixed=config.stats_token_sample * 4)


# A built table's row in host memory beside its activations (float16 per token), as polars
# holds it before it is written; measured on the tiny test model's tables (tests/test_plan.py).
TABLE_ROW_MEMORY_BYTES = 44
STATS_ROW_MEMORY_BYTES = 64


def exemplar_rows_per_split(config: ExemplarsConfig, per_split: int | None = None) -> int:
    """Exemplar rows of one feature x polarity in one split: top, quantile samples, quiet and
    random sequences, at most ``per_split`` of each kind where the split is that small."""
    cap = per_split if per_split is not None else float("inf")
    quantile = min(config.quantile_bins * config.per_quantile, config.quantile_reservoir) if config.per_quantile else 0
    return int(sum(min(n, cap) for n in (config.top_k, quantile, config.quiet_per_split, config.random_per_split)))


def exemplar_table_bytes(config: ExemplarsConfig, seq_len: int, polarities: int) -> int:
    """One feature's exemplar and stats rows, every polarity and split, as built in host
    memory at the end of the pass (an upper bound: short windows hold fewer tokens)."""
    rows = 3 * exemplar_rows_per_split(config)
    return polarities * (rows * (seq_len * KEPT_ACT_BYTES + TABLE_ROW_MEMORY_BYTES) + STATS_ROW_MEMORY_BYTES)


# The pass works in these sizes, and the plan counts them (state and tables read them here).

CHUNK_BYTES = 256 * 2**20
"""Per-batch work is done over slices of the feature axis whose (batch, tokens, features)
float32 size is at most this, so temporaries stay bounded whatever the model's width."""
CHUNK_TEMPORARIES = 3  # chunk-sized temporaries alive at once (gathered rows, comparison masks, casts)

TABLE_WORKERS = 2
"""Layers whose tables are built at once at the end of a pass. Two keep two cores busy (the
build is mostly single-threaded numpy) and hold two layers' tables beside the one the caller
is writing: the plan's host peak counts the three (about 1.3 GB per layer, both polarities,
for configs/llama31_8b_instruct.yaml)."""


def plan_exemplar_pass(
    neurons: dict[int, list[int]],
    polarities: list[Polarity],
    config: ExemplarsConfig,
    seq_len: int,
    batch_size: int,
    device,
    dtype,
    budget_bytes: int | None = None,
) -> ExemplarPlan:
    """How the pass will hold its state: bytes per feature, the device budget, and the groups
    of features read in one pass each (as few as fit the budget, each whole layers where a
    layer fits, in layer order).

    The budget is ``budget_bytes``, else ``exemplars.device_memory_gb``, else 90% of what is
    free on a GPU (after the model is loaded) or 80% of the available host memory on CPU.
    """
    device = torch.device(device)
    act_bytes = torch.empty((), dtype=dtype).element_size()
    sizes = exemplar_state_bytes(config, seq_len, act_bytes, len(polarities))
    if budget_bytes is not None:
        budget, source = int(budget_bytes), "given"
    elif config.device_memory_gb is not None:
        budget, source = int(config.device_memory_gb * 1e9), "exemplars.device_memory_gb"
    else:
        budget, source = _free_memory(device)
    # The device holds the split being read and the train statistics; on CPU the host is the
    # device, so finished splits count against the same budget. Each feature also costs its
    # captured activations of one batch.
    resident = sizes.stats + sizes.split * (len(Split) if device.type == "cpu" else 1)
    per_feature = resident + batch_size * seq_len * act_bytes
    widest = max((len(v) for v in neurons.values()), default=0)
    fixed = sizes.fixed + CHUNK_TEMPORARIES * min(CHUNK_BYTES, batch_size * seq_len * widest * 4)
    capacity = (budget - fixed) // per_feature
    total = sum(len(v) for v in neurons.values())
    if capacity < 1:
        raise ValueError(
            f"the exemplar pass cannot fit one feature in {budget / 1e9:.2f} GB ({source}): a feature needs "
            f"{per_feature / 1e6:.2f} MB plus {fixed / 1e9:.2f} GB of fixed buffers. Fix: raise "
            "exemplars.device_memory_gb, lower subject.batch_size, exemplars.quantile_reservoir or "
            "exemplars.stats_token_sample, or free device memory"
        )
    groups = _pack_groups(neurons, int(capacity))
    return ExemplarPlan(
        features=total, polarities=len(polarities), seq_len=seq_len, batch_size=batch_size, device=str(device),
        act_bytes=act_bytes, budget_bytes=budget, budget_source=source, split_state_bytes=sizes.split,
        stats_bytes=sizes.stats, resident_bytes=resident, per_feature_bytes=per_feature, fixed_bytes=fixed,
        table_bytes=exemplar_table_bytes(config, seq_len, len(polarities)), groups=tuple(PassGroup(g) for g in groups),
    )


@dataclass(frozen=True)
class PassGroup:
    """The features one pass reads: layer -> neuron indices; the pass stops after its deepest layer."""

    neurons: dict[int, list[int]]

    @property
    def features(self) -> int:
        return sum(len(v) for v in self.neurons.values())

    @property
    def deepest(self) -> int:
        return max(self.neurons)


@dataclass(frozen=True)
class ExemplarPlan:
    """The exemplar pass's memory plan, computed before reading (all sizes in bytes)."""

    features: int
    polarities: int
    seq_len: int
    batch_size: int
    device: str
    act_bytes: int
    budget_bytes: int
    budget_source: str
    split_state_bytes: int  # per feature: one split, all polarities (top-k, reservoir, random)
    stats_bytes: int  # per feature: running sums and the train token sample
    resident_bytes: int  # per feature on the device: the split being read and the stats (all splits on CPU)
    per_feature_bytes: int  # resident + one batch of captured activations
    fixed_bytes: int  # buffers that do not grow with features: token-sample keys, chunk temporaries
    table_bytes: int  # per feature: its exemplar and stats rows, every polarity, as built on the host
    groups: tuple[PassGroup, ...]

    @property
    def passes(self) -> int:
        return len(self.groups)

    @property
    def peak_device_bytes(self) -> int:
        """The collector's own peak on the device (model weights and forward workspace aside)."""
        return self.fixed_bytes + max(g.features for g in self.groups) * self.per_feature_bytes

    @property
    def feature_state_bytes(self) -> int:
        """One feature's whole state: every split and the stats (finished, on the host)."""
        return len(Split) * self.split_state_bytes + self.stats_bytes

    @property
    def state_bytes(self) -> int:
        """The whole state of all features, all splits: what the pass holds once, over all groups."""
        return self.features * self.feature_state_bytes

    @property
    def peak_host_bytes(self) -> int:
        """Host memory at the end of a group's pass: its finished splits, and the tables of the
        layers built at once (TABLE_WORKERS) beside the one the caller is writing."""
        return max(self.host_bytes(g) for g in self.groups)

    def host_bytes(self, group: PassGroup) -> int:
        """One group's host peak: finished splits of its features, tables of its widest layers."""
        in_flight = sorted((len(v) for v in group.neurons.values()), reverse=True)[: TABLE_WORKERS + 1]
        return group.features * self.feature_state_bytes + sum(in_flight) * self.table_bytes

    def group_neurons(self) -> list[dict[int, list[int]]]:
        return [g.neurons for g in self.groups]

    def regrouped(self, groups: list[dict[int, list[int]]]) -> ExemplarPlan:
        return replace(self, groups=tuple(PassGroup(g) for g in groups))

    def describe(self) -> str:
        """A few lines for the log and the asset's metadata."""
        gb = 1e9
        lines = [
            f"exemplar pass plan: {self.features} features x {self.polarities} polarities on {self.device}, "
            f"budget {self.budget_bytes / gb:.2f} GB ({self.budget_source})",
            f"  state per feature: {self.split_state_bytes / 1e3:.1f} kB per split, {self.stats_bytes / 1e3:.1f} kB stats; "
            f"{self.state_bytes / gb:.2f} GB for all features and splits",
            f"  {self.passes} pass{'es' if self.passes > 1 else ''} over the corpus; device peak "
            f"{self.peak_device_bytes / gb:.2f} GB (state + captured activations), host {self.peak_host_bytes / gb:.2f} GB "
            "(finished splits + tables being built)",
        ]
        for i, group in enumerate(self.groups):
            layers = sorted(group.neurons)
            span = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"
            lines.append(f"  pass {i + 1}: {span}, {group.features} features, stops after layer {group.deepest}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "groups"}
        fields.update(passes=self.passes, peak_device_bytes=self.peak_device_bytes, state_bytes=self.state_bytes,
                      peak_host_bytes=self.peak_host_bytes,
                      groups=[{"layers": sorted(g.neurons), "features": g.features, "deepest": g.deepest} for g in self.groups])
        return fields


def _free_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9), f"90% of the {free / 1e9:.1f} GB free on {device}"
    import psutil

    available = psutil.virtual_memory().available
    return int(available * 0.8), f"80% of the {available / 1e9:.1f} GB of available host memory"


def _pack_groups(neurons: dict[int, list[int]], capacity: int) -> list[dict[int, list[int]]]:
    """Whole layers in order while they fit; a layer wider than the capacity is cut in pieces."""
    groups: list[dict[int, list[int]]] = []
    current: dict[int, list[int]] = {}
    used = 0
    for layer in sorted(neurons):
        indices = neurons[layer]
        if used + len(indices) > capacity and current:
            groups.append(current)
            current, used = {}, 0
        if len(indices) <= capacity:
            current[layer] = list(indices)
            used += len(indices)
            continue
        pieces = -(-len(indices) // capacity)
        size = -(-len(indices) // pieces)
        for lo in range(0, len(indices), size):
            groups.append({layer: list(indices[lo : lo + size])})
    if current:
        groups.append(current)
    return groups
