"""Simulator throughput, and the val vs test gap of the embedded default.

In one run:
  (a) the fine-tuned simulator (the embedded default: MiniLM backbone, simulate.finetuned
      settings of the demo config; weights do not change the speed): (description, exemplar)
      pairs scored per second as the val stage asks for them (each feature's k candidates,
      then its shuffled control on the same exemplars), by the former path (per feature:
      every pair encoded from its whole text, batch_size pairs per forward, one host copy
      per batch; FinetunedSimulator.simulate_pairwise) and by the fast one (simulate_many:
      parts encoded once, every feature's pairs in length-sorted batches of a token budget,
      one host copy), and the ratio new / old;
  (b) the semantic simulator (the demo's selector) the same way: its former path (per
      feature, a dot product per unit and description in Python, the lexical rule's token
      shapes made for every description; tests/support/reference_paths.py) against
      simulate_many, with the MiniLM caches cleared first (cold: every text embedded) and
      with every text already embedded (warm: the demo's features share their 160 val
      sequences, so most calls are warm);
  (c) the prompted all-at-once simulator: pairs per second through a local forward pass
      (transformers) and, when vLLM is installed, through a real vLLM server's completions
      endpoint (echo + logprobs), both on a tiny random Llama (the numbers measure the
      machinery, not a production model);
  (d) if the embedded demo has been run (neuron-assets run), the selected descriptions' mean
      val and test scores, their gap, and the shuffled control, from its neuron_descriptions.

Usage: python bench/simulate.py [--features 8] [--k 4] [--exemplars 25] [--skip-prompted] [--root DIR]
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
    parser.add_argument("--skip-prompted", action="store_true", help="leave out (c), the prompted simulator")
    parser.add_argument("--root", help="storage root of a demo run (default: the config's)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = Config()
    print(f"torch threads: {torch.get_num_threads()}, device: cpu")

    settings = config.simulate.finetuned
    simulator = FinetunedSimulator.from_backbone(settings.backbone, settings.head, settings.alignment,
                                                 settings.max_length, settings.backbone_layers, device="cpu",
                                                 batch_size=settings.batch_size)
    records = minilm_records(simulator.tokenizer, args.features * args.exemplars, args.seq_len)
    features = [records[i * args.exemplars : (i + 1) * args.exemplars] for i in range(args.features)]
    pairs = args.features * (args.k + 1) * args.exemplars
    print(f"\n(a) fine-tuned simulator: {settings.backbone}, {settings.backbone_layers} layers, {args.features} features x "
          f"({args.k} candidates + a control) x {args.exemplars} exemplars = {pairs} pairs of {args.seq_len}-token "
          f"exemplars, batch_size {settings.batch_size}")
    simulator.simulate(DESCRIPTIONS[: args.k], features[0][:2])  # warm up

    def fresh():
        simulator._descriptions.clear()
        simulator._records.clear()

    old, new = compare(pairs, simulator.simulate_pairwise, simulator.simulate_many, features, args.k, fresh)
    report(old, new)

    from neuron_assets.simulate.semantic import SemanticSimulator
    from tests.support.reference_paths import FormerLexical, semantic_per_pair

    semantic = SemanticSimulator(device="cpu")
    print(f"\n(b) semantic simulator (MiniLM): the same {pairs} pairs")

    def cold():
        semantic.encoder._sentences.clear()
        semantic.encoder._records.clear()
        semantic._layouts.clear()

    def former(descriptions, exemplars):
        with FormerLexical():
            return semantic_per_pair(semantic, descriptions, exemplars)

    for label, reset in (("cold", cold), ("warm", semantic._layouts.clear)):
        print(f"  {label}:")
        old, new = compare(pairs, former, semantic.simulate_many, features, args.k, reset)
        report(old, new)

    if not args.skip_prompted:
        prompted_benchmarks(args, records)
    val_test_gap(args.root or config.root)


def compare(pairs, per_feature, many, features, k, reset):
    """(pairs/s, outputs) of the former path and of the fast one, each as the val stage
    calls it: the candidates of every feature, then every feature's control."""
    def stage_old():
        outputs = [per_feature(candidates(k, i), exemplars) for i, exemplars in enumerate(features)]
        return outputs + [per_feature([control(i)], exemplars) for i, exemplars in enumerate(features)]

    def stage_new():
        outputs = many([(candidates(k, i), exemplars) for i, exemplars in enumerate(features)])
        return outputs + many([([control(i)], exemplars) for i, exemplars in enumerate(features)])

    results = []
    for run in (stage_old, stage_new):
        reset()
        started = time.perf_counter()
        outputs = run()
        results.append((pairs / (time.perf_counter() - started), outputs))
    return results


def report(old, new) -> None:
    worst = max(float(np.abs(a - b).max()) for fa, fb in zip(old[1], new[1]) for da, db in zip(fa, fb)
                for a, b in zip(da, db))
    print(f"    former path {old[0]:8.1f} pairs/s   fast path {new[0]:8.1f} pairs/s   ratio new / old "
          f"{new[0] / old[0]:.2f}x  (max |difference| of predictions {worst:.1e})")


def control(feature: int) -> str:
    return DESCRIPTIONS[(feature + 5) % len(DESCRIPTIONS)]


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
        print(f"\n(c) prompted all-at-once simulator on a tiny random Llama (2 layers, hidden 128): {n} pairs, one "
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
    print(f"\n(d) val vs test on the embedded default ({root})")
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
