"""The openai backend end to end through a real vLLM OpenAI-compatible server (CPU build, its
own venv, 127.0.0.1) serving a tiny random Llama. Its answers are gibberish: this checks the
mechanics (requests, token counts, parsing, retries, failures, storage), not the wording."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from neuron_assets.config import ExplainConfig, PromptFormat
from neuron_assets.excerpts import TokenDisplay
from neuron_assets.explain import CANDIDATE_SCHEMA, explain_features, plan_candidate, prompt_builder_for, puzzle_pool
from neuron_assets.explain.backends import ChatTokenCounter
from neuron_assets.explain.best_of_k import corpus_sample
from neuron_assets.explain.planted import planted_feature, word_tokens
from neuron_assets.store import Store, with_lineage
from tests.support.tiny_models import EOT_TOKEN, make_tiny_llama, sample_texts, train_tokenizer
from tests.support.vllm_server import (
    REPO_ROOT,
    no_chunked_prefill,
    require_vllm,
    server_env,
    vllm_python,
    vllm_server,
)

pytestmark = pytest.mark.vllm

# vLLM's structured outputs make a random model's answer parseable.
ANSWER_REGEX = r"\[DESCRIPTION\]: [a-z]{2,10}( [a-z]{2,10}){0,3}"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    require_vllm()
    tokenizer = train_tokenizer(sample_texts(), vocab_size=512)
    model_dir = make_tiny_llama(tmp_path_factory.mktemp("explainer"), tokenizer, max_position_embeddings=4096)
    with vllm_server(model_dir, max_model_len=3072, served_model_name="tiny-explainer",
                     extra_args=no_chunked_prefill(3072)) as (base_url, name):
        yield base_url, name, model_dir, tokenizer


def features_with_chat_tokens():
    sentences = sample_texts(900, seed=4)
    texts = [" ".join(sentences[i : i + 3]) for i in range(0, len(sentences), 3)]
    # Every sequence ends a chat turn: <|eot_id|> in the text must not end the explainer's turn.
    words = [["cat", "dog", "bird"], ["red", "green", "blue"], ["slowly", "quickly", "again"]]
    return [planted_feature(texts, w, layer=1, index=i, tokenize=lambda t: (*word_tokens(t), EOT_TOKEN))
            for i, w in enumerate(words)]


def test_openai_backend_end_to_end_through_vllm(served, tmp_path):
    base_url, name, model_dir, tokenizer = served
    features = features_with_chat_tokens()
    # room for the longest answer the regex allows: one cut at max_tokens would be a failure row
    config = ExplainConfig(backend="openai", model=name, base_url=base_url, tokenizer=str(model_dir), k=3,
                           max_tokens=64, context_window=3072, concurrency=4, max_retries=1,
                           extra_body={"structured_outputs": {"regex": ANSWER_REGEX}})
    frame = explain_features(features, config, progress=False)
    assert frame.schema == pl.Schema(CANDIDATE_SCHEMA) and frame.height == 9
    assert frame["failure"].null_count() == 9, frame["failure"].to_list()
    assert all(re.fullmatch(ANSWER_REGEX.removeprefix(r"\[DESCRIPTION\]: "), d) for d in frame["description"])
    assert frame["explainer_model"].unique().to_list() == [name] and (frame["attempts"] == 1).all()
    assert (frame["completion_tokens"] <= 64).all() and (frame["completion_tokens"] > 0).all()

    # The server's prompt token counts are the ones the prompts were fitted with.
    builder = prompt_builder_for(config)
    counter = ChatTokenCounter(tokenizer)
    pool = [p.solved() for p in puzzle_pool(config, corpus_sample(features).records)]

    class Counting:
        backend, model, reads_prompts, count_tokens = "openai", name, True, counter

    for row in frame.iter_rows(named=True):
        feature = features[row["neuron"]]
        plan = plan_candidate(feature, row["candidate"], config, builder, pool, TokenDisplay(), Counting())
        assert row["prompt_tokens"] == plan.prompt.tokens <= 3072 - 64
        assert row["exemplar_seq_ids"] == list(plan.seq_ids) and row["puzzle"] == plan.prompt.puzzle
        assert "⟨eot_id⟩" in plan.prompt.messages[-1].content and EOT_TOKEN not in plan.prompt.messages[-1].content

    # Stored and read back like the asset does.
    store = Store(tmp_path)
    store.write("candidate_descriptions", with_lineage(frame, "subject", "hash", "run"), 1, "pos")
    assert "candidate_descriptions" in store.build_catalog()
    with store.connect() as con:
        assert con.sql("select count(description) from candidate_descriptions").fetchone() == (9,)


def test_gibberish_is_retried_then_recorded_as_failed_through_vllm(served):
    base_url, name, model_dir, _ = served
    config = ExplainConfig(backend="openai", model=name, base_url=base_url, k=2, max_tokens=12,
                           context_window=3072, max_retries=2, backoff_s=0.01,
                           prompt_format=PromptFormat.TOKEN_ACTIVATION, exemplars_min=3, exemplars_max=4)
    frame = explain_features(features_with_chat_tokens()[:1], config, progress=False)
    assert frame["description"].null_count() == 2
    for row in frame.iter_rows(named=True):
        assert row["attempts"] == 3 and row["failure"].startswith("malformed answer"), row["failure"]
        assert row["failure"].endswith("(after 3 attempts)")
        assert row["completion_tokens"] > 0 and row["prompt_tokens"] > 0, "every paid attempt is counted"


def test_a_request_the_server_rejects_is_recorded_not_retried(served):
    base_url, name, model_dir, _ = served
    # A completion budget beyond the server's max_model_len: the server answers 400, not retried.
    config = ExplainConfig(backend="openai", model=name, base_url=base_url, k=1, max_tokens=5000,
                           context_window=100_000, max_retries=3, backoff_s=0.01)
    [row] = explain_features(features_with_chat_tokens()[:1], config, progress=False).iter_rows(named=True)
    assert row["description"] is None and row["attempts"] == 1
    assert row["failure"].startswith("HTTP 400: ") and "(after 1 attempts)" in row["failure"], row["failure"]
    assert row["prompt_tokens"] == 0, "a rejected request costs nothing"


def distilled_folder(base_dir: Path, out_root: Path) -> Path:
    """A few steps of distillation of ``base_dir`` on hand-written prompts; the checkpoint folder."""
    from neuron_assets.config import DistillConfig
    from neuron_assets.distill import DistillExample, distill_explainer
    from neuron_assets.explain.formats import ChatMessage
    from neuron_assets.types import FeatureId, Polarity

    examples = [DistillExample(FeatureId(1, i, Polarity.POS), (ChatMessage("system", "Describe the feature."),
                                                               ChatMessage("user", f"Excerpt 1: the {{{{{word}}}}} sat")),
                               f"[DESCRIPTION]: the word {word}") for i, word in enumerate(["cat", "dog", "red", "blue"])]
    settings = DistillConfig(base_model=str(base_dir), epochs=1, batch_size=2, grad_accum_steps=1, learning_rate=1e-3,
                             max_length=512)
    return distill_explainer(examples, settings, out_root, log=lambda _: None).path


OFFLINE_SCRIPT = r"""
import json, sys
from neuron_assets.config import ExplainConfig
from neuron_assets.explain import explain_features
from neuron_assets.explain.planted import planted_feature
from tests.support.tiny_models import sample_texts

