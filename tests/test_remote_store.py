"""A store on a non-local fsspec filesystem (issue 9, part 7): tables round-trip, the DuckDB
views read them, writes are atomic, and the writer lock says it cannot lock there."""

from __future__ import annotations

import uuid

import duckdb
import fsspec
import polars as pl
import pytest

from neuron_assets.lock import writer_lock
from neuron_assets.store import Store, is_url


@pytest.fixture
def memory_store():
    root = f"memory://stores/{uuid.uuid4().hex}"
    yield Store(root)
    memory = fsspec.filesystem("memory")
    if memory.exists(root):
        memory.rm(root, recursive=True)


def test_a_partition_round_trips_on_memory_fs_and_a_view_reads_it(memory_store, tmp_path):
    store = memory_store
    assert store.remote and is_url(store.root) and not is_url(tmp_path) and not is_url(str(tmp_path))
    frame = pl.DataFrame({"kind": ["neuron"] * 3, "neuron": [3, 1, 2], "seq_id": [7, 8, 9],
                          "split": ["train", "val", "test"], "extreme": [0.5, 0.25, 1.0]})
    path = store.write("neuron_stats", frame, layer=2, polarity="neg")
    assert path.startswith("memory://") and path.endswith("/data/neuron_stats/layer=2/polarity=neg/data.parquet")
    assert store.read("neuron_stats", 2, "neg").equals(frame)
    assert store.exists("neuron_stats", 2, "neg") and not store.exists("neuron_stats", 3, "neg")
    assert store.partitions("neuron_stats") == [(2, "neg")]
    assert not [key for key in store.fs.find(store.root) if key.endswith(".tmp")], "no temporary key is left"
    with store.connect() as con:
        assert con.execute("select layer, polarity, count(*), max(extreme) from neuron_stats group by all").fetchall() \
            == [(2, "neg", 3, 1.0)]
        with pytest.raises(duckdb.Error):  # the contained connection reads the store and nothing else
            con.execute(f"select * from read_parquet('{tmp_path}/x.parquet')")
    assert "neuron_stats" in store.views()
    assert not store.fs.exists(f"{store.root}/catalog.duckdb"), "the views are built in memory, nothing written there"


def test_a_failed_remote_write_leaves_the_old_table(memory_store):
    store = memory_store
    store.write("neuron_stats", pl.DataFrame({"neuron": [1]}), 0, "pos")

    def broken():
        yield from ()
        raise RuntimeError("the writer died")

    import pyarrow as pa

    with pytest.raises(RuntimeError, match="writer died"):
        store.write_batches("neuron_stats", pa.schema([("neuron", pa.int64())]), broken(), 0, "pos")
    assert store.read("neuron_stats", 0, "pos")["neuron"].to_list() == [1]
    assert [key.rsplit("/", 1)[1] for key in store.fs.find(store.root)] == ["data.parquet"]
    assert not store.check_readable("neuron_stats", 0, "pos")


def test_the_writer_lock_lives_in_the_store_on_a_url_root(memory_store, monkeypatch):
    """On a URL root the locks are files of the store itself (issue 30): an exclusive create
    through fsspec, the holder named to whoever is refused, a dead machine's lock taken over
    once its lease has expired."""
    import json
    import time

    from neuron_assets.lock import NODE_ENV, StoreLocked, held_locks

    monkeypatch.setenv(NODE_ENV, "node-a")
    with writer_lock(memory_store.root, "run-1", ["corpus"]) as record:
        assert record["run_id"] == "run-1" and record["host"] == "node-a"
        assert held_locks(memory_store.root) == [f"{memory_store.root}/locks/corpus.lock"]
        monkeypatch.setenv(NODE_ENV, "node-b")  # another machine
        with pytest.raises(StoreLocked, match="another run is writing to memory://.* on node-a, run run-1.*lease"):
            with writer_lock(memory_store.root, "run-2", ["corpus"]):
                pass
        monkeypatch.setenv(NODE_ENV, "node-a")
    assert held_locks(memory_store.root) == []

    gone = {"pid": 4242, "host": "node-a", "run_id": "run-3", "started_at": "?", "token": "t3", "lease_s": 5,
            "renewed_at": time.time() - 60}
    memory_store.fs.pipe_file(f"{memory_store.root}/locks/corpus.lock", json.dumps(gone).encode())
    monkeypatch.setenv(NODE_ENV, "node-b")
    with pytest.warns(UserWarning, match="left by pid 4242 on node-a .*lease of 5 s expired"):
        with writer_lock(memory_store.root, "run-4", ["corpus"]):
            held = json.loads(memory_store.fs.cat_file(f"{memory_store.root}/locks/corpus.lock"))
            assert held["run_id"] == "run-4"
    assert held_locks(memory_store.root) == []


def test_a_run_on_a_url_root_writes_its_tables_there_and_resumes(tiny_llama, text_corpus, tmp_path, monkeypatch, capsys):
    """`storage.root: memory://...` (the stand-in for s3://): every table of `neuron-assets run`
    lands on the fsspec filesystem, nothing but local state (markers, locks, Dagster's
    instance) in the scratch folder, `sql` and `show` read it, and a rerun skips every stage."""
    import yaml

    from neuron_assets.cli import main
    from tests.conftest import STAGES

    root = f"memory://runs/{uuid.uuid4().hex}"
    scratch = tmp_path / "scratch"
    monkeypatch.setenv("NEURON_ASSETS_SCRATCH", str(scratch))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    raw = {
        "name": "remote", "storage": {"root": root},
        "subject": {"model": str(tiny_llama), "batch_size": 8},
        "corpus": {"sources": [{"name": "texts", "kind": "text", "path": str(text_corpus)}], "seq_len": 16,
                   "chat_prefix": None, "sequences_per_split": 12},
        "features": {"layers": [1], "neurons": {"sample": 3, "seed": 0}}, "sae": {"layers": []},
        "exemplars": {"top_k": 3, "random_per_split": 2, "per_quantile": 1, "quantile_bins": 4, "quiet_per_split": 2,
                      "quantile_reservoir": 8, "stats_token_sample": 64},
        "explain": {"k": 2}, "simulate": {"backend": "lexical", "compare_with": []},
        "score": {"scorers": ["correlation"]},
    }
    config = tmp_path / "remote.yaml"
    config.write_text(yaml.safe_dump(raw))
    memory = fsspec.filesystem("memory")
    try:
        assert main(["--config", str(config), "run", "--select", STAGES]) == 0
        written = {key.split("/data/", 1)[1].split("/", 1)[0] for key in memory.find(root) if key.endswith(".parquet")}
        assert {"sequences", "exemplars", "neuron_stats", "candidate_descriptions", "description_scores",
                "neuron_descriptions"} <= written
        local = [p.relative_to(scratch).as_posix() for p in scratch.rglob("*.parquet")]
        assert not [p for p in local if "/data/" in p or p.startswith("data/")], f"tables written locally: {local}"
        from neuron_assets.config import load_config

        assert load_config(config).root.is_relative_to(scratch)
        assert (load_config(config).root / "report" / "index.html").is_file(), "the report is built in the scratch folder"
        capsys.readouterr()
        assert main(["--config", str(config), "sql", "select count(*) as n from neuron_descriptions", "--format", "csv"]) == 0
        assert capsys.readouterr().out.splitlines() == ["n", "6"]  # 3 neurons x 2 polarities
        assert main(["--config", str(config), "run", "--select", STAGES]) == 0
        assert "everything is up to date" in capsys.readouterr().err
    finally:
        if memory.exists(root):
            memory.rm(root, recursive=True)
