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
    assert (bm25.method, semantic.method) == ("bm25", "hnsw")
    first = lambda result: (result.hits[0].layer, result.hits[0].polarity, result.hits[0].neuron)  # noqa: E731
    assert first(bm25) == first(semantic) == PLANTED[:3]
    # The index's answer is the exact scan's answer here.
    with S.open_search(store) as session:
        from neuron_assets.embedding import sentence_encoder

        vector = sentence_encoder(session.embedding_model())([phrase])[0]
        exact = session.semantic(vector, 5, exact=True)
        assert exact.method == "exact"
        assert [(h.layer, h.neuron) for h in exact.hits][:3] == [(h.layer, h.neuron) for h in semantic.hits][:3]


def test_bm25_from_the_term_tables_equals_the_fts_macro(searchable):
    """The text search scores only documents holding a query term, from the index's term tables;
    its scores and order are those of fts's own match_bm25, which scores every row."""
    _, config = searchable
    store = Store(config.root)
    with S.open_search(store) as session:
        for query in ("closing parentheses and brackets", "words", "French cooking numbers", "zzz nothing"):
            fast = [(round(h.match, 9), h.layer, h.polarity, h.neuron) for h in session.text(query, 8).hits]
            session.con.execute(f"USE {S.INDEX_NAME}")
            macro = session.con.execute(
                "SELECT match, layer, polarity, neuron FROM (SELECT *, fts_main_descriptions.match_bm25(doc_id, ?, "
                "fields := 'description') AS match FROM descriptions) WHERE match IS NOT NULL "
                "ORDER BY match DESC, doc_id LIMIT 8", [query]).fetchall()
            session.con.execute("USE memory")
            assert fast == [(round(m, 9), layer, polarity, neuron) for m, layer, polarity, neuron in macro], query
        filtered = session.text("words", 20, S.Filters(layer=1, polarity="neg")).hits
        assert filtered and all((h.layer, h.polarity) == (1, "neg") for h in filtered)


def test_text_search_falls_back_to_ilike_without_fts(searchable, monkeypatch):
    _, config = searchable
    store = Store(config.root)
    real = S.pinned_extension_path

    def no_fts(name):
        if name == "fts":
            raise ValueError("the fts extension is not installed")
        return real(name)

    monkeypatch.setattr(S, "pinned_extension_path", no_fts)
    S.index_path(store).unlink()  # rebuilt without its BM25 index
    result = S.search(store, "Python function", top=3, mode="text")
    assert result.method == "ilike" and any("ILIKE" in note for note in result.notes)
    assert (result.hits[0].layer, result.hits[0].neuron) == (PLANTED[0], PLANTED[2])
    assert S.search(store, "closing brackets", top=1).method == "hnsw"  # vss still loads


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


EXTENSIONS_OFFLINE = r"""
import sys
import polars as pl
import numpy as np
from neuron_assets import search as S
from neuron_assets.store import Store
store = Store(sys.argv[1])
rng = np.random.default_rng(0)
texts = pl.DataFrame({"layer": 0, "polarity": "pos", "neuron": range(50), "source": "selected", "candidate": 0,
                      "description": [f"term{chr(97 + i // 26)}{chr(97 + i % 26)} shared text" for i in range(50)], "score": 0.5,
                      "text_hash": [str(i) for i in range(50)]})
vectors = rng.standard_normal((50, 8)).astype(np.float32)
vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
store.write(S.EMBEDDINGS_TABLE, S.embeddings_frame(texts, dict(zip(texts["text_hash"], vectors)), "m"), 0, "pos")
built = S.build_index(store)
assert built.hnsw and built.fts, built
with S.open_search(store) as session:
    assert session.semantic(vectors[7], 3).hits[0].neuron == 7
    plan = session.con.execute("EXPLAIN SELECT unnest(min_by(d, array_cosine_distance(d.embedding, ?::FLOAT[8]), 3)) "
                               "FROM description_index.main.descriptions AS d", [vectors[7].tolist()]).fetchall()[0][1]
    assert "HNSW_INDEX_SCAN" in plan, plan
    assert session.text("termah", 3).hits[0].neuron == 7
print("ok")
"""


def test_pinned_extensions_load_offline(tmp_path):
    """vss and fts load from their packages with autoinstall off, in a process whose home has no
    DuckDB extension cache and whose proxy settings point nowhere: nothing is fetched."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-c", EXTENSIONS_OFFLINE, str(tmp_path / "store")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
    assert not (home / ".duckdb").exists()  # no extension was installed or cached
