"""The exemplar pass's per-batch reductions: torch's one-call forms against the forms the pass uses.

On one (batch, tokens, features) view of activations, as the pass reads them (a batch's
counted tokens: every row from the first token after the chat header), in one run:
  - the running sums: sum over (sequences, tokens) in one call vs over tokens, then
    sequences, accumulated in float64;
  - the sum of squares: vector_norm over both axes vs squares summed over tokens, then
    sequences, in float64;
  - the counts of positive and negative tokens: bool sums over both axes (int64) vs over
    tokens in int32, then sequences;
  - each sequence's max and min: torch.aminmax vs amax and amin.
Prints milliseconds of each and the speed-up of the pass's form (the best of several repeats).
Usage: python bench/reductions.py [--batch 32] [--seq-len 64] [--prefix 3] [--features 1536]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from neuron_assets.exemplars.batches import CountedRanges
from neuron_assets.exemplars.stats import reduce_tokens


def best_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--prefix", type=int, default=3, help="header tokens that do not count")
    parser.add_argument("--features", type=int, default=1536, help="one layer's neurons (SmolLM2: 1,536)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    acts = torch.randn(args.batch, args.seq_len, args.features, generator=torch.Generator().manual_seed(0))
    view = acts[:, args.prefix :]
    f32 = torch.float32
    # the pass's own forms, called, so the bench measures what the pass runs
    ranges = CountedRanges(np.full(args.batch, args.prefix), np.full(args.batch, args.seq_len), "cpu")
    pairs = {
        "sum": (lambda: view.sum(dim=(0, 1), dtype=f32), lambda: reduce_tokens(view)),
        "sum of squares": (lambda: torch.linalg.vector_norm(view, dim=(0, 1), dtype=f32).square(),
                           lambda: reduce_tokens(view * view)),
        "positive, negative counts": (lambda: ((view > 0).sum(dim=(0, 1)), (view < 0).sum(dim=(0, 1))),
                                      lambda: (reduce_tokens(view > 0), reduce_tokens(view < 0))),
        "max and min per sequence": (lambda: torch.aminmax(view, dim=1),
                                     lambda: tuple(reversed(ranges.extremes(acts)))),
    }
    print(f"view {tuple(view.shape)} of ({args.batch}, {args.seq_len}, {args.features}) float32, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'reduction':<28} {'one call ms':>12} {'pass ms':>10} {'speed-up':>9}")
    for name, (one_call, split) in pairs.items():
        a, b = one_call(), split()
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert torch.allclose(x.double(), y.double(), rtol=1e-4, atol=1e-3), name  # the same numbers
        slow, fast = best_ms(one_call, args.repeats), best_ms(split, args.repeats)
        print(f"{name:<28} {slow:12.2f} {fast:10.2f} {slow / fast:8.1f}x")


if __name__ == "__main__":
    main()
