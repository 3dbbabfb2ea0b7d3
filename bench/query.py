"""The description database at Llama scale, on a synthetic store: SQL, and the search index
chosen by measurement against the alternatives.

    python bench/query.py                  1M descriptions (32 layers x 2 polarities x 15,625), 384-d
    python bench/query.py --rows 50000     a quick run

The vectors are built to have the neighbourhoods of real description vectors: anchors are
MiniLM vectors of generated descriptions ("the word 'comma'", "dates and years in French text"),
each row an anchor plus noise (cosine about 0.85 to it, as paraphrases are), and the queries
are MiniLM vectors of other generated descriptions. (Isotropic random vectors around a few
topics, which an earlier version used, have no neighbourhoods at all: every index is near
chance on them, and real descriptions do not look like that.) Descriptions are drawn from a
word list, so BM25 sees real term statistics.

Measured, each with p50 and p95 over --repeat single queries, recall@10 against an exact scan,
build time and memory:

  (a) the best description of every neuron of one layer (SQL over the Parquet views);
  (b) the project's index (neuron_assets.description_index: a faiss IVF index and BM25 postings
      per partition), built through search.build_index: semantic top-10 unfiltered, filtered by
      layer and by least score; BM25 top-10; rebuilding one re-scored partition;
  (c) the alternatives on --ann-rows rows (their build is the cost; build time scales about
      linearly, so 1M is extrapolated): DuckDB's vss HNSW, faiss HNSW, usearch HNSW.

Ends with one line for the chosen index:
  chosen: rows=N semantic_p95_ms=X recall_at_10=Y text_p95_ms=Z build_s=W
The machine is usually shared: read ratios, and rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neuron_assets import search as S  # noqa: E402
from neuron_assets.store import Store  # noqa: E402

WORDS = ("closing opening bracket parenthesis comma period quote apostrophe hyphen colon semicolon number digit "
         "year date month day name city country river mountain person company python code function return keyword "
         "variable loop class import string list dictionary error exception file path url email html tag "
         "french german spanish latin greek english word prefix suffix plural verb noun adjective adverb pronoun "
         "article the a of in on after before inside end start line sentence paragraph heading title question "
         "answer negation emotion anger joy sadness food cooking sports music film book science math equation "
         "chemistry biology medicine law money price currency time clock week weather color animal plant").split()
FORMS = ("the word '{a}'", "{a} and {b} in {c} text", "tokens after '{a}'", "mentions of {a} or {b}",
         "the {a} of a {b}", "{a} {b} {c}", "'{a}' inside {b}", "{a} in a list of {b}")
NOISE = 0.6  # norm of the noise added to an anchor: cosine about 0.85 between a row and its anchor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="descriptions in all")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--ann-rows", type=int, default=50_000, help="rows the alternatives are built over")
    parser.add_argument("--root", help="build the store here (default: a temporary folder)")
    args = parser.parse_args()

    anchors, queries = real_vectors()
    with tempfile.TemporaryDirectory(prefix="bench-query-") as scratch:
        root = Path(args.root) if args.root else Path(scratch)
        store = Store(root / "store")
        per_partition = max(1, args.rows // (args.layers * 2))
        started = time.perf_counter()
        matrix, scores = write_store(store, args.layers, per_partition, anchors)
        rows = matrix.shape[0]
        print(f"synthetic store: {rows:,} descriptions, {matrix.shape[1]}-d, written in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        store.build_catalog()
        rss_before = _rss_gib()
        built = S.build_index(store, threads=os.cpu_count())
        shards_gib = sum(p.stat().st_size for p in (S.index_path(store).parent / "shards").glob("*.npz")) / 2**30
        print(f"project index: {built.shards} shards, built in {built.seconds:.0f} s ({rows / built.seconds:,.0f} rows/s), "
              f"{shards_gib:.2f} GiB on disk", flush=True)
        results: dict[str, tuple] = {}
        layer = args.layers // 2
        exact = [np.argsort(-(matrix @ q))[:10] for q in queries]
        with S.open_search(store) as session:
            con = session.con
            results["(a) best description of every neuron of a layer (SQL)"] = timed(args.repeat, lambda: con.execute(
                "SELECT neuron, polarity, description, test_score FROM neuron_descriptions WHERE layer = ? "
                "ORDER BY polarity, neuron", [layer]).fetchall())
            session.semantic(queries[0], 10)  # loads the shards
            print(f"shards loaded: process memory {_rss_gib() - rss_before:.2f} GiB more", flush=True)
            found = [session.semantic(q, 10).hits for q in queries]
            recall = _recall(found, exact, per_partition, args.layers)
            results["(b) semantic top-10, IVF shards"] = (*timed_each(queries, args.repeat,
                                                                     lambda q: session.semantic(q, 10)), recall)
            by_layer = S.Filters(layer=layer)
            layer_exact = [_exact_within(matrix, q, per_partition, args.layers, layer=layer) for q in queries]
            results["(b) semantic top-10, one layer"] = (*timed_each(queries, args.repeat, lambda q: session.semantic(
                q, 10, by_layer)), _recall([session.semantic(q, 10, by_layer).hits for q in queries], layer_exact,
                                           per_partition, args.layers))
            good = S.Filters(min_score=0.7)  # keeps about 1 row in 7
            good_exact = [_exact_within(matrix, q, per_partition, args.layers, keep=scores >= 0.7) for q in queries]
            results["(b) semantic top-10, score >= 0.7"] = (*timed_each(queries, args.repeat, lambda q: session.semantic(
                q, 10, good)), _recall([session.semantic(q, 10, good).hits for q in queries], good_exact,
                                       per_partition, args.layers))
            texts = ["closing bracket", "french cooking", "python function return", "year date", "anger emotion word",
                     "number digit after comma", "the word comma", "mentions of money or price"]
            results["(b) BM25 top-10, postings"] = timed_each(texts, args.repeat, lambda t: session.text(t, 10))
            results["(b) exact scan over the Parquet files (the fallback)"] = timed_each(
                queries[:3], 3, lambda q: session.semantic(q, 10, exact=True))
        # A re-scored partition: its new file, then the index brought up to date.
        frame = store.read(S.EMBEDDINGS_TABLE, layer, "pos")
        store.write(S.EMBEDDINGS_TABLE, frame.with_columns(pl.col("score") + 0.01), layer, "pos")
        update = S.build_index(store)
        print(f"one re-scored partition: {update.built} shard rebuilt in {update.seconds:.1f} s", flush=True)

        alternatives(results, matrix, queries, args.ann_rows, args.repeat, root)

    print(f"\n{'query':<58} {'p50 ms':>9} {'p95 ms':>9} {'recall@10':>10}")
    for name, value in results.items():
        recall = f"{value[2]:.3f}" if len(value) > 2 and value[2] is not None else ""
        print(f"{name:<58} {value[0]:>9.1f} {value[1]:>9.1f} {recall:>10}")
    semantic, text = results["(b) semantic top-10, IVF shards"], results["(b) BM25 top-10, postings"]
    print(f"\nchosen: rows={rows} semantic_p95_ms={semantic[1]:.1f} recall_at_10={semantic[2]:.3f} "
          f"text_p95_ms={text[1]:.1f} build_s={built.seconds:.0f}")
    return 0


def alternatives(results: dict, matrix: np.ndarray, queries: list, rows: int, repeat: int, root: Path) -> None:
    """DuckDB vss, faiss and usearch HNSW over the first ``rows`` rows; build time extrapolated to
    the whole store linearly (HNSW inserts cost about log n each: this flatters them a little)."""
    sample = np.ascontiguousarray(matrix[:rows])
    exact = [np.argsort(-(sample @ q))[:10] for q in queries]
    scale = matrix.shape[0] / rows
    builds = {}

    def note(name: str, seconds: float, search, recall_of) -> None:
        builds[name] = seconds
        p50, p95 = timed_each(queries, repeat, search)
        results[f"(c) {name}, {rows:,} rows"] = (p50, p95, recall_of())
        print(f"{name}: {rows:,} rows built in {seconds:.0f} s ({rows / seconds:,.0f} rows/s; "
              f"{matrix.shape[0]:,} rows: about {seconds * scale / 60:.0f} min)", flush=True)

    try:
        import faiss

        started = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(sample.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction, hnsw.hnsw.efSearch = 80, 64
        hnsw.add(sample)
        note("faiss HNSW (M 32, ef 64)", time.perf_counter() - started, lambda q: hnsw.search(q[None, :], 10),
             lambda: _overlap([hnsw.search(q[None, :], 10)[1][0] for q in queries], exact))
    except ImportError:
        print("faiss is not installed: skipped")
    try:
        from usearch.index import Index

        started = time.perf_counter()
        index = Index(ndim=sample.shape[1], metric="ip", dtype="f16", connectivity=16, expansion_add=64,
                      expansion_search=64)
        index.add(np.arange(rows), sample, threads=os.cpu_count() or 1)
        note("usearch HNSW (f16, M 16, ef 64)", time.perf_counter() - started, lambda q: index.search(q, 10),
             lambda: _overlap([index.search(q, 10).keys for q in queries], exact))
    except ImportError:
        print("usearch is not installed (pip install usearch): skipped")
    import duckdb

    from neuron_assets.store import pinned_extension_path, sql_string

    con = duckdb.connect(str(root / "vss.duckdb"))
    con.execute(f"LOAD {sql_string(pinned_extension_path('vss'))}")
    con.execute("SET hnsw_enable_experimental_persistence = true")
    dim = sample.shape[1]
    con.execute(f"CREATE TABLE d (id BIGINT, v FLOAT[{dim}])")
    con.register("frame", pl.DataFrame({"id": np.arange(rows), "v": sample}, schema={"id": pl.Int64,
                                                                                    "v": pl.Array(pl.Float32, dim)}))
    con.execute("INSERT INTO d SELECT id, v FROM frame")
    started = time.perf_counter()
    con.execute("CREATE INDEX d_hnsw ON d USING HNSW (v) WITH (metric = 'cosine')")
    seconds = time.perf_counter() - started

    def vss(q):
        return con.execute(f"SELECT id FROM d ORDER BY array_cosine_distance(v, ?::FLOAT[{dim}]) LIMIT 10",
                           [q.tolist()]).fetchall()

    note("DuckDB vss HNSW", seconds, vss, lambda: _overlap([[r[0] for r in vss(q)] for q in queries], exact))
    con.close()


# -- the synthetic store -----------------------------------------------------------------------


def real_vectors(anchors: int = 3000, queries: int = 50) -> tuple[np.ndarray, list[np.ndarray]]:
    """MiniLM vectors of generated descriptions: the anchors rows are made around, and queries."""
    from neuron_assets.embedding import sentence_encoder

    rng = np.random.default_rng(0)
    texts = list(dict.fromkeys(_description(rng) for _ in range(int((anchors + queries) * 1.3))))[:anchors + queries]
    started = time.perf_counter()
    vectors = np.asarray(sentence_encoder("builtin:all-MiniLM-L6-v2")(texts), dtype=np.float32)
    print(f"{len(texts):,} descriptions embedded with MiniLM in {time.perf_counter() - started:.0f} s", flush=True)
    return vectors[:anchors], list(vectors[anchors:])


def _description(rng) -> str:
    form = FORMS[rng.integers(len(FORMS))]
    return form.format(a=WORDS[rng.integers(len(WORDS))], b=WORDS[rng.integers(len(WORDS))],
                       c=WORDS[rng.integers(len(WORDS))])


def write_store(store: Store, layers: int, per_partition: int, anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """neuron_descriptions and description_embeddings for every layer x polarity; returns every
    row's vector and score, in the order (layer, polarity pos then neg, neuron)."""
    rng = np.random.default_rng(1)
    dim = anchors.shape[1]
    matrix = np.empty((layers * 2 * per_partition, dim), dtype=np.float32)
    scores = np.empty(layers * 2 * per_partition)
    for layer in range(layers):
        for p, polarity in enumerate(("pos", "neg")):
            start = (layer * 2 + p) * per_partition
            anchor = rng.integers(0, len(anchors), size=per_partition)
            vectors = anchors[anchor] + NOISE * rng.standard_normal((per_partition, dim)).astype(np.float32) / np.sqrt(dim)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            matrix[start:start + per_partition] = vectors
            descriptions = [_description(rng) for _ in range(per_partition)]
            neurons = np.arange(per_partition)
            score = rng.uniform(-0.1, 0.8, size=per_partition)
            scores[start:start + per_partition] = score
            store.write("neuron_descriptions", pl.DataFrame({
                "layer": layer, "polarity": polarity, "kind": "neuron", "neuron": neurons, "candidate": 0,
                "description": descriptions, "scorer": "correlation", "simulator": "semantic",
                "val_score": score + 0.05, "test_score": score, "explainer_backend": "statistical",
                "explainer_model": None, "simulator_version": None, "model": "bench", "config_hash": "bench",
                "run_id": "bench"}), layer, polarity)
            texts = pl.DataFrame({"layer": layer, "polarity": polarity, "kind": "neuron", "neuron": neurons,
                                  "source": S.SELECTED, "candidate": 0, "description": descriptions, "score": score,
                                  "text_hash": [f"{layer}-{polarity}-{n}" for n in neurons]})
            frame = S.embeddings_frame(texts, dict(zip(texts["text_hash"].to_list(), vectors)), "bench")
            store.write(S.EMBEDDINGS_TABLE, frame.with_columns(model=pl.lit("bench"), config_hash=pl.lit("bench"),
                                                               run_id=pl.lit("bench")), layer, polarity)
    return matrix, scores


