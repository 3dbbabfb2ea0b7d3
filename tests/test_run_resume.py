"""`neuron-assets run` as a long job: progress on every stage, resume that skips finished
stages, one writer per store, failures that say so, and a resumable Ctrl-C."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import polars as pl
from polars.testing import assert_frame_equal
import pytest

from neuron_assets.cli import main
from neuron_assets.config import load_config
from neuron_assets.failures import StageFailed, check_candidates, count_reasons, failure_reason
from neuron_assets.lock import StoreLocked, held_locks, lock_path, writer_lock
from neuron_assets.progress import LineSink, Progress, TerminalSink
from neuron_assets.stages.graph import STAGES
from neuron_assets.store import Store
from tests.support.tables import TABLES, store_tables

FAST = {"simulate__compare_with": [], "score__scorers": ["correlation"]}  # no simulator to train


# -- progress -----------------------------------------------------------------------------


def test_line_sink_reports_start_bounded_updates_and_end():
    lines: list[str] = []
    progress = Progress([LineSink(lines.append, interval=3600)])
    with progress.task("explain 0|pos", total=40, unit="candidate") as task:
        for _ in range(40):
            task.advance(1)
    assert lines[0] == "explain 0|pos: 40 candidates"
    assert len(lines) == 2, "no line between start and end within the interval"
    assert lines[1].startswith("explain 0|pos: 40/40 candidates (100%) done in")

    lines.clear()
    progress = Progress([LineSink(lines.append, interval=0)])
    with progress.task("simulator stage1", total=3, unit="step") as task:
        for step in range(3):
            task.advance(1, info=f"loss {1 / (step + 1):.3f}")
    assert "simulator stage1: 2/3 steps (67%)" in lines[2] and "loss 0.500" in lines[2]
    assert lines[-1].endswith("loss 0.333")


def test_terminal_sink_draws_a_bar_on_a_terminal_and_lines_otherwise():
    plain = io.StringIO()
    progress = Progress([TerminalSink(plain, interval=3600)])
    with progress.task("activations", total=9, unit="batch") as task:
        task.advance(9)
    assert plain.getvalue().splitlines()[0] == "activations: 9 batches"
    assert "\r" not in plain.getvalue(), "a CI log gets whole lines"

    bar = io.StringIO()
    progress = Progress([TerminalSink(bar, bars=True)])
    with progress.task("score 1|neg", total=4, unit="feature") as task:
        task.advance(4)
    assert "score 1|neg" in bar.getvalue() and "4/4" in bar.getvalue()


# -- the writer lock ----------------------------------------------------------------------


def test_lock_refuses_a_live_holder_takes_over_a_dead_one_and_is_reentrant(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _fake_lock(tmp_path, holder.pid, "run-a")
        with pytest.raises(StoreLocked) as refused:
            with writer_lock(tmp_path, "run-b", ["corpus"]):
                pass
        message = str(refused.value)
        assert f"pid {holder.pid} on {socket.gethostname()}" in message and "run run-a" in message
        assert "neuron-assets sql" in message, "says that readers are not blocked"
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(UserWarning, match=f"left by pid {holder.pid}.*no longer running"):
        with writer_lock(tmp_path, "run-b", ["corpus"]) as record:
            assert json.loads(lock_path(tmp_path, "corpus").read_text())["run_id"] == "run-b"
            with writer_lock(tmp_path, "run-b", ["corpus"]):  # an asset body of the same run passes through
                pass
            assert lock_path(tmp_path, "corpus").exists(), "the inner block does not release the outer one's lock"
            assert record["pid"] == os.getpid()
    assert not lock_path(tmp_path, "corpus").exists()

    _fake_lock(tmp_path, 12345, "run-c", host="another-node")
    with pytest.raises(StoreLocked, match=f"cannot be checked.*delete {lock_path(tmp_path, 'corpus')}"):
        with writer_lock(tmp_path, "run-d", ["corpus"]):
            pass


def test_a_waiting_writer_queues_behind_a_live_holder(tmp_path):
    """Dagster runs (a UI backfill split per polarity) wait for the lock instead of failing."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    try:
        _fake_lock(tmp_path, holder.pid, "run-a")
        with pytest.raises(StoreLocked):
            with writer_lock(tmp_path, "run-b", ["corpus"], wait_s=0.3):
                pass
        told = []
        with pytest.warns(UserWarning, match="no longer running"):
            with writer_lock(tmp_path, "run-b", ["corpus"], wait_s=30, on_wait=told.append):
                assert json.loads(lock_path(tmp_path, "corpus").read_text())["run_id"] == "run-b"
        assert holder.poll() is not None, "the lock was taken only once its holder had gone"
        assert len(told) == 1 and told[0].startswith("waiting for the writer lock: another run is writing")
    finally:
        holder.kill()
        holder.wait()


