"""The prompted (all-at-once) simulator: the prompt, the expected-value math, the local
forward pass, and the real vLLM server's echo + logprobs path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuron_assets.config import PromptedSimulatorConfig, config_from_dict
from neuron_assets.llm.tokens import encode_at_offsets, encode_in_pieces
from neuron_assets.simulate import build_simulator
from neuron_assets.simulate.prompted import (
    FEW_SHOT,
    OpenAICompletionsLogprobs,
    PromptedSimulator,
    SimulationPrompt,
    TransformersLogprobs,
    all_at_once_prompt,
    value_token_ids,
)
from neuron_assets.types import ActivationRecord
from tests.support.vllm_server import require_vllm, vllm_server

TOKENS = ("<|begin_of_text|>", "The", " cat", "\n", " sat", "<|eot_id|>")


def _record(tokens=TOKENS, prefix_len=1):
    return ActivationRecord(0, tuple(tokens), tuple(range(len(tokens))), np.zeros(len(tokens), np.float32), prefix_len)


def test_prompt_golden():
    prompt = all_at_once_prompt('the word "cat"', TOKENS[1:])
    solved = "".join(f"{t}\t{a}\n" for t, a in zip(FEW_SHOT.tokens, FEW_SHOT.activations))
    tail = (
        "\n\nNeuron 2\nExplanation of neuron 2 behavior: the main thing this neuron does is find the word \"cat\"\n"
        "Activations:\n<start>\nThe\tunknown\n cat\tunknown\n\\n\tunknown\n sat\tunknown\n⟨eot_id⟩\tunknown\n<end>\n"
    )
    assert prompt.text.endswith(solved + "<end>\n" + tail)
    assert prompt.text.startswith("We're studying neurons in a neural network.")
    assert "Neuron 1\nExplanation of neuron 1 behavior: the main thing this neuron does is find the word \"and\"" in prompt.text
    assert len(prompt.placeholder_offsets) == 5
    assert all(prompt.text[o : o + 8] == "unknown\n" and prompt.text[o - 1] == "\t" for o in prompt.placeholder_offsets)


class _FixedSource:
    """value probabilities chosen by the test: placeholder i puts mass on values i and 10."""

    name = "fixed"

    def value_probabilities(self, prompts):
        out = []
        for prompt in prompts:
            table = np.zeros((len(prompt.placeholder_offsets), 11))
            for i in range(len(prompt.placeholder_offsets)):
                table[i, i] = 0.3
                table[i, 10] = 0.1
            out.append(table)
        return out


def test_expected_value_over_the_values_at_each_placeholder():
    simulator = PromptedSimulator(_FixedSource())
    [[a], [b]] = simulator.simulate(["x", "y"], [_record()])
    expected = [(0.3 * i + 0.1 * 10) / 0.4 for i in range(5)]  # renormalized over the 0..10 mass
    assert a[0] == 0.0  # the prefix
    np.testing.assert_allclose(a[1:], expected, rtol=1e-6)
    np.testing.assert_allclose(b, a)


def _manual_values(model, tokenizer, prompt: SimulationPrompt) -> np.ndarray:
    encoded = tokenizer(prompt.text, return_offsets_mapping=True)
    starts = [s for s, _ in encoded["offset_mapping"]]
    with torch.no_grad():
        logits = model(torch.tensor([encoded["input_ids"]])).logits[0]
    probabilities = torch.softmax(logits, -1)
    ids = value_token_ids(tokenizer)
    table = np.zeros((len(prompt.placeholder_offsets), 11))
    for row, offset in enumerate(prompt.placeholder_offsets):
        position = starts.index(offset)
        for value, token_id in ids.items():
            table[row, value] = probabilities[position - 1, token_id].item()
    return table


@pytest.fixture(scope="module")
def local_source(tiny_llama):
    return TransformersLogprobs.from_config(PromptedSimulatorConfig(model=str(tiny_llama), batch_size=2))


def test_transformers_logprobs_read_the_distribution_before_each_placeholder(local_source):
    prompts = [all_at_once_prompt(d, TOKENS[1:]) for d in ("cats", "a much longer description of sitting")]
    tables = local_source.value_probabilities(prompts)  # batched with right padding
    for prompt, table in zip(prompts, tables):
        np.testing.assert_allclose(table, _manual_values(local_source.llm.lm, local_source.llm.tokenizer, prompt),
                                   atol=1e-5)
        spelled = sorted(value_token_ids(local_source.llm.tokenizer))  # values that are one token ("10" is not, here)
        assert (table[:, spelled] > 0).all() and (table.sum(1) < 1).all()
        assert not table[:, [v for v in range(11) if v not in spelled]].any()
    # splitting the prompt at the placeholders gives the same ids when no placeholder is merged
    tokenizer, prompt = local_source.llm.tokenizer, prompts[0]
    whole, positions = encode_at_offsets(tokenizer, prompt.text, prompt.placeholder_offsets)
    pieces, piece_positions = encode_in_pieces(tokenizer, prompt.text, prompt.placeholder_offsets)
    assert whole == pieces and positions == piece_positions


def test_prompted_backend_from_config(tiny_llama):
    config = config_from_dict({"simulate": {"backend": "prompted", "prompted": {"model": str(tiny_llama)}}})
    simulator = build_simulator(config)
    [[values]] = simulator.simulate(["the word cat"], [_record()])
    assert values.shape == (6,) and values[0] == 0 and ((values[1:] > 0) & (values[1:] < 10)).all()


@pytest.mark.vllm
def test_vllm_completions_echo_logprobs_match_the_local_forward_pass(tiny_llama, local_source):
    require_vllm()
    prompts = [all_at_once_prompt(d, TOKENS[1:]) for d in ("cats", "the word sat")]
    local = local_source.value_probabilities(prompts)
    vocabulary = len(local_source.llm.tokenizer)
    with vllm_server(tiny_llama, served_model_name="tiny", max_logprobs=vocabulary) as (base_url, model):
        config = PromptedSimulatorConfig(backend="openai_completions", model=model, base_url=base_url,
                                         top_logprobs=vocabulary, concurrency=2)
        remote_source = OpenAICompletionsLogprobs.from_config(config)
        remote = remote_source.value_probabilities(prompts)
        simulated = PromptedSimulator(remote_source).simulate(["cats"], [_record()])[0][0]
    for a, b in zip(local, remote):
        np.testing.assert_allclose(b, a, rtol=2e-3, atol=1e-6)
    expected = PromptedSimulator(local_source).simulate(["cats"], [_record()])[0][0]
    np.testing.assert_allclose(simulated, expected, atol=1e-3)
