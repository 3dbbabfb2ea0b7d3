"""What the exemplar pass keeps while it reads: per feature and split the kept sequences
(top-k, reservoir, quiet sample) and the random sequences' activations, per group of
features the pass state, and the blocks it hands to table assembly."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from neuron_assets.config import ExemplarsConfig
from neuron_assets.exemplars.batches import Batch, CountedRanges
from neuron_assets.exemplars.plan import CHUNK_BYTES, KEPT_ACT_BYTES
from neuron_assets.exemplars.stats import TokenStats
from neuron_assets.types import Sample, Polarity, Split


@dataclass
class FeatureLayout:
    """The selected neurons of a group's layers side by side on one feature axis."""

    neurons: dict[int, list[int]]
    layers: list[int] = field(init=False)
    offsets: dict[int, int] = field(init=False)
    total: int = field(init=False)

    def __post_init__(self):
        self.layers = sorted(self.neurons)
        self.offsets, position = {}, 0
        for layer in self.layers:
            self.offsets[layer] = position
            position += len(self.neurons[layer])
        self.total = position

    def columns(self, layer: int) -> slice:
        return slice(self.offsets[layer], self.offsets[layer] + len(self.neurons[layer]))


@dataclass
class Block:
    """(F, j) arrays of one sample of exemplars in one split, ready to flatten into rows."""

    sample: Sample
    split: Split
    seq_ids: torch.Tensor
    extremes: torch.Tensor
    acts: torch.Tensor  # (F, j, T), or (F, K, T) read through slots
    valid: torch.Tensor
    bins: torch.Tensor | None
    slots: torch.Tensor | None = None  # (F, j): the slot of acts' second axis each member is in


class KeptSequences:
    """Per feature, the k sequences with the largest key, with their per-token activations.

    Top-k uses the sequence's extreme as key; the uniform reservoir uses a random key (and
    -inf for sequences that do not activate), which makes the same merge a sampler.
    """

    NAMES = ("keys", "extremes", "seq_ids", "acts")

    @classmethod
    def fresh(cls, features: int, k: int, seq_len: int, device, dtype) -> KeptSequences:
        kept = cls()
        kept.keys = torch.full((features, k), -torch.inf, device=device)
        kept.extremes = torch.full((features, k), -torch.inf, device=device)
        kept.seq_ids = torch.full((features, k), -1, dtype=torch.long, device=device)
        # Slots are written before they are read (an empty slot's key is -inf and it is never
        # shown), so the large buffer is left uninitialized rather than zeroed.
        kept.acts = torch.empty((features, k, seq_len), dtype=dtype, device=device)
        return kept

    def offer(self, cols: slice, keys, extremes, seq_ids, chunk: Chunk) -> None:
        """keys, extremes: (B, Fc) for the features ``cols``; seq_ids: (B,); chunk: the
        batch's activations of those features.

        Only features where some candidate beats the k-th kept key are merged. The kept set
        is unordered (ranks come at the end): a candidate that enters takes the slot of one
        that leaves, so only entering token rows are copied.
        """
        kept = self.keys[cols]
        beats = (keys > kept.amin(dim=1)).any(dim=0)
        rows = beats.nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        k = kept.shape[1]
        all_keys = torch.cat([kept[rows], keys[:, rows].T], dim=1)  # (R, k + B)
        chosen = torch.zeros_like(all_keys, dtype=torch.bool)
        chosen.scatter_(1, all_keys.topk(k, dim=1, sorted=False).indices, True)
        # Row by row, the leaving slots and the entering candidates are equally many, and
        # nonzero() lists both in row-major order, so they pair up.
        leave_row, leave_slot = (~chosen[:, :k]).nonzero(as_tuple=True)
        enter_row, enter_seq = chosen[:, k:].nonzero(as_tuple=True)
        if enter_row.numel() == 0:
            return
        local = rows[enter_row]
        # Both sides through flat indices: index_select and index_copy_ are several times
        # faster on CPU than indexing with two index tensors.
        slot = (cols.start + rows[leave_row]) * k + leave_slot
        pair = enter_seq * keys.shape[1] + local
        self.keys.view(-1).index_copy_(0, slot, keys.reshape(-1).index_select(0, pair))
        self.extremes.view(-1).index_copy_(0, slot, extremes.reshape(-1).index_select(0, pair))
        self.seq_ids.view(-1).index_copy_(0, slot, seq_ids.index_select(0, enter_seq))
        self.acts.view(-1, self.acts.shape[2]).index_copy_(0, slot, chunk.rows(enter_seq, local))

    def rows(self, cols: slice) -> KeptSequences:
        part = KeptSequences()
        for name in self.NAMES:
            setattr(part, name, getattr(self, name)[cols])
        return part

    def ranked(self) -> Block:
        """The members ordered by key, largest first, as a block whose activations stay where
        they are (the slot map names each member's slot; only the valid rows are ever copied)."""
        order = self.keys.argsort(dim=1, descending=True, stable=True)
        keys = self.keys.gather(1, order)
        return Block(None, None, self.seq_ids.gather(1, order), self.extremes.gather(1, order), self.acts,
                     torch.isfinite(keys), None, order)

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.NAMES]

    def state(self) -> dict:
        return {name: getattr(self, name).cpu() for name in self.NAMES}

    @classmethod
    def restore(cls, saved: dict, device) -> KeptSequences:
        kept = cls()
        for name in cls.NAMES:
            setattr(kept, name, saved[name].to(device))
        return kept