def _fake_lock(root: Path, pid: int, run_id: str, host: str | None = None) -> None:
    lock_path(root, "corpus").parent.mkdir(parents=True, exist_ok=True)
    lock_path(root, "corpus").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "run_id": run_id,
                                              "started_at": "2026-01-01T00:00:00+00:00", "token": run_id}))


def test_queries_do_not_wait_for_the_writer_lock(tiny_config, capsys):
    path = str(tiny_config(**FAST))
    assert main(["--config", path, "run", "--select", "corpus"]) == 0
    capsys.readouterr()
    root = load_config(path).root
    with writer_lock(root, "someone-else", ["corpus", "exemplars/0|pos"]):
        assert main(["--config", path, "sql", "select count(*) as n from sequences", "--format", "json"]) == 0
        assert json.loads(capsys.readouterr().out) == [{"n": 72}]


# -- failures -----------------------------------------------------------------------------


def test_failure_reasons_group_alike_failures():
    assert failure_reason("APIConnectionError: Connection error. (after 3 attempts)") == "APIConnectionError"
    assert failure_reason("HTTP 429: rate limited (after 4 attempts)") == "HTTP 429"
    assert failure_reason("no train top exemplars") == "no train top exemplars"
    assert count_reasons(["HTTP 500: a", None, "HTTP 500: b", "malformed answer: x"]) == {"HTTP 500": 2,
                                                                                         "malformed answer": 1}
    frame = pl.DataFrame({"layer": [0, 0], "polarity": ["pos", "pos"], "neuron": [1, 2],
                          "description": [None, None], "failure": ["HTTP 500: a", "HTTP 500: b"]})
    with pytest.raises(StageFailed, match=r"every candidate failed \(2 of 2, 2 features\): HTTP 500 x2"):
        check_candidates(frame)
    assert check_candidates(frame.with_columns(pl.Series("description", ["a", None]))) == {"HTTP 500": 2}


def test_root_cause_is_the_user_exception_not_dagsters_wrapper():
    from dagster_shared.error import SerializableErrorInfo

    from neuron_assets.defs.materialize import root_cause

    inner = SerializableErrorInfo("ConnectionRefusedError: [Errno 111] Connection refused\n", [], "ConnectionRefusedError")
    user = SerializableErrorInfo("neuron_assets.store.MissingTableError: no 'sequences' table under /x; "
                                 "materialize it first\n", ["  File ...\n"] * 40, "MissingTableError", cause=inner)
    wrapper = SerializableErrorInfo('dagster._core.errors.DagsterExecutionStepExecutionError: Error occurred while '
                                    'executing op "exemplars":\n', ["  File ...\n"] * 40,
                                    "DagsterExecutionStepExecutionError", cause=user)
    assert root_cause(wrapper) == ("MissingTableError: no 'sequences' table under /x; materialize it first\n"
                                   "caused by ConnectionRefusedError: [Errno 111] Connection refused")


