"""Activation collection: bare forward pass vs one-pass exemplars vs one pass per layer.

On the same batches of the embedded demo corpus, in one run:
  (a) the bare forward pass of the whole model, no hooks;
  (b) exemplar collection for all layers in one pass (top-k, reservoirs, stats);
  (c) the naive way: one full forward pass per layer, each collecting that layer.
Prints tokens/s of each and the ratios b/a (the one pass's speed against the bare forward
pass; 1.0 = collection is free) and b/c (speed-up of one pass over one pass per layer).
Usage: python bench/activations.py [--sequences-per-split 100] [--neurons all]
[--model builtin:SmolLM2-135M-Instruct] [--layers 0,5,10 | all] [--no-per-layer]. The default
subject and layers are the demo's; (c) costs one full forward pass per layer, so keep the
layers few or skip it with --no-per-layer.
"""

from __future__ import annotations

import argparse
import time

import torch

from neuron_assets.config import Config, FeaturesConfig, NeuronSample
from neuron_assets.corpus import build_sequences
from neuron_assets.exemplars import _Corpus, _plan_batches, collect_exemplars, select_neurons
from neuron_assets.subject import load_subject
from neuron_assets.types import Polarity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences-per-split", type=int, default=100)
    parser.add_argument("--neurons", default="all", help="'all' or a per-layer sample size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default=None, help="subject model (default: the demo's)")
    parser.add_argument("--layers", default=None, help="comma-separated layers or 'all' (default: the demo's)")
    parser.add_argument("--no-per-layer", action="store_true",
                        help="skip (c), which costs one full forward pass per layer (30 passes for --layers all)")
    args = parser.parse_args()

    config = Config()
    if args.model:
        config = config.model_copy(update={"subject": config.subject.model_copy(update={"model": args.model})})
    layers = config.features.layers if args.layers is None else (
        "all" if args.layers == "all" else [int(layer) for layer in args.layers.split(",")])
    subject = load_subject(config.subject)
    corpus = config.corpus.model_copy(update={"sequences_per_split": args.sequences_per_split})
    if not getattr(subject.tokenizer, "chat_template", None):  # an encoder such as MiniLM: no chat header
        corpus = corpus.model_copy(update={"chat_prefix": None})
    sequences = build_sequences(corpus, subject.tokenizer)
    neurons_config = FeaturesConfig(layers=layers,
                                    neurons="all" if args.neurons == "all" else NeuronSample(sample=int(args.neurons)))
    neurons = select_neurons(neurons_config, subject.num_layers, subject.neurons_per_layer)
    polarities = [Polarity.POS, Polarity.NEG]
    tokens = int(sequences["n_tokens"].sum())
    n_features = sum(len(v) for v in neurons.values())
    print(f"{subject.name}: layers {sorted(neurons)} of {subject.num_layers}, {n_features} features, {sequences.height} sequences, "
          f"{tokens} tokens, batch {args.batch_size}, {torch.get_num_threads()} threads")

    corpus = _Corpus(sequences, subject.tokenizer)

    def bare():
        with torch.inference_mode():
            for _, rows in _plan_batches(corpus.splits, args.batch_size):
                batch = corpus.batch(rows)
                subject.model(input_ids=batch.ids.to(subject.device), attention_mask=batch.mask.to(subject.device))

    streamed = {}

    def one_pass():
        started = time.perf_counter()
        collect_exemplars(subject, sequences, neurons, polarities, config.exemplars, args.batch_size, progress=False,
                          on_batch=lambda done: streamed.__setitem__("s", time.perf_counter() - started))

    def per_layer():
        subject.stop_after_deepest = False
        try:
            for layer, indices in neurons.items():
                collect_exemplars(subject, sequences, {layer: indices}, polarities, config.exemplars, args.batch_size,
                                  progress=False)
        finally:
            subject.stop_after_deepest = True

    bare()  # warm-up: first-call allocations and thread start-up
    timings, cpu = {}, {}
    runs = [("a bare forward", bare), ("b one pass, all layers", one_pass)]
    if not args.no_per_layer:
        runs.append(("c one pass per layer", per_layer))
    for name, fn in runs:
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        timings[name[0]] = time.perf_counter() - start
        cpu[name[0]] = time.process_time() - start_cpu
        print(f"{name:<26} {timings[name[0]]:8.2f} s {tokens / timings[name[0]]:10.0f} tokens/s  ({cpu[name[0]]:.2f} CPU-s)")
    print(f"  of b, the streaming pass (to the last batch): {streamed['s']:.2f} s; building the tables: "
          f"{timings['b'] - streamed['s']:.2f} s (fixed per feature, not per token)")
    print(f"streaming part / bare     = {timings['a'] / streamed['s']:.2f}x tokens/s")
    print(f"CPU-time one pass / bare  = {cpu['a'] / cpu['b']:.2f}x  (steadier than wall time on a shared machine)")
    print(f"one pass / bare forward   = {timings['a'] / timings['b']:.2f}x tokens/s  (1.0: collection is free; target >= 0.7 on CPU)")
    if "c" in timings:
        print(f"per layer / bare forward  = {timings['a'] / timings['c']:.2f}x tokens/s")
        print(f"one pass / per layer      = {timings['c'] / timings['b']:.2f}x faster")


if __name__ == "__main__":
    main()
