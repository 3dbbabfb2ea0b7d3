"""The celery tier (issue 30, part 1): a run's steps on two Celery workers, separate processes
with their own working directories and their own copy of the config, that share nothing but
the store root (and the Dagster instance the executor sends with every step, which a cluster
keeps in Postgres). Debian's redis-server is the broker, started on a free port.

One run of the tiny config's stages over two partitions: the ``gpu`` queue gets the subject's
step, ``cpu`` the rest; the worker that takes ``description_scores`` is SIGKILLed (its whole
process group, as a machine dies) once the step has finished one partition. The step's message,
never acknowledged, goes back to the queue after the visibility timeout; the other worker takes
it, waits for the dead worker's writer locks to pass their lease (the workers count as two
machines: $NEURON_ASSETS_NODE), skips the partition the dead one finished (its marker is in the
store) and computes the other. The tables equal an in-process run's, value for value, nothing
is left half-written, and a rerun skips everything.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml
from polars.testing import assert_frame_equal

from neuron_assets.config import load_config
from neuron_assets.lock import held_locks
from tests.support.tables import TABLES, store_tables

pytestmark = pytest.mark.celery

REPO = Path(__file__).resolve().parent.parent
FAST = {"simulate__compare_with": [], "score__scorers": ["correlation"]}  # no simulator to train
SELECT = "corpus,exemplars,candidate_descriptions,simulator_training_data,simulator_checkpoint,description_scores," \
         "neuron_descriptions"
VISIBILITY_S = 20  # an unacknowledged step goes back to its queue after this long (every step here is shorter)
LEASE_S = 3

# A worker whose first description_scores step stalls once it has finished one partition, and
# says so in a flag file: the step to kill it in. The other worker (or a redelivery) runs through.
WORKER = """
import os, sys, time
from neuron_assets.defs import score_assets
real = score_assets.make_description_scores
def stalling(*args, on_partition=None, **kwargs):
    def done(partition, files):
        on_partition(partition, files)
        try:
            fd = os.open(os.environ["STALL_FLAG"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, os.environ["NEURON_ASSETS_NODE"].encode())
        os.close(fd)
        time.sleep(600)
    return real(*args, on_partition=done, **kwargs)
score_assets.make_description_scores = stalling
from celery.__main__ import main
sys.argv = ["celery", "-A", "neuron_assets.defs.celery_worker", "worker", "-Q", "gpu,cpu", "--concurrency", "1",
            "--hostname", os.environ["NEURON_ASSETS_NODE"] + "@%h", "--without-gossip", "--without-mingle",
            "--loglevel", "INFO"]
main()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def redis_broker(tmp_path):
    server = shutil.which("redis-server")
    if server is None:  # as the vLLM and browser tiers: the README's test command installs it
        pytest.fail("redis-server is not installed: bash .ci/install_redis.sh installs it (or leave this tier out "
                    "with -m 'not celery')")
    pytest.importorskip("dagster_celery", reason="pip install -e '.[celery]'")
    port = _free_port()
    folder = tmp_path / "redis"
    folder.mkdir()
    process = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, "redis")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_two_celery_workers_run_the_partitions_and_survive_a_killed_worker(tiny_config, tmp_path, redis_broker):
    path = tiny_config(features__layers=[0], **FAST)  # two partitions: 0|pos, 0|neg
    raw = yaml.safe_load(path.read_text())
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for name in ("NEURON_ASSETS_EXECUTOR", "NEURON_ASSETS_CONFIG", "NEURON_ASSETS_NODE"):
        env.pop(name, None)

    # the in-process run of the same config, on a root of its own
    reference = tmp_path / "reference.yaml"
    reference.write_text(yaml.safe_dump({**raw, "storage": {"root": str(tmp_path / "reference")}}))
    started = time.monotonic()
    local = subprocess.run([sys.executable, "-m", "neuron_assets.cli", "--config", str(reference), "run", "--select",
                            SELECT], env=dict(env, DAGSTER_HOME=str(tmp_path / "reference-home")), capture_output=True,
                           text=True, timeout=600)
    in_process_s = time.monotonic() - started
    assert local.returncode == 0, local.stderr[-3000:]

    shared = tmp_path / "shared-store"
    raw["storage"] = {"root": str(shared)}
    celery_env = dict(env, NEURON_ASSETS_EXECUTOR="celery", NEURON_ASSETS_CELERY_BROKER=redis_broker,
                      NEURON_ASSETS_CELERY_VISIBILITY_S=str(VISIBILITY_S), NEURON_ASSETS_LOCK_LEASE_S=str(LEASE_S))
    flag = tmp_path / "stalled"
    workers, logs, run = {}, {}, None
    try:
        for node in ("worker-a", "worker-b"):
            home = tmp_path / node  # its own working directory and its own copy of the config
            home.mkdir()
            (home / "config.yaml").write_text(yaml.safe_dump(raw))
            logs[node] = open(home / "worker.log", "w")
            workers[node] = subprocess.Popen(
                [sys.executable, "-c", WORKER], cwd=home, stdout=logs[node], stderr=subprocess.STDOUT,
                env=dict(celery_env, NEURON_ASSETS_CONFIG=str(home / "config.yaml"), NEURON_ASSETS_NODE=node,
                         STALL_FLAG=str(flag)), start_new_session=True)
        for node in workers:
            _wait_for(lambda: "ready." in (tmp_path / node / "worker.log").read_text(), f"{node} to start", 180)

        orchestrator = tmp_path / "orchestrator"
        orchestrator.mkdir()
        (orchestrator / "config.yaml").write_text(yaml.safe_dump(raw))
        started = time.monotonic()
        logs["run"] = open(orchestrator / "run.log", "w")
        run = subprocess.Popen([sys.executable, "-m", "neuron_assets.cli", "--config", "config.yaml", "run",
                                "--select", SELECT], cwd=orchestrator, env=dict(celery_env, DAGSTER_HOME=str(tmp_path / "dagster-home")),
                               stdout=logs["run"], stderr=subprocess.STDOUT, text=True)
        _wait_for(lambda: flag.exists() and flag.read_text() != "" or run.poll() is not None, "a stalled step", 300)
        assert run.poll() is None, "the run ended before a worker stalled: " + (orchestrator / "run.log").read_text()[-3000:]
        killed = flag.read_text()
        os.killpg(workers[killed].pid, signal.SIGKILL)  # the machine dies mid-step: no clean-up at all
        workers[killed].wait(timeout=30)
        killed_at = time.monotonic()
        run.wait(timeout=300)
        celery_s = time.monotonic() - started
        assert run.returncode == 0, (orchestrator / "run.log").read_text()[-4000:]
    finally:
        if run is not None and run.poll() is None:
            run.kill()
            run.wait(timeout=30)
        for process in workers.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        for log in logs.values():
            log.close()
    survivor = next(node for node in workers if node != killed)
    survivor_log = (tmp_path / survivor / "worker.log").read_text()
    print(f"in-process run {in_process_s:.1f} s; celery run on two workers {celery_s:.1f} s, of which "
          f"{time.monotonic() - killed_at:.1f} s after {killed} was killed (visibility timeout {VISIBILITY_S} s, "
          f"lease {LEASE_S} s)")

    # the same tables as in-process, nothing half-written, no lock left, every marker there
    expected, got = store_tables(tmp_path / "reference"), store_tables(shared)
    for table in TABLES:
        assert_frame_equal(got[table], expected[table], check_exact=True), table
    assert not [p for p in shared.rglob("*") if ".tmp" in p.name or ".takeover-" in p.name]
    for file in shared.rglob("*.parquet"):
        pl.read_parquet(file)
    assert held_locks(shared) == []
    assert "taking over the writer lock" in survivor_log and "left by pid" in survivor_log \
        and f"on {killed}" in survivor_log and "lease" in survivor_log, survivor_log[-3000:]

    # the steps went to their queues, and the killed worker's step was run again by the other
    import dagster as dg

    with dg.DagsterInstance.from_ref(dg._core.instance.ref.InstanceRef.from_dir(str(tmp_path / "dagster-home"))) as instance:
        [latest] = instance.get_runs(limit=1)
        events = [entry.dagster_event for entry in instance.all_logs(latest.run_id) if entry.dagster_event]
        messages = [entry.dagster_event.message if entry.dagster_event else entry.user_message
                    for entry in instance.all_logs(latest.run_id)]
    assert 'Submitting celery task for step "exemplars" to queue "gpu".' in messages
    assert 'Submitting celery task for step "candidate_descriptions" to queue "cpu".' in messages
    ran = [event.engine_event_data.metadata["Celery worker"].value for event in events
           if event.message == "[CeleryExecutor] Executing steps description_scores in celery worker"]
    assert [name.split("@")[0] for name in ran] == [killed, survivor], "run by the killed worker, then by the other"
    assert "description_scores: 1 of 2 partitions to compute (1 up to date, skipped)" in messages, \
        "the survivor skipped the partition the killed worker had finished"

    # a rerun, from any machine that sees the store, finds everything up to date
    rerun = subprocess.run([sys.executable, "-m", "neuron_assets.cli", "--config", str(tmp_path / survivor / "config.yaml"),
                            "run", "--select", SELECT], cwd=tmp_path / survivor,
                           env=dict(env, DAGSTER_HOME=str(tmp_path / "other-home")), capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0 and "everything is up to date" in rerun.stderr, rerun.stderr[-2000:]
    assert load_config(tmp_path / survivor / "config.yaml").store_root == shared
