"""The logit lens (table output_tokens): planted output directions promote the planted token,
for an untied head read from the checkpoint's files (Llama) and a tied one (GPT-2)."""

from __future__ import annotations

import torch

from neuron_assets.config import SubjectConfig
from neuron_assets.features.logit_lens import subject_output_tokens, unembedding
from neuron_assets.subject import load_subject
from neuron_assets.types import Polarity
from tests.support.tiny_models import make_tiny_gpt2, make_tiny_llama

TARGET = 7  # the token id the planted neurons promote (pos) or demote (neg)


def _plant(model, site_weight: torch.Tensor, unembed: torch.Tensor, gamma: torch.Tensor, linear: bool) -> None:
    """Unembedding row TARGET = 10 e0, every other row orthogonal to e0; neuron 3's output
    direction is +e0 / gamma, neuron 5's is -e0 / gamma."""
    with torch.no_grad():
        unembed[:, 0] = 0.0
        unembed[TARGET] = 0.0
        unembed[TARGET, 0] = 10.0
        direction = torch.zeros(unembed.shape[1])
        direction[0] = 1.0
        direction = direction / gamma
        for neuron, sign in ((3, 1.0), (5, -1.0)):
            if linear:
                site_weight[:, neuron] = sign * direction
            else:
                site_weight[neuron, :] = sign * direction


def test_an_untied_llama_head_is_read_from_the_checkpoint(tmp_path, tiny_tokenizer):
    from transformers import LlamaForCausalLM

    folder = make_tiny_llama(tmp_path / "llama", tiny_tokenizer, num_layers=2, hidden=64, intermediate=96, heads=1)
    model = LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 2.0)  # the lens must divide out a non-trivial gamma
    _plant(model, model.model.layers[1].mlp.down_proj.weight, model.lm_head.weight, model.model.norm.weight, True)
    model.save_pretrained(folder)

    subject = load_subject(SubjectConfig(model=str(folder), device="cpu"))
    assert subject.model.get_input_embeddings().weight[TARGET, 0] != 10.0, "the head is not the input embedding"
    assert unembedding(subject.model, str(folder))[TARGET, 0] == 10.0
    tables = subject_output_tokens(subject, {1: torch.tensor([3, 5, 9])}, [Polarity.POS, Polarity.NEG], 4, str(folder))
    pos, neg = tables[(1, Polarity.POS)], tables[(1, Polarity.NEG)]
    first = {(row["neuron"]): row for row in pos.filter(pos["rank"] == 0).iter_rows(named=True)}
    assert first[3]["token_id"] == TARGET and abs(first[3]["logit"] - 10.0) < 1e-3
    assert neg.filter((neg["neuron"] == 5) & (neg["rank"] == 0))["token_id"].item() == TARGET
    assert first[5]["token_id"] != TARGET and first[9]["token_id"] != TARGET
    assert pos.height == neg.height == 3 * 4
    assert first[3]["token"] == tiny_tokenizer.decode([TARGET])


def test_a_tied_gpt2_reads_its_embeddings_and_an_encoder_has_no_lens(tmp_path, tiny_tokenizer):
    from transformers import GPT2LMHeadModel

    folder = make_tiny_gpt2(tmp_path / "gpt2", tiny_tokenizer, num_layers=2, hidden=64, intermediate=96, heads=1)
    model = GPT2LMHeadModel.from_pretrained(folder)
    _plant(model, model.transformer.h[0].mlp.c_proj.weight, model.transformer.wte.weight,
           model.transformer.ln_f.weight, False)
    model.save_pretrained(folder)

    subject = load_subject(SubjectConfig(model=str(folder), device="cpu"))
    [table] = subject_output_tokens(subject, {0: torch.tensor([3])}, [Polarity.POS], 2, str(folder)).values()
    assert table["token_id"][0] == TARGET

    subject.model.config.architectures = ["BertModel"]  # an encoder: nothing to read
    assert subject_output_tokens(subject, {0: torch.tensor([3])}, [Polarity.POS], 2, str(folder)) == {}


def test_the_explain_stage_gives_each_feature_its_promoted_tokens(described_run):
    """explain.output_tokens: the stage attaches each feature's rows of the output_tokens table,
    strongest first, to what the prompt builder sees."""
    from neuron_assets.config import load_config
    from neuron_assets.exemplars import load_feature_exemplars
    from neuron_assets.stages.descriptions import with_output_tokens
    from neuron_assets.store import Store
    from neuron_assets.types import Polarity

    store = Store(load_config(described_run).root)
    features = load_feature_exemplars(store, 1, Polarity.NEG)
    attached = with_output_tokens(features, store, 1, Polarity.NEG, "neuron", log=lambda _: None)
    table = store.read("output_tokens", 1, "neg")
    for feature in attached:
        rows = table.filter(table["neuron"] == feature.feature.index).sort("rank")
        assert feature.output_tokens == tuple(rows["token"].to_list()) and len(feature.output_tokens) > 0
