"""Transluce's released checkpoints as backends: the simulator's exact input ids and class
read-out, the distilled explainer's prompt, the preset that selects both, and the errors
for a checkpoint folder that is missing or incomplete.

The published construction is written out here from TransluceAI/observatory
(lib/explanations/explanations/simulation_utils.py, FinetunedSimulator.simulate, and
llama_model.py), independently of neuron_assets.simulate.transluce, on a tiny random Llama
whose tokenizer has Llama-3's layout: BOS added by the tokenizer, the chat special tokens
in its vocabulary, then <PAD> and the four stand-ins added after it.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from neuron_assets.config import REPO_ROOT, ConfigError, ExplainConfig, PromptFormat, config_from_dict, load_config
from neuron_assets.excerpts import TokenDisplay
from neuron_assets.explain.backends import ChatTokenCounter
from neuron_assets.explain.best_of_k import plan_candidate
from neuron_assets.explain.formats import Shown, TransluceDistilledFormat, prompt_builder_for, transluce_excerpt
from neuron_assets.simulate import SimulatorUnavailable, build_simulator, needs_checkpoint
from neuron_assets.simulate.alignment import NOT_READ
from neuron_assets.simulate.finetuned import load_released_simulator
from neuron_assets.types import (
    ActivationRecord,
    Exemplar,
    Sample,
    FeatureExemplars,
    FeatureId,
    FeatureStats,
    Polarity,
    Split,
)
from tests.support.tiny_models import BOS_TOKEN, END_HEADER, EOT_TOKEN, START_HEADER, make_tiny_llama

STAND_INS = ["<||begin_of_text||>", "<||start_header_id||>", "<||end_header_id||>", "<||eot_id||>"]
DESCRIPTION = 'the word "mat" after "the", and <|eot_id|> tokens'


@pytest.fixture(scope="module")
def released(tmp_path_factory, tiny_tokenizer):
    """A folder laid out as the released simulator: the model's embedding has the vocabulary
    plus <PAD> and the four stand-ins; the saved tokenizer has only the base vocabulary (the
    loader adds the five tokens, as the published one does)."""
    from transformers import AutoTokenizer

    folder = make_tiny_llama(tmp_path_factory.mktemp("released-simulator"), tiny_tokenizer, num_layers=1, hidden=64,
                             intermediate=64, heads=1)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder)
    model.resize_token_embeddings(len(tiny_tokenizer) + 5, mean_resizing=False)
    torch.manual_seed(1)
    with torch.no_grad():  # distinct rows for the five added tokens, so a wrong id changes the logits
        model.get_input_embeddings().weight[-5:] = torch.randn(5, 64) * 0.5
    model.save_pretrained(folder)
    assert len(AutoTokenizer.from_pretrained(folder)) == len(tiny_tokenizer)
    return folder


@pytest.fixture(scope="module")
def record(tiny_tokenizer) -> ActivationRecord:
    """A sequence with a Llama-style chat prefix (BOS, a system header, an open user turn)."""
    tok = tiny_tokenizer
    special = tok.convert_tokens_to_ids
    words = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    prefix = ([special(BOS_TOKEN), special(START_HEADER)] + words("system") + [special(END_HEADER)] + words("\n\nhello")
              + [special(EOT_TOKEN), special(START_HEADER)] + words("user") + [special(END_HEADER)] + words("\n\n"))
    body = words(" the cat sat on the mat")
    ids = prefix + body
    tokens = tuple(tok.decode([i]) for i in ids)
    activations = np.zeros(len(ids), np.float32)
    activations[-1] = 7.0
    return ActivationRecord(3, tokens, tuple(ids), activations, prefix_len=len(prefix))


def published_input_ids(folder, base_vocab: int, description: str, token_ids) -> torch.Tensor:
    """Transluce's FinetunedSimulator.simulate for one description, step by step."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    tokenizer.add_tokens(STAND_INS)
    for original, stand_in in zip([BOS_TOKEN, START_HEADER, END_HEADER, EOT_TOKEN], STAND_INS):
        description = description.replace(original, stand_in)  # Llama3TokenizerWrapper.update_input
    prefix = tokenizer([f"## Neuron Description: {description}\n\n ## Input: "], padding=True,
                       return_tensors="pt")["input_ids"]
    input_ids = torch.cat((prefix, torch.tensor([list(token_ids)])), dim=1)
    # UPD_MAPPING in this tokenizer's layout: the tiny tokenizer's special ids are 0 (BOS),
    # 4, 5, 6 (start/end header, eot); <PAD> takes base_vocab, the stand-ins the next four.
    for old, new in {0: base_vocab + 1, 4: base_vocab + 2, 5: base_vocab + 3, 6: base_vocab + 4}.items():
        input_ids[input_ids == old] = new
    return input_ids


