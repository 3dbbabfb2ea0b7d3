"""Activation collection: bare forward pass vs one-pass exemplars (with and without the prefix
cache) vs one pass per layer.

On the same batches of the embedded demo corpus, in one run:
  (a) the bare forward pass of the model through the deepest requested layer (the pass stops
      there too; the subject is loaded without its LM head), nothing read: run between (b)'s
      batches on the batch (b) just read and timed apart from it, so a shared machine's
      drift falls on both alike;
  (b) exemplar collection for all layers in one pass (top-k, reservoirs, stats), the header
      run in every sequence (exemplars.prefix_cache off);
  (b') the same pass with the prefix cache (the chat header run once, each batch's tokens
      after it against its key/value cache), the same tables;
  (c) the naive way: one full forward pass per layer, each collecting that layer.
Prints tokens/s of each (every token of the sequences, header included, so the rates compare
as times) and the ratios b/a (the one pass's speed against the bare forward pass; 1.0 =
collection is free), b/c (speed-up of one pass over one pass per layer), and last
`prefix cache: cached/plain = R` (tokens/s of b' over b).
Usage: python bench/activations.py [--sequences-per-split N (default: the demo's)] [--neurons all]
[--model builtin:SmolLM2-135M-Instruct] [--layers 0,5,10 | all] [--no-per-layer] [--no-bare]. The
default subject, layers and corpus size are the demo's; (c) costs one full forward pass per
layer, so keep the layers few or skip it with --no-per-layer.
"""

from __future__ import annotations

import argparse
import time

import torch

