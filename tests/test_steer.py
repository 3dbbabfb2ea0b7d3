"""Steering (neuron_assets.steer): a known answer on a tiny Llama whose planted neuron writes a
chosen token's unembedding direction (and an SAE latent whose decoder is that neuron); the
selection by query, id and cluster; SmolLM2 steered by selected features (changed, the same
for the same seed, the baseline at strength 0); Neuronpedia's request and response; bad
input; the command."""

from __future__ import annotations

import json
import math
import shutil
import zlib

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from neuron_assets.cli import main
from neuron_assets.config import load_config
from neuron_assets.steer import (
    SteerFeature,
    Steerer,
    SteerRequest,
    neuronpedia_request,
    neuronpedia_response,
    parse_feature_id,
)
from neuron_assets.steer.neuronpedia import source_layer
from neuron_assets.store import Store
from neuron_assets.types import FeatureId, Partition, Polarity
from tests.support.tiny_models import make_tiny_llama

TARGET = 7  # the token the planted neuron promotes
PLANTED, UNWIRED = 5, 6  # layer 1's neuron writing TARGET's direction, and one wired to nothing
LATENT = 3  # the SAE latent whose decoder row is neuron PLANTED
PROMPT = "the cat sees a red ball"


def hashed_words(texts) -> np.ndarray:
    """A tiny deterministic sentence encoder: each word hashed into one of 64 dimensions."""
    out = np.zeros((len(texts), 64), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in str(text).lower().replace('"', " ").split():
            out[row, zlib.crc32(word.encode()) % 64] += 1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)


def write_tables(root, layer: int, polarity: str, rows: list[tuple[str, int, float, str]], embed_with=None) -> None:
    """neuron_stats and neuron_descriptions rows (kind, index, q99, description) of one partition,
    and, given an encoder, its description vectors."""
    store = Store(root)
    kinds, indices, q99, texts = (list(column) for column in zip(*rows))
    store.write("neuron_stats", pl.DataFrame({
        "kind": kinds, "neuron": indices, "max": [2 * q for q in q99], "mean": [0.25] * len(rows),
        "std": [1.0] * len(rows), "frac_active": [0.5] * len(rows), "q50": [0.1] * len(rows),
        "q90": [q / 2 for q in q99], "q99": q99, "q999": [1.5 * q for q in q99]}), layer, polarity)
    store.write("neuron_descriptions", pl.DataFrame({
        "kind": kinds, "neuron": indices, "candidate": [0] * len(rows), "description": texts,
        "val_score": [0.5] * len(rows), "test_score": [0.1 * (i + 1) for i in range(len(rows))],
        "model": "test", "config_hash": "test", "run_id": "test"}), layer, polarity)
    if embed_with is not None:
        from neuron_assets.search import embed_partition

        config = load_config(root.parent / "config.yaml")
        embed_partition(config, Partition(layer, Polarity(polarity)), "test", encoder=embed_with)


