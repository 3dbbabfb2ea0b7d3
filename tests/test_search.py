"""Description search: the embeddings asset, semantic search (HNSW and exact), BM25 and its ILIKE
fallback, and the pinned extensions loading offline. The descriptions are planted in the store
(the stages before are tested elsewhere); the vectors come from the shipped MiniLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from neuron_assets import search as S
from neuron_assets.cli import main
from neuron_assets.config import load_config
from neuron_assets.store import Store
from neuron_assets.types import Partition, Polarity

PLANTED = (1, "neg", 3, "closing parentheses and brackets at the end of Python function calls")
DISTRACTORS = [
    "the word 'the' at the start of a sentence", "numbers that are years in dates", "French words about cooking",
    "capitalized names of cities and countries", "the keyword return inside functions", "plural nouns ending in s",
    "emotional words such as anger and joy", "email addresses and URLs", "the letter e inside longer words",
    "tokens after a comma in lists", "mathematical equations and variables", "quotation marks around titles",
]


def plant_descriptions(root: Path, partitions: list[tuple[int, str]]) -> None:
    """Selected descriptions for every partition: the distractors, and in one the planted concept."""
    store = Store(root)
    for layer, polarity in partitions:
        texts = [f"{d} ({layer} {polarity})" for d in DISTRACTORS[:6]] if (layer, polarity) != PLANTED[:2] else \
            DISTRACTORS[6:9] + [PLANTED[3]] + DISTRACTORS[9:]
        store.write("neuron_descriptions", pl.DataFrame({
            "layer": layer, "polarity": polarity, "neuron": list(range(len(texts))), "candidate": 0,
            "description": texts, "val_score": 0.5, "test_score": [0.1 * (i % 5) for i in range(len(texts))],
            "explainer_backend": "statistical", "model": "tiny", "config_hash": "test", "run_id": "test"}),
            layer, polarity)


@pytest.fixture
def searchable(tiny_config):
    """A tiny config whose store has planted descriptions, embedded by the Dagster asset."""
    from neuron_assets.defs.materialize import materialize_config

    path = tiny_config()
    config = load_config(path)
    partitions = [(layer, polarity) for layer in range(3) for polarity in ("pos", "neg")]
    plant_descriptions(config.root, partitions)
    outcome = materialize_config(str(path), ["description_embeddings"])
    assert outcome.success, outcome.error
    return path, config


def run_cli(capsys, *argv) -> list[dict]:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_search_finds_the_planted_neuron_first(searchable, capsys):
    path, config = searchable
    store = Store(config.root)
    assert S.index_path(store).exists() and not S.index_stale(store)
    hits = run_cli(capsys, "--config", str(path), "search", "brackets closing in code", "--format", "json")
    layer, polarity, neuron, description = PLANTED
    assert (hits[0]["layer"], hits[0]["polarity"], hits[0]["neuron"]) == (layer, polarity, neuron)
    assert hits[0]["description"] == description and hits[0]["show"] == "neuron-assets show 1 3 --polarity neg"
    assert len(hits) == 10 and hits[0]["match"] > hits[1]["match"]

    # Filters scan exactly and still return --top hits of the chosen layer only.
    layer0 = run_cli(capsys, "--config", str(path), "search", "brackets", "--layer", "0", "--top", "3", "--format", "json")
    assert [h["layer"] for h in layer0] == [0, 0, 0]
    scored = run_cli(capsys, "--config", str(path), "search", "words", "--min-score", "0.35", "--format", "json")
    assert scored and all(h["score"] >= 0.35 for h in scored)

    assert main(["--config", str(path), "search", "closing brackets", "--top", "2"]) == 0
    table = capsys.readouterr().out
    assert "cosine" in table and PLANTED[3] in table and "neuron-assets show 1 3 --polarity neg" in table


def test_text_and_semantic_search_agree_on_an_exact_phrase(searchable):
    _, config = searchable
    store = Store(config.root)
    phrase = "closing parentheses and brackets"
    bm25 = S.search(store, phrase, top=5, mode="text")
    semantic = S.search(store, phrase, top=5)
    assert (bm25.method, semantic.method) == ("bm25", "ivf")
    first = lambda result: (result.hits[0].layer, result.hits[0].polarity, result.hits[0].neuron)  # noqa: E731
    assert first(bm25) == first(semantic) == PLANTED[:3]
    # The index's answer is the exact scan's answer here.
    with S.open_search(store) as session:
        from neuron_assets.embedding import sentence_encoder

        vector = sentence_encoder(session.embedding_model())([phrase])[0]
        exact = session.semantic(vector, 5, exact=True)
        assert exact.method == "exact"
        assert [(h.layer, h.neuron) for h in exact.hits][:3] == [(h.layer, h.neuron) for h in semantic.hits][:3]


def test_bm25_scores_only_rows_holding_a_query_term_and_equals_the_formula(searchable):
    """The text search reads the postings of the query's terms; its scores and order equal BM25
    (k1 = 1.2, b = 0.75, idf log((N - df + 0.5) / (df + 0.5) + 1)) computed over every row."""
    from neuron_assets.description_index import words

    _, config = searchable
    store = Store(config.root)
    rows = pl.concat([store.read(S.EMBEDDINGS_TABLE, *p) for p in store.partitions(S.EMBEDDINGS_TABLE)])
    docs = [words(t) for t in rows["description"].to_list()]
    average = sum(map(len, docs)) / len(docs)

    def bm25(query: str) -> dict[tuple, float]:
        terms = set(words(query))
        scores = {}
        for row, doc in zip(rows.iter_rows(named=True), docs):
            total = 0.0
            for term in terms:
                tf, df = doc.count(term), sum(term in d for d in docs)
                if tf:
                    idf = np.log((len(docs) - df + 0.5) / (df + 0.5) + 1)
                    total += idf * tf * 2.2 / (tf + 1.2 * (1 - 0.75 + 0.75 * len(doc) / average))
            if total:
                scores[(row["layer"], row["polarity"], row["neuron"])] = total
        return scores

    with S.open_search(store) as session:
        for query in ("closing parentheses and brackets", "words", "French cooking numbers", "zzz nothing"):
            expected = bm25(query)
            hits = session.text(query, 8).hits
            assert [h.match for h in hits] == pytest.approx(sorted(expected.values(), reverse=True)[:8], rel=1e-9), query
            assert all(h.match == pytest.approx(expected[(h.layer, h.polarity, h.neuron)], rel=1e-9) for h in hits)
        filtered = session.text("words", 20, S.Filters(layer=1, polarity="neg")).hits
        assert filtered and all((h.layer, h.polarity) == (1, "neg") for h in filtered)


def test_search_without_a_readable_index_scans_the_parquet_files(searchable):
    _, config = searchable
    store = Store(config.root)
    for shard in (S.index_path(store).parent / "shards").glob("*.npz"):
        shard.write_bytes(b"damaged")  # the manifest names them; none loads
    from neuron_assets import description_index

    description_index._LOADED.clear()
    with S.open_search(store, rebuild=False) as session:
        assert session.index is None
    result = S.search(store, "Python function", top=3, mode="text")
    assert result.method in ("ilike", "bm25")


def test_embeddings_are_cached_by_text_hash(searchable):
    _, config = searchable
    store = Store(config.root)
    frame = store.read("neuron_descriptions", 0, "pos")
    store.write("neuron_descriptions", frame.with_columns(
        pl.when(pl.col("neuron") == 2).then(pl.lit("a changed description")).otherwise(pl.col("description"))
        .alias("description")), 0, "pos")
    seen = []

    def counting(texts):
        seen.extend(texts)
        from neuron_assets.embedding import sentence_encoder

        return sentence_encoder(config.search.embedding_model)(texts)

    written = S.embed_partition(config, Partition(0, Polarity.POS), "rerun", encoder=counting)
    assert seen == ["a changed description"] and (written.embedded, written.reused) == (1, 5)
    vectors = pl.read_parquet(written.path)
    assert vectors.schema["embedding"] == pl.Array(pl.Float32, 384)
    norms = np.linalg.norm(np.asarray(vectors["embedding"].to_list(), dtype=np.float32), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-4)
    assert S.index_stale(store)  # a search rebuilds it
    assert S.search(store, "a changed description", top=1).hits[0].neuron == 2
    assert not S.index_stale(store)


def test_search_errors_name_the_fix(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(LookupError, match="description_embeddings"):
        S.search(store, "anything")
    with pytest.raises(ValueError, match="empty"):
        S.search(store, "   ")


INDEX_OFFLINE = r"""
import sys
import polars as pl
import numpy as np
from neuron_assets import search as S
from neuron_assets.store import Store
store = Store(sys.argv[1])
rng = np.random.default_rng(0)
for layer, rows in ((0, 50), (1, 6000)):  # a flat shard and an IVF shard
    texts = pl.DataFrame({"layer": layer, "polarity": "pos", "neuron": range(rows), "source": "selected",
                          "candidate": 0, "description": [f"term{chr(97 + i // 26 % 26)}{chr(97 + i % 26)} shared text"
                                                          for i in range(rows)], "score": 0.5,
                          "text_hash": [f"{layer}-{i}" for i in range(rows)]})
    vectors = rng.standard_normal((rows, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store.write(S.EMBEDDINGS_TABLE, S.embeddings_frame(texts, dict(zip(texts["text_hash"], vectors)), "m"), layer, "pos")
    if layer == 0:
        probe = vectors[7]
built = S.build_index(store)
assert (built.rows, built.shards, built.built) == (6050, 2, 2), built
with S.open_search(store) as session:
    assert session.semantic(probe, 3).hits[0].neuron == 7
    assert session.text("termah", 3).hits[0].neuron == 7
print("ok")
"""


def test_the_search_index_builds_and_answers_offline(tmp_path):
    """faiss builds and answers with no network and no cache in a fresh home."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-c", INDEX_OFFLINE, str(tmp_path / "store")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_a_rescored_partition_rebuilds_its_shard_and_no_other(searchable):
    _, config = searchable
    store = Store(config.root)
    shards = S.index_path(store).parent / "shards"
    before = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.npz")}
    assert len(before) == 6
    frame = store.read("neuron_descriptions", 2, "neg")
    store.write("neuron_descriptions", frame.with_columns(pl.lit("a rescored text").alias("description")), 2, "neg")
    S.embed_partition(config, Partition(2, Polarity.NEG), "rerun")
    built = S.build_index(store)
    after = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.npz")}
    assert built.built == 1 and len(after) == 6
    assert len(set(after) - set(before)) == 1 and next(iter(set(after) - set(before))).startswith("2-neg-")
    assert all(after[name] == before[name] for name in set(after) & set(before))
    assert S.search(store, "a rescored text", top=1, mode="text").hits[0].layer == 2


def test_a_texts_vector_does_not_depend_on_the_texts_beside_it():
    """Texts of one length go together, none padded: padding moved a vector by 6e-8, and as a
    vector is cached for the process, a resumed run's scores differed from a whole run's."""
    from neuron_assets.embedding import MiniLMEncoder

    text = 'the tokens "(" and "def"'
    longer = "a much longer description of dates and years in French text, with more words after it"
    alone = MiniLMEncoder("builtin:all-MiniLM-L6-v2", "cpu")([text])[0]
    beside = MiniLMEncoder("builtin:all-MiniLM-L6-v2", "cpu")([longer, text, "x", text + " too"])[1]
    assert np.array_equal(alone, beside)
