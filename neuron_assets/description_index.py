"""The search index over descriptions, built to hold at Llama scale: one shard per partition.

Each ``description_embeddings`` partition file gets a shard of its own, built from that file
alone: ``data/description_index/shards/<layer>-<polarity>-<digest>.npz``, the digest naming the
file's path, size and modification time. A re-scored partition writes a new embeddings file,
so its shard is built again and no other; a shard is written to a temporary name and renamed,
so a reader sees a whole shard or none. A shard holds

- the partition's vectors in a faiss IVF index (inner product of unit vectors, i.e. cosine;
  ``NLIST_PER_SQRT_ROWS * sqrt(rows)`` lists, exact below ``EXACT_BELOW`` rows), ids = row numbers;
- BM25 postings: a rows x terms matrix of term counts (compressed sparse columns), its
  vocabulary and the rows' lengths; document frequencies and the mean length are summed over
  the shards at query time, so every shard scores with the statistics of the whole store;
- the rows themselves (layer, polarity, kind, neuron, source, candidate, description, score).

A semantic query searches every shard its filters allow with ``nprobe`` lists (more when a
filter keeps few rows: sqrt(1 / share) times as many) and merges the shards' top k. A text query scores only the rows that hold a query term.
bench/query.py measured the choice (faiss IVF against DuckDB's vss HNSW and usearch) at 1M
rows; bench/README.md has the table.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import polars as pl

FORMAT = 1  # bump when a shard's contents change: older shards are then built again
EXACT_BELOW = 4096  # rows: a smaller shard is searched exactly (a flat index)
NLIST_PER_SQRT_ROWS = 4  # IVF lists = 4 * sqrt(rows), faiss's rule of thumb
TRAIN_PER_LIST = 39  # k-means training rows per list (faiss warns below 39)
NPROBE = 24  # lists searched per shard: recall@10 >= 0.95 against exact search (bench/query.py)
BM25_K1, BM25_B = 1.2, 0.75
ROW_COLUMNS = ("layer", "polarity", "kind", "neuron", "source", "candidate", "description", "score")
WORD = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset("a an and are as at be by for from has in is it its of on or that the to was with".split())


def words(text: str) -> list[str]:
    """BM25's terms of a text: lower-case words and numbers, stop words left out, a plural's
    final s dropped ("brackets" finds "bracket")."""
    out = []
    for word in WORD.findall(text.lower()):
        if word in STOPWORDS:
            continue
        if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        out.append(word)
    return out


@dataclass(frozen=True)
class Hit:
    """A shard's row and how well it matched (cosine similarity or BM25 score)."""

    match: float
    row: dict


@dataclass(frozen=True)
class Want:
    """What a query keeps: each field None for any."""

    layers: tuple[int, ...] | None = None
    polarity: str | None = None
    kind: str | None = None
    min_score: float | None = None
    max_score: float | None = None

    def mask(self, shard: "Shard") -> np.ndarray | None:
        """The shard's rows this keeps (None: all of them)."""
        keep = None
        if self.kind is not None:
            keep = shard.kind == self.kind
        if self.min_score is not None:
            keep = _and(keep, shard.score >= self.min_score)  # NaN (a candidate: no score) is never kept
        if self.max_score is not None:
            keep = _and(keep, shard.score <= self.max_score)
        return keep

    def allows(self, shard: "Shard") -> bool:
        return ((self.layers is None or shard.layer in self.layers)
                and (self.polarity is None or shard.polarity == self.polarity))


def _and(a: np.ndarray | None, b: np.ndarray) -> np.ndarray:
    return b if a is None else a & b


