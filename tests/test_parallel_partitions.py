"""Runs over different layer x polarity partitions of one store write side by side.

Two `neuron-assets run` processes over disjoint layers of one root both succeed at the same
time (the writer locks are per partition; the corpus and simulator_checkpoints, one file each,
are locked only while their stage writes), every Parquet file reads back whole, and a reader
that queries the catalog in a loop meanwhile, rebuilding it as the tables change, never errors.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl

from neuron_assets.config import load_config
from neuron_assets.lock import held_locks
from neuron_assets.store import Store

FAST = {"simulate__compare_with": [], "score__scorers": ["correlation"]}  # no simulator to train
SELECT = "corpus,exemplars,candidate_descriptions"  # the shared corpus and two per-feature stages
REPO = Path(__file__).resolve().parent.parent


def test_two_runs_over_disjoint_layers_of_one_root_both_succeed(tiny_config, tmp_path):
    first = tiny_config(features__layers=[0], **FAST).rename(tmp_path / "layer0.yaml")
    second = tiny_config(features__layers=[1], **FAST).rename(tmp_path / "layer1.yaml")
    root = load_config(str(first)).root
    assert load_config(str(second)).root == root
    root.mkdir(parents=True)

    reader = _Reader(Store(root))
    reader.start()
    env = dict(os.environ, PYTHONPATH=str(REPO), DAGSTER_HOME=str(root))
    started = time.monotonic()
    runs = [subprocess.Popen([sys.executable, "-m", "neuron_assets.cli", "--config", str(path), "run", "--select", SELECT], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for path in (first, second)]
    try:
        outputs = [run.communicate(timeout=400)[0] for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
        reader.stop()
    for run, output in zip(runs, outputs):
        assert run.returncode == 0, output[-3000:]
    assert reader.errors == [], reader.errors[:3]
    assert reader.queries > 0, "the reader queried while the runs wrote"
    assert not held_locks(root), "both runs released their locks"

    files = sorted((root / "data").rglob("*.parquet"))
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")], "no temporary file is left"
    for path in files:
        pl.read_parquet(path)  # every file reads back whole
    layers = {(table, p.parent.parent.name) for p in files if (table := p.relative_to(root / "data").parts[0])}
    for table in ("exemplars", "neuron_stats", "candidate_descriptions"):
        assert {(table, "layer=0"), (table, "layer=1")} <= layers, f"{table} has both runs' layers"
    con = Store(root).connect()
    assert con.execute("select distinct layer from candidate_descriptions order by 1").fetchall() == [(0,), (1,)]
    con.close()
    print(f"two concurrent runs in {time.monotonic() - started:.1f} s, {reader.queries} reader queries meanwhile")


class _Reader(threading.Thread):
    """Queries every view of the catalog in a loop, as `neuron-assets sql` does."""

    def __init__(self, store: Store):
        super().__init__(daemon=True)
        self.store, self.errors, self.queries = store, [], 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            if not self.store.catalog_path.exists() and not (self.store.data_dir / "sequences").exists():
                time.sleep(0.2)
                continue
            try:
                con = self.store.connect()
                try:
                    for (view,) in con.execute("select view_name from duckdb_views() where not internal").fetchall():
                        con.execute(f'select count(*) from "{view}"').fetchone()
                        self.queries += 1
                finally:
                    con.close()
            except Exception as err:  # noqa: BLE001 - any failure of a reader is the finding
                self.errors.append(f"{type(err).__name__}: {err}")
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=60)
