"""Corpus building: peak host memory and time of the streaming builder, against the builder
it replaced (every window as Python lists, one polars frame) at a size that one can hold.

Synthetic text (seeded pseudo-words in sentences, one JSONL row per document, every
document long enough for corpus.max_windows_per_document windows) is cut into sequences of
``--seq-len`` tokens (the chat header of SmolLM2-135M-Instruct's template included) with its
fast tokenizer, read offline. Each build runs in a child process of its own, so its peak
resident memory (ru_maxrss) is its own; the child's memory after imports, before building, is
printed beside it. The streaming builds write the ``sequences`` table through the store, as
``neuron-assets run`` does; the old one builds its frame and writes it.

Usage: python bench/corpus.py [--sequences 1000000] [--compare 100000] [--workers 0,2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=1_000_000, help="sequences of the big streaming build")
    parser.add_argument("--compare", type=int, default=100_000, help="sequences of the old-vs-new build (0: skip)")
    parser.add_argument("--seq-len", type=int, default=95)
    parser.add_argument("--workers", default="0,2", help="corpus.tokenize_workers values of the big build")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*json.loads(args.child))))
        return

    with tempfile.TemporaryDirectory() as scratch:
        biggest = max(args.sequences, args.compare)
        documents = Path(scratch) / "documents.jsonl"
        started = time.perf_counter()
        n_docs = write_documents(documents, windows=int(biggest * 1.25) + 100, seq_len=args.seq_len)
        print(f"{n_docs} synthetic documents ({documents.stat().st_size / 1e6:.0f} MB) in "
              f"{time.perf_counter() - started:.0f} s; every build runs in a child process of its own")
        rows = []
        if args.compare:
            for builder in ("old", "new"):
                rows.append(_run(builder, args.compare, 0, documents, args.seq_len, scratch))
        for workers in [int(w) for w in args.workers.split(",") if w != ""]:
            rows.append(_run("new", args.sequences, workers, documents, args.seq_len, scratch))
        print(f"\n{'builder':<8}{'workers':>8}{'sequences':>11}{'seconds':>9}{'seq/s':>9}{'peak RSS MB':>13}"
              f"{'at start MB':>13}{'bytes/seq':>11}{'worker peak MB':>16}")
        for r in rows:
            grown = (r["peak_mb"] - r["start_mb"]) * 1e6 / r["rows"]
            print(f"{r['builder']:<8}{r['workers']:>8}{r['rows']:>11}{r['seconds']:>9.1f}{r['rows'] / r['seconds']:>9.0f}"
                  f"{r['peak_mb']:>13.0f}{r['start_mb']:>13.0f}{grown:>11.0f}{r['workers_peak_mb']:>16.0f}")
        if args.compare:
            old, new = rows[0], rows[1]
            print(f"\nat {args.compare} sequences: the streaming builder takes {new['seconds'] / old['seconds']:.2f}x "
                  f"the old one's time and {(new['peak_mb'] - new['start_mb']) / (old['peak_mb'] - old['start_mb']):.3f}x "
                  "its memory growth (peak RSS minus RSS at start)")


def write_documents(path: Path, windows: int, seq_len: int) -> int:
    """Seeded pseudo-word text, about 16 windows' worth per document (a pseudo-word is 2-3 tokens)."""
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocabulary = np.array(["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(5000)], dtype=object)
    words_per_doc = 16 * seq_len // 2
    n_docs = windows // 16 + 1
    with path.open("w") as handle:
        for _ in range(n_docs):
            words = vocabulary[rng.zipf(1.3, words_per_doc) % len(vocabulary)]
            ends = rng.random(words_per_doc) < 0.08
            text = " ".join(w + "." if end else w for w, end in zip(words.tolist(), ends.tolist()))
            handle.write(json.dumps({"text": text}) + "\n")
    return n_docs


def _run(builder: str, sequences: int, workers: int, documents: Path, seq_len: int, scratch: str) -> dict:
    spec = json.dumps([builder, sequences, workers, str(documents), seq_len, scratch])
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {builder} build failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{builder} builder, {workers} workers: {result['rows']} sequences in {result['seconds']:.1f} s, "
          f"peak RSS {result['peak_mb']:.0f} MB")
    return result


def _child(builder: str, sequences: int, workers: int, documents: str, seq_len: int, scratch: str) -> dict:
    import warnings

    from transformers import AutoTokenizer

    from neuron_assets.builtin_models import smollm2_folder
    from neuron_assets.config import CorpusConfig, SourceConfig
    from neuron_assets.store import Store

    warnings.simplefilter("ignore")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder())
    per_split = -(-sequences // 3)
    config = CorpusConfig(sources=[SourceConfig(name="synthetic", kind="jsonl", path=documents)],
                          seq_len=seq_len, sequences_per_split=per_split, tokenize_workers=workers)
    store = Store(Path(scratch) / f"store-{builder}-{workers}-{sequences}")
    start_mb = _peak_mb()
    started = time.perf_counter()
    if builder == "old":
        from bench._legacy_corpus import legacy_build_sequences

        frame = legacy_build_sequences(config, tokenizer)
        store.write("sequences", frame)
        rows = frame.height
    else:
        from neuron_assets.corpus import plan_corpus

        corpus = plan_corpus(config, tokenizer)
        store.write_batches("sequences", corpus.schema(), corpus.batches())
        rows = corpus.rows
    return {"builder": builder, "workers": workers, "rows": rows, "seconds": time.perf_counter() - started,
            "peak_mb": _peak_mb(), "start_mb": start_mb,
            "workers_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


if __name__ == "__main__":
    main()