def test_every_candidate_failing_fails_the_run_with_its_cause_first(tiny_config, monkeypatch, capsys):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    path = str(tiny_config(**FAST, explain={"backend": "openai", "model": "m", "base_url": f"http://127.0.0.1:{port}/v1",
                                            "k": 2, "max_retries": 0, "timeout_s": 2.0}))
    select = ["--select", "corpus,exemplars,candidate_descriptions"]
    assert main(["--config", path, "run", *select]) == 1
    err = capsys.readouterr().err
    cause = err[err.index("error in candidate_descriptions"):].splitlines()
    assert "every candidate failed (72 of 72, 36 features): APIConnectionError x72" in cause[0]
    assert "--verbose" in cause[1] and "Stack Trace" not in err and "Traceback" not in err
    root = load_config(path).root
    assert not (root / "markers" / "candidate_descriptions").exists() or not any(
        (root / "markers" / "candidate_descriptions").iterdir()), "a failed stage is not marked done"

    assert main(["--config", path, "run", *select, "--verbose"]) == 1
    err = capsys.readouterr().err
    assert "up to date, skipped: corpus, exemplars (6 partitions)" in err
    assert "full trace" in err and "Stack Trace" in err


def test_some_failures_end_in_a_loud_warning_with_counts(tiny_config, monkeypatch, capsys):
    import neuron_assets.explain as explain

    real_explain = explain.explain_features

    def every_fourth_fails(*args, **kwargs):
        frame = real_explain(*args, **kwargs)
        failed = pl.Series([i % 4 == 0 for i in range(frame.height)])
        return frame.with_columns(pl.when(failed).then(None).otherwise(pl.col("description")).alias("description"),
                                  pl.when(failed).then(pl.lit("HTTP 500: upstream (after 4 attempts)"))
                                  .otherwise(pl.col("failure")).alias("failure"))

    monkeypatch.setattr(explain, "explain_features", every_fourth_fails)  # the explain stage reads it at call time
    path = str(tiny_config(**FAST))
    assert main(["--config", path, "run"]) == 0
    captured = capsys.readouterr()
    assert "WARNING: candidate_descriptions: 36 failed (HTTP 500 x36)" in captured.err
    assert "candidate_descriptions" in captured.out and "seconds" in captured.out, "stage times in the summary"
    with dg.DagsterInstance.from_config(str(load_config(path).root)) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("candidate_descriptions"))
        assert event.asset_materialization.metadata["failures_by_reason"].value == {"HTTP 500": 36}


# -- resume -------------------------------------------------------------------------------


def test_stage_graph_matches_the_dagster_asset_graph(tiny_config):
    from neuron_assets.defs.definitions import build_definitions

    def graph_of(path):
        defs = build_definitions(str(path))
        return defs, {spec.key.to_user_string(): {dep.asset_key.to_user_string() for dep in spec.deps}
                      for spec in defs.resolve_all_asset_specs()}

    defs, graph = graph_of(tiny_config(sae={"layers": [1]}))  # every stage, the SAE's too
    assert graph == {name: set(stage.upstream) for name, stage in STAGES.items()}
    for name, stage in STAGES.items():
        assert (defs.resolve_assets_def(name).partitions_def is not None) == stage.partitioned
    _, plain = graph_of(tiny_config())  # without an SAE the stage is not there, nor the edge to it
    assert "sae_checkpoint" not in plain and plain["exemplars"] == {"corpus"}


