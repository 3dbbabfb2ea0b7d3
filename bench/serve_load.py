"""Load on the explorer: concurrent clients mixing search and page requests, optionally while a
writer replaces the store's files, for a bounded time.

    python bench/serve_load.py --config STORE_CONFIG                    20 clients, 20 s
    python bench/serve_load.py --config STORE_CONFIG --writer --seconds 30

Starts `neuron-assets serve` on the store of ``--config`` in a process of its own (on a copy of
the store with ``--writer``), waits until it answers and its first semantic search is done (the
sentence encoder loaded), then runs ``--clients`` threads, each with its own HTTP connection,
each looping over a mix of requests until ``--seconds`` pass:

    feature   /api/features/L/P/N (a described feature, at random)          40%
    semantic  /api/search?q=<words of a description>                        20%
    filtered  /api/search?q=...&layer=L&polarity=P (an exact scan)           10%
    text      /api/search?q=<a word>&mode=text (BM25)                        15%
    overview  /api/layers, /api/layers/L/P, /api/clusters                    15%

With ``--writer`` a thread rewrites every partition of neuron_descriptions, neuron_stats and
exemplars (the same rows, each file written to a temporary name and renamed, as a run does) as
fast as it can meanwhile. Reports p50/p95/max latency per kind and overall, requests per
second, and errors (any answer but 200, or a failed connection): zero expected.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neuron_assets.config import load_config  # noqa: E402
from neuron_assets.store import Store  # noqa: E402

MIX = (("feature", 40), ("semantic", 20), ("filtered", 10), ("text", 15), ("overview", 15))
WRITTEN_TABLES = ("neuron_descriptions", "neuron_stats", "exemplars")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="the store's config (default: $NEURON_ASSETS_CONFIG, else the embedded demo)")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--writer", action="store_true", help="rewrite partitions while the clients read (on a copy)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config_path, cleanup = prepare(args.config, copy=args.writer)
    try:
        config = load_config(str(config_path) if config_path else None)
        port = free_port()
        server, url = start_server(config_path, port)
        try:
            started = time.perf_counter()
            plan = workload(url)
            print(f"store {config.store_root}: {len(plan['features'])} described features; server ready and warm in "
                  f"{time.perf_counter() - started:.1f} s")
            stop = threading.Event()
            writes: list[float] = []
            writer = threading.Thread(target=write_loop, args=(Store(config.store_root), stop, writes)) if args.writer else None
            results: list[tuple[str, float, int | str]] = []
            lock = threading.Lock()
            if writer:
                writer.start()
            began = time.perf_counter()
            clients = [threading.Thread(target=client_loop, args=(url, plan, began + args.seconds, args.seed + n, results, lock))
                       for n in range(args.clients)]
            for thread in clients:
                thread.start()
            for thread in clients:
                thread.join()
            elapsed = time.perf_counter() - began
            stop.set()
            if writer:
                writer.join()
            report(results, elapsed, args, writes)
            return 0 if all(status == 200 for _, _, status in results) else 1
        finally:
            stop_server(server)
    finally:
        cleanup()


def prepare(config: str | None, copy: bool) -> tuple[Path | None, callable]:
    """The config to serve; with ``copy``, a copy of its store (the writer must not touch the original)."""
    path = Path(config) if config else (Path(os.environ["NEURON_ASSETS_CONFIG"]) if os.environ.get("NEURON_ASSETS_CONFIG") else None)
    if not copy:
        return path, lambda: None
    original = load_config(str(path) if path else None)
    folder = Path(tempfile.mkdtemp(prefix="serve-load-"))
    shutil.copytree(original.root, folder / "home", ignore=shutil.ignore_patterns("checkpoints", "report"))
    raw = yaml.safe_load(path.read_text()) if path else {}
    raw.setdefault("storage", {})["root"] = str(folder / "home")
    copied = folder / "config.yaml"
    copied.write_text(yaml.safe_dump(raw))
    return copied, lambda: shutil.rmtree(folder, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(config_path: Path | None, port: int) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "neuron_assets.cli"] + (["--config", str(config_path)] if config_path else []) \
        + ["serve", "--port", str(port)]
    server = subprocess.Popen(command, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the explorer did not start ({' '.join(command)})")
        time.sleep(0.3)


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGINT)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def workload(url: str) -> dict:
    """What the clients ask for, from the server itself; the first semantic search loads the encoder."""
    with httpx.Client(base_url=url, timeout=300) as client:
        layers = client.get("/api/layers").json()["layers"]
        features, descriptions = [], []
        for row in layers:
            page = client.get(f"/api/layers/{row['layer']}/{row['polarity']}", params={"kind": row["kind"], "size": 100}).json()
            for feature in page["features"]:
                features.append(feature["page"])
                descriptions.append(feature["description"] or "")
        client.get("/api/search", params={"q": "warm up"}).raise_for_status()
    words = sorted({w.strip('".,') for d in descriptions for w in d.split() if len(w.strip('".,')) > 3}) or ["words"]
    return {"features": features, "descriptions": [d for d in descriptions if d] or ["words"], "words": words,
            "partitions": [(r["layer"], r["polarity"]) for r in layers]}


def request_for(kind: str, plan: dict, rng: random.Random) -> tuple[str, dict]:
    if kind == "feature":
        return "/api" + rng.choice(plan["features"]), {}
    if kind == "semantic":
        return "/api/search", {"q": " ".join(rng.choice(plan["descriptions"]).split()[:4])}
    if kind == "filtered":
        layer, polarity = rng.choice(plan["partitions"])
        return "/api/search", {"q": rng.choice(plan["words"]), "layer": layer, "polarity": polarity}
    if kind == "text":
        return "/api/search", {"q": rng.choice(plan["words"]), "mode": "text", "page": rng.choice((1, 1, 2))}
    layer, polarity = rng.choice(plan["partitions"])
    return rng.choice(("/api/layers", f"/api/layers/{layer}/{polarity}", "/api/clusters")), {}


def client_loop(url: str, plan: dict, deadline: float, seed: int, results: list, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    kinds, weights = zip(*MIX)
    with httpx.Client(base_url=url, timeout=60) as client:
        while time.perf_counter() < deadline:
            kind = rng.choices(kinds, weights)[0]
            path, params = request_for(kind, plan, rng)
            started = time.perf_counter()
            try:
                status: int | str = client.get(path, params=params).status_code
            except httpx.HTTPError as err:
                status = type(err).__name__
            with lock:
                results.append((kind, time.perf_counter() - started, status))


def write_loop(store: Store, stop: threading.Event, writes: list[float]) -> None:
    frames = {(table, p): store.read(table, *p) for table in WRITTEN_TABLES for p in store.partitions(table)}
    while not stop.is_set():
        for (table, (layer, polarity)), frame in frames.items():
            started = time.perf_counter()
            store.write(table, frame, layer, polarity)
            writes.append(time.perf_counter() - started)
            if stop.is_set():
                break


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def report(results: list, elapsed: float, args, writes: list[float]) -> None:
    print(f"{args.clients} clients for {elapsed:.1f} s{' beside a writer' if args.writer else ''}: "
          f"{len(results)} requests, {len(results) / elapsed:.1f} per second")
    print(f"{'kind':<10}{'requests':>9}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}{'errors':>8}")
    for kind in [k for k, _ in MIX] + ["all"]:
        chosen = [r for r in results if kind in ("all", r[0])]
        if not chosen:
            continue
        ms = [latency * 1000 for _, latency, _ in chosen]
        errors = sum(status != 200 for _, _, status in chosen)
        print(f"{kind:<10}{len(chosen):>9}{statistics.median(ms):>9.0f}{percentile(ms, 0.95):>9.0f}{max(ms):>9.0f}{errors:>8}")
    failed = sorted({str(status) for _, _, status in results if status != 200})
    if failed:
        print("errors: " + ", ".join(failed))
    if writes:
        ms = [w * 1000 for w in writes]
        print(f"writer: {len(writes)} files replaced, p50 {statistics.median(ms):.0f} ms, p95 {percentile(ms, 0.95):.0f} ms "
              "per file (no lock taken by the readers)")


if __name__ == "__main__":
    sys.exit(main())