def test_input_ids_equal_the_published_construction(released, record, tiny_tokenizer):
    simulator = load_released_simulator(released, device="cpu", dtype="float32", max_length=512)
    pair = simulator.encoder.encode(DESCRIPTION, record)
    expected = published_input_ids(released, len(tiny_tokenizer), DESCRIPTION, record.token_ids)[0].tolist()
    assert list(pair.input_ids) == expected
    head = len(expected) - len(record.token_ids)
    assert expected[0] == len(tiny_tokenizer) + 1, "BOS, as the tokenizer adds it, is remapped too"
    assert (np.array(expected) == 0).sum() == 0 and {4, 5, 6}.isdisjoint(expected), "no chat token is left"
    want = np.full(len(record.tokens), NOT_READ)
    want[record.prefix_len :] = np.arange(head + record.prefix_len, len(expected))
    np.testing.assert_array_equal(pair.read_at, want)  # each token's own position; the prefix is not scored
    assert simulator.pad_id == simulator.tokenizer.convert_tokens_to_ids("<PAD>") == len(tiny_tokenizer)


def test_the_11_classes_are_the_first_vocabulary_logits_at_each_tokens_own_position(released, record, tiny_tokenizer):
    simulator = load_released_simulator(released, device="cpu", dtype="float32", max_length=512)
    simulator.batch_size = 2  # both descriptions in one padded batch
    descriptions = [DESCRIPTION, "cats"]
    predicted = simulator.simulate(descriptions, [record])
    for d, description in enumerate(descriptions):
        ids = published_input_ids(released, len(tiny_tokenizer), description, record.token_ids)
        with torch.no_grad():
            logits = simulator.model(input_ids=ids).logits[0, :, :11].float()
        expected = (torch.softmax(logits, -1) * torch.arange(11)).sum(-1).numpy()
        head = ids.shape[1] - len(record.token_ids)
        got = predicted[d][0]
        np.testing.assert_allclose(got[record.prefix_len :], expected[head + record.prefix_len :], atol=1e-5)
        assert not got[: record.prefix_len].any()
        assert not np.allclose(got[record.prefix_len :], expected[head + record.prefix_len - 1 : -1], atol=1e-3), \
            "read at the token's own position, not the one before"


def test_a_record_without_ids_has_each_token_tokenized_alone(released, tiny_tokenizer):
    simulator = load_released_simulator(released, device="cpu", dtype="float32")
    tokens = ("<|eot_id|>", " the", " mat")
    pair = simulator.encoder.encode("mats", ActivationRecord(-1, tokens, (-1, -1, -1), np.zeros(3, np.float32)))
    pieces = [simulator.tokenizer(t.replace("<|eot_id|>", "<||eot_id||>"), add_special_tokens=False)["input_ids"]
              for t in tokens]
    body = [i for piece in pieces for i in piece]
    assert list(pair.input_ids[-len(body):]) == body and body[0] == len(tiny_tokenizer) + 4
    np.testing.assert_array_equal(pair.read_at, len(pair.input_ids) - len(body) - 1 + np.cumsum([len(p) for p in pieces]))


