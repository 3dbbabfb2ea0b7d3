"""The corpus as the exemplar pass reads it: padded token ids, batches of one split in a
seeded random order, the keys that make its samples, the random sequences, and the counted
tokens of a batch."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from neuron_assets.types import Split

SEQUENCE_COLUMNS = ["seq_id", "split", "token_ids", "prefix_len", "n_tokens"]
"""The columns of `sequences` the exemplar pass reads (token strings are never read)."""


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) token ids, padded
    mask: torch.Tensor  # (B, T) attention mask
    counted: torch.Tensor  # (B, T) bool: tokens after the prefix, before the padding
    seq_ids: torch.Tensor  # (B,)
    prefix_len: np.ndarray  # (B,)
    n_tokens: np.ndarray  # (B,)


class Corpus:
    """The token ids of every sequence as one padded (N, T) int32 array, built once without a
    Python loop over rows; token strings are never read."""

    def __init__(self, sequences: pl.DataFrame, tokenizer):
        self.seq_len = int(sequences["n_tokens"].max())
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        lengths = sequences["n_tokens"].to_numpy().astype(np.int64)
        flat = sequences["token_ids"].explode().to_numpy().astype(np.int32)
        self.ids = np.full((sequences.height, self.seq_len), pad, dtype=np.int32)
        positions = np.arange(self.seq_len)[None, :] < lengths[:, None]
        self.ids[positions] = flat
        self.lengths = lengths
        self.prefix = sequences["prefix_len"].to_numpy().astype(np.int64)
        self.seq_ids = sequences["seq_id"].to_numpy().astype(np.int64)
        self.splits = sequences["split"].to_numpy()
        self.n_tokens_of = np.zeros(int(self.seq_ids.max()) + 1, dtype=np.int64)
        self.n_tokens_of[self.seq_ids] = lengths
        self.prefix_of = np.zeros_like(self.n_tokens_of)
        self.prefix_of[self.seq_ids] = self.prefix

    def batch(self, rows: np.ndarray) -> Batch:
        positions = np.arange(self.seq_len)[None, :]
        lengths, prefix = self.lengths[rows], self.prefix[rows]
        mask = positions < lengths[:, None]
        counted = mask & (positions >= prefix[:, None])
        return Batch(torch.from_numpy(self.ids[rows].astype(np.int64)), torch.from_numpy(mask.astype(np.int64)),
                      torch.from_numpy(counted), torch.from_numpy(self.seq_ids[rows]), prefix, lengths)


class CountedRanges:
    """The counted tokens of a batch as runs of rows sharing (prefix, length): a fixed prefix
    and full windows make one run, read as a view of the activations with no mask or copy."""

    def __init__(self, prefix: np.ndarray, lengths: np.ndarray, device):
        self.batch = len(prefix)
        by_range: dict[tuple[int, int], list[int]] = {}
        for row, key in enumerate(zip(prefix.tolist(), lengths.tolist())):
            by_range.setdefault(key, []).append(row)
        self.runs = []
        for (start, stop), rows in by_range.items():
            if stop <= start:
                continue  # nothing counted in these sequences
            contiguous = rows == list(range(rows[0], rows[-1] + 1))
            index = slice(rows[0], rows[-1] + 1) if contiguous else torch.tensor(rows, device=device)
            self.runs.append((index, start, stop))

    def views(self, acts: torch.Tensor):
        for index, start, stop in self.runs:
            yield acts[index, start:stop]

    def extremes(self, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sequence and feature, the max and min over counted tokens, (B, F) float32;
        -inf and +inf where a sequence counts no token."""
        # amax and amin apart: on CPU, torch.aminmax over the token axis is several times
        # slower than the two (bench/reductions.py)
        if len(self.runs) == 1 and self.runs[0][0] == slice(0, self.batch):
            view = next(self.views(acts))
            return view.amax(dim=1).float(), view.amin(dim=1).float()
        shape = (acts.shape[0], acts.shape[2])
        highest = torch.full(shape, -torch.inf, device=acts.device)
        lowest = torch.full(shape, torch.inf, device=acts.device)
        for (index, _, _), view in zip(self.runs, self.views(acts)):
            highest[index], lowest[index] = view.amax(dim=1).float(), view.amin(dim=1).float()
        return highest, lowest


READ_ORDER = "each split in a seeded random order; val and test samples first come"
"""How the pass orders its batches and keys its samples: part of a checkpoint's signature."""


def plan_batches(splits: np.ndarray, batch_size: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """(split, row indices) per batch; a batch never mixes splits, and each split is read in a
    random order drawn from ``seed`` (what makes val and test's first-come samples uniform,
    :func:`batch_keys`)."""
    batches = []
    rng = np.random.default_rng(seed)
    for split in Split:
        rows = rng.permutation(np.flatnonzero(splits == split.value))
        batches += [(split.value, rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    return batches


def batch_keys(seed: int, batch_no: int, batch: int, seq_len: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys of a batch's sequences (the reservoir and quiet samples) and tokens (the token
    sample): a function of (seed, batch) alone, so a resumed run, or a pass over another group
    of features, draws exactly what one uninterrupted pass would.

    Train sequences draw random keys: which of them activate depends on the running
    threshold, so only keys drawn apart from the order keep the sample uniform. In val and
    test the threshold is final, and the key falls with the batch number: the samples keep the
    first sequences read, a uniform sample since each split is read in a random order, and a
    full sample admits nothing more (the merge then costs one comparison per batch, where
    random keys would let about k ln(n/k) more sequences in and out)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch_no)
    sequence_keys = (torch.rand(batch, generator=generator) if split == Split.TRAIN.value
                     else torch.full((batch,), -float(batch_no)))  # exact in float32 to 2**24 batches
    return sequence_keys, torch.rand(batch, seq_len, generator=generator)


def random_sequence_ids(sequences: pl.DataFrame, per_split: int, seed: int) -> dict[str, torch.Tensor]:
    chosen = {}
    for split in Split:
        ids = sequences.filter(pl.col("split") == split.value)["seq_id"].to_list()
        picked = sorted(random.Random(f"{seed}:random:{split.value}").sample(ids, min(per_split, len(ids))))
        chosen[split.value] = torch.tensor(picked, dtype=torch.long)
    return chosen