def test_a_run_that_failed_in_scoring_resumes_without_the_activation_pass(tiny_config, monkeypatch, capsys):
    from neuron_assets.stages import scoring
    from neuron_assets.subject import SubjectModel

    path = str(tiny_config(**FAST))
    real_scores = scoring.score_partition

    def fail_on_layer_1_neg(config, partition, *args, **kwargs):
        if partition.key == "1|neg":
            raise RuntimeError("scorer crashed on 1|neg")
        return real_scores(config, partition, *args, **kwargs)

    monkeypatch.setattr(scoring, "score_partition", fail_on_layer_1_neg)
    assert main(["--config", path, "run"]) == 1
    err = capsys.readouterr().err
    assert "error in description_scores: RuntimeError: scorer crashed on 1|neg" in err
    assert "activations: 9/9 batches (100%) done" in err and "explain 2|neg: 24/24 candidates" in err
    monkeypatch.setattr(scoring, "score_partition", real_scores)

    forward_passes = []
    real_activations = SubjectModel.activations
    monkeypatch.setattr(SubjectModel, "activations",
                        lambda self, *a, **k: forward_passes.append(1) or real_activations(self, *a, **k))
    assert main(["--config", path, "run"]) == 0
    err = capsys.readouterr().err
    assert forward_passes == [], "the activation pass did not run again"
    assert ("up to date, skipped: corpus, exemplars (6 partitions), candidate_descriptions (6 partitions), "
            "simulator_training_data, simulator_checkpoint, description_scores (3 of 6 partitions)") in err
    assert "description_scores: 3 of 6 partitions to compute (3 up to date, skipped)" in err
    resumed = store_tables(load_config(path).root)

    assert main(["--config", path, "run"]) == 0
    assert "everything is up to date" in capsys.readouterr().err

    assert main(["--config", path, "run", "--force"]) == 0, "--force recomputes everything"
    assert forward_passes, "--force runs the activation pass again"
    uninterrupted = store_tables(load_config(path).root)
    for table in TABLES:
        # scores agree to float noise: MiniLM's vectors depend at 1e-7 on which texts share a batch
        assert_frame_equal(resumed[table], uninterrupted[table], rel_tol=1e-5, abs_tol=1e-6)

    root = load_config(path).root
    with dg.DagsterInstance.from_config(str(root)) as instance:
        [latest] = instance.get_runs(limit=1)
        messages = [entry.user_message for entry in instance.all_logs(latest.run_id)]
    assert any(m.startswith("explain 0|pos: 24/24 candidates (100%) done") for m in messages), \
        "progress is in the Dagster run log"
    assert any(m.startswith("score 2|neg: 6/6 features") for m in messages)