from neuron_assets.config import Config, FeaturesConfig, NeuronSample
from neuron_assets.corpus import build_sequences
from neuron_assets.exemplars import collect_exemplars
from neuron_assets.exemplars.batches import Corpus, plan_batches
from neuron_assets.features.selection import select_neurons
from neuron_assets.subject import load_subject
from neuron_assets.types import Polarity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences-per-split", type=int, default=None, help="default: the demo corpus's")
    parser.add_argument("--neurons", default="all", help="'all' or a per-layer sample size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default=None, help="subject model (default: the demo's)")
    parser.add_argument("--layers", default=None, help="comma-separated layers or 'all' (default: the demo's)")
    parser.add_argument("--no-per-layer", action="store_true",
                        help="skip (c), which costs one full forward pass per layer (30 passes for --layers all)")
    parser.add_argument("--no-bare", action="store_true", help="skip (a), the bare forward between (b)'s batches")
    args = parser.parse_args()

    config = Config()
    if args.model:
        config = config.model_copy(update={"subject": config.subject.model_copy(update={"model": args.model})})
    layers = config.features.layers if args.layers is None else (
        "all" if args.layers == "all" else [int(layer) for layer in args.layers.split(",")])
    subject = load_subject(config.subject)
    per_split = args.sequences_per_split or config.corpus.sequences_per_split
    corpus = config.corpus.model_copy(update={"sequences_per_split": per_split})
    if not getattr(subject.tokenizer, "chat_template", None):  # an encoder such as MiniLM: no chat header
        corpus = corpus.model_copy(update={"chat_prefix": None})
    sequences = build_sequences(corpus, subject.tokenizer)
    neurons_config = FeaturesConfig(layers=layers,
                                    neurons="all" if args.neurons == "all" else NeuronSample(sample=int(args.neurons)))
    neurons = select_neurons(neurons_config, subject.num_layers, subject.neurons_per_layer)
    polarities = [Polarity.POS, Polarity.NEG]
    tokens = int(sequences["n_tokens"].sum())
    header = int(sequences["prefix_len"].sum())
    n_features = sum(len(v) for v in neurons.values())
    deepest = max(neurons)
    print(f"{subject.name}: layers {sorted(neurons)} of {subject.num_layers}, {n_features} features, {sequences.height} sequences, "
          f"{tokens} tokens ({header / tokens:.0%} of them header), batch {args.batch_size}, {torch.get_num_threads()} threads")
    plain_config = config.exemplars.model_copy(update={"prefix_cache": False})
    cached_config = config.exemplars.model_copy(update={"prefix_cache": True})

    corpus = Corpus(sequences, subject.tokenizer)
    batches = [rows for _, rows in plan_batches(corpus.splits, args.batch_size, seed=0)]
    nothing = {deepest: torch.empty(0, dtype=torch.long)}

    def bare(batch):
        """The forward pass through the deepest requested layer's site, where the pass stops too; nothing read."""
        subject.activations(batch.ids, batch.mask, nothing)

    # The bare forward runs between the pass's batches, on the batch the pass just read, and
    # is timed apart from it: both see the same machine at the same moment, so a shared
    # host's drift does not skew the ratio.
    bare_time = [0.0, 0.0]  # wall s, CPU s
    streamed = {}

    def between_batches(done):
        wall, cpu = time.perf_counter(), time.process_time()
        streamed.update(wall=wall - bare_time[0], cpu=cpu - bare_time[1])  # the pass alone, to this batch
        if not args.no_bare:
            bare(corpus.batch(batches[done - 1]))
            bare_time[0] += time.perf_counter() - wall
            bare_time[1] += time.process_time() - cpu

    def per_layer():
        subject.stop_after_deepest = False
        try:
            for layer, indices in neurons.items():
                collect_exemplars(subject, sequences, {layer: indices}, polarities, plain_config, args.batch_size,
                                  progress=False)
        finally:
            subject.stop_after_deepest = True

    first = corpus.batch(batches[0])
    bare(first)  # warm-up: first-call allocations and thread start-up
    start, start_cpu = time.perf_counter(), time.process_time()
    collect_exemplars(subject, sequences, neurons, polarities, plain_config, args.batch_size, progress=False,
                      on_batch=between_batches)
    timings = {"a": bare_time[0], "b": time.perf_counter() - start - bare_time[0]}
    cpu = {"a": bare_time[1], "b": time.process_time() - start_cpu - bare_time[1]}
    streaming = {"wall": streamed["wall"] - start, "cpu": streamed["cpu"] - start_cpu}
    cached_stream = {}
    measured = {}
    cached_start, start_cpu = time.perf_counter(), time.process_time()
    collect_exemplars(subject, sequences, neurons, polarities, cached_config, args.batch_size, progress=False,
                      measured=measured, on_batch=lambda done: cached_stream.update(wall=time.perf_counter()))
    timings["cached"], cpu["cached"] = time.perf_counter() - cached_start, time.process_time() - start_cpu
    if not args.no_per_layer:
        start, start_cpu = time.perf_counter(), time.process_time()
        per_layer()
        timings["c"], cpu["c"] = time.perf_counter() - start, time.process_time() - start_cpu
    if args.no_bare:
        del timings["a"], cpu["a"]
    names = {"a": "a bare forward", "b": "b one pass, all layers", "cached": "b' the same, prefix cache",
             "c": "c one pass per layer"}
    for label, seconds in timings.items():
        print(f"{names[label]:<26} {seconds:8.2f} s {tokens / seconds:10.0f} tokens/s  ({cpu[label]:.2f} CPU-s)")
    print(f"  of b, the streaming pass (to the last batch): {streaming['wall']:.2f} s; building the tables: "
          f"{timings['b'] - streaming['wall']:.2f} s (fixed per feature, not per token)")
    print(f"  of b', the streaming pass: {cached_stream['wall'] - cached_start:.2f} s; {measured['prefix_cache']}")
    if "a" in timings:
        print(f"streaming part / bare     = {timings['a'] / streaming['wall']:.2f}x tokens/s "
              f"({cpu['a'] / streaming['cpu']:.2f}x in CPU time)")
        print(f"CPU-time one pass / bare  = {cpu['a'] / cpu['b']:.2f}x")
        print(f"one pass / bare forward   = {timings['a'] / timings['b']:.2f}x tokens/s  (1.0: collection is free; target >= 0.7 on CPU)")
    if "c" in timings:
        if "a" in timings:
            print(f"per layer / bare forward  = {timings['a'] / timings['c']:.2f}x tokens/s")
        print(f"one pass / per layer      = {timings['c'] / timings['b']:.2f}x faster")
    print(f"streaming part, cached/plain = {streaming['wall'] / (cached_stream['wall'] - cached_start):.2f}x tokens/s; "
          f"whole pass in CPU time {cpu['b'] / cpu['cached']:.2f}x")
    print(f"prefix cache: cached/plain = {timings['b'] / timings['cached']:.2f}")


if __name__ == "__main__":
    main()
