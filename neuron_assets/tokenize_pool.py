"""Tokenizing batches of texts with a fast tokenizer's Rust backend, in this process or in
worker processes, for the corpus builder.

A module of its own, importing only numpy and tokenizers, so that a spawned worker starts
quickly: each worker rebuilds the backend from its JSON once, then turns batches of texts
into flat arrays (token ids, each token's character end, each text's first token)."""

from __future__ import annotations

import itertools
import multiprocessing
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor

import numpy as np

Encoded = tuple[np.ndarray, np.ndarray, np.ndarray]  # ids (int32), character ends (int64), offsets (int64)


class PoolEncoder:
    """Batches tokenized by ``workers`` processes, yielded in order with a bounded lookahead;
    ``state`` is (the backend's JSON, whether special tokens' text is split)."""

    def __init__(self, state: tuple[str, bool], workers: int):
        self.state, self.workers = state, workers

    def map(self, batches: Iterable) -> Iterator[tuple[object, Encoded]]:
        # spawn, not fork: the parent may hold threads (Dagster's, the tokenizer's own pool).
        pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker, initargs=(self.state,))
        pending: deque = deque()
        try:
            for batch in batches:
                pending.append((batch, pool.submit(_encode_in_worker, batch.texts)))
                if len(pending) > 2 * self.workers:  # a bounded lookahead keeps memory flat
                    batch, future = pending.popleft()
                    yield batch, future.result()
            while pending:
                batch, future = pending.popleft()
                yield batch, future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def backend_from_state(state: tuple[str, bool]):
    from tokenizers import Tokenizer

    json_text, split_special = state
    backend = Tokenizer.from_str(json_text)
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = split_special  # as transformers sets it before every call
    return backend


def encode(backend, texts: list[str]) -> Encoded:
    """The texts' tokens, without special tokens, as flat arrays."""
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    lengths = [len(encoding) for encoding in encodings]
    total = sum(lengths)
    ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), np.int32, total)
    ends = np.fromiter((end for e in encodings for _, end in e.offsets), np.int64, total)
    return ids, ends, offsets_of(lengths)


def offsets_of(lengths) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)


_worker_backend = None  # the tokenizer of one pool worker process (set by its initializer)


def _start_worker(state: tuple[str, bool]) -> None:
    global _worker_backend
    _worker_backend = backend_from_state(state)


def _encode_in_worker(texts: list[str]) -> Encoded:
    return encode(_worker_backend, texts)
