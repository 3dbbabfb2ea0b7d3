"""The streaming corpus builder: row groups, token strings, workers (issue 9, part 2)."""

from __future__ import annotations

import json

import polars as pl
import pyarrow.parquet as pq

from neuron_assets.config import CorpusConfig, SourceConfig, load_config
from neuron_assets.corpus import build_sequences, plan_corpus, tokenize_with_text
from neuron_assets.stages import make_corpus
from neuron_assets.store import Store
from tests.support.tiny_models import sample_texts


def _documents(folder, n=24):
    """Documents with text beyond ASCII (accents, CJK, emoji), so byte and character offsets differ."""
    folder.mkdir()
    sentences = sample_texts(n * 6, seed=5)
    texts = []
    for i in range(n):
        text = " ".join(sentences[i * 6:(i + 1) * 6]).replace(" a ", " á ").replace("the", "thé 日本 😀")
        (folder / f"d{i:02d}.txt").write_text(text)
        texts.append(text)
    return texts


def test_row_groups_hold_the_table_and_tokens_concatenate_to_the_text(tmp_path, tiny_tokenizer):
    texts = _documents(tmp_path / "docs")
    config = CorpusConfig(sources=[SourceConfig(name="docs", kind="text", path=str(tmp_path / "docs"))], seq_len=20,
                          chat_prefix=None, prefix="Read: é", sequences_per_split=12, max_windows_per_document=3)
    corpus = plan_corpus(config, tiny_tokenizer)
    store = Store(tmp_path / "store")
    path = store.write_batches("sequences", corpus.schema(), corpus.batches(rows_per_batch=7))
    assert pq.ParquetFile(path).metadata.num_row_groups == -(-corpus.rows // 7) > 1
    table = pl.read_parquet(path)
    assert table.equals(build_sequences(config, tiny_tokenizer)), "the row groups hold the same table as one frame"
    assert table.group_by("split").len()["len"].to_list() == [12, 12, 12]
    prefix_text = "".join(tokenize_with_text("Read: é", tiny_tokenizer)[1])
    for row in table.iter_rows(named=True):
        assert len(row["tokens"]) == len(row["token_ids"]) == row["n_tokens"] == 20
        prefix = "".join(row["tokens"][:row["prefix_len"]])
        assert prefix.endswith(prefix_text) and prefix.startswith("<|begin_of_text|>")
        window = "".join(row["tokens"][row["prefix_len"]:])
        document = texts[row["doc_id"]]
        assert window in document, "a window's strings are a piece of its document"
        ids, tokens = tokenize_with_text(document, tiny_tokenizer)
        p, n = row["prefix_len"], row["n_tokens"] - row["prefix_len"]
        at = next(i for i in range(len(ids)) if ids[i:i + n] == row["token_ids"][p:])
        assert row["tokens"][p:] == tokens[at:at + n], "each string is what tokenizing the document alone gives"


def test_workers_build_the_same_table_and_make_corpus_streams(tiny_config, tmp_path, chat_corpus):
    sources = [{"name": "texts", "kind": "text", "path": str(tmp_path / "docs")},
               {"name": "chats", "kind": "jsonl", "path": str(chat_corpus), "messages_field": "messages"}]
    _documents(tmp_path / "docs")
    config = load_config(tiny_config(corpus__sources=sources, corpus__sequences_per_split=10, corpus__tokenize_workers=1))
    written = make_corpus(config, "run-3")
    streamed = pl.read_parquet(written.path)
    assert written.rows == streamed.height == 30
    assert set(streamed["run_id"]) == {"run-3"} and set(streamed["model"]) == {config.subject.model}
    in_process = build_sequences(config.corpus.model_copy(update={"tokenize_workers": 0}), _tokenizer(config))
    assert streamed.drop("model", "config_hash", "run_id").equals(in_process), "workers change nothing in the table"
    chats = streamed.filter(pl.col("source") == "chats")
    first = json.loads(chat_corpus.read_text().splitlines()[chats["doc_id"][0]])["messages"][0]["content"]
    assert first[:10] in "".join(chats["tokens"][0])


def _tokenizer(config):
    from neuron_assets.subject import load_tokenizer

    return load_tokenizer(config.subject)