class Shard:
    """One partition's vectors, postings and rows, as loaded from its file."""

    def __init__(self, path: Path, layer: int, polarity: str, arrays: dict[str, np.ndarray]):
        import faiss

        self.path, self.layer, self.polarity = path, layer, polarity
        self.index = faiss.deserialize_index(arrays["index"])
        self.rows = int(arrays["neuron"].shape[0])
        self.neuron = arrays["neuron"]
        self.candidate = arrays["candidate"]
        self.score = arrays["score"]
        self.kind = _strings(arrays["kind_bytes"], arrays["kind_offsets"])
        self.source = _strings(arrays["source_bytes"], arrays["source_offsets"])
        self.description_bytes, self.description_offsets = arrays["description_bytes"], arrays["description_offsets"]
        self.terms = {term: i for i, term in enumerate(_strings(arrays["term_bytes"], arrays["term_offsets"]))}
        self.term_counts = arrays["term_counts"]  # per posting
        self.term_rows = arrays["term_rows"]
        self.term_starts = arrays["term_starts"]  # postings of term i: term_starts[i]:term_starts[i + 1]
        self.lengths = arrays["lengths"]
        self.embedding_model = str(arrays["embedding_model"])

    def document_frequency(self, term: str) -> int:
        i = self.terms.get(term)
        return 0 if i is None else int(self.term_starts[i + 1] - self.term_starts[i])

    def row(self, i: int) -> dict:
        start, end = self.description_offsets[i], self.description_offsets[i + 1]
        score = float(self.score[i])
        candidate = int(self.candidate[i])
        return {"layer": self.layer, "polarity": self.polarity, "kind": str(self.kind[i]), "neuron": int(self.neuron[i]),
                "source": str(self.source[i]), "candidate": None if candidate < 0 else candidate,
                "description": bytes(self.description_bytes[start:end]).decode("utf-8"),
                "score": None if np.isnan(score) else score}

    def nearest(self, vector: np.ndarray, top: int, keep: np.ndarray | None, nprobe: int) -> list[tuple[float, int]]:
        """(similarity, row) of the shard's ``top`` nearest rows among those ``keep`` allows."""
        import faiss

        if keep is not None and not keep.any():
            return []
        params = None
        ivf = faiss.try_extract_index_ivf(self.index) if hasattr(faiss, "try_extract_index_ivf") else None
        if ivf is not None:
            share = 1.0 if keep is None else float(keep.mean())
            # A filter keeping a share s of the rows: sqrt(1/s) times the lists (measured at 1M rows:
            # recall@10 1.00 with score >= 0.7, which keeps 1 row in 7; 1/s probed twice the lists for it)
            params = faiss.SearchParametersIVF(nprobe=min(ivf.nlist, max(nprobe, int(np.ceil(nprobe / np.sqrt(share))))))
        else:
            params = faiss.SearchParameters()
        if keep is not None:
            selector = faiss.IDSelectorBitmap(np.packbits(keep, bitorder="little"))
            params.sel = selector
        similarity, rows = self.index.search(vector[None, :], min(top, self.rows), params=params)
        return [(float(s), int(r)) for s, r in zip(similarity[0], rows[0]) if r >= 0]

    def bm25(self, terms: Sequence[tuple[str, float]], average_length: float, top: int,
             keep: np.ndarray | None) -> list[tuple[float, int]]:
        """(BM25 score, row) of the shard's best ``top`` rows for ``terms`` (term, idf)."""
        rows, scores = [], []
        for term, idf in terms:
            i = self.terms.get(term)
            if i is None:
                continue
            span = slice(self.term_starts[i], self.term_starts[i + 1])
            found, tf = self.term_rows[span], self.term_counts[span].astype(np.float64)
            norm = BM25_K1 * (1 - BM25_B + BM25_B * self.lengths[found] / average_length)
            rows.append(found)
            scores.append(idf * tf * (BM25_K1 + 1) / (tf + norm))
        if not rows:
            return []
        found, inverse = np.unique(np.concatenate(rows), return_inverse=True)
        total = np.bincount(inverse, weights=np.concatenate(scores))
        if keep is not None:
            kept = keep[found]
            found, total = found[kept], total[kept]
        if found.size > top:
            best = np.argpartition(-total, top - 1)[:top]
            found, total = found[best], total[best]
        return [(float(s), int(r)) for s, r in zip(total, found)]