def test_ctrl_c_in_a_step_exits_130_and_leaves_no_partial_files(tiny_config, monkeypatch, capsys):
    from neuron_assets.defs import score_assets

    path = str(tiny_config(**FAST))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(score_assets, "make_neuron_descriptions", interrupted)
    assert main(["--config", path, "run"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "rerun the same command to resume" in err and "Traceback" not in err
    root = load_config(path).root
    assert not held_locks(root), "the locks are released"
    assert not [p for p in root.rglob("*") if ".tmp" in p.name or ".partial" in p.name]
    monkeypatch.undo()
    assert main(["--config", path, "run"]) == 0
    assert "to compute: neuron_descriptions (6 partitions)" in capsys.readouterr().err


# -- two processes on one store, SIGKILL and SIGINT -----------------------------------------


STALLING_RUN = """
import sys, time
from neuron_assets.defs import score_assets
def stall(*args, **kwargs):
    time.sleep(600)  # a long scoring stage, to be killed or interrupted in
score_assets.make_description_scores = stall
from neuron_assets.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_runs_on_one_store_then_sigkill_then_resume_then_sigint(tiny_config, tmp_path):
    path = str(tiny_config(**FAST))
    root = load_config(path).root
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    args = ["--config", path, "run"]
    stalling = [sys.executable, "-c", STALLING_RUN, *args]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(stalling, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: bool(held_locks(root)), first)
        second = subprocess.run([sys.executable, "-m", "neuron_assets.cli", *args], env=env, capture_output=True,
                                text=True, timeout=300)
        assert second.returncode == 1
        assert f"another run is writing to {root}: pid {first.pid}" in second.stderr
        _wait_for(lambda: (root / "markers" / "simulator_checkpoint" / "all.json").exists(), first)
        exemplars_written = {p: p.stat().st_mtime_ns for p in (root / "data" / "exemplars").rglob("*.parquet")}
        first.send_signal(signal.SIGKILL)  # while it scores
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    assert held_locks(root), "a killed run leaves its locks behind"

    resumed = subprocess.run([sys.executable, "-m", "neuron_assets.cli", *args], env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"taking over the writer lock of {root}: it was left by pid {first.pid}" in resumed.stderr
    assert ("up to date, skipped: corpus, exemplars (6 partitions), candidate_descriptions (6 partitions), "
            "simulator_training_data, simulator_checkpoint") in resumed.stderr
    assert "activations" not in resumed.stderr, "the activation pass did not run again"
    assert {p: p.stat().st_mtime_ns for p in exemplars_written} == exemplars_written, "exemplars were not rewritten"

    marker = root / "markers" / "simulator_checkpoint" / "all.json"
    before = marker.stat().st_mtime_ns
    interrupted = subprocess.Popen([*stalling, "--force"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
    _wait_for(lambda: marker.exists() and marker.stat().st_mtime_ns != before, interrupted)
    time.sleep(2)
    interrupted.send_signal(signal.SIGINT)  # as Ctrl-C does, while it scores
    _, err = interrupted.communicate(timeout=120)
    assert interrupted.returncode == 130, err[-2000:]
    assert "rerun the same command to resume" in err and "Traceback" not in err
    assert not held_locks(root)
    assert not [p for p in root.rglob("*") if ".tmp" in p.name]


def _wait_for(condition, process, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the condition held"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


# -- an LLM explainer: pay for an answer once, and Ctrl-C against a slow server ------------------


class _CountingExplainer:
    """A local OpenAI-compatible explainer that counts the requests it is sent. It answers the
    first ``answer_first`` requests at once and holds every later one until ``release()`` (or
    answers everything at once when ``answer_first`` is None)."""

    def __init__(self, answer_first: int | None = None):
        import threading

        from tests.support.openai_endpoint import LocalEndpoint, chat_completion

        self.requests = 0
        self.answer_first = answer_first
        self.released = threading.Event()
        self.lock = threading.Lock()
        outer = self

        class Endpoint(LocalEndpoint):
            def handle(self, handler, body):
                with outer.lock:
                    outer.requests += 1
                    held = outer.answer_first is not None and outer.requests > outer.answer_first
                if held:
                    outer.released.wait(120)
                seed = body.get("seed")
                try:
                    handler.send(200, json.dumps(chat_completion(f"[DESCRIPTION]: the word w{seed % 97}", "m", 50, 7)))
                except OSError:  # the client went away (interrupted)
                    pass

        self.endpoint = Endpoint().__enter__()
        self.base_url = self.endpoint.base_url

    def release(self):
        self.answer_first = None
        self.released.set()

    def close(self):
        self.released.set()
        self.endpoint.close()


def _no_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


CANDIDATE_KEYS = ["layer", "polarity", "neuron", "candidate"]
PAID = ("prompt_tokens", "completion_tokens", "latency_s", "run_id")  # what a resumed run did not pay again


def test_a_partition_explained_again_after_a_kill_pays_for_no_answer_twice(tiny_config, monkeypatch, capsys):
    _no_proxy(monkeypatch)
    server = _CountingExplainer()
    try:
        path = str(tiny_config(**FAST, explain={"backend": "openai", "model": "m", "base_url": server.base_url, "k": 2,
                                                "max_retries": 0, "timeout_s": 30}))
        select = ["--select", "corpus,exemplars,candidate_descriptions"]
        assert main(["--config", path, "run", *select]) == 0
        root = load_config(path).root
        first = _candidates(root)
        asked = server.requests
        assert asked == first.height == 72 and first["description"].null_count() == 0
        # a kill between writing the partitions and marking them done: answers and files there, no markers
        for marker in (root / "markers" / "candidate_descriptions").iterdir():
            marker.unlink()
        capsys.readouterr()
        assert main(["--config", path, "run", *select]) == 0
        err = capsys.readouterr().err
        assert server.requests == asked, "no answer was asked for again"
        again = _candidates(root)
        assert_frame_equal(again.drop(PAID), first.drop(PAID))
        assert again["prompt_tokens"].sum() == 0 and again["completion_tokens"].sum() == 0, "hits cost 0 tokens"
        assert first["prompt_tokens"].sum() == 72 * 50
        assert "layer 0 pos: 12 of 12 explainer answers came from the answer cache" in _run_log(root), err[-2000:]
    finally:
        server.close()


@pytest.mark.slow
def test_ctrl_c_while_explaining_on_a_slow_server_exits_130_at_once_and_resumes(tiny_config, monkeypatch, tmp_path):
    _no_proxy(monkeypatch)
    server = _CountingExplainer(answer_first=5)
    try:
        path = str(tiny_config(**FAST, explain={"backend": "openai", "model": "m", "base_url": server.base_url, "k": 2,
                                                "max_retries": 0, "timeout_s": 120, "concurrency": 16}))
        root = load_config(path).root
        assert main(["--config", path, "run", "--select", "corpus,exemplars"]) == 0
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        select = ["--select", "candidate_descriptions"]
        run = subprocess.Popen([sys.executable, "-m", "neuron_assets.cli", "--config", path, "run", *select], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: server.requests >= 12, run)  # the first partition's requests are all in flight
        time.sleep(3)
        interrupted_at = time.monotonic()
        run.send_signal(signal.SIGINT)  # as Ctrl-C does, while the server holds 7 answers
        _, err = run.communicate(timeout=120)
        stopped_after = time.monotonic() - interrupted_at
        print(f"the run stopped {stopped_after:.1f} s after SIGINT")
        assert run.returncode == 130, err[-3000:]
        assert stopped_after < 15, f"the run went on for {stopped_after:.1f} s after Ctrl-C"
        assert "rerun the same command to resume" in err and "Traceback" not in err
        assert "Exception ignored" not in err and "Exception in callback" not in err, err[-3000:]
        assert not held_locks(root)
        assert not [p for p in root.rglob("*") if ".tmp" in p.name]
        assert not (root / "markers" / "candidate_descriptions").exists() or not any(
            (root / "markers" / "candidate_descriptions").iterdir())

        server.release()
        asked = server.requests
        assert main(["--config", path, "run", *select]) == 0
        assert server.requests - asked == 72 - 5, "the 5 answers that came before Ctrl-C were not paid again"
        assert _candidates(root)["description"].null_count() == 0
    finally:
        server.close()


def _candidates(root: Path) -> pl.DataFrame:
    store = Store(root)
    frame = pl.concat([store.read("candidate_descriptions", *p) for p in store.partitions("candidate_descriptions")])
    return frame.sort(CANDIDATE_KEYS)


def _run_log(root: Path) -> str:
    with dg.DagsterInstance.from_config(str(root)) as instance:
        [latest] = instance.get_runs(limit=1)
        return "\n".join(entry.user_message for entry in instance.all_logs(latest.run_id))


# -- soak: killed at random moments, the same tables in the end --------------------------------


@pytest.mark.slow
def test_a_run_killed_at_ten_random_moments_ends_with_the_tables_of_an_uninterrupted_one(tiny_config, tmp_path):
    """SIGKILL (no clean-up at all) at ten moments drawn over an uninterrupted run's length, a
    resume after each, then a resume to the end: every table equals the uninterrupted run's,
    value for value (lineage and latency aside)."""
    import random

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    whole = tiny_config(storage={"root": str(tmp_path / "whole")})
    started = time.monotonic()
    assert main(["--config", str(whole), "run"]) == 0
    length = time.monotonic() - started
    expected = store_tables(load_config(whole).root)

    path = tiny_config(storage={"root": str(tmp_path / "killed")})
    args = [sys.executable, "-m", "neuron_assets.cli", "--config", str(path), "run"]
    draw = random.Random(7)
    finished = False
    for kill in range(10):
        run = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            run.wait(timeout=draw.uniform(2.0, length))
            finished = True  # it finished before this moment: the remaining kills have nothing to stop
            break
        except subprocess.TimeoutExpired:
            run.send_signal(signal.SIGKILL)
            run.wait(timeout=60)
    print(f"uninterrupted run {length:.0f} s; killed {kill + (not finished)} times")
    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = store_tables(load_config(path).root)
    for table in TABLES:
        assert_frame_equal(got[table], expected[table], check_exact=True, check_row_order=True), table


EXPLAINER_PROCESS = """
import json, sys, time
from pathlib import Path
from tests.support.openai_endpoint import LocalEndpoint, chat_completion
port, count = int(sys.argv[1]), Path(sys.argv[2])
class Explainer(LocalEndpoint):
    def handle(self, handler, body):
        time.sleep(0.05)
        with count.open("a") as f:
            f.write("x")
        handler.send(200, json.dumps(chat_completion(f"[DESCRIPTION]: the word w{body['seed'] % 97}", "m", 50, 7)))
endpoint = Explainer.__new__(Explainer)
from http.server import ThreadingHTTPServer
from tests.support.openai_endpoint import EndpointHandler
ThreadingHTTPServer.allow_reuse_address = True
endpoint.server = ThreadingHTTPServer(("127.0.0.1", port), EndpointHandler)
endpoint.server.endpoint = endpoint
endpoint.server.serve_forever()
"""


@pytest.mark.slow
def test_an_explainer_server_killed_and_restarted_twice_mid_explain_changes_no_table(tiny_config, tmp_path,
                                                                                      monkeypatch):
    """The OpenAI-compatible server dies (SIGKILL) twice while the run explains and comes back a
    second later: the client's retries carry the requests over the gap, and every table equals
    that of a run whose server never died (what each answer cost aside: its attempts, tokens
    and latency)."""
    _no_proxy(monkeypatch)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    count = tmp_path / "answered"
    count.write_text("")

    def start_server():
        server = subprocess.Popen([sys.executable, "-c", EXPLAINER_PROCESS, str(port), str(count)], env=env)
        _wait_for(lambda: _listening(port), server, timeout=60)
        return server

    explain = {"backend": "openai", "model": "m", "base_url": f"http://127.0.0.1:{port}/v1", "k": 2,
               "max_retries": 4, "timeout_s": 30, "concurrency": 4}
    select = ["run", "--select", "corpus,exemplars,candidate_descriptions,description_scores,neuron_descriptions"]
    server = start_server()
    try:
        steady = tiny_config(**FAST, explain=explain, storage={"root": str(tmp_path / "steady")})
        assert main(["--config", str(steady), *select]) == 0
        expected = store_tables(load_config(steady).root)
        count.write_text("")
        path = tiny_config(**FAST, explain=explain, storage={"root": str(tmp_path / "killed")})
        run = subprocess.Popen([sys.executable, "-m", "neuron_assets.cli", "--config", str(path), *select], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for answered in (10, 40):  # of the 72 requests
            _wait_for(lambda: len(count.read_text()) >= answered, run)
            server.send_signal(signal.SIGKILL)
            server.wait(timeout=30)
            time.sleep(1.0)
            server = start_server()
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-3000:]
        assert "failed" not in err.split("done in")[-1], err[-3000:]
    finally:
        server.kill()
        server.wait(timeout=30)
    got = store_tables(load_config(path).root)
    assert got["candidate_descriptions"]["attempts"].max() > 1, "some requests met the dead server"
    for table in TABLES:
        drop = [c for c in (*PAID, "attempts") if c in got[table].columns]
        assert_frame_equal(got[table].drop(drop), expected[table].drop(drop), check_exact=True), table


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0