def write_config(folder, model: str) -> str:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({"storage": {"root": str(folder / "home")},
                                    "subject": {"model": model, "device": "cpu"}}))
    return str(path)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama whose layer-1 neuron PLANTED fires at " the" and alone writes e0 to the
    residual, the only direction TARGET's unembedding reads (10 e0); neuron UNWIRED writes nothing; a top-k SAE over the
    layer whose latent LATENT decodes to neuron PLANTED; a store with stats and descriptions."""
    from transformers import LlamaForCausalLM

    from neuron_assets.features.sae import make_rule, save_sae, SparseAutoencoder
    from neuron_assets.features.sae_stage import sae_folder

    folder = tmp_path_factory.mktemp("steer-planted")
    model_dir = make_tiny_llama(folder / "model", tiny_tokenizer, num_layers=2, hidden=64, intermediate=96, heads=1)
    model = LlamaForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        unembed = model.lm_head.weight
        unembed[:, 0] = 0.0
        unembed[TARGET] = 0.0
        unembed[TARGET, 0] = 10.0
        embeddings = model.get_input_embeddings().weight
        embeddings[:, :2] = 0.0  # nothing but the planted neuron writes e0; e1 marks the token " the"
        marker = tiny_tokenizer(" the", add_special_tokens=False)["input_ids"]
        assert len(marker) == 1
        embeddings[marker[0], 1] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:2, :] = 0.0
            layer.mlp.down_proj.weight[:2, :] = 0.0
        mlp = model.model.layers[1].mlp
        mlp.gate_proj.weight[PLANTED, 1] = 4.0  # the planted neuron fires at " the": silu(4) * 4
        mlp.up_proj.weight[PLANTED, 1] = 4.0
        down = mlp.down_proj.weight  # (hidden, neurons)
        down[:, PLANTED] = 0.0
        down[0, PLANTED] = 1.0
        down[:, UNWIRED] = 0.0
    model.save_pretrained(model_dir)
    config_path = write_config(folder, str(model_dir))
    root = folder / "home"
    write_tables(root, 1, "pos", [("neuron", PLANTED, 3.0, "the colour red and red objects"),
                                  ("neuron", UNWIRED, 2.0, "animals such as cats and dogs"),
                                  ("neuron", 9, 1.0, "verbs of seeing and watching"),
                                  ("sae", LATENT, 4.0, "round toys like balls")], embed_with=hashed_words)
    write_tables(root, 0, "neg", [("neuron", 2, 0.5, "the end of a sentence")], embed_with=hashed_words)
    sae = SparseAutoencoder(96, 8, make_rule("topk", k=2))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.1)
        sae.W_dec.normal_(0, 0.1)
        sae.W_dec[LATENT] = 0.0
        sae.W_dec[LATENT, PLANTED] = 1.0
    save_sae(sae, sae_folder(Store(root), 1))
    steerer = Steerer(load_config(config_path), encoder=hashed_words)
    return steerer, config_path


def explicit(*features: SteerFeature, **settings) -> SteerRequest:
    return SteerRequest(PROMPT, features=features, chat=False, **{"tokens": "prompt", "n_tokens": 4, **settings})


def test_steering_the_planted_neuron_up_raises_its_token_and_an_unwired_neuron_changes_nothing(planted):
    steerer, _ = planted
    up = SteerFeature(FeatureId(1, PLANTED, Polarity.POS), value=30.0)
    baseline, steered = steerer.next_token_logprobs(explicit(up))
    assert steered[TARGET] > baseline[TARGET] + 5 and int(steered.argmax()) == TARGET
    assert math.exp(float(steered[TARGET])) > 0.9

    for mode in ("set", "add", "ablate"):
        unwired = SteerFeature(FeatureId(1, UNWIRED, Polarity.POS), value=30.0)
        baseline, steered = steerer.next_token_logprobs(explicit(unwired, mode=mode))
        assert torch.equal(baseline, steered), mode

    # Through generation: from the first new token on, the steered text is the planted token.
    result = steerer.run(explicit(up, tokens="both", n_tokens=3))
    assert result.steered.token_ids == (TARGET,) * 3 and result.baseline.token_ids[0] != TARGET
    assert result.steered.logprobs[0] > result.baseline.logprobs[0] - 1e-9
    assert [f.value for f in result.features] == [30.0] and result.features[0].base_from == "given"
    # Steering only the generated tokens leaves the first token to the unsteered prompt.
    late = steerer.run(explicit(up, tokens="generated", n_tokens=3))
    assert late.steered.token_ids[0] == late.baseline.token_ids[0] and late.steered.token_ids[1:] == (TARGET,) * 2


def test_the_default_value_is_the_q99_times_the_strength_and_an_sae_latent_adds_its_decoder(planted):
    steerer, _ = planted
    chosen = steerer.select(explicit(SteerFeature(FeatureId(1, PLANTED, Polarity.POS)), strength=4.0))
    assert [(f.value, f.base, f.base_from, f.description) for f in chosen] == \
        [(12.0, 3.0, "q99", "the colour red and red objects")]
    neg = steerer.select(explicit(SteerFeature(FeatureId(0, 2, Polarity.NEG)), strength=2.0))
    assert neg[0].value == -1.0, "a neg feature is set to minus its quantile"
    mean = steerer.select(explicit(SteerFeature(FeatureId(1, PLANTED, Polarity.POS)), mode="ablate", ablate_with="mean"))
    assert mean[0].value == 0.25 and mean[0].base_from == "mean"

    latent = SteerFeature(FeatureId(1, LATENT, Polarity.POS, "sae"), value=30.0)
    for mode in ("add", "set"):
        baseline, steered = steerer.next_token_logprobs(explicit(latent, mode=mode))
        assert int(steered.argmax()) == TARGET and steered[TARGET] > baseline[TARGET] + 5, mode
    by_stats = steerer.select(explicit(SteerFeature(FeatureId(1, LATENT, Polarity.POS, "sae"))))
    assert by_stats[0].value == 4.0 and by_stats[0].description == "round toys like balls"


def test_features_are_selected_by_query_with_filters_and_by_cluster(planted):
    steerer, _ = planted
    hits = steerer.select(SteerRequest(PROMPT, select="red colour objects", top=2))
    assert hits[0].feature == FeatureId(1, PLANTED, Polarity.POS) and hits[0].source == "search" and len(hits) == 2
    assert hits[0].match is not None and hits[0].score == pytest.approx(0.1)
    text = steerer.select(SteerRequest(PROMPT, select="cats", select_mode="text"))
    assert [f.feature.index for f in text] == [UNWIRED]
    only_neg = steerer.select(SteerRequest(PROMPT, select="red colour", polarity="neg"))
    assert [(f.feature.layer, f.feature.polarity.value) for f in only_neg] == [(0, "neg")]
    sae_only = steerer.select(SteerRequest(PROMPT, select="red colour", kind="sae", layers=(1,)))
    assert [(f.feature.kind, f.feature.index) for f in sae_only] == [("sae", LATENT)]
    scored = steerer.select(SteerRequest(PROMPT, select="red colour", min_score=0.25))
    assert {f.feature.index for f in scored} == {9, LATENT}
    # An explicit id first, and a feature chosen twice once.
    both = steerer.select(SteerRequest(PROMPT, features=("1:9",), select="seeing watching verbs", top=1))
    assert [f.feature.index for f in both] == [9]

    store = steerer.store
    with pytest.raises(LookupError, match="run neuron-assets run --select description_clusters"):
        steerer.select(SteerRequest(PROMPT, cluster=1))
    store.write("description_clusters", pl.DataFrame({
        "cluster": [1, 1, 2], "label": ["red", "red", "end"], "layer": [1, 1, 0], "polarity": ["pos", "pos", "neg"],
        "kind": ["neuron", "sae", "neuron"], "neuron": [PLANTED, LATENT, 2],
        "description": ["the colour red and red objects", "round toys like balls", "the end of a sentence"],
        "score": [0.1, 0.4, 0.1], "member_rank": [1, 2, 1]}))
    members = steerer.select(SteerRequest(PROMPT, cluster=1, chat=False))
    assert [(f.feature.kind, f.feature.index, f.source) for f in members] == [("neuron", PLANTED, "cluster"),
                                                                           ("sae", LATENT, "cluster")]
    assert members[0].value == 3.0 and members[1].description == "round toys like balls"
    with pytest.raises(LookupError, match="no cluster 7 .*cluster ids: 1-2"):
        steerer.select(SteerRequest(PROMPT, cluster=7))


@pytest.mark.parametrize("request_, error, message", [
    (dict(select="zebra xylophone", select_mode="text"), LookupError, "matches no feature.*other words"),
    (dict(select="red", layers=(0,), kind="sae"), LookupError, "matches no feature with layers 0, kind sae"),
    (dict(features=("7:1",)), ValueError, r"layer 7 is out of range: .* has 2 layers \(0-1\)"),
    (dict(features=("1:500",)), ValueError, r"neuron 500 is out of range: layer 1 has 96 neurons \(0-95\)"),
    (dict(features=("1:40",)), LookupError, "1:40:pos has no row in neuron_stats .* give its value explicitly"),
    (dict(features=("1:40",), mode="ablate", ablate_with="mean"), LookupError, "use ablate_with zero"),
    (dict(features=("0:1:sae",)), LookupError, "needs the layer's SAE checkpoint.*--select sae_checkpoint"),
    (dict(features=("1:8:sae",)), ValueError, r"latent 8 is out of range: layer 1's SAE has 8 latents"),
    (dict(features=("1:5",), prompt="word " * 2100), ValueError, "passes .* context of 2048 tokens. Shorten"),
])
def test_bad_input_names_the_problem_and_the_fix(planted, request_, error, message):
    steerer, _ = planted
    settings = {"prompt": PROMPT, "chat": False, "n_tokens": 2, **request_}
    with pytest.raises(error, match=message):
        steerer.run(SteerRequest(**settings))


def test_bad_requests_are_refused_before_any_model_loads(tmp_path):
    cases = [({"prompt": "x", "features": ["1:2"], "strength": float("nan")}, "strength must be a finite number"),
             ({"prompt": "x", "features": ["1:2"], "strenght": 2}, "unknown key.*'strenght'.*the keys are"),
             ({"prompt": "x"}, "nothing to steer"),
             ({"prompt": "  ", "features": ["1:2"]}, "the prompt is empty"),
             ({"prompt": "x", "features": ["1:2"], "mode": "boost"}, "mode must be one of set, add, ablate"),
             ({"prompt": "x", "features": ["1:2"], "n_tokens": 0}, "n_tokens must be at least 1"),
             ({"prompt": "x", "features": ["1:two"]}, "must be whole numbers"),
             ({"prompt": "x", "features": ["1:2:neg:sae"]}, "has no neg polarity"),
             ({"prompt": "x", "features": [{"layer": 1}]}, "needs layer and index"),
             ({"prompt": "x", "features": [{"layer": 1, "index": 2, "value": float("inf")}]}, "value must be a finite"),
             ({"prompt": "x", "select": "a", "top": 0}, "top must be at least 1")]
    for body, message in cases:
        with pytest.raises(ValueError, match=message):
            SteerRequest.from_dict(body)
    assert parse_feature_id("12:7:sae:pos") == FeatureId(12, 7, Polarity.POS, "sae")
    request = SteerRequest.from_dict({"prompt": "x", "features": ["3:4:neg", {"layer": 2, "index": 1, "value": 2}],
                                      "layers": "0,2-3"})
    assert request.layers == (0, 2, 3) and request.features[1].value == 2.0
    assert SteerRequest.from_dict(request.as_dict()) == request

    # A store with no descriptions, for a query.
    empty = Steerer(load_config(write_config(tmp_path, "unused")))
    with pytest.raises(LookupError, match="has no descriptions .*neuron-assets run"):
        empty.select(SteerRequest("x", select="anything"))


def test_neuronpedia_requests_map_to_additive_steering_and_answer_in_its_shape(planted):
    steerer, _ = planted
    assert source_layer("12-res-jb") == (12, "neuron") and source_layer("3-mlp-sae") == (3, "sae")
    assert source_layer(4) == (4, "neuron") and source_layer("4") == (4, "neuron")
    with pytest.raises(ValueError, match="not a Neuronpedia source id"):
        source_layer("res-12")
    body = {"prompt": PROMPT, "modelId": "tiny", "features": [{"modelId": "tiny", "layer": "1-mlp", "index": PLANTED,
                                                               "strength": 10}],
            "temperature": 0, "n_tokens": 2, "freq_penalty": 0, "seed": 16, "strength_multiplier": 3,
            "steer_method": "SIMPLE_ADDITIVE", "n_logprobs": 2}
    request = neuronpedia_request(body)
    assert request.mode == "add" and request.strength == 3.0 and request.tokens == "both" and not request.chat
    assert request.features == (SteerFeature(FeatureId(1, PLANTED, Polarity.POS), 1.0, 10.0),)
    result = steerer.run(request)
    assert result.features[0].value == 30.0
    answer = neuronpedia_response(result)
    assert set(answer) == {"STEERED", "DEFAULT", "steeredLogProbs", "defaultLogProbs", "id", "shareUrl", "limit"}
    assert answer["STEERED"].startswith(PROMPT) and answer["DEFAULT"] == PROMPT + result.baseline.text
    assert result.steered.token_ids == (TARGET, TARGET)
    first = answer["steeredLogProbs"][0]
    assert first["token"] == steerer.subject.tokenizer.decode([TARGET]) and len(first["topLogprobs"]) == 2
    json.dumps(answer)
    assert neuronpedia_request({**body, "steer_method": "ORTHOGONAL_DECOMP"}).mode == "set"
    for bad, message in [({"normalize_steering": True}, "normalize_steering is not supported"),
                         ({"foo": 1}, "unknown key"), ({"features": []}, "non-empty list"),
                         ({"steer_method": "X"}, "steer_method must be one of")]:
        with pytest.raises(ValueError, match=message):
            neuronpedia_request({**body, **bad})


def test_the_steer_command_prints_both_texts_and_the_features(planted, capsys, monkeypatch):
    _, config_path = planted
    argv = ["--config", config_path, "steer", PROMPT, "--feature", f"1:{PLANTED}", "--strength", "10", "--tokens", "3",
            "--no-chat", "--torch-threads", str(torch.get_num_threads())]
    assert main([*argv, "--format", "json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert set(answer) == {"prompt", "baseline", "steered", "features", "settings"}
    assert answer["steered"]["token_ids"] == [TARGET] * 3 and answer["features"][0]["value"] == 30.0
    assert set(answer["features"][0]) >= {"layer", "index", "polarity", "kind", "value", "description", "score"}

    monkeypatch.setenv("COLUMNS", "150")
    assert main(argv) == 0
    shown = capsys.readouterr().out
    assert "BASELINE" in shown and " | STEERED" in shown and "the colour red and red objects" in shown
    monkeypatch.setenv("COLUMNS", "60")
    assert main([*argv, "--select", "cats dogs", "--text", "--top", "1", "--layers", "1"]) == 0
    shown = capsys.readouterr().out
    assert "\nSTEERED\n" in shown and "2 feature(s) set, strength 10" in shown and "animals such as cats" in shown

    assert main([*argv[:3], "a prompt", "--feature", "1:5", "--strength", "nan"]) == 1
    assert "strength must be a finite number" in capsys.readouterr().err


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The embedded SmolLM2 with a store describing a few layer-12 neurons (planted rows)."""
    folder = tmp_path_factory.mktemp("steer-smollm2")
    config_path = write_config(folder, "builtin:SmolLM2-135M-Instruct")
    write_tables(folder / "home", 12, "pos", [("neuron", n, 6.0, f"punctuation and brackets {n}") for n in range(8)]
                 + [("neuron", 100 + n, 6.0, f"the weather and the seasons {n}") for n in range(8)],
                 embed_with=hashed_words)
    return Steerer(load_config(config_path), encoder=hashed_words)


