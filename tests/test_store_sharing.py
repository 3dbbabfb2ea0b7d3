"""A store that several machines share (issue 30, part 2): the writer locks and the resume markers
live in the store itself, so processes that see each other only through the store's root (a
``file://`` URL, read and written through fsspec as an object store would be; ``memory://``
cannot be shared by two processes) exclude each other from a partition, name the holder, take a
dead machine's lock over only once its lease has expired, and skip what another finished.

Each process gets its own $NEURON_ASSETS_NODE, so that they count as separate machines (on one
host a dead pid would be known at once, and taken over without waiting for the lease)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from neuron_assets.lock import held_locks

REPO = Path(__file__).resolve().parent.parent
LEASE_S = 2.0

HOLDER = """
import sys, time
from neuron_assets.lock import writer_lock
with writer_lock(sys.argv[1], "run-a", ["exemplars/0|pos", "corpus"], command="holder"):
    print("held", flush=True)
    time.sleep(600)
"""

TAKER = """
import sys, time, warnings
from neuron_assets.lock import StoreLocked, writer_lock
warnings.simplefilter("always")
started = time.monotonic()
try:
    with writer_lock(sys.argv[1], "run-b", ["exemplars/0|pos"], command="taker", wait_s=float(sys.argv[2])):
        print(f"took it after {time.monotonic() - started:.1f} s", flush=True)
except StoreLocked as err:
    print(f"refused after {time.monotonic() - started:.1f} s: {err}", flush=True)
"""


def _env(node: str) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), NEURON_ASSETS_NODE=node, NEURON_ASSETS_LOCK_LEASE_S=str(LEASE_S))


def _take(root: str, wait_s: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TAKER, root, str(wait_s)], env=_env("node-b"), capture_output=True,
                          text=True, timeout=120)


def test_two_machines_share_the_locks_through_the_store_root(tmp_path):
    folder = tmp_path / "store"
    root = f"file://{folder}"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, root], env=_env("node-a"), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = json.loads((folder / "locks" / "exemplars" / "0-pos.lock").read_text())
        assert lock["host"] == "node-a" and lock["lease_s"] == LEASE_S

        refused = _take(root, 0)
        assert refused.stdout.startswith("refused"), refused.stdout + refused.stderr
        assert f"another run is writing to {root}: pid {holder.pid} on node-a, run run-a" in refused.stdout
        assert "holds exemplars/0|pos" in refused.stdout and "lease of 2 s" in refused.stdout

        # three leases long: the holder's heartbeat keeps its lease, so the taker still waits in vain
        waited = _take(root, 3 * LEASE_S)
        assert waited.stdout.startswith("refused after"), waited.stdout + waited.stderr
        renewed = json.loads((folder / "locks" / "exemplars" / "0-pos.lock").read_text())["renewed_at"]
        assert renewed > lock["renewed_at"], "the heartbeat renewed the lease"

        holder.send_signal(signal.SIGKILL)  # the machine dies: its locks stay in the store
        holder.wait(timeout=30)
        assert len(held_locks(root)) == 2
        taken = _take(root, 60)
        assert taken.stdout.startswith("took it after"), taken.stdout + taken.stderr
        assert not (folder / "locks" / "exemplars" / "0-pos.lock").exists(), "the taker released what it took"
        assert f"left by pid {holder.pid} on node-a (run run-a" in taken.stderr and "lease of 2 s expired" in taken.stderr
        assert held_locks(root) == [f"{root}/locks/corpus.lock"], "the dead holder's other lock is still there"
        assert not [p for p in folder.rglob("*") if ".tmp" in p.name or "takeover" in p.name]
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_rerun_from_another_machine_skips_what_the_first_finished(tiny_config, tmp_path):
    """Two machines: their own working folder, config copy, scratch folder and Dagster instance;
    nothing in common but the storage root, given as a file:// URL."""
    raw = yaml.safe_load(tiny_config(features__layers=[0]).read_text())
    raw["storage"] = {"root": f"file://{tmp_path / 'shared'}"}
    outputs = []
    for machine in ("a", "b"):
        home = tmp_path / f"machine-{machine}"
        home.mkdir()
        (home / "config.yaml").write_text(yaml.safe_dump(raw))
        env = dict(_env(f"node-{machine}"), NEURON_ASSETS_SCRATCH=str(home / "scratch"), DAGSTER_HOME=str(home / "dagster"))
        run = subprocess.run([sys.executable, "-m", "neuron_assets.cli", "--config", "config.yaml", "run", "--select",
                              "corpus,exemplars"], cwd=home, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        outputs.append(run.stderr)
    assert "to compute: corpus, exemplars (2 partitions)" in outputs[0]
    assert "everything is up to date" in outputs[1], outputs[1][-2000:]
    markers = sorted(p.relative_to(tmp_path / "shared").as_posix() for p in (tmp_path / "shared" / "markers").rglob("*.json"))
    assert markers == ["markers/corpus/all.json", "markers/exemplars/0-neg.json", "markers/exemplars/0-pos.json"]
    assert held_locks(tmp_path / "shared") == []
