"""A real instruct model behind a real vLLM OpenAI-compatible server (CPU build, its own venv,
127.0.0.1): SmolLM2-135M-Instruct, the converted builtin folder, served once for this module
and used by the openai explainer, the detection/fuzzing judges and the completions-logprobs
prompted simulator, all through the LLM client layer. Its descriptions are poor; this checks
parsing, failure rows and that the token counts are the server's."""

from __future__ import annotations

import numpy as np
import openai
import pytest

from neuron_assets import runtime
from neuron_assets.builtin_models import smollm2_folder
from neuron_assets.config import ExplainConfig, PromptedSimulatorConfig
from neuron_assets.excerpts import TokenDisplay
from neuron_assets.explain import explain_features, make_explainer, plan_candidate, prompt_builder_for, puzzle_pool
from neuron_assets.explain.best_of_k import corpus_sample
from neuron_assets.explain.planted import planted_feature
from neuron_assets.llm import Request, ask
from neuron_assets.score import DetectionScorer, FuzzingScorer, LLMJudge
from neuron_assets.simulate.prompted import OpenAICompletionsLogprobs, TransformersLogprobs, all_at_once_prompt
from neuron_assets.types import Split
from tests.support.tiny_models import sample_texts
from tests.support.vllm_server import no_chunked_prefill, require_vllm, servable_folder, vllm_server

pytestmark = pytest.mark.vllm

TEXTS = [" ".join(p) for p in zip(*[iter(sample_texts(360, seed=8))] * 3)]
MAX_TOKENS = 48
MAX_MODEL_LEN = 4096


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    require_vllm()
    folder = servable_folder(smollm2_folder(), tmp_path_factory.mktemp("smollm2"))
    with vllm_server(folder, served_model_name="smollm2", max_model_len=MAX_MODEL_LEN, max_logprobs=20,
                     extra_args=[*no_chunked_prefill(MAX_MODEL_LEN), "--gpu-memory-utilization", "0.3"]) as (url, name):
        yield url, name, folder
    runtime.release_all()


@pytest.fixture(scope="module")
def features():
    return [planted_feature(TEXTS, words, layer=0, index=i)
            for i, words in enumerate((["cat", "dog", "bird"], ["red", "green", "blue"]))]


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def served_config(url, name, folder, **overrides) -> ExplainConfig:
    settings = dict(backend="openai", model=name, base_url=url, tokenizer=str(folder), k=2, max_tokens=MAX_TOKENS,
                    max_retries=1, exemplars_min=4, exemplars_max=6, context_window=MAX_MODEL_LEN, concurrency=4,
                    temperature=0.7, backoff_s=0.05)
    return ExplainConfig(**(settings | overrides))


def test_openai_explainer_through_vllm_serving_smollm2(served, features):
    url, name, folder = served
    config = served_config(url, name, folder)
    explainer = make_explainer(config)
    frame = explain_features(features, config, progress=False, explainer=explainer)
    assert frame.height == 4
    builder = prompt_builder_for(config)
    pool = [p.solved() for p in puzzle_pool(config, corpus_sample(features).records)]
    parsed = 0
    for row in frame.iter_rows(named=True):
        assert (row["description"] is None) != (row["failure"] is None), row
        if row["description"] is None:
            assert row["failure"].startswith("malformed answer: ") and "attempts)" in row["failure"], row["failure"]
        else:
            parsed += 1
        plan = plan_candidate(features[row["neuron"]], row["candidate"], config, builder, pool, TokenDisplay(),
                              explainer)
        # the server's usage, summed over attempts, is the count the prompt was fitted with
        assert row["prompt_tokens"] == row["attempts"] * plan.prompt.tokens
        assert plan.prompt.tokens + MAX_TOKENS <= MAX_MODEL_LEN
        assert 0 < row["completion_tokens"] <= row["attempts"] * MAX_TOKENS
        print(f"SMOLLM2-vLLM candidate: {row['description']!r} / {row['failure']!r} ({row['attempts']} attempts)")
    print(f"SMOLLM2-vLLM parsed {parsed} of {frame.height}")


def test_the_layers_token_counts_are_the_servers_usage(served):
    url, name, folder = served
    explainer = make_explainer(served_config(url, name, folder))
    messages = ({"role": "system", "content": "You answer in one short sentence."},
                {"role": "user", "content": "Name three colours."})
    [answer] = ask(explainer.llm, [Request(messages=messages, max_tokens=24, temperature=0.0, seed=1)],
                   lambda reply: reply.text, 1)
    direct = openai.OpenAI(base_url=url, api_key="EMPTY").chat.completions.create(
        model=name, messages=list(messages), max_completion_tokens=24, temperature=0.0, seed=1)
    assert answer.ok and answer.text == direct.choices[0].message.content
    assert answer.prompt_tokens == direct.usage.prompt_tokens == explainer.count_tokens(messages)
    assert answer.completion_tokens == direct.usage.completion_tokens > 0


def test_an_over_long_answer_through_vllm_is_a_failure_row(served, features):
    url, name, folder = served
    config = served_config(url, name, folder, max_tokens=3, k=1)
    [row] = explain_features(features[:1], config, progress=False).iter_rows(named=True)
    assert row["description"] is None and row["attempts"] == 2 and row["completion_tokens"] == 6
    assert "hit explain.max_tokens (3)" in row["failure"], row["failure"]


def test_detection_and_fuzzing_judges_through_vllm(served, features):
    url, name, folder = served
    judge = LLMJudge(served_config(url, name, folder))
    for scorer in (DetectionScorer(judge, examples=3, batch=3), FuzzingScorer(judge, examples=3, batch=3)):
        [score] = scorer.score(features[0], ['the words "cat", "dog", "bird"'], Split.VAL)
        assert 0.0 <= score.value <= 1.0 and score.n_examples >= 4, (scorer.name, score)
        print(f"SMOLLM2-vLLM {scorer.name} score {score.value:.3f} flags {score.flags}")
    assert judge.unanswered == 0, judge.failures
    assert judge.prompt_tokens > 0 and 0 < judge.completion_tokens <= 4 * LLMJudge.max_tokens


def test_completions_logprobs_match_the_local_forward_pass(served):
    url, name, folder = served
    prompt = all_at_once_prompt('the word "cat"', ("The", " cat", " sat", " on", " the", " mat", "."))
    remote = OpenAICompletionsLogprobs.from_config(PromptedSimulatorConfig(
        backend="openai_completions", model=name, base_url=url, top_logprobs=20))
    local = TransformersLogprobs.from_config(PromptedSimulatorConfig(model=str(folder), device="cpu"))
    [far], [near] = remote.value_probabilities([prompt]), local.value_probabilities([prompt])
    assert not remote.failures and far.shape == near.shape == (7, 11)
    seen = far > 0  # values among the server's top 20 alternatives
    assert seen[:, 0].all(), "0 is always among the likeliest next tokens after a tab here"
    np.testing.assert_allclose(far[seen], near[seen], rtol=0.05, atol=1e-6)
    assert remote.prompt_tokens > 0
