"""Simulators: the lexical rule, the 0-10 math, the fine-tuned simulator's input and alignment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuron_assets.config import Config, ConfigError, config_from_dict
from neuron_assets.corpus import tokenize_with_text
from neuron_assets.simulate import (
    SIMULATORS,
    LexicalSimulator,
    SimulatorUnavailable,
    build_simulator,
    discretize,
    expected_value,
)
from neuron_assets.simulate.alignment import (
    NOT_READ,
    CharOffsetEncoder,
    SubjectIdsEncoder,
    control_token_forms,
    last_subtoken_positions,
    simulator_input_text,
    token_spans,
)
from neuron_assets.simulate.finetuned import FinetunedSimulator, SimulatorSpec
from neuron_assets.simulate.lexical import named_terms
from neuron_assets.types import ActivationRecord
from tests.support.tiny_models import sample_texts


def _record(tokens, prefix_len=0, token_ids=None, seq_id=0):
    ids = tuple(token_ids) if token_ids is not None else tuple(range(len(tokens)))
    return ActivationRecord(seq_id, tuple(tokens), ids, np.zeros(len(tokens), np.float32), prefix_len)


@pytest.fixture(scope="module")
def minilm_simulator():
    return FinetunedSimulator.from_backbone("builtin:all-MiniLM-L6-v2", backbone_layers=1, added_tokens=["⟨eot_id⟩"],
                                            max_length=96, batch_size=8)


# -- shared math -------------------------------------------------------------------------------


def test_expected_value_and_discretize():
    one_hot = np.eye(11)[[0, 3, 10]]
    assert expected_value(one_hot).tolist() == [0.0, 3.0, 10.0]
    assert expected_value(np.array([0.5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.5])) == pytest.approx(5.0)
    # unnormalized mass (an API's top logprobs) is renormalized; no mass predicts 0
    assert expected_value(np.array([[0.1, 0.1] + [0] * 9, [0] * 11])).tolist() == pytest.approx([0.5, 0.0])
    with pytest.raises(ValueError):
        expected_value(np.ones(10))
    assert discretize(np.array([0.0, 0.04, 0.05, 0.5, 1.0, 2.0]), 1.0).tolist() == [0, 0, 0, 5, 10, 10]
    assert discretize(np.array([0.3]), 0.0).tolist() == [0]


def test_registry_builds_by_name_and_explains_unknown_names():
    from neuron_assets.simulate.semantic import SemanticSimulator

    assert set(SIMULATORS) == {"lexical", "semantic", "hybrid", "finetuned", "prompted"}
    assert isinstance(build_simulator(config_from_dict({"simulate": {"backend": "lexical"}})), LexicalSimulator)
    with pytest.raises(ConfigError, match="simulate.backend.*'lexical', 'semantic', 'hybrid', 'finetuned' or 'prompted'"):
        config_from_dict({"simulate": {"backend": "oracle"}})  # unknown names fail when the config loads
    with pytest.raises(SimulatorUnavailable, match="known: lexical, semantic, hybrid, finetuned, prompted"):
        build_simulator(Config(), name="oracle")
    with pytest.raises(SimulatorUnavailable, match="materialize simulator_checkpoint"):
        build_simulator(config_from_dict({"simulate": {"backend": "finetuned"}}))
    with pytest.raises(SimulatorUnavailable, match="simulate.semantic.model"):
        build_simulator(config_from_dict({"simulate": {"semantic": {"model": "/nonexistent/model"}}}), name="semantic")
    # the demo selects by the semantic simulator: it beats lexical on the validity puzzles (tests/test_validity.py)
    assert isinstance(build_simulator(Config()), SemanticSimulator)


# -- lexical ------------------------------------------------------------------------------------


def test_lexical_rule_levels():
    tokens = ["<s>", "The", " cat", "s", " sat", " on", " cat", ",", " the", " catalog", " mat", " play", "ing", "\n"]
    record = _record(tokens, prefix_len=1)
    [[values]] = LexicalSimulator().simulate(['the word "cat" and mats, playing'], [record])
    # exact token 10; a token of a named multi-token word 6 ("play"+"ing"); a shared stem 3
    # ("catalog" for "cat", "mat" for "mats"); punctuation and other words 0
    assert values.tolist() == [0, 0, 10, 0, 0, 0, 10, 0, 0, 3, 3, 6, 6, 0]
    [[prefix_only]] = LexicalSimulator().simulate(['"<s>"'], [record])
    assert prefix_only[0] == 0  # the prefix is never predicted
    assert named_terms('tokens like "New York" fire').quoted == {"new york"}
    assert {"new", "york"} <= named_terms('tokens like "New York" fire').words
    assert "tokens" not in named_terms('tokens like "New York" fire').words


def test_lexical_matches_quoted_punctuation_and_control_tokens():
    record = _record(["(", "x", ")", "⟨eot_id⟩"])
    [[values]] = LexicalSimulator().simulate(['an opening "(" and ⟨eot_id⟩'], [record])
    assert values.tolist() == [10, 0, 0, 10]


# -- fine-tuned simulator input and alignment -------------------------------------------------------


def test_simulator_input_golden():
    record = _record(["<|begin_of_text|>", "Hi", "<|eot_id|>", " there", "\n"], prefix_len=1)
    text = simulator_input_text('the token "<|eot_id|>"\nand  more', record)
    assert text == '## Neuron Description: the token "⟨eot_id⟩" and more ## Input: Hi⟨eot_id⟩ there\n'
    assert control_token_forms(["<|eot_id|>", "[SEP]", "<pad>", "plain"]) == ["⟨SEP⟩", "⟨eot_id⟩", "⟨pad⟩"]


def test_last_subtoken_positions_by_hand():
    # subject tokens: "ab", " cd", " ", "e"; backbone tokens: [CLS] "a" "b c" "d" "e" [SEP]
    spans = token_spans(["ab", " cd", " ", "e"], start=10)
    offsets = [(0, 0), (10, 11), (11, 14), (14, 15), (16, 17), (0, 0)]
    special = [1, 0, 0, 0, 0, 1]
    # "ab" ends inside backbone token 2; " cd" ends in 3; the lone space has no overlapping
    # backbone token and is read at the last one before it; "e" is 4
    assert last_subtoken_positions(spans, offsets, special, input_start=10).tolist() == [2, 3, 3, 4]
    assert last_subtoken_positions(spans, [(0, 0)], [1], input_start=10).tolist() == [NOT_READ] * 4


def test_alignment_of_a_subject_bpe_tokenizer_to_the_minilm_backbone(tiny_tokenizer, minilm_simulator):
    text = sample_texts(3, seed=5)[2] + " Unbelievably, 1234 cats!"
    ids, tokens = tokenize_with_text(text, tiny_tokenizer)
    assert len(tokens) > len(text.split())  # the subject BPE splits words the backbone keeps whole, and back
    record = _record(["<|begin_of_text|>", *tokens], prefix_len=1, token_ids=[0, *ids])
    pair = minilm_simulator.encoder.encode("numbers", record)
    assert pair.read_at[0] == NOT_READ
    read = pair.read_at[1:]
    assert (read > 0).all() and (np.diff(read) >= 0).all()  # in order, every subject token read
    # check against the backbone's own offsets: token i is read at the last backbone token
    # overlapping its characters
    full = simulator_input_text("numbers", record)
    start = len(full) - len(text)
    encoded = minilm_simulator.tokenizer(full, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    for (a, b), position in zip(token_spans(tokens, start), read):
        overlapping = [i for i, (s, e) in enumerate(offsets) if e > s and s < b and e > a]
        if overlapping:
            assert position == overlapping[-1]
        else:  # whitespace the backbone drops: the nearest backbone token before it
            assert offsets[position][1] <= a
    words = minilm_simulator.tokenizer.convert_ids_to_tokens(list(pair.input_ids))
    unbelievably = next(i for i, t in enumerate(tokens) if t.strip() and "Unbelievably".endswith(t.strip()) and
                        tokens[i + 1].startswith(","))
    assert "unbelievably".endswith(words[read[unbelievably]].removeprefix("##"))  # its last sub-token


def test_subject_ids_encoder_reads_each_token_at_its_own_position(tiny_tokenizer):
    ids, tokens = tokenize_with_text("The cat sees a dog.", tiny_tokenizer)
    record = _record(["<|begin_of_text|>", *tokens], prefix_len=1, token_ids=[tiny_tokenizer.bos_token_id, *ids])
    encoder = SubjectIdsEncoder(tiny_tokenizer, max_length=128)
    pair = encoder.encode('the word "cat"', record)
    read = pair.read_at[1:]
    assert [pair.input_ids[p] for p in read] == ids
    assert pair.input_ids[0] == tiny_tokenizer.bos_token_id and pair.read_at[0] == NOT_READ
    limit = len(ids) + len(encoder.input_head_ids) + 3
    short = SubjectIdsEncoder(tiny_tokenizer, max_length=limit).encode("a long description " * 20, record)
    assert len(short.input_ids) == limit and [short.input_ids[p] for p in short.read_at[1:]] == ids
    assert short.input_ids[0] == tiny_tokenizer.bos_token_id


def test_a_long_description_is_cut_never_the_input(minilm_simulator):
    record = _record([" word"] * 40)
    pair = CharOffsetEncoder(minilm_simulator.tokenizer, max_length=60).encode("very long description " * 50, record)
    assert len(pair.input_ids) <= 60
    assert (pair.read_at != NOT_READ).all()


def test_control_tokens_are_one_added_token_in_description_and_input(minilm_simulator):
    record = _record(["Hi", "<|eot_id|>"])
    pair = minilm_simulator.encoder.encode("fires on <|eot_id|>", record)
    added = minilm_simulator.tokenizer.convert_tokens_to_ids("⟨eot_id⟩")
    assert list(pair.input_ids).count(added) == 2
    assert pair.input_ids[pair.read_at[1]] == added
    # the added token starts as its name's embedding, not a random or shared row
    weight = minilm_simulator.model.get_input_embeddings().weight
    name_ids = minilm_simulator.tokenizer("eot id", add_special_tokens=False)["input_ids"]
    assert torch.allclose(weight[added], weight[name_ids].mean(0))


def test_batched_by_feature_equals_one_pair_per_forward(minilm_simulator):
    texts = sample_texts(4, seed=3)
    records = [_record(["[CLS]", *tokenize_with_text(t, minilm_simulator.tokenizer)[1]], prefix_len=1, seq_id=i)
               for i, t in enumerate(texts)]
    descriptions = ['the word "the"', "verbs", "nouns about animals"]
    batched = minilm_simulator.simulate(descriptions, records)
    minilm_simulator.batch_size = 1
    try:
        single = minilm_simulator.simulate(descriptions, records)
    finally:
        minilm_simulator.batch_size = 8
    for d in range(3):
        for r in range(4):
            assert batched[d][r].shape == (len(records[r].tokens),)
            assert batched[d][r][0] == 0.0 and ((batched[d][r] >= 0) & (batched[d][r] <= 10)).all()
            np.testing.assert_allclose(batched[d][r], single[d][r], atol=1e-4)


def test_checkpoint_round_trip_with_lm_head_slots(tmp_path, tiny_llama, tiny_tokenizer):
    simulator = FinetunedSimulator.from_backbone(str(tiny_llama), head="lm_head_slots", alignment="subject_ids",
                                                 max_length=64, added_tokens=["⟨eot_id⟩"])
    ids, tokens = tokenize_with_text("The cat sees a dog.", tiny_tokenizer)
    record = _record(["<|begin_of_text|>", *tokens], prefix_len=1, token_ids=[tiny_tokenizer.bos_token_id, *ids])
    logits = simulator.class_logits(*simulator.collate([simulator.encoder.encode("x", record)]))
    assert logits.shape[-1] == 11
    before = simulator.simulate(["cats", "dogs"], [record])
    simulator.save(tmp_path / "ckpt", extra={"note": "round trip"})
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    spec = SimulatorSpec.read(tmp_path / "ckpt")
    assert spec.head == "lm_head_slots" and spec.alignment == "subject_ids" and spec.added_tokens == ("⟨eot_id⟩",)
    loaded = FinetunedSimulator.load(tmp_path / "ckpt")
    after = loaded.simulate(["cats", "dogs"], [record])
    np.testing.assert_allclose(before[0][0], after[0][0], atol=1e-5)
    np.testing.assert_allclose(before[1][0], after[1][0], atol=1e-5)