class Chunk:
    """One batch's activations of a slice of features, (B, T, Fc), with the counted mask;
    rows come out in ``dtype``, the kept sequences' dtype."""

    def __init__(self, acts: torch.Tensor, counted: torch.Tensor, dtype: torch.dtype):
        self.acts, self.counted, self.dtype = acts, counted, dtype
        self._by_feature: torch.Tensor | None = None

    def rows(self, seq: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """(n, T) activations of (sequence, feature) pairs, zero where a token does not count.
        When many pairs are wanted (early in a pass), one masked transpose to (B, Fc, T), cast
        once, makes every row a contiguous copy; a few are gathered from the strided
        activations."""
        if self._by_feature is None and seq.numel() * 8 >= self.acts.shape[0] * self.acts.shape[2]:
            batch, tokens, features = self.acts.shape
            self._by_feature = torch.empty((batch, features, tokens), dtype=self.dtype, device=self.acts.device)
            torch.mul(self.acts.transpose(1, 2), self.counted.unsqueeze(1), out=self._by_feature)
        if self._by_feature is not None:
            batch, features, tokens = self._by_feature.shape
            return self._by_feature.view(batch * features, tokens).index_select(0, seq * features + feature)
        return (self.acts[seq, :, feature] * self.counted[seq]).to(self.dtype)


def kept_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of kept sequences' activations: the subject's where it has KEPT_ACT_BYTES (the
    plan sizes the state by the same rule), else float16, the precision the exemplar tables
    store. A float32 subject (CPU) would otherwise write and hold twice the bytes for digits
    the tables drop."""
    return dtype if dtype.itemsize <= KEPT_ACT_BYTES else torch.float16


class SplitState:
    """One split's kept sequences for every polarity, and its random sequences' activations."""

    def __init__(self, top, reservoir, random_ids, random_acts, quiet=None):
        self.top: dict[str, KeptSequences] = top
        self.reservoir: dict[str, KeptSequences] = reservoir
        self.random_ids: torch.Tensor = random_ids  # (n,), on the host
        self.random_acts: torch.Tensor = random_acts  # (n, F, T)
        self.quiet: dict[str, KeptSequences] = quiet or {}

    @classmethod
    def fresh(cls, features, polarities, config: ExemplarsConfig, seq_len, random_ids, device, dtype) -> SplitState:
        kept = kept_dtype(dtype)
        top = {p: KeptSequences.fresh(features, config.top_k, seq_len, device, kept) for p in polarities}
        reservoir = ({p: KeptSequences.fresh(features, config.quantile_reservoir, seq_len, device, kept) for p in polarities}
                     if config.per_quantile else {})
        quiet = ({p: KeptSequences.fresh(features, config.quiet_per_split, seq_len, device, kept) for p in polarities}
                 if config.quiet_per_split else {})
        acts = torch.zeros((len(random_ids), features, seq_len), dtype=dtype, device=device)
        return cls(top, reservoir, random_ids.cpu(), acts, quiet)

    def tensors(self) -> list[torch.Tensor]:
        kept = (*self.top.values(), *self.reservoir.values(), *self.quiet.values())
        return [t for k in kept for t in k.tensors()] + [self.random_acts]

    def state(self) -> dict:
        return {"top": {p: k.state() for p, k in self.top.items()},
                "reservoir": {p: k.state() for p, k in self.reservoir.items()},
                "quiet": {p: k.state() for p, k in self.quiet.items()},
                "random_ids": self.random_ids, "random_acts": self.random_acts.cpu()}

    @classmethod
    def restore(cls, saved: dict, device) -> SplitState:
        return cls({p: KeptSequences.restore(v, device) for p, v in saved["top"].items()},
                   {p: KeptSequences.restore(v, device) for p, v in saved["reservoir"].items()},
                   saved["random_ids"], saved["random_acts"].to(device),
                   {p: KeptSequences.restore(v, device) for p, v in saved.get("quiet", {}).items()})


class PassState:
    """Everything one pass over the corpus keeps for one group of features. A split's state
    is allocated on the device when its first batch arrives and moves to host memory when
    its last batch is done, so the device holds only the split being read (and the train
    statistics while train is read)."""

    def __init__(self, neurons, polarities, config: ExemplarsConfig, seq_len, random_ids, device, dtype):
        self.layout = FeatureLayout(neurons)
        self.polarities = [Polarity(p) for p in polarities]
        self.config, self.seq_len, self.random_ids = config, seq_len, random_ids
        self.device, self.dtype = device, dtype
        self.splits: dict[str, SplitState] = {}
        self.stats: TokenStats | None = None
        self.final_thresholds: dict[str, torch.Tensor] = {}  # polarity -> (F,), once train is read

    def split_state(self, split: str) -> SplitState:
        if split not in self.splits:
            self.splits[split] = SplitState.fresh(self.layout.total, [p.value for p in self.polarities], self.config,
                                                  self.seq_len, self.random_ids[split], self.device, self.dtype)
        if split == Split.TRAIN.value and self.stats is None:
            self.stats = TokenStats.fresh(self.layout.total, self.config.stats_token_sample, self.device, self.dtype)
        return self.splits[split]

    def update(self, split: str, per_layer: dict[int, torch.Tensor], batch: Batch, random_keys) -> None:
        """Fold one batch of one split in, layer by layer and chunk by chunk of features."""
        state = self.split_state(split)
        device = self.device
        counted = batch.counted.to(device)
        seq_ids = batch.seq_ids.to(device)
        sequence_keys, token_keys = (key.to(device) for key in random_keys)
        ranges = CountedRanges(batch.prefix_len, batch.n_tokens, device)
        wanted = state.random_ids
        hits = (batch.seq_ids.unsqueeze(1) == wanted.unsqueeze(0)).nonzero().tolist()
        train = split == Split.TRAIN.value
        entering = self.stats.entering(counted, token_keys) if train else None
        for layer in self.layout.layers:
            acts = per_layer[layer]  # (B, T, F_layer)
            offset, width = self.layout.offsets[layer], acts.shape[-1]
            step = max(1, CHUNK_BYTES // (acts.shape[0] * acts.shape[1] * 4))
            for lo in range(0, width, step):
                chunk = acts[..., lo : lo + step]
                cols = slice(offset + lo, offset + lo + chunk.shape[-1])
                highest, lowest = ranges.extremes(chunk)
                offered = Chunk(chunk, counted, kept_dtype(self.dtype))
                for polarity in self.polarities:
                    extremes = highest if polarity is Polarity.POS else -lowest
                    state.top[polarity.value].offer(cols, extremes, extremes, seq_ids, offered)
                    reservoir = state.reservoir.get(polarity.value)
                    quiet = state.quiet.get(polarity.value)
                    if reservoir is None and quiet is None:
                        continue
                    threshold = self.threshold(split, polarity, cols)  # (Fc,), after this batch's top offer
                    if reservoir is not None:
                        keys = torch.where(extremes > threshold, sequence_keys.unsqueeze(1), -torch.inf)
                        reservoir.offer(cols, keys, extremes, seq_ids, offered)
                    if quiet is not None:
                        below = (extremes <= threshold) & torch.isfinite(extremes)
                        quiet.offer(cols, torch.where(below, sequence_keys.unsqueeze(1), -torch.inf), extremes,
                                    seq_ids, offered)
                for row, slot in hits:
                    state.random_acts[slot, cols] = (chunk[row] * counted[row].unsqueeze(-1)).T.to(self.dtype)
                if train:
                    self.stats.update(cols, chunk, ranges, entering)
        if train:
            self.stats.commit(counted, entering, batch.ids.to(device), torch.as_tensor(batch.prefix_len, device=device))

    def threshold(self, split: str, polarity: Polarity, cols: slice) -> torch.Tensor:
        """(Fc,) activating threshold of the features ``cols`` on the device: the fraction of
        the train max, read from the train top-k (running while train is read, final after;
        0 where no train sequence was read or the max is not positive)."""
        train = self.splits.get(Split.TRAIN.value)
        if train is None:
            return torch.zeros(cols.stop - cols.start, device=self.device)
        if split != Split.TRAIN.value:  # final: computed once per polarity
            if polarity.value not in self.final_thresholds:
                self.final_thresholds[polarity.value] = activating_threshold(train.top[polarity.value].extremes,
                                                                             self.config).to(self.device)
            return self.final_thresholds[polarity.value][cols]
        return activating_threshold(train.top[polarity.value].extremes[cols], self.config)

    def finish_split(self, split: str) -> None:
        self.splits[split] = SplitState.restore(self.splits[split].state(), "cpu")
        if split == Split.TRAIN.value:
            self.stats = TokenStats.restore(self.stats.state(), "cpu")

    def restore_split(self, split: str, saved: dict, stats: dict | None, device) -> None:
        """Put a split's saved state back on ``device``, with the train statistics saved beside
        it (None for a split other than train); :func:`neuron_assets.exemplars.checkpoint.restore_group`
        reads them from a checkpoint."""
        self.splits[split] = SplitState.restore(saved, device)
        if stats is not None:
            self.stats = TokenStats.restore(stats, device)

    def tensors(self) -> list[torch.Tensor]:
        return [t for s in self.splits.values() for t in s.tensors()] + (self.stats.tensors() if self.stats else [])


def activating_threshold(train_top_extremes: torch.Tensor, config: ExemplarsConfig) -> torch.Tensor:
    """(F,) activating threshold from the train top-k's extremes: fraction * max(max, 0)."""
    return config.activating_fraction * train_top_extremes.amax(dim=1).clamp(min=0).float()