def _exact_within(matrix, q, per_partition, layers, layer=None, keep=None) -> np.ndarray:
    similarity = matrix @ q
    if layer is not None:
        mask = np.zeros(len(similarity), dtype=bool)
        mask[layer * 2 * per_partition:(layer + 1) * 2 * per_partition] = True
        similarity = np.where(mask, similarity, -np.inf)
    if keep is not None:
        similarity = np.where(keep, similarity, -np.inf)
    return np.argsort(-similarity)[:10]


def _recall(found: list, exact: list, per_partition: int, layers: int) -> float:
    """Hits as row numbers of the matrix (layer, polarity, neuron), against the exact top 10."""
    rows = [[(h.layer * 2 + (h.polarity == "neg")) * per_partition + h.neuron for h in hits] for hits in found]
    return _overlap(rows, exact)


def _overlap(found: list, exact: list) -> float:
    return float(np.mean([len(set(map(int, f)) & set(map(int, e))) / 10 for f, e in zip(found, exact)]))


def timed(repeat: int, call) -> tuple[float, float]:
    call()  # warm: first touch of the files and the index
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        seconds.append((time.perf_counter() - started) * 1000)
    return _p50_p95(seconds)


def timed_each(items: list, repeat: int, call) -> tuple[float, float]:
    """``call(item)`` for ``repeat`` items in turn (cycling), after one warm call."""
    call(items[0])
    seconds = []
    for i in range(repeat):
        started = time.perf_counter()
        call(items[i % len(items)])
        seconds.append((time.perf_counter() - started) * 1000)
    return _p50_p95(seconds)


def _p50_p95(seconds: list[float]) -> tuple[float, float]:
    seconds.sort()
    return statistics.median(seconds), seconds[min(len(seconds) - 1, int(round(0.95 * (len(seconds) - 1))))]


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


if __name__ == "__main__":
    sys.exit(main())
