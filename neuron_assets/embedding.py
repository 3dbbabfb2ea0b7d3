"""The one sentence-embedding model of the package (MiniLM, shipped as
``builtin:all-MiniLM-L6-v2``): sentence vectors for the embedding scorer, the semantic
simulator and description search, and per-unit contextual vectors for the semantic simulator.

:func:`sentence_encoder` shares one loaded encoder per (model, device) through
:mod:`neuron_assets.runtime`, so a process that scores, simulates and searches loads MiniLM
once; vectors are cached by text (bounded).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np

CACHE_SIZE = 50_000  # texts whose vectors are kept
# Padded tokens per forward pass by device type. On CPU, batches of about 2,048 tokens ran
# fastest (one-word texts 1.7 ms each against 2.0 in batches of 64 texts; texts of 1-120 words
# 21 ms against 40): larger ones fall out of cache. A GPU wants large batches.
BATCH_TOKENS = {"cpu": 2_048, "cuda": 16_384}
BATCH_SIZE = 1_024  # texts per forward pass at most


@dataclass(eq=False)
class UnitLayout:
    """A record's text after its prefix, its units, and which units each token overlaps (the
    semantic simulator cuts the units, :func:`neuron_assets.simulate.semantic.unit_layout`; the
    encoder gives each unit its contextual vector, :meth:`MiniLMEncoder.unit_states`)."""

    length: int  # tokens in the record
    text: str
    unit_texts: tuple[str, ...]
    unit_spans: tuple[tuple[int, int], ...]
    token_units: tuple[tuple[int, ...], ...]  # per token: the units it overlaps (none in the prefix)

    def token_values(self, unit_values: np.ndarray) -> np.ndarray:
        """Each token's highest unit value (0 for tokens with no unit)."""
        values = np.zeros(self.length, dtype=np.float32)
        positions, flat, starts = self._flat
        if positions.size:
            values[positions] = np.maximum.reduceat(np.asarray(unit_values, dtype=np.float32)[flat], starts)
        return values

    @cached_property
    def _flat(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens that overlap a unit, their units concatenated, where each token's units start)."""
        positions = [i for i, units in enumerate(self.token_units) if units]
        flat = [u for i in positions for u in self.token_units[i]]
        starts = np.cumsum([0] + [len(self.token_units[i]) for i in positions[:-1]]) if positions else []
        return np.array(positions, dtype=np.int64), np.array(flat, dtype=np.int64), np.array(starts, dtype=np.int64)


def sentence_encoder(model: str = "builtin:all-MiniLM-L6-v2", device: str = "auto", batch_size: int = BATCH_SIZE,
                     batch_tokens: int | None = None) -> MiniLMEncoder:
    """The process's encoder for ``model`` on ``device``, loaded on first use."""
    from neuron_assets import runtime

    return runtime.shared(runtime.cache_key("sentence_encoder", model, device),
                          lambda: MiniLMEncoder(model, device, batch_size, batch_tokens))


class MiniLMEncoder:
    """Sentence vectors (mean pooling, L2-normalized) and per-unit contextual vectors.

    Texts are tokenized once, sorted by length (longest first) and cut into batches of texts
    of one length, at most ``batch_tokens`` tokens (default by device: :data:`BATCH_TOKENS`)
    and ``batch_size`` texts: short texts (descriptions, words) fill large batches, long ones
    small batches, no compute goes to padding, and a text's vector does not depend on the
    texts beside it."""

    def __init__(self, model: str, device: str = "auto", batch_size: int = BATCH_SIZE, batch_tokens: int | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from neuron_assets.runtime import choose_device, quiet_transformers
        from neuron_assets.subject import resolve_model_path

        path = resolve_model_path(model)
        self.device = choose_device(device)
        with quiet_transformers():
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"{model}: the sentence encoder needs a fast tokenizer (character offsets); this one has none")
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens or BATCH_TOKENS.get(self.device.type, BATCH_TOKENS["cuda"])
        self.max_length = min(512, int(getattr(self.model.config, "max_position_embeddings", 512)))
        self._torch = torch
        self._sentences: OrderedDict[str, np.ndarray] = OrderedDict()
        self._records: OrderedDict[str, np.ndarray] = OrderedDict()

    def sentences(self, texts: Sequence[str]) -> list[np.ndarray]:
        missing = sorted({t for t in texts if t not in self._sentences})
        for chosen, hidden, mask, _ in self._forward(missing):
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            for i, vector in zip(chosen, self._torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()):
                _remember(self._sentences, missing[i], vector)
        return [self._sentences[t] for t in texts]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), hidden) sentence vectors."""
        vectors = self.sentences(texts)
        return np.stack(vectors) if vectors else np.zeros((0, self.model.config.hidden_size), dtype=np.float32)

    def unit_states(self, layout: UnitLayout) -> np.ndarray:
        """(units, hidden) L2-normalized: each unit's word pieces' mean last hidden state, with
        the record's whole text as context."""
        if not layout.unit_texts:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        if layout.text not in self._records:
            self._encode_records([layout])
        return self._records[layout.text]

    def encode_records(self, layouts: Sequence[UnitLayout]) -> None:
        """Contextual vectors of many records in batches (the simulator calls this first)."""
        self._encode_records([layout for layout in layouts if layout.unit_texts and layout.text not in self._records])

    def _encode_records(self, layouts: Sequence[UnitLayout]) -> None:
        unique = list({layout.text: layout for layout in layouts}.values())
        for chosen, hidden, mask, offsets in self._forward([layout.text for layout in unique], offsets=True):
            hidden = hidden.float().cpu().numpy()
            for row, layout in enumerate(unique[i] for i in chosen):
                spans = offsets[row]
                usable = [(i, s, e) for i, (s, e) in enumerate(spans) if e > s]
                piece_index = np.array([i for i, _, _ in usable], dtype=np.int64)
                piece_start = np.array([s for _, s, _ in usable], dtype=np.int64)
                piece_end = np.array([e for _, _, e in usable], dtype=np.int64)
                vectors = np.zeros((len(layout.unit_spans), hidden.shape[-1]), dtype=np.float32)
                for u, (a, b) in enumerate(layout.unit_spans):
                    pieces = piece_index[(piece_start < b) & (piece_end > a)] if usable else piece_index
                    if pieces.size == 0:  # past the model's max length: the last piece stands in
                        pieces = piece_index[-1:] if usable else np.zeros(0, dtype=np.int64)
                    if pieces.size:
                        vectors[u] = hidden[row, pieces].mean(0)
                norms = np.linalg.norm(vectors, axis=1, keepdims=True)
                _remember(self._records, layout.text, vectors / np.where(norms > 0, norms, 1.0))

    def _forward(self, texts: Sequence[str], offsets: bool = False):
        """Per batch (class doc): (positions in ``texts``, last hidden states (b, t, h), mask
        (b, t, 1), each text's token character spans when ``offsets``)."""
        torch = self._torch
        if not texts:
            return
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                                 return_offsets_mapping=offsets, return_attention_mask=False)
        ids = encoded["input_ids"]
        types = encoded.get("token_type_ids")
        lengths = np.array([len(row) for row in ids], dtype=np.int64)
        order = np.argsort(-lengths, kind="stable")
        pad = self.tokenizer.pad_token_id or 0
        for chosen in token_batches(order, lengths, self.batch_tokens, self.batch_size):
            width = int(lengths[chosen[0]])
            input_ids = np.full((len(chosen), width), pad, dtype=np.int64)
            attention = np.zeros((len(chosen), width), dtype=np.int64)
            type_ids = np.zeros((len(chosen), width), dtype=np.int64)
            for row, i in enumerate(chosen):  # right padding, as the tokenizer pads
                input_ids[row, : lengths[i]] = ids[i]
                attention[row, : lengths[i]] = 1
                if types is not None:
                    type_ids[row, : lengths[i]] = types[i]
            inputs = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention)}
            if types is not None:
                inputs["token_type_ids"] = torch.from_numpy(type_ids)
            inputs = {name: tensor.to(self.device) for name, tensor in inputs.items()}
            with torch.inference_mode():
                hidden = self.model(**inputs).last_hidden_state
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            yield chosen, hidden, mask, [encoded["offset_mapping"][i] for i in chosen] if offsets else None


def token_batches(order: np.ndarray, lengths: np.ndarray, budget: int, most: int):
    """Runs of ``order`` (longest first) of texts of one length, at most ``most`` of them and
    within ``budget`` tokens (one text alone may exceed it). No text is padded: padding moves a
    vector in its last bits (6e-8), which would make a text's vector, cached for the process,
    depend on which texts came first, and a resumed run's scores differ from a whole run's."""
    batch: list[int] = []
    for i in order.tolist():
        if batch and (len(batch) >= most or lengths[i] != lengths[batch[0]]
                      or (len(batch) + 1) * lengths[batch[0]] > budget):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _remember(cache: OrderedDict, key: str, value: np.ndarray) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > CACHE_SIZE:
        cache.popitem(last=False)