model_dir = sys.argv[1]
texts = [" ".join(sample_texts(300, seed=4)[i : i + 3]) for i in range(0, 300, 3)]
features = [planted_feature(texts, words, index=i) for i, words in enumerate((["cat", "dog"], ["red", "blue"]))]
config = ExplainConfig(backend="vllm", model=model_dir, k=2, max_tokens=12, max_retries=1, context_window=2048,
                       engine_kwargs={"dtype": "float32", "max_model_len": 2048, "enforce_eager": True,
                                      "enable_chunked_prefill": False, "max_num_batched_tokens": 2048,
                                      "max_logprobs": 500})
frame = explain_features(features, config, progress=False)
print("RESULT " + json.dumps(frame.to_dicts()))

# the prompted simulator's logprobs through the same engine (the process's cached one)
from neuron_assets import runtime
from neuron_assets.llm import open_llm, settings_from_explain
from neuron_assets.simulate.prompted import LLMLogprobs, all_at_once_prompt

engines = len(runtime.loaded())
llm = open_llm(settings_from_explain(config), top_logprobs=500)  # of a vocabulary of about 512
prompt = all_at_once_prompt("cats", ("The", " cat", " sat", " on", " the", " mat"))
[table] = LLMLogprobs(llm).value_probabilities([prompt])
print("LOGPROBS " + json.dumps({"engines": [engines, len(runtime.loaded())], "table": table.tolist()}))
"""


def test_vllm_offline_backend_runs_in_the_vllm_venv(served, tmp_path):
    """The offline LLM backend, run by the vLLM venv's interpreter (polars borrowed from ours),
    on a distilled explainer's checkpoint folder (the tiny Llama fine-tuned for a few steps by
    neuron_assets.distill): vLLM loads the folder by path, as explain.model gives it."""
    _, _, base_dir, _ = served
    model_dir = distilled_folder(base_dir, tmp_path / "distilled")
    borrowed = tmp_path / "borrowed"
    borrowed.mkdir()
    site = Path(pl.__file__).parent.parent
    for name in ("polars", "_polars_runtime_32"):
        if (site / name).exists():
            (borrowed / name).symlink_to(site / name)
    env = server_env() | {"PYTHONPATH": f"{REPO_ROOT}:{borrowed}"}
    done = subprocess.run([str(vllm_python()), "-c", OFFLINE_SCRIPT, str(model_dir)], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=600)
    result = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
    assert result, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(result.removeprefix("RESULT "))
    assert len(rows) == 4 and {r["backend"] for r in rows} == {"vllm"}
    for row in rows:
        assert row["explainer_model"] == str(model_dir) and row["attempts"] in (1, 2)
        assert row["prompt_tokens"] > 100 and 0 < row["completion_tokens"] <= 24
        assert (row["description"] is None) == (row["failure"] is not None)
        assert row["failure"] is None or row["failure"].startswith("malformed answer")
    logprobs = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("LOGPROBS "))[9:])
    assert logprobs["engines"] == [1, 1], "the simulator's logprobs came from the explainer's engine"
    from neuron_assets.config import PromptedSimulatorConfig
    from neuron_assets.simulate.prompted import TransformersLogprobs, all_at_once_prompt

    local = TransformersLogprobs.from_config(PromptedSimulatorConfig(model=str(model_dir), device="cpu"))
    prompt = all_at_once_prompt("cats", ("The", " cat", " sat", " on", " the", " mat"))
    [expected] = local.value_probabilities([prompt])
    served = np.array(logprobs["table"])
    seen = served > 0  # among the engine's top 500
    assert seen[expected > 0].mean() > 0.8, served
    np.testing.assert_allclose(served[seen], expected[seen], rtol=2e-3, atol=1e-7)
