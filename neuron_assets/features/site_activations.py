"""A neuron site's activations over the corpus, streamed: what an SAE trains and is measured on.

The site is the one the exemplar pass reads (the input of a layer's MLP output projection).
Only counted tokens enter: after the sequence's chat-header prefix, before its padding (the
header shared by the rows of a pass is run once, :mod:`neuron_assets.features.prefix_cache`). The
stream never holds the split's activations: it reads a *block* of ``block_sequences``
sequences at a time (in the subject's batch size, each forward pass stopping after the
site's layer), shuffles the block's tokens and cuts them into training batches; the tokens
left over at the end of a block are dropped. Which sequences form block b of epoch e, and
how its tokens are shuffled, is a function of (seed, e, b); the number of batches a block
gives is known from the ``sequences`` table alone (n_tokens - prefix_len), so a resumed run
finds the block of its step without reading anything before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from neuron_assets.config import SubjectConfig
from neuron_assets.features.prefix_cache import PrefixCache
from neuron_assets.features.sae import SaeError
from neuron_assets.subject import SubjectModel, find_sites, load_subject, load_tokenizer, resolve_model_path


def load_site_subject(config: SubjectConfig) -> tuple[SubjectModel, bool]:
    """The subject with its LM head when it is a causal LM (the reconstruction score needs the
    next-token loss), else the base model the exemplar pass reads; and whether it is causal.
    Both expose the same sites, so activations are the same either way."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from neuron_assets.runtime import choose_device, choose_dtype

    path = resolve_model_path(config.model)
    model_config = AutoConfig.from_pretrained(path, local_files_only=not config.allow_download,
                                              trust_remote_code=config.trust_remote_code)
    architectures = getattr(model_config, "architectures", None) or []
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return load_subject(config), False
    device = choose_device(config.device)
    dtype = choose_dtype(config.dtype, device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=not config.allow_download,
                                                 trust_remote_code=config.trust_remote_code)
    model.to(device).eval()
    subject = SubjectModel(name=config.model, model=model, tokenizer=load_tokenizer(config),
                           sites=find_sites(model, config.site), device=device, dtype=dtype)
    return subject, True


@dataclass
class TokenBatch:
    ids: torch.Tensor  # (B, T) int64, padded
    mask: torch.Tensor  # (B, T) attention mask
    counted: torch.Tensor  # (B, T) bool: after the prefix, before the padding


class SequenceTable:
    """Token ids of some sequences as one padded (N, T) array; token strings are never read."""

    def __init__(self, sequences: pl.DataFrame, pad_id: int):
        if sequences.height == 0:
            raise SaeError("the split holds no sequences; build the corpus first (asset `corpus`)")
        self.lengths = sequences["n_tokens"].to_numpy().astype(np.int64)
        self.prefix = sequences["prefix_len"].to_numpy().astype(np.int64)
        self.seq_len = int(self.lengths.max())
        flat = sequences["token_ids"].explode().to_numpy().astype(np.int64)
        self.ids = np.full((sequences.height, self.seq_len), pad_id, dtype=np.int64)
        self.ids[np.arange(self.seq_len)[None, :] < self.lengths[:, None]] = flat
        self.counted_per_row = np.clip(self.lengths - self.prefix, 0, None)

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: np.ndarray) -> TokenBatch:
        positions = np.arange(self.seq_len)[None, :]
        mask = positions < self.lengths[rows][:, None]
        counted = mask & (positions >= self.prefix[rows][:, None])
        return TokenBatch(torch.from_numpy(self.ids[rows]), torch.from_numpy(mask.astype(np.int64)),
                          torch.from_numpy(counted))


def split_table(sequences: pl.DataFrame, split: str, tokenizer) -> SequenceTable:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return SequenceTable(sequences.filter(pl.col("split") == split).sort("seq_id"), pad)


class CorpusSiteStream:
    """Training batches of one layer's site activations over a split (an ActivationStream)."""

    def __init__(self, subject: SubjectModel, table: SequenceTable, layer: int, batch_tokens: int,
                 block_sequences: int, seed: int, device: torch.device, subject_batch: int = 32,
                 prefix_cache: bool = True):
        subject.check_layers([layer])
        self.subject, self.table, self.layer, self.subject_batch = subject, table, layer, subject_batch
        self.batch_tokens, self.block_sequences, self.seed = batch_tokens, block_sequences, seed
        self.device = device
        self.prefix = PrefixCache(subject, prefix_cache)
        self.d_in = subject.neurons_per_layer(layer)
        per_epoch = sum(self._batches_in(rows) for rows in self._blocks(0))
        if per_epoch == 0:
            raise SaeError(f"a block of {block_sequences} sequences holds fewer than sae.batch_tokens = {batch_tokens} "
                           f"counted tokens (at most {int(table.counted_per_row.max())} per sequence); raise "
                           "sae.block_sequences or lower sae.batch_tokens")

    def batches(self, start_step: int = 0) -> Iterator[torch.Tensor]:
        step, epoch = 0, 0
        while True:
            for number, rows in enumerate(self._blocks(epoch)):
                n = self._batches_in(rows)
                if step + n <= start_step:  # a resumed run skips whole blocks without reading them
                    step += n
                    continue
                tokens = self._block_tokens(rows, epoch, number)
                for i in range(max(0, start_step - step), n):
                    yield tokens[i * self.batch_tokens:(i + 1) * self.batch_tokens]
                step += n
            epoch += 1

    def _blocks(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.table))
        return [order[i:i + self.block_sequences] for i in range(0, len(order), self.block_sequences)]

    def _batches_in(self, rows: np.ndarray) -> int:
        return int(self.table.counted_per_row[rows].sum()) // self.batch_tokens

    def _block_tokens(self, rows: np.ndarray, epoch: int, number: int) -> torch.Tensor:
        tokens = torch.cat(list(site_activations(self.subject, self.table, self.layer, self.subject_batch, rows, self.device,
                                                 self.prefix)))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 10_007 + number)
        return tokens[torch.randperm(tokens.shape[0], generator=generator).to(tokens.device)]


def site_activations(subject: SubjectModel, table: SequenceTable, layer: int, batch_size: int,
                     rows: np.ndarray | None = None, device: torch.device | None = None,
                     prefix: PrefixCache | None = None) -> Iterator[torch.Tensor]:
    """Per forward pass of the subject's batch size, the counted tokens' activations at the
    layer's site as (tokens, d_in) float32 on ``device`` (default: the subject's); ``prefix``
    keeps the shared header's key/value cache between calls (default: one for this call)."""
    rows = np.arange(len(table)) if rows is None else rows
    prefix = prefix or PrefixCache(subject)
    for start in range(0, len(rows), batch_size):
        chosen = rows[start:start + batch_size]
        batch = table.batch(chosen)
        with autocast(subject):
            captured = prefix.activations(batch.ids, batch.mask, table.prefix[chosen], {layer: None})[layer]
        yield captured[batch.counted.to(captured.device)].to(device or captured.device, torch.float32)


def token_batches(table: SequenceTable, batch_size: int) -> Iterator[TokenBatch]:
    """The table in batches of ``batch_size`` sequences (for the reconstruction score)."""
    for start in range(0, len(table), batch_size):
        yield table.batch(np.arange(start, min(start + batch_size, len(table))))


def autocast(subject: SubjectModel):
    """bf16/fp16 autocast around the subject on a GPU (the SAE stays float32 outside it)."""
    if subject.device.type == "cuda" and subject.dtype != torch.float32:
        return torch.autocast("cuda", dtype=subject.dtype)
    return nullcontext()