def test_missing_or_incomplete_checkpoint_folder_names_the_fix(tmp_path, released):
    def build(path):
        config = config_from_dict({"simulate": {"backend": "finetuned", "finetuned": {
            "input_format": "transluce", "checkpoint": str(path), "device": "cpu"}}})
        assert not needs_checkpoint(config), "a given checkpoint is never trained"
        return build_simulator(config)

    with pytest.raises(SimulatorUnavailable, match="does not exist.*hf download Transluce/llama_8b_simulator"):
        build(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((released / "config.json").read_text())
    with pytest.raises(SimulatorUnavailable, match="has no model weights.*--local-dir"):
        build(partial)
    with pytest.raises(ConfigError, match="simulate.finetuned.checkpoint"):
        config_from_dict({"simulate": {"finetuned": {"input_format": "transluce"}}})


def test_a_checkpoint_without_the_added_token_embeddings_is_refused(tmp_path, tiny_tokenizer):
    folder = make_tiny_llama(tmp_path / "plain-llama", tiny_tokenizer, num_layers=1, hidden=64, intermediate=64, heads=1)
    with pytest.raises(ValueError, match="token embeddings but the input needs"):
        load_released_simulator(folder, device="cpu", dtype="float32")


# -- the distilled explainer's prompt -----------------------------------------------------------

# SYS_PROMPT_NO_COT, TransluceAI/observatory lib/explanations/explanations/explainer_prompts.py.
NO_COT_SYSTEM = (
    "You are a meticulous AI researcher conducting an important investigation into a specific neuron inside a "
    "language model that activates in response to text excerpts. Your overall task is to describe features of text "
    "excerpts that cause the neuron to strongly activate.\n\nYou will receive a list of text excerpts on which the "
    "neuron activates. Tokens causing activation will appear between delimiters like {{this}}. Consecutive "
    "activating tokens will also be accordingly delimited {{just like this}}. If no tokens are highlighted with {{}}, "
    "then the neuron does not activate on any tokens in the excerpt.\n\nNote: Neurons activate on a word-by-word "
    "basis. Also, neuron activations can only depend on words before the word it activates on, so the description "
    "cannot depend on words that come after, and should only depend on words that come before the activation."
)
PREFIX = [("<|begin_of_text|>", 0.0), ("<|start_header_id|>", 20.0), ("user", 0.0), ("<|end_header_id|>", 0.0),
          ("\n\n", 0.0)]


def chat_record(seq_id: int, body) -> ActivationRecord:
    rows = PREFIX + list(body)
    return ActivationRecord(seq_id, tuple(t for t, _ in rows), tuple(range(len(rows))),
                            np.array([a for _, a in rows], np.float32), prefix_len=len(PREFIX))


def test_distilled_prompt_golden_excerpt():
    record = chat_record(1, [(" The", 0), (" cat", 0), (" sat", 0), (" on", 0), (" the", 1.0), (" mat", 9.0),
                             (".", 0), ("\n", 0), ("Next", 0)])
    text = TransluceDistilledFormat().render(Shown((transluce_excerpt(record, Polarity.POS),)))
    # The prefix's 20.0 neither shows nor lowers the threshold; " the mat" is one run, its space outside.
    assert text == ("Excerpt 1:<||begin_of_text||><||start_header_id||>user<||end_header_id||>\n\n"
                    " The cat sat on {{the mat}}.\nNext\n")


class CountingExplainer:
    backend, model, reads_prompts = "fake", "fake-model", True
    count_tokens = ChatTokenCounter()


def test_distilled_prompt_has_its_system_prompt_no_few_shot_and_10_to_20_permuted_exemplars():
    top = [chat_record(100 + i, [(" a", 0.0), (f" w{i}", 2.0 + i)]) for i in range(20)]
    feature = FeatureExemplars(
        FeatureId(4, 9, Polarity.POS), FeatureStats(max=30.0, mean=0.1, std=1.0, frac_active=0.1),
        tuple(Exemplar(Split.TRAIN, Sample.TOP, i, float(r.activations.max()), r)
              for i, r in enumerate(sorted(top, key=lambda r: -r.activations[-1]))))
    config = ExplainConfig(prompt_format="transluce_distilled", few_shot=False, cot=False, k=6,
                           exemplars_min=10, exemplars_max=20)
    builder = prompt_builder_for(config)
    plans = [plan_candidate(feature, c, config, builder, [], TokenDisplay(), CountingExplainer()) for c in range(6)]
    for plan in plans:
        messages = plan.prompt.messages
        assert [m.role for m in messages] == ["system", "user"] and messages[0].content == NO_COT_SYSTEM
        assert plan.prompt.puzzle is None and plan.prompt.format_name == "transluce_distilled"
        shown = re.findall(r"^Excerpt (\d+):<\|\|begin_of_text\|\|>", messages[1].content, flags=re.MULTILINE)
        assert 10 <= len(shown) <= 20 and shown == [str(i) for i in range(1, len(shown) + 1)]
        assert len(plan.seq_ids) == len(shown) and set(plan.seq_ids) <= {r.seq_id for r in top}
    orders = [list(p.seq_ids) for p in plans]
    assert len({tuple(o) for o in orders}) == 6 and any(o != sorted(o) for o in orders), "permuted per candidate"
    again = plan_candidate(feature, 2, config, builder, [], TokenDisplay(), CountingExplainer())
    assert again.prompt == plans[2].prompt, "the permutation is fixed by the seed"
    reseeded = plan_candidate(feature, 2, config.model_copy(update={"seed": 7}), builder, [], TokenDisplay(),
                              CountingExplainer())
    assert reseeded.seq_ids != plans[2].seq_ids


def test_registries_match_the_config_choices():
    from typing import get_args

    from neuron_assets.config import FinetunedSimulatorConfig
    from neuron_assets.explain.formats import FORMATS
    from neuron_assets.simulate.finetuned import CHECKPOINT_FORMATS

    assert set(CHECKPOINT_FORMATS) == set(get_args(FinetunedSimulatorConfig.model_fields["input_format"].annotation))
    assert set(FORMATS) == set(PromptFormat)


def test_answers_get_llamas_chat_tokens_back():
    from neuron_assets.explain.formats import restore_chat_tokens

    assert restore_chat_tokens("the <||eot_id||> token after <||start_header_id||>") == \
        "the <|eot_id|> token after <|start_header_id|>"


def test_distilled_prompt_refuses_few_shot_or_reasoning():
    for wrong in ({"few_shot": True}, {"few_shot": False, "cot": True}):
        with pytest.raises(ValueError, match="few_shot: false and explain.cot: false"):
            ExplainConfig(prompt_format="transluce_distilled", **wrong)


def test_the_preset_selects_both_released_checkpoints():
    config = load_config(REPO_ROOT / "configs" / "transluce_llama31_8b.yaml")
    explain, finetuned = config.explain, config.simulate.finetuned
    assert explain.backend == "vllm" and explain.prompt_format is PromptFormat.TRANSLUCE_DISTILLED
    assert not explain.few_shot and not explain.cot and (explain.exemplars_min, explain.exemplars_max) == (10, 20)
    assert config.exemplars.top_k == 20 and config.corpus.seq_len == 95
    assert config.simulate.backend == "finetuned" and finetuned.input_format == "transluce" and finetuned.checkpoint
    assert not needs_checkpoint(config), "no training stage runs for the released simulator"
    assert config.subject.model == "meta-llama/Llama-3.1-8B-Instruct"
