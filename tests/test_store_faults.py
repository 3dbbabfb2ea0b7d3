"""Faults a hostile week finds in the store (issue 32, part B), tried as a user would: each case
asserts the message (the problem and the fix), the exit code, and what a reader sees. Damage
that keeps a file's size, a deleted partition, `sql` reading the working directory, lists in
CSV, a table folder that plain pandas, polars and DuckDB read, and the view the README lists."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from neuron_assets.cli import main
from neuron_assets.config import load_config
from neuron_assets.store import DamagedTableError, Store


def _write_store(root: Path, layers=(0, 1)) -> Store:
    """A small store as the stages write it: layer and polarity columns in every partition frame."""
    store = Store(root)
    store.write("sequences", pl.DataFrame({"seq_id": [0, 1, 2], "split": ["train", "val", "test"],
                                           "tokens": [["a"], ["b", "c"], ["d"]]}))
    for layer in layers:
        for polarity in ("pos", "neg"):
            store.write("exemplars", pl.DataFrame({
                "layer": pl.Series([layer] * 2, dtype=pl.Int16), "polarity": [polarity] * 2, "neuron": [0, 1],
                "extreme": [1.0, 1.0], "activations": [[0.5, 1.0], [0.25, 1.0]]}), layer, polarity)
            store.write("neuron_stats", pl.DataFrame({"layer": [layer] * 2, "polarity": [polarity] * 2,
                                                      "neuron": [0, 1], "max": [1.0, 1.0]}), layer, polarity)
    return store


@pytest.fixture
def small_store(tmp_path):
    store = _write_store(tmp_path / "home")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"storage": {"root": str(store.root)}}))
    return str(config), store


def _run(capsys, config: str, *args: str) -> tuple[int, str, str]:
    code = main(["--config", config, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _big_exemplars(store: Store, layer: int = 0, polarity: str = "pos") -> Path:
    rows = 50_000
    return store.write("exemplars", pl.DataFrame({
        "layer": pl.Series([layer] * rows, dtype=pl.Int16), "polarity": [polarity] * rows,
        "neuron": np.arange(rows), "extreme": np.random.default_rng(0).random(rows),
        "activations": [[0.5, 1.0]] * rows}), layer, polarity)


# -- item 2: damage that keeps the file's size ---------------------------------------------------


def test_damage_of_unchanged_size_is_left_out_and_named(small_store, capsys):
    config, store = small_store
    path = _big_exemplars(store)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 40] = bytes(255 - b for b in data[middle: middle + 40])  # 40 bytes, same size
    path.write_bytes(bytes(data))
    code, out, err = _run(capsys, config, "sql", "SELECT count(*) AS n, sum(extreme) AS s FROM exemplars", "--format", "json")
    assert code == 0 and json.loads(out) == [{"n": 6, "s": 6.0}], "the other partitions answer, no garbage"
    assert f"warning: {path} is damaged (its content changed after it was written: sha256" in err
    assert "the 'exemplars' view leaves it out" in err
    assert "dagster asset materialize -m neuron_assets.defs --select exemplars --partition '0|pos'" in err
    assert [d.partition for d in store.damaged()] == ["0|pos"]
    assert main(["--config", config, "show", "0", "1"]) == 1  # show reads that partition: refused, not garbage
    assert f"{path} is damaged (its content changed" in capsys.readouterr().err
    for read in (lambda: store.read("exemplars", 0, "pos"), lambda: store.scan("exemplars", 0, "pos")):
        with pytest.raises(DamagedTableError, match=r"is damaged \(its content changed.*--select exemplars "
                                                    r"--partition '0\|pos'.*or delete the file and rerun neuron-assets run"):
            read()  # a stage reading it fails, naming the fix, instead of computing on garbage
    # verify names it with the rerun command and exits non-zero
    code, out, err = _run(capsys, config, "verify")
    assert code == 1 and f"damaged: {path}" in out and "--select exemplars --partition '0|pos'" in out
    assert "1 damaged, 0 missing" in err
    # the fix: the partition written again
    _big_exemplars(store)
    code, out, err = _run(capsys, config, "sql", "SELECT count(*) AS n FROM exemplars", "--format", "json")
    assert code == 0 and json.loads(out) == [{"n": 50_006}] and "damaged" not in err
    code, out, err = _run(capsys, config, "verify")
    assert code == 0 and out == "" and "9 data files checked" in err and "all readable and as written" in err


def test_files_are_hashed_only_when_changed_since_written(small_store, monkeypatch):
    """Opening a store just written hashes nothing; a copy without modification times is hashed
    once, and not again when its catalog is rebuilt for another change."""
    from neuron_assets.store import checksums

    _, store = small_store
    hashed = []
    real = checksums.sha256_of
    monkeypatch.setattr(checksums, "sha256_of", lambda path: hashed.append(Path(path).name) or real(path))
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM store_files WHERE sha256 IS NOT NULL").fetchone() == (9,)
    assert hashed == []
    copy = Store(store.root.parent / "copy")
    shutil.copytree(store.root, copy.root, copy_function=shutil.copyfile)  # new modification times
    with copy.connect() as con:
        assert con.execute("SELECT count(*) FROM exemplars").fetchone() == (8,)
    assert len(hashed) == 9
    copy.write("neuron_stats", pl.DataFrame({"neuron": [5], "max": [2.0]}), 0, "pos")  # the catalog is rebuilt
    with copy.connect() as con:
        assert con.execute("SELECT count(*) FROM neuron_stats").fetchone() == (7,)
        assert con.execute("SELECT count(*) FROM store_files WHERE problem IS NOT NULL").fetchone() == (0,)
    assert len(hashed) == 9 + 1, "only the file just written (by the writer)"


# -- item 3: a deleted partition file ------------------------------------------------------------


def test_a_deleted_partition_is_named_with_its_rerun_command(small_store, capsys):
    from neuron_assets.stages.markers import Markers

    config, store = small_store
    markers = Markers(load_config(config), ["0|pos", "0|neg", "1|pos", "1|neg"])
    for layer in (0, 1):
        for polarity in ("pos", "neg"):
            markers.complete("exemplars", f"{layer}|{polarity}",
                             [store.path("exemplars", layer, polarity), store.path("neuron_stats", layer, polarity)], "run-7")
    gone = store.path("neuron_stats", 1, "neg")
    gone.unlink()
    code, out, err = _run(capsys, config, "sql", "SELECT count(*) AS n FROM neuron_stats", "--format", "json")
    assert code == 0 and json.loads(out) == [{"n": 6}]
    assert f"warning: {gone} is missing, though its completion marker" in err and "says run run-7 wrote it" in err
    assert "the 'neuron_stats' view lacks its rows" in err
    assert "--select exemplars --partition '1|neg'" in err  # the asset that writes neuron_stats
    code, out, err = _run(capsys, config, "verify")
    assert code == 1 and f"missing: {gone}" in out and "0 damaged, 1 missing" in err
    assert "--select exemplars --partition '1|neg'" in out


# -- item 4: `sql` reads nothing of the working directory ------------------------------------------


def test_sql_cannot_read_the_working_directorys_tmp(small_store, capsys, tmp_path, monkeypatch):
    config, store = small_store
    work = tmp_path / "work"
    (work / ".tmp").mkdir(parents=True)
    (work / ".tmp" / "s.txt").write_text("S\n")
    monkeypatch.chdir(work)
    code, out, err = _run(capsys, config, "sql", "select * from read_text('.tmp/s.txt')")
    assert code == 1 and out == "" and "cannot read .tmp/s.txt" in err and "reads only this store" in err
    with store.connect() as con:
        spill = con.execute("select current_setting('temp_directory')").fetchone()[0]
    assert Path(spill).is_absolute() and not Path(spill).resolve().is_relative_to(work)


# -- item 5: lists and structs in CSV ---------------------------------------------------------------


def test_csv_writes_lists_and_structs_as_json(small_store, capsys, tmp_path):
    config, _ = small_store
    code, out, err = _run(capsys, config, "sql", "select * from exemplars order by layer, polarity, neuron", "--format", "csv")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 8 and json.loads(rows[0]["activations"]) == [0.5, 1.0]
    target = tmp_path / "nested.csv"
    code, _, err = _run(capsys, config, "sql", "select {'a': 1, 'b': ['x', null]} as s, [[1, 2], []] as l, "
                        "null::INT[] as none", "--format", "csv", "--output", str(target))
    assert code == 0 and f"wrote 1 rows to {target}" in err
    row = next(csv.DictReader(target.open()))
    assert json.loads(row["s"]) == {"a": 1, "b": ["x", None]} and json.loads(row["l"]) == [[1, 2], []]
    assert row["none"] == ""


# -- item 8: a table folder any Parquet reader reads ---------------------------------------------


def _check_frame(frame: pl.DataFrame) -> None:
    assert frame.height == 8
    assert sorted(frame.select(pl.col("layer").cast(pl.Int64), pl.col("polarity").cast(pl.String)).unique().rows()) \
        == [(0, "neg"), (0, "pos"), (1, "neg"), (1, "pos")]


def test_a_table_folder_reads_with_pyarrow_polars_and_duckdb(small_store):
    _, store = small_store
    folder = store.table_dir("exemplars")
    _check_frame(pl.from_arrow(pq.read_table(folder)))  # what pandas.read_parquet(folder) calls
    _check_frame(pl.read_parquet(folder))
    _check_frame(pl.scan_parquet(folder, hive_partitioning=True).collect())
    _check_frame(duckdb.sql(f"select * from read_parquet('{folder}/**/*.parquet')").pl())
    # the store's own readers see the frames as they were written: same columns, places and types
    frame = store.read("exemplars", 1, "neg")
    assert frame.columns[:4] == ["layer", "polarity", "neuron", "extreme"] and frame.schema["layer"] == pl.Int16
    assert frame["polarity"].to_list() == ["neg", "neg"]
    assert store.scan("exemplars", 1, "neg").select("layer", "neuron").collect().rows() == [(1, 0), (1, 1)]
    assert store.read("exemplars", 1, "neg", columns=["polarity"])["polarity"].to_list() == ["neg", "neg"]
    assert store.read("neuron_stats", 0, "pos").schema["layer"] == pl.Int64
    with store.connect() as con:  # the views put layer and polarity first, as before
        assert [row[0] for row in con.execute("DESCRIBE exemplars").fetchall()][:3] == ["layer", "polarity", "neuron"]
        assert con.execute("SELECT count(*) FROM exemplars WHERE layer = 1 AND polarity = 'neg'").fetchone() == (2,)


def test_a_table_written_in_batches_reads_back_the_same(tmp_path):
    store = Store(tmp_path / "home")
    schema = pa.schema([("layer", pa.int16()), ("polarity", pa.string()), ("neuron", pa.int32())])
    batch = pa.record_batch([pa.array([3, 3], pa.int16()), pa.array(["pos", "pos"]), pa.array([4, 5], pa.int32())],
                            schema=schema)
    store.write_batches("exemplars", schema, iter([batch]), 3, "pos")
    assert "layer" not in pq.read_schema(store.path("exemplars", 3, "pos")).names
    assert store.read("exemplars", 3, "pos").select("layer", "polarity", "neuron").equals(pl.from_arrow(batch))
    wrong = pa.record_batch([pa.array([2], pa.int16()), pa.array(["pos"]), pa.array([1], pa.int32())], schema=schema)
    with pytest.raises(ValueError, match="holds another layer"):
        store.write_batches("exemplars", schema, iter([wrong]), 3, "pos")
    assert store.read("exemplars", 3, "pos").height == 2, "the partition is as it was"


def test_pandas_reads_a_table_folder(small_store):
    pandas = pytest.importorskip("pandas", reason="pandas is not a dependency; pyarrow's read above is its reader")
    _, store = small_store
    frame = pandas.read_parquet(store.table_dir("exemplars"))
    assert len(frame) == 8 and sorted(frame["layer"].astype(int).unique()) == [0, 1]


# -- the view the README lists --------------------------------------------------------------------


def test_simulator_training_data_has_a_view(small_store, capsys):
    config, store = small_store
    store.write("simulator_training_data", pl.DataFrame({"fold": [0, 0], "role": ["stage1", "heldout"],
                                                         "layer": [0, 1], "labels": [[0, 3], [10]]}))
    code, out, err = _run(capsys, config, "sql", "SELECT role, count(*) AS n FROM simulator_training_data "
                          "GROUP BY role ORDER BY role", "--format", "json")
    assert code == 0, err
    assert json.loads(out) == [{"role": "heldout", "n": 1}, {"role": "stage1", "n": 1}]


def test_checksum_records_stay_out_of_the_data_folder(small_store):
    _, store = small_store
    assert all(p.name == "data.parquet" for p in store.data_dir.rglob("*") if p.is_file())
    assert (store.root / "checksums" / "data" / "exemplars" / "layer=0" / "polarity=pos" / "data.parquet.json").is_file()
    assert not [p for p in store.root.rglob("*.tmp")]
    assert os.listdir(store.root / "checksums") == ["data"]