def test_smollm2_steered_by_selected_features_changes_is_seeded_and_strength_0_is_the_baseline(smollm2):
    request = dict(prompt="My favourite season is", select="the weather and the seasons", top=8, chat=False,
                   n_tokens=6, strength=4.0)
    steered = smollm2.run(SteerRequest(**request))
    assert sorted(f.feature.index for f in steered.features) == list(range(100, 108))
    assert steered.steered.token_ids != steered.baseline.token_ids and steered.steered.text != steered.baseline.text
    assert steered.settings["dtype"] == "float32" and not steered.settings["chat"]

    off = smollm2.run(SteerRequest(**{**request, "strength": 0.0}))
    assert off.steered == off.baseline and not any(f.active for f in off.features)

    sampled = SteerRequest(**{**request, "temperature": 1.0, "seed": 3})
    first = smollm2.run(sampled)
    smollm2.forget_baselines()  # the baseline generated again, not taken from the kept ones
    again = smollm2.run(sampled)
    assert again.baseline == first.baseline and again.steered == first.steered
    assert first.baseline.token_ids != steered.baseline.token_ids, "sampled, not greedy"


def test_ablating_the_planted_neuron_changes_the_loss_and_an_unwired_one_does_not(planted, tiny_tokenizer):
    from neuron_assets.steer.effects import ablation_effects
    from neuron_assets.steer.select import SelectedFeature
    from neuron_assets.types import ActivationRecord

    steerer, _ = planted
    texts = ["the cat sees a red ball", "a dog finds the green door quickly"]
    records = [ActivationRecord(i, (), tuple(tiny_tokenizer(t)["input_ids"]), np.zeros(1), prefix_len=1)
               for i, t in enumerate(texts)]

    def ablated(*indices: int, batch_rows: int = 16):
        features = [SelectedFeature(FeatureId(1, index, Polarity.POS), 0.0, 1.0, None, "zero") for index in indices]
        return ablation_effects(steerer.subject, features, [records] * len(features), steerer.sae_for, batch_rows)

    # Intact, the planted neuron makes TARGET follow " the" (not " green"); ablated, it does not.
    [(delta, kl, tokens)] = ablated(PLANTED)
    assert tokens == sum(len(r.token_ids) - 2 for r in records) and kl > 0.1 and delta < -0.1
    assert ablated(UNWIRED) == [(0.0, 0.0, tokens)]
    # In one batch each row is ablated by its own feature: the same as apart, in any batching.
    for batch_rows in (1, 3, 16):
        together = ablated(PLANTED, UNWIRED, batch_rows=batch_rows)
        assert together[0] == pytest.approx((delta, kl, tokens), rel=1e-4, abs=1e-6)
        assert together[1] == pytest.approx((0.0, 0.0, tokens), abs=1e-6)


