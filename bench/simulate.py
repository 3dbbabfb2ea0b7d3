"""Simulator throughput, and the val vs test gap of the embedded default.

In one run:
  (a) the fine-tuned simulator (the embedded default: MiniLM backbone, simulate.finetuned
      settings of the demo config; weights do not change the speed): (description, exemplar)
      pairs scored per second when all k candidates of a feature share each forward pass with
      an exemplar (batched by feature, batch_size pairs per pass) vs one pair per forward;
  (b) the prompted all-at-once simulator: pairs per second through a local forward pass
      (transformers) and, when vLLM is installed, through a real vLLM server's completions
      endpoint (echo + logprobs), both on a tiny random Llama (the numbers measure the
      machinery, not a production model);
  (c) if the embedded demo has been run (neuron-assets run), the selected descriptions' mean
      val and test scores, their gap, and the shuffled control, from its neuron_descriptions.

Usage: python bench/simulate.py [--features 8] [--k 4] [--exemplars 25] [--root DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from neuron_assets.config import Config, PromptedSimulatorConfig  # noqa: E402
from neuron_assets.corpus import tokenize_with_text  # noqa: E402
from neuron_assets.simulate.finetuned import FinetunedSimulator  # noqa: E402
from neuron_assets.simulate.prompted import OpenAICompletionsLogprobs, PromptedSimulator, TransformersLogprobs  # noqa: E402
from neuron_assets.types import ActivationRecord  # noqa: E402

DESCRIPTIONS = ['the word "return"', 'the tokens "(" and ")"', "names of Python modules", 'the word "the", mostly after "of"',
                "numbers such as \"1\", \"2\" and \"3\"", "punctuation at the end of a sentence", "the word \"class\"",
                "verbs in the imperative"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--k", type=int, default=4, help="candidates per feature")
    parser.add_argument("--exemplars", type=int, default=25, help="exemplars per feature (E_val: 20 top + 5 random)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--prompted-pairs", type=int, default=24)
    parser.add_argument("--root", help="storage root of a demo run (default: the config's)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = Config()
    print(f"torch threads: {torch.get_num_threads()}, device: cpu")

    settings = config.simulate.finetuned
    simulator = FinetunedSimulator.from_backbone(settings.backbone, settings.head, settings.alignment,
                                                 settings.max_length, settings.backbone_layers, device="cpu")
    records = minilm_records(simulator.tokenizer, args.features * args.exemplars, args.seq_len)
    features = [records[i * args.exemplars : (i + 1) * args.exemplars] for i in range(args.features)]
    pairs = args.features * args.k * args.exemplars
    print(f"\n(a) fine-tuned simulator: {settings.backbone}, {settings.backbone_layers} layers, {args.features} features x "
          f"{args.k} candidates x {args.exemplars} exemplars = {pairs} pairs of {args.seq_len}-token exemplars")
    simulator.simulate(DESCRIPTIONS[: args.k], features[0][:2])  # warm up
    results = {}
    for label, batch_size in (("batched by feature", settings.batch_size), ("one pair per forward", 1)):
        simulator.batch_size = batch_size
        started = time.perf_counter()
        outputs = [simulator.simulate(candidates(args.k, i), exemplars) for i, exemplars in enumerate(features)]
        seconds = time.perf_counter() - started
        results[label] = (pairs / seconds, outputs)
        print(f"  {label:<22} batch_size={batch_size:<3} {pairs / seconds:8.1f} pairs/s  ({seconds:.1f} s)")
    batched, single = results["batched by feature"], results["one pair per forward"]
    worst = max(float(np.abs(a - b).max()) for fa, fb in zip(batched[1], single[1]) for da, db in zip(fa, fb)
                for a, b in zip(da, db))
    print(f"  ratio batched / per pair: {batched[0] / single[0]:.2f}x  (max |difference| of predictions {worst:.1e})")

    prompted_benchmarks(args, records)
    val_test_gap(args.root or config.root)


def candidates(k: int, feature: int) -> list[str]:
    return [DESCRIPTIONS[(feature + c) % len(DESCRIPTIONS)] for c in range(k)]


def minilm_records(tokenizer, count: int, seq_len: int) -> list[ActivationRecord]:
    """Real text (Python's documentation topics) cut into seq_len-token sequences after a [CLS]."""
    from pydoc_data.topics import topics

    text = " ".join(" ".join(v.split()) for v in topics.values())
    ids, tokens = tokenize_with_text(text, tokenizer)
    body = seq_len - 1
    records = []
    for i in range(count):
        start = (i * body) % max(1, len(ids) - body)
        window = tokens[start : start + body]
        records.append(ActivationRecord(i, ("[CLS]", *window), (101, *ids[start : start + body]),
                                        np.zeros(seq_len, np.float32), prefix_len=1))
    return records


def prompted_benchmarks(args, records: list[ActivationRecord]) -> None:
    from tests.support.tiny_models import make_tiny_llama, sample_texts, train_tokenizer
    from tests.support.vllm_server import vllm_available, vllm_server

    n = args.prompted_pairs
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(sample_texts(600), vocab_size=512)
        model_dir = make_tiny_llama(Path(tmp) / "tiny-llama", tokenizer, max_position_embeddings=4096)
        words = [r.tokens[1:] for r in records[:n]]
        subject = [ActivationRecord(i, ("<|begin_of_text|>", *w), tuple(range(len(w) + 1)), np.zeros(len(w) + 1,
                                                                                                        np.float32), 1)
                   for i, w in enumerate(words)]
        print(f"\n(b) prompted all-at-once simulator on a tiny random Llama (2 layers, hidden 128): {n} pairs, one "
              f"prompt each (about {len(subject[0].tokens) * 4 + 300} tokens)")
        local = PromptedSimulator(TransformersLogprobs.from_config(PromptedSimulatorConfig(model=str(model_dir),
                                                                                          batch_size=4)))
        local.simulate([DESCRIPTIONS[0]], subject[:2])
        started = time.perf_counter()
        local.simulate([DESCRIPTIONS[0]], subject)
        print(f"  transformers forward pass   {n / (time.perf_counter() - started):8.1f} pairs/s")
        if not vllm_available():
            print("  vLLM server: not installed (.ci/install_vllm.sh); skipped")
            return
        with vllm_server(model_dir, served_model_name="tiny", max_model_len=4096) as (base_url, model):
            source = OpenAICompletionsLogprobs.from_config(PromptedSimulatorConfig(
                backend="openai_completions", model=model, base_url=base_url, concurrency=8))
            remote = PromptedSimulator(source)
            remote.simulate([DESCRIPTIONS[0]], subject[:2])
            started = time.perf_counter()
            remote.simulate([DESCRIPTIONS[0]], subject)
            print(f"  vLLM server (echo+logprobs) {n / (time.perf_counter() - started):8.1f} pairs/s  (concurrency 8)")


def val_test_gap(root) -> None:
    from neuron_assets.stages import DESCRIPTIONS_TABLE, read_all
    from neuron_assets.store import Store

    frame = read_all(Store(root), DESCRIPTIONS_TABLE)
    print(f"\n(c) val vs test on the embedded default ({root})")
    if not frame.height:
        print("  no neuron_descriptions yet: run `neuron-assets run` first")
        return
    for key, group in sorted(frame.group_by("scorer", "simulator"), key=lambda kv: kv[0]):
        val, test = group["val_score"].mean(), group["test_score"].mean()
        control = group["control_test_score"].drop_nulls().mean()
        print(f"  {key[0]} ({key[1]}), {group.height} neuron x polarity: val {val:.3f}  test {test:.3f}  "
              f"gap {val - test:+.3f}  shuffled control (test) {control:.3f}")


if __name__ == "__main__":
    main()