def _strings(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    raw = bytes(data)
    return np.array([raw[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)], dtype=object)


def _packed(texts: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [t.encode("utf-8") for t in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in encoded])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


# -- building a shard ------------------------------------------------------------------------


def build_shard(frame: pl.DataFrame, target: Path, threads: int | None = None) -> int:
    """Write the shard of one embeddings partition (``frame``: its rows, as the table holds
    them) to ``target``; returns its rows. The caller writes to a temporary path and renames."""
    import faiss

    if threads:
        faiss.omp_set_num_threads(threads)
    rows = frame.height
    vectors = np.asarray(frame["embedding"].to_numpy(), dtype=np.float32).reshape(rows, -1) if rows else \
        np.zeros((0, 1), dtype=np.float32)
    dim = vectors.shape[1]
    index = make_vector_index(vectors)
    kinds = frame["kind"].fill_null("neuron").to_list() if "kind" in frame.columns else ["neuron"] * rows
    descriptions = frame["description"].to_list()
    term_rows, term_counts, term_starts, vocabulary, lengths = _postings(descriptions)
    kind_bytes, kind_offsets = _packed(kinds)
    source_bytes, source_offsets = _packed(frame["source"].to_list())
    description_bytes, description_offsets = _packed(descriptions)
    term_bytes, term_offsets = _packed(vocabulary)
    models = frame["embedding_model"].unique().to_list() if rows else [""]
    with open(target, "wb") as out:
        np.savez(out, index=faiss.serialize_index(index), dim=np.int64(dim),
                 neuron=frame["neuron"].cast(pl.Int64).to_numpy(),
                 candidate=frame["candidate"].cast(pl.Int64).fill_null(-1).to_numpy(),
                 score=frame["score"].cast(pl.Float64).fill_null(float("nan")).to_numpy(),
                 kind_bytes=kind_bytes, kind_offsets=kind_offsets, source_bytes=source_bytes,
                 source_offsets=source_offsets, description_bytes=description_bytes,
                 description_offsets=description_offsets, term_bytes=term_bytes, term_offsets=term_offsets,
                 term_rows=term_rows, term_counts=term_counts, term_starts=term_starts, lengths=lengths,
                 embedding_model=np.str_(",".join(sorted(m for m in models if m))))
    return rows


def make_vector_index(vectors: np.ndarray):
    """A flat (exact) index below EXACT_BELOW rows, else an IVF index with 4 sqrt(rows) lists
    trained on a sample; ids are row numbers."""
    import faiss

    rows, dim = vectors.shape
    if rows < EXACT_BELOW:
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return index
    nlist = int(min(NLIST_PER_SQRT_ROWS * np.sqrt(rows), rows // TRAIN_PER_LIST))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(0).choice(rows, size=min(rows, nlist * TRAIN_PER_LIST * 2), replace=False)
    index.train(vectors[np.sort(sample)])
    index.add(vectors)
    return index


def _postings(texts: Sequence[str]):
    """(rows, counts, starts) of each term's postings, the vocabulary, and each text's length in terms."""
    pairs: dict[str, dict[int, int]] = {}
    lengths = np.zeros(len(texts), dtype=np.int32)
    for row, text in enumerate(texts):
        found = words(text or "")
        lengths[row] = len(found)
        for word in found:
            counts = pairs.setdefault(word, {})
            counts[row] = counts.get(row, 0) + 1
    vocabulary = sorted(pairs)
    starts = np.zeros(len(vocabulary) + 1, dtype=np.int64)
    starts[1:] = np.cumsum([len(pairs[w]) for w in vocabulary])
    rows = np.fromiter((r for w in vocabulary for r in pairs[w]), dtype=np.int32, count=int(starts[-1]))
    counts = np.fromiter((c for w in vocabulary for c in pairs[w].values()), dtype=np.int16, count=int(starts[-1]))
    return rows, counts, starts, vocabulary, lengths


def shard_name(layer: int, polarity: str, source: str, size: int, modified_ns: int) -> str:
    digest = hashlib.sha256(f"{FORMAT}|{source}|{size}|{modified_ns}".encode()).hexdigest()[:16]
    return f"{layer}-{polarity}-{digest}.npz"


# -- reading ----------------------------------------------------------------------------------


_LOADED: dict[Path, Shard] = {}  # a server loads each shard once
_LOADING = threading.Lock()


def load_shard(path: Path, layer: int, polarity: str) -> Shard:
    with _LOADING:
        shard = _LOADED.get(path)
        if shard is None:
            with np.load(path, allow_pickle=False) as arrays:
                shard = Shard(path, layer, polarity, {name: arrays[name] for name in arrays.files})
            _LOADED[path] = shard
            for stale in [p for p in _LOADED if p.parent == path.parent and p.name.startswith(f"{layer}-{polarity}-")
                          and p != path]:
                del _LOADED[stale]
        return shard


class ShardedIndex:
    """Every current shard of a store, queried together."""

    def __init__(self, shards: list[Shard]):
        self.shards = shards
        self.rows = sum(s.rows for s in shards)
        self.average_length = (sum(float(s.lengths.sum()) for s in shards) / self.rows) if self.rows else 1.0

    def embedding_models(self) -> set[str]:
        return {m for s in self.shards for m in s.embedding_model.split(",") if m}

    def semantic(self, vector: np.ndarray, top: int, want: Want = Want(), nprobe: int = NPROBE) -> list[Hit]:
        vector = np.ascontiguousarray(vector, dtype=np.float32)
        found = []
        for shard in self.shards:
            if want.allows(shard):
                found += [(s, shard, r) for s, r in shard.nearest(vector, top, want.mask(shard), nprobe)]
        return _best(found, top)

    def text(self, query: str, top: int, want: Want = Want()) -> list[Hit]:
        terms = sorted(set(words(query)))
        frequencies = {t: sum(s.document_frequency(t) for s in self.shards) for t in terms}
        weighted = [(t, float(np.log((self.rows - df + 0.5) / (df + 0.5) + 1))) for t, df in frequencies.items() if df]
        found = []
        for shard in self.shards:
            if want.allows(shard):
                found += [(s, shard, r) for s, r in shard.bm25(weighted, self.average_length, top, want.mask(shard))]
        return _best(found, top)


def _best(found: list, top: int) -> list[Hit]:
    found.sort(key=lambda hit: (-hit[0], hit[1].layer, hit[1].polarity, hit[2]))
    return [Hit(score, shard.row(row)) for score, shard, row in found[:top]]