def test_description_effects_are_an_asset_of_a_described_tiny_run(described_run, tmp_path):
    """`run --select description_effects` on a copy of a finished tiny run: one row per selected description."""
    raw = yaml.safe_load(open(described_run))
    shutil.copytree(raw["storage"]["root"], tmp_path / "home")
    raw["storage"]["root"] = str(tmp_path / "home")
    raw["effects"] = {"exemplars": 2, "prompts": ["the cat", "a dog"], "n_tokens": 3, "batch_size": 3}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(path), "run", "--select", "description_effects"]) == 0
    store = Store(tmp_path / "home")
    for layer, polarity in store.partitions("neuron_descriptions"):
        frame = store.read("description_effects", layer, polarity)
        assert frame.height == store.read("neuron_descriptions", layer, polarity).height > 0
        assert frame["ablation_tokens"].min() > 0 and frame["ablation_kl"].min() >= 0
        assert frame["agreement"].is_not_null().all() and frame["changed_share"].is_between(0, 1).all()
    assert set(frame.columns) >= {"kind", "neuron", "ablation_loss_delta", "agreement", "control_agreement",
                                  "output_token_similarity", "output_token_overlap", "model", "run_id"}
    assert main(["--config", str(path), "sql", "select count(*) as n from description_effects", "--format", "json"]) == 0


def test_the_plan_counts_the_effects_stage_when_it_is_in_the_run(tmp_path, capsys):
    from neuron_assets.config import REPO_ROOT

    raw = yaml.safe_load((REPO_ROOT / "configs/llama31_8b_instruct.yaml").read_text())
    path = tmp_path / "llama.yaml"
    for in_run in (False, True):
        raw["effects"] = {"in_run": in_run, "exemplars": 5, "prompts": ["a", "b", "c", "d"], "n_tokens": 16,
                          "batch_size": 8}
        path.write_text(yaml.safe_dump(raw))
        assert main(["--config", str(path), "plan", "--format", "json", "--shape",
                     str(REPO_ROOT / "configs/llama31_8b_instruct.shape.json")]) == 0
        stages = {s["stage"]: s for s in json.loads(capsys.readouterr().out)["stages"]}
        assert ("description_effects" in stages) is in_run
    effects = stages["description_effects"]
    # 458,752 neurons x 2 polarities: 10 exemplar passes each, and 4 x 16 steps per batch of 8
    assert "917,504 features" in effects["note"] and "18.0 passes a feature" in effects["note"]
    assert 10 < effects["device_hours"] < 1000 and effects["peak_device_bytes"] < 80e9
