"""Bad input and damaged files, tried as a user would: each case asserts the message (the
problem and the fix), the exit code or exception, and that nothing is left where a reader
sees it. SQL containment, a copied or moved store, damaged partitions and checkpoints,
checks that run before any tokenizing, and the corpus rows that used to be misread."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import duckdb
import polars as pl
import pytest
import yaml

from neuron_assets.cli import main
from neuron_assets.config import ConfigError, load_config
from neuron_assets.corpus import CorpusError
from neuron_assets.stages import make_corpus
from neuron_assets.store import Store
from neuron_assets.subject import SubjectError

# -- a small store, written directly (no model needed) ----------------------------------------


def _write_store(root: Path, layers=(0, 1), rows_per_partition: int = 2) -> Store:
    store = Store(root)
    store.write("sequences", pl.DataFrame({"seq_id": [0, 1, 2], "split": ["train", "val", "test"],
                                           "tokens": [["a"], ["b"], ["c"]]}))
    for layer in layers:
        for polarity in ("pos", "neg"):
            neurons = list(range(rows_per_partition))
            store.write("exemplars", pl.DataFrame({"neuron": neurons, "extreme": [1.0] * rows_per_partition}),
                        layer, polarity)
            store.write("neuron_stats", pl.DataFrame({"neuron": neurons, "max": [1.0] * rows_per_partition}),
                        layer, polarity)
    return store


@pytest.fixture
def small_store(tmp_path):
    store = _write_store(tmp_path / "home")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"storage": {"root": str(store.root)}}))
    return str(config), store


def _data_hashes(store: Store) -> dict[str, str]:
    return {str(p.relative_to(store.root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.data_dir.rglob("*")) if p.is_file()}


def _sql(capsys, config: str, *args: str) -> tuple[int, str, str]:
    code = main(["--config", config, "sql", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


# -- part 1: `sql` reads only the store --------------------------------------------------------

REFUSED = [
    # (statement, words the message must hold); {part} is an exemplars partition, {tmp} a scratch folder
    ("COPY (SELECT 99 AS neuron, 9.0 AS extreme) TO '{part}' (FORMAT parquet)", ["COPY", "--format csv|json|parquet --output FILE"]),
    ("COPY exemplars TO '{tmp}/out.csv'", ["COPY", "--output FILE"]),
    ("EXPORT DATABASE '{tmp}/export'", ["EXPORT DATABASE", "--output FILE"]),
    ("SELECT * FROM read_csv('/etc/passwd')", ["cannot read /etc/passwd", "reads only this store"]),
    ("SELECT * FROM read_text('/etc/passwd')", ["cannot read /etc/passwd", "show tables"]),
    ("SELECT * FROM glob('/root/*')", ["cannot read /root/*", "reads only this store"]),
    ("SELECT * FROM read_parquet('{tmp}/../**/*.parquet')", ["cannot read", "reads only this store"]),
    ("ATTACH '{tmp}/other.duckdb' AS other", ["ATTACH", "this store's catalog"]),
    ("INSTALL httpfs", ["only the pinned extensions (fts, vss)", "nothing is installed from the network"]),
    ("LOAD '{tmp}/evil.duckdb_extension'", ["only the pinned extensions"]),
    ("SET enable_external_access = true", ["settings are locked"]),
    ("CREATE TABLE t AS SELECT 1", ["read-only"]),
    ("SELECT 1; DROP VIEW exemplars", ["DROP", "read-only"]),
]


@pytest.mark.parametrize("statement,words", REFUSED, ids=[s.split()[0] + "-" + str(i) for i, (s, _) in enumerate(REFUSED)])
def test_sql_refuses_what_would_write_or_leave_the_store(small_store, capsys, tmp_path, statement, words):
    config, store = small_store
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    before = _data_hashes(store)
    query = statement.format(part=store.path("exemplars", 0, "pos"), tmp=scratch)
    code, out, err = _sql(capsys, config, query)
    assert code == 1 and out == ""
    for word in words:
        assert word in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert _data_hashes(store) == before, "the store is unchanged"
    assert list(scratch.iterdir()) == [], "nothing was written outside the store"
    code, out, _ = _sql(capsys, config, "SELECT count(*) AS n FROM exemplars", "--format", "json")
    assert code == 0 and json.loads(out) == [{"n": 8}], "the next query still reads the real rows"


def test_the_connection_itself_is_contained(small_store, tmp_path):
    """Past the statement filter, the engine refuses other files, the network and unlocking."""
    _, store = small_store
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM exemplars").fetchone() == (8,)
        for statement in ["SELECT * FROM read_csv('/etc/passwd')", "SELECT * FROM read_text('/etc/passwd')",
                          "SELECT * FROM glob('/root/*')", f"ATTACH '{tmp_path}/x.duckdb' AS x",
                          f"COPY (SELECT 1) TO '{tmp_path}/x.csv'", f"EXPORT DATABASE '{tmp_path}/export'",
                          "INSTALL httpfs", "LOAD httpfs", "SET enable_external_access = true",
                          "SET allowed_directories = ['/']", "SET lock_configuration = false",
                          "CREATE TABLE catalog.main.t AS SELECT 1"]:
            with pytest.raises(duckdb.Error):
                con.execute(statement)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "home"]


def test_pinned_extensions_load_offline(small_store, capsys):
    config, _ = small_store
    code, out, err = _sql(capsys, config, "LOAD fts; SELECT stem('running', 'porter') AS s", "--format", "json")
    assert code == 0, err
    assert json.loads(out) == [{"s": "run"}]


def test_results_go_to_a_file_in_any_format(small_store, capsys, tmp_path):
    config, _ = small_store
    query = "SELECT layer, polarity, neuron FROM exemplars ORDER BY ALL"
    for fmt in ("csv", "json", "parquet"):
        target = tmp_path / f"out.{fmt}"
        code, out, err = _sql(capsys, config, query, "--format", fmt, "--output", str(target))
        assert code == 0 and f"wrote 8 rows to {target}" in err
        frame = {"csv": pl.read_csv, "parquet": pl.read_parquet, "json": lambda p: pl.DataFrame(json.loads(p.read_text()))}[fmt](target)
        assert frame.height == 8 and frame.columns == ["layer", "polarity", "neuron"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_parquet_to_stdout_when_it_is_not_a_terminal(small_store, capsysbinary):
    config, _ = small_store
    assert main(["--config", config, "sql", "SELECT 1 AS one", "--format", "parquet"]) == 0
    payload = capsysbinary.readouterr().out
    assert payload[:4] == b"PAR1" and payload[-4:] == b"PAR1"


@pytest.mark.parametrize("args,words", [
    (["--max-rows", "-1"], ["--max-rows", "must be at least 1", "--format csv"]),
    (["--max-rows", "many"], ["--max-rows", "expected a whole number"]),
    (["--format", "xml"], ["--format", "invalid choice"]),
])
def test_bad_sql_flags_get_messages(small_store, capsys, args, words):
    config, _ = small_store
    with pytest.raises(SystemExit) as exit_:
        main(["--config", config, "sql", "SELECT 1", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err


def test_sql_usage_errors(small_store, capsys, tmp_path):
    config, _ = small_store
    code, _, err = _sql(capsys, config, "SELECT 1", "--output", str(tmp_path / "x.csv"))
    assert code == 1 and "add --format csv" in err and not (tmp_path / "x.csv").exists()
    code, _, err = _sql(capsys, config, f"@{tmp_path}/missing.sql")
    assert code == 1 and "missing.sql does not exist" in err
    code, _, err = _sql(capsys, config, "SELEC 1")
    assert code == 1 and "syntax error" in err
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    code, _, err = _sql(capsys, str(empty), "SELECT 1")
    assert code == 1 and "empty.yaml is empty" in err and "leave out --config" in err


# -- part 2: a store can be copied and moved ------------------------------------------------------


def test_a_copied_store_answers_from_the_copy(tmp_path, capsys):
    original = _write_store(tmp_path / "a", rows_per_partition=4)
    assert original.views()  # the catalog is built, with the original's paths
    copy_root = tmp_path / "b"
    shutil.copytree(original.root, copy_root, copy_function=shutil.copy2)  # as cp -a: same mtimes
    copy = Store(copy_root)
    copy.write("exemplars", pl.DataFrame({"neuron": [0, 1], "extreme": [1.0, 1.0]}), 0, "pos")
    shutil.rmtree(copy.data_dir / "exemplars" / "layer=1")
    with copy.connect() as con:
        assert con.execute("SELECT count(*) FROM exemplars").fetchone() == (2 + 4,)
        assert con.execute("SELECT count(DISTINCT layer) FROM neuron_stats").fetchone() == (2,)  # untouched table
    with original.connect() as con:
        assert con.execute("SELECT count(*) FROM exemplars").fetchone() == (16,)
    # a moved store: its old place is gone, the views follow
    moved = tmp_path / "moved"
    os.rename(original.root, moved)
    with Store(moved).connect() as con:
        assert con.execute("SELECT count(*) FROM exemplars").fetchone() == (16,)
        assert con.execute("SELECT root FROM store_info").fetchone() == (moved.resolve().as_posix(),)


def test_a_read_only_copy_is_queried_without_writing(tmp_path, monkeypatch):
    original = _write_store(tmp_path / "a")
    original.views()
    copy_root = tmp_path / "b"
    shutil.copytree(original.root, copy_root, copy_function=shutil.copy2)
    catalog_bytes = (copy_root / "catalog.duckdb").read_bytes()

    def cannot_write(self):
        raise PermissionError(13, "Permission denied", str(self.catalog_path))

    monkeypatch.setattr(Store, "build_catalog", cannot_write)
    with Store(copy_root).connect() as con:  # views built in memory, over the copy's files
        assert con.execute("SELECT count(*) FROM exemplars").fetchone() == (8,)
        assert con.execute("SELECT root FROM store_info").fetchone() == (copy_root.resolve().as_posix(),)
        with pytest.raises(duckdb.Error):
            con.execute("SELECT * FROM read_csv('/etc/passwd')")
    assert (copy_root / "catalog.duckdb").read_bytes() == catalog_bytes


# -- part 6: a damaged file is named, not fatal ---------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_damaged_partition_is_named_and_the_rest_answers(small_store, capsys):
    config, store = small_store
    damaged = store.path("exemplars", 1, "pos")
    _truncate(damaged)
    code, out, err = _sql(capsys, config, "SELECT count(*) AS n FROM sequences", "--format", "json")
    assert code == 0 and json.loads(out) == [{"n": 3}], "sequences still answers"
    assert f"warning: {damaged} is damaged" in err and "the 'exemplars' view leaves it out" in err
    assert "dagster asset materialize -m neuron_assets.defs --select exemplars --partition '1|pos'" in err
    assert f"DAGSTER_HOME={store.root}" in err and f"NEURON_ASSETS_CONFIG={Path(config).resolve()}" in err
    code, out, _ = _sql(capsys, config, "SELECT count(*) AS n FROM exemplars", "--format", "json")
    assert code == 0 and json.loads(out) == [{"n": 6}], "the other three partitions answer"
    assert [d.partition for d in store.damaged()] == ["1|pos"]
    assert main(["--config", config, "show", "1", "0"]) == 1
    err = capsys.readouterr().err
    assert f"{damaged} is damaged" in err and "--select exemplars --partition '1|pos'" in err
    # the fix: the partition written again, and the warning is gone
    store.write("exemplars", pl.DataFrame({"neuron": [0, 1], "extreme": [1.0, 1.0]}), 1, "pos")
    code, out, err = _sql(capsys, config, "SELECT count(*) AS n FROM exemplars", "--format", "json")
    assert code == 0 and json.loads(out) == [{"n": 8}] and "damaged" not in err


def test_a_damaged_sequences_table_leaves_the_other_views(small_store, capsys):
    config, store = small_store
    _truncate(store.path("sequences"))
    code, out, err = _sql(capsys, config, "SELECT count(*) AS n FROM neuron_stats", "--format", "json")
    assert code == 0 and json.loads(out) == [{"n": 8}]
    assert "--select corpus" in err and "--partition" not in err
    code, _, err = _sql(capsys, config, "SELECT * FROM sequences")
    assert code == 1 and "Views in the catalog: exemplars, neuron_stats" in err


def test_a_damaged_exemplars_checkpoint_is_set_aside_and_the_pass_restarts(tiny_config):
    from neuron_assets.config import load_config
    from neuron_assets.exemplars import checkpoint_name, collect_exemplars, select_neurons
    from neuron_assets.subject import load_subject
    from neuron_assets.types import Polarity

    config = load_config(tiny_config(corpus__sequences_per_split=8))
    make_corpus(config, "run-1")
    sequences = Store(config.root).read("sequences")
    subject = load_subject(config.subject)
    neurons = select_neurons(config.features, subject.num_layers, subject.neurons_per_layer)
    polarities = [Polarity.POS, Polarity.NEG]
    args = dict(batch_size=4, seed=0, progress=False)
    clean = collect_exemplars(subject, sequences, neurons, polarities, config.exemplars, **args)
    checkpoint = config.root / "checkpoints" / checkpoint_name(subject.name, sequences, neurons, polarities,
                                                               config.exemplars, 4, 0)
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "plan.json").write_bytes(b'{"signature": "torn in the middle of a wri')
    with pytest.warns(UserWarning, match=r"checkpoint .*exemplars-\w+ is damaged .*set it aside as .*\.damaged"):
        resumed = collect_exemplars(subject, sequences, neurons, polarities, config.exemplars, checkpoint=checkpoint, **args)
    for key, (exemplars, stats) in clean.items():
        assert resumed[key][0].equals(exemplars) and resumed[key][1].equals(stats)
    assert not checkpoint.exists()
    assert (checkpoint.with_name(checkpoint.name + ".damaged") / "plan.json").read_bytes().startswith(b'{"signature"')


def test_damaged_simulator_training_states_are_set_aside(tmp_path):
    import torch

    from neuron_assets.config import FinetunedSimulatorConfig
    from neuron_assets.finetune import load_training_state as _load_training_state
    from neuron_assets.simulate.training import load_stage1 as _load_stage1

    logged = []
    resume = tmp_path / ".resume-stage1.pt"
    resume.write_bytes(b"\x80\x04 truncated")
    assert _load_training_state(resume, "cpu", logged.append) is None
    assert not resume.exists() and (tmp_path / ".resume-stage1.pt.damaged").is_file()
    assert "training state" in logged[-1] and ".resume-stage1.pt.damaged" in logged[-1] and "from its start" in logged[-1]
    good = {"model": {}, "optimizer": {}, "schedule": {}, "step": 3, "losses": [1.0], "rng": torch.get_rng_state()}
    torch.save(good, resume)
    assert _load_training_state(resume, "cpu", logged.append)["step"] == 3

    stage1, marker = tmp_path / "stage1", tmp_path / "stage1.json"
    stage1.mkdir()
    (stage1 / "simulator.json").write_text("{\"trunc")
    marker.write_text(json.dumps({"loss": [1.0], "heldout": {"described": 0.1, "shuffled": 0.0, "features": 2}}))
    assert _load_stage1(stage1, marker, FinetunedSimulatorConfig(), logged.append) is None
    assert not stage1.exists() and not marker.exists()
    assert (tmp_path / "stage1.damaged" / "simulator.json").is_file() and (tmp_path / "stage1.json.damaged").is_file()
    assert "training stage 1 again" in logged[-1]


# -- part 7: checks before work ---------------------------------------------------------------------

BEFORE_TOKENIZING = [
    ({"features__layers": []}, ConfigError, ["features.layers", "is empty", "layers: all"]),
    ({"features__polarities": []}, ConfigError, ["features.polarities", "is empty", "[pos, neg]"]),
    ({"features__neurons": []}, ConfigError, ["features.neurons", "is empty"]),
    ({"features__layers": [0, 7]}, ConfigError, ["features.layers: layer 7 is out of range", "3 layers (0-2)"]),
    ({"features__neurons": [3, 500]}, ConfigError, ["features.neurons: neuron 500 is out of range", "96 neurons"]),
    ({"features__neurons": {"sample": 500}}, ConfigError, ["features.neurons.sample is 500", "only 96 neurons",
                                                           "neurons: all"]),
    ({"corpus__seq_len": 4096}, ConfigError, ["corpus.seq_len is 4096", "2048 positions", "2048 or less"]),
    ({"subject__site": r"layers\.(\d+\.mlp"}, ConfigError, ["subject.site", "not a regular expression"]),
    ({"subject__site": r"layers\.\d+\.mlp"}, ConfigError, ["subject.site", "no group"]),
    ({"subject__site": r"blocks\.(\d+)\.ffn$"}, SubjectError, ["no neuron site found", "layers.0.mlp.down_proj",
                                                               "Set subject.site"]),
    ({"subject__device": "gpu"}, ConfigError, ["subject.device 'gpu' is not a torch device", "auto, cpu, cuda"]),
    ({"corpus__sources": [{"name": "gone", "kind": "text", "path": "/no/such/folder"}]}, ConfigError,
     ["corpus.sources[0].path", "/no/such/folder does not exist"]),
]


@pytest.mark.parametrize("overrides,error,words", BEFORE_TOKENIZING, ids=[next(iter(o)) for o, _, _ in BEFORE_TOKENIZING])
def test_checks_run_before_the_corpus_is_tokenized(tiny_config, tmp_path, monkeypatch, overrides, error, words):
    from neuron_assets.stages import foundation

    def no_tokenizing(*_):
        raise AssertionError("the corpus was tokenized before the config was checked")

    monkeypatch.setattr(foundation, "load_tokenizer", no_tokenizing)
    monkeypatch.setattr(foundation, "plan_corpus", no_tokenizing)
    with pytest.raises(error) as raised:
        make_corpus(load_config(tiny_config(**overrides)), "run-1")
    for word in words:
        assert word in str(raised.value), str(raised.value)
    root = tmp_path / "home"  # the tiny config's storage root
    assert not root.exists() or not [p for p in root.rglob("*") if p.is_file()]


def test_a_missing_gpu_is_named(tiny_config, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU machine checks the same path
    with pytest.raises(ConfigError, match=r"subject.device is 'cuda:1' but this machine has no cuda device.*auto"):
        make_corpus(load_config(tiny_config(subject__device="cuda:1")), "run-1")


def test_run_stops_at_a_bad_config_with_the_key_named(tiny_config, capsys):
    path = tiny_config(features__neurons={"sample": 500})
    assert main(["--config", str(path), "run"]) == 1
    err = capsys.readouterr().err
    assert "features.neurons.sample is 500" in err and "lower sample to 96 or less" in err
    root = load_config(path).root
    assert not (root / "data").exists()


def test_an_empty_config_file_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert main(["--config", str(empty), "config"]) == 1
    err = capsys.readouterr().err
    assert "is empty" in err and "configs/demo.yaml" in err


# -- corpus rows that used to be misread --------------------------------------------------------


def _jsonl(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _rows(n: int, seed: int = 0) -> list[bytes]:
    from tests.support.tiny_models import sample_texts

    texts = sample_texts(n * 4, seed=seed)
    return [json.dumps({"text": " ".join(texts[4 * i: 4 * i + 4])}).encode() for i in range(n)]


def _corpus_error(tiny_config, source: dict) -> str:
    config = load_config(tiny_config(corpus__sources=[source]))
    with pytest.raises(CorpusError) as raised:
        make_corpus(config, "run-1")
    assert not (config.root / "data").exists() or not list((config.root / "data").rglob("*"))
    return str(raised.value)


def test_a_jsonl_row_that_is_not_an_object(tiny_config, tmp_path):
    path = _jsonl(tmp_path / "rows.jsonl", _rows(3) + [b'["a", "list"]'] + _rows(3, seed=1))
    message = _corpus_error(tiny_config, {"name": "rows", "kind": "jsonl", "path": str(path)})
    assert f"{path}:4 is a JSON list, not an object" in message and "one object per line" in message


def test_non_utf8_jsonl_names_the_file_and_line(tiny_config, tmp_path):
    path = _jsonl(tmp_path / "latin1.jsonl", _rows(2) + ['{"text": "caf\xe9 au lait"}'.encode("latin-1")] + _rows(2, 1))
    message = _corpus_error(tiny_config, {"name": "latin", "kind": "jsonl", "path": str(path)})
    assert f"{path}:3 is not UTF-8" in message and "re-encode the file as UTF-8" in message


def test_a_string_messages_field_is_not_read_as_text(tiny_config, tmp_path):
    path = _jsonl(tmp_path / "chats.jsonl", [json.dumps({"messages": "user: hello there"}).encode()] * 4)
    message = _corpus_error(tiny_config, {"name": "chats", "kind": "jsonl", "path": str(path), "messages_field": "messages"})
    assert f"{path}:1: field 'messages' holds str, not a chat" in message and "set text_field" in message


def test_a_chat_in_the_text_field_is_not_read_as_a_chat(tiny_config, tmp_path):
    chat = [{"role": "user", "content": "hi"}]
    path = _jsonl(tmp_path / "chats.jsonl", [json.dumps({"text": chat}).encode()] * 4)
    message = _corpus_error(tiny_config, {"name": "chats", "kind": "jsonl", "path": str(path)})
    assert "field 'text' holds a list, not text" in message and "messages_field: text" in message


@pytest.mark.filterwarnings("ignore:the corpus holds only")
def test_a_single_document_source_is_an_error_not_an_empty_table(tiny_config, tmp_path):
    from tests.support.tiny_models import sample_texts

    document = tmp_path / "one.txt"
    document.write_text(" ".join(sample_texts(400)))  # long enough for every window, but one document
    message = _corpus_error(tiny_config, {"name": "one", "kind": "text", "path": str(document)})
    assert "source 'one' has 1 usable document(s)" in message and "at least 3 documents" in message


# -- part 8: ui finds dagster beside its own interpreter --------------------------------------------


def test_ui_runs_the_dagster_beside_its_interpreter(tiny_config, monkeypatch, tmp_path):
    bin_dir = tmp_path / "venv" / "bin"  # a venv's layout, whatever installed this one
    bin_dir.mkdir(parents=True)
    beside = bin_dir / "dagster"
    beside.write_text("#!/bin/sh\n")
    beside.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    calls = []
    monkeypatch.setenv("PATH", "/nonexistent")  # as when the venv is not activated
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    assert main(["--config", str(tiny_config()), "ui", "--port", "3999"]) == 0
    path, argv, env = calls[0]
    assert path == str(beside) and argv[1:4] == ["dev", "-p", "3999"]
    assert env["PATH"].split(os.pathsep)[0] == str(beside.parent)
    assert env["NEURON_ASSETS_CONFIG"] == str(Path(tiny_config()).resolve())


def test_ui_without_dagster_says_how_to_install_it(tiny_config, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("nothing to exec"))
    assert main(["--config", str(tiny_config()), "ui"]) == 1
    assert "pip install dagster dagster-webserver" in capsys.readouterr().err


def test_damage_inside_a_readable_file_names_it_on_query(small_store, capsys):
    """A footer that reads but a page that does not, in a file with no checksum record (as an older
    version wrote it; with one, the catalog leaves it out: tests/test_store_faults.py): the query
    fails, naming the file and the fix."""
    import numpy as np

    config, store = small_store
    path = store.write("exemplars", pl.DataFrame({"neuron": np.arange(50_000), "extreme": np.random.default_rng(0).random(50_000)}), 0, "pos")
    shutil.rmtree(store.root / "checksums")
    data = bytearray(path.read_bytes())
    data[len(data) // 3: len(data) // 3 + 2000] = b"\x13" * 2000
    path.write_bytes(bytes(data))
    code, out, err = _sql(capsys, config, "SELECT sum(extreme) FROM exemplars")
    assert code == 1 and out == ""
    assert f"{path} is damaged" in err and "--select exemplars --partition '0|pos'" in err


# -- issue 32, part B: a hostile week ---------------------------------------------------------------


def test_ui_refuses_a_port_in_use(tiny_config, monkeypatch, tmp_path, capsys):
    import socket

    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "dagster").write_text("#!/bin/sh\n")
    (bin_dir / "dagster").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("dagster dev started on a port in use"))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--config", str(tiny_config()), "ui", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is not free" in err and "neuron-assets ui --port " in err
    assert main(["--config", str(tiny_config()), "ui", "--port", "70000"]) == 1
    assert "--port 70000 is not a port number" in capsys.readouterr().err


def _disk_full_sqlalchemy():
    import sqlite3

    from sqlalchemy.exc import OperationalError

    return OperationalError("INSERT INTO event_logs ...", {}, sqlite3.OperationalError("database or disk is full"))


@pytest.mark.parametrize("raised", [_disk_full_sqlalchemy, lambda: OSError(28, "No space left on device", "/x/data.parquet")],
                         ids=["event-log", "enospc"])
def test_a_full_disk_during_run_says_so_and_where(tiny_config, monkeypatch, capsys, raised):
    from neuron_assets.defs import materialize

    def full(*_, **__):
        raise raised()

    monkeypatch.setattr(materialize, "materialize_config", full)
    monkeypatch.setattr(materialize, "partition_count", lambda _: 4)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    path = tiny_config()
    assert main(["--config", str(path), "run"]) == 1
    err = capsys.readouterr().err
    root = load_config(path).root
    assert f"error: the disk is full: the run could not write to the storage root {root}" in err
    assert "GB free" in err and "storage.root (or NEURON_ASSETS_HOME) and DAGSTER_HOME" in err
    assert "rerun the same command" in err and "Traceback" not in err


def test_a_full_disk_in_a_step_says_so_too(tiny_config, monkeypatch, capsys):
    from neuron_assets.defs import materialize

    failed = materialize.RunOutcome("run-1", success=False, error=materialize.StepError(
        "exemplars", "OSError: [Errno 28] No space left on device: '/x/data.parquet'", "trace"))
    monkeypatch.setattr(materialize, "materialize_config", lambda *_, **__: failed)
    monkeypatch.setattr(materialize, "partition_count", lambda _: 4)
    assert main(["--config", str(tiny_config()), "run"]) == 1
    err = capsys.readouterr().err
    assert "error in exemplars: OSError: [Errno 28] No space left on device" in err
    assert "the disk is full" in err and "point storage.root (or NEURON_ASSETS_HOME)" in err


def test_a_storage_root_that_is_a_file_or_unwritable(tiny_config, tmp_path, monkeypatch, capsys):
    import tempfile

    afile = tmp_path / "a-file"
    afile.write_text("not a folder")
    for root, words in [(afile, "is a file, not a folder"), (afile / "home", f"cannot be created ({afile} is a file)")]:
        assert main(["--config", str(tiny_config(storage__root=str(root))), "run"]) == 1
        err = capsys.readouterr().err
        assert f"the storage root {root} {words}" in err, err
        assert "set storage.root in the config (or NEURON_ASSETS_HOME)" in err and "Errno" not in err
    locked = tmp_path / "locked"
    locked.mkdir()
    real = tempfile.mkstemp

    def denied(*args, **kwargs):  # a read-only folder (root writes anywhere, so chmod would not do)
        if Path(kwargs.get("dir") or "") == locked:
            raise PermissionError(13, "Permission denied", str(locked))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    assert main(["--config", str(tiny_config(storage__root=str(locked))), "report"]) == 1
    err = capsys.readouterr().err
    assert f"the storage root {locked} is not writable by this user (Permission denied)" in err
    assert "NEURON_ASSETS_HOME" in err and not list(locked.iterdir())


def test_config_naming_a_directory(tmp_path, capsys):
    (tmp_path / "mine.yaml").write_text("name: mine\n")
    assert main(["--config", str(tmp_path), "config"]) == 1
    err = capsys.readouterr().err
    assert f"config {tmp_path} is a directory; name a YAML file with --config" in err
    assert str(tmp_path / "mine.yaml") in err and "does not exist" not in err


def test_a_failed_download_does_not_suggest_allowing_downloads():
    from neuron_assets.config import SubjectConfig
    from neuron_assets.subject import model_not_found_message

    err = OSError("nobody/no-such-model is not a valid model identifier")
    on = model_not_found_message(SubjectConfig(model="nobody/no-such-model", allow_download=True), err)
    assert "allow_download" not in on and "could not be loaded from the Hugging Face hub" in on
    assert "check the name (https://huggingface.co/nobody/no-such-model), the network" in on
    off = model_not_found_message(SubjectConfig(model="nobody/no-such-model"), err)
    assert "in the local Hugging Face cache" in off and "or set subject.allow_download: true" in off


def test_binary_files_in_a_text_source(tiny_config, tmp_path):
    from neuron_assets.corpus import read_documents
    from neuron_assets.config import SourceConfig

    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("plain text, and caf\u00e9")
    (folder / "picture.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8)
    (folder / "latin1.md").write_bytes("caf\xe9 au lait, na\xefve".encode("latin-1"))  # not UTF-8, still text
    source = SourceConfig(name="mixed", kind="text", path=str(folder))
    with pytest.warns(UserWarning, match=r"source 'mixed': skipped .*picture\.txt is a binary file, not text \(a NUL byte"):
        documents = list(read_documents(source))
    assert documents == ["plain text, and caf\u00e9", "caf\ufffd au lait, na\ufffdve"]
    message = _corpus_error(tiny_config, {"name": "pic", "kind": "text", "path": str(folder / "picture.txt")})
    assert f"source 'pic': {folder / 'picture.txt'} is a binary file, not text" in message
    assert "point corpus.sources[].path at text files" in message


def test_validate_scorers_says_when_no_finetuned_simulator_is_configured(tiny_config, monkeypatch, capsys):
    from neuron_assets.score import validity
    from neuron_assets.simulate import SimulatorUnavailable, build_simulator

    config = load_config(tiny_config())
    with pytest.raises(SimulatorUnavailable) as raised:  # the simulator's own message, as validate_scorers gets it
        build_simulator(config, None, "finetuned")

    def measured(config, puzzle_files=(), log=print, **_):
        log(f"scorer validity: correlation/finetuned skipped: {raised.value}")
        return validity.ValidityReport((), "correlation/hybrid", {"correlation/finetuned": str(raised.value)})

    monkeypatch.setattr(validity, "validate_scorers", measured)
    assert main(["--config", str(tiny_config()), "validate-scorers"]) == 0
    out, err = capsys.readouterr()
    for text in (out, err):
        assert "no finetuned simulator is configured" in text and "simulator_checkpoint trains none" in text
        assert "materialize simulator_checkpoint first" not in text
    assert "skipped correlation/finetuned: no finetuned simulator" in out
    # with the finetuned simulator configured, materializing simulator_checkpoint is the fix
    assert main(["--config", str(tiny_config(simulate__compare_with=["lexical", "finetuned"])), "validate-scorers"]) == 0
    assert "materialize simulator_checkpoint first" in capsys.readouterr().out
