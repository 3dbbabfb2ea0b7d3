"""The distilled explainer (issue 11 part 3) on a tiny random Llama, from a finished tiny
run's best descriptions: the loss goes down, train and held-out features are disjoint, the
checkpoint reloads to the trained weights, the transformers explainer generates from it by
path, a stopped training resumes to the same weights, and the evaluation has base and
distilled rows for every k."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from neuron_assets.cli import main
from neuron_assets.config import load_config
from neuron_assets.distill import (
    DISTILL_INFO,
    DistillError,
    answer_loss,
    best_descriptions,
    build_examples,
    distill_explain_config,
    distill_explainer,
    encode_example,
    load_base_tokenizer,
    read_distilled,
    split_features,
)
from neuron_assets.simulate.folds import feature_key
from neuron_assets.stages import (
    DESCRIPTIONS_TABLE,
    DISTILL_EVAL_TABLE,
    DISTILLED_TABLE,
    EVAL_PLOT,
    make_explainer_distilled,
    read_all,
)
from neuron_assets.stages.tables import exemplars_of_features
from neuron_assets.store import Store

K = 3


def _distill_settings(tiny_llama: Path) -> dict:
    return {"base_model": str(tiny_llama), "min_train_features": 4, "heldout_fraction": 0.25, "epochs": 4,
            "batch_size": 2, "grad_accum_steps": 1, "learning_rate": 3e-3, "warmup_share": 0.0, "eval_k": K,
            "eval_max_tokens": 12, "max_length": 768, "save_every_steps": 2}


@pytest.fixture(scope="module")
def distilled_run(described_run, tiny_llama, tmp_path_factory):
    """A copy of the finished tiny run, distilled and evaluated through `neuron-assets distill`."""
    folder = tmp_path_factory.mktemp("distill")
    raw = yaml.safe_load(Path(described_run).read_text())
    shutil.copytree(raw["storage"]["root"], folder / "home")
    raw["storage"]["root"] = str(folder / "home")
    raw["distill"] = _distill_settings(tiny_llama)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(path), "distill"]) == 0
    return path


def test_distillation_learns_on_disjoint_features_and_reloads(distilled_run):
    config = load_config(distilled_run)
    store = Store(config.store_root)
    row = store.read(DISTILLED_TABLE).row(0, named=True)
    trained = read_distilled(Path(row["path"]))
    assert trained.method == "full" and trained.dtype == "float32" and trained.examples >= 4
    assert trained.loss_curve[-1] < 0.6 * trained.loss_curve[0]  # it learned the answers
    described = {feature_key(f) for f in best_descriptions(read_all(store, DESCRIPTIONS_TABLE))}
    train, heldout = set(trained.train_features), set(trained.heldout_features)
    assert train and heldout and not train & heldout and train | heldout <= described
    assert set(row["heldout_features"]) == heldout
    # the folder is a model transformers loads by path, with the trained weights in it
    from transformers import AutoModelForCausalLM

    folder = Path(row["path"])
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not list(folder.parent.glob(".*.partial")) and not (folder / ".resume.pt").exists()
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    settings = config.distill
    tokenizer = load_base_tokenizer(settings)
    examples = _examples(config, store, sorted(train))
    with torch.no_grad():
        reloaded = float(answer_loss(model, [encode_example(tokenizer, examples[0])], tokenizer.pad_token_id, "cpu"))
    assert reloaded == pytest.approx(trained.first_example_loss, abs=1e-5)


def test_the_transformers_explainer_generates_from_the_checkpoint_by_path(distilled_run):
    from neuron_assets.explain import explain_features, make_explainer

    config = load_config(distilled_run)
    store = Store(config.store_root)
    path = store.read(DISTILLED_TABLE)["path"][0]
    explain = distill_explain_config(config, backend="transformers", model=path).model_copy(update={"k": 1})
    explainer = make_explainer(explain)
    assert explainer.model == path
    feature = exemplars_of_features(store, list(best_descriptions(read_all(store, DESCRIPTIONS_TABLE)))[:1])
    rows = explain_features(feature, explain, explainer=explainer, progress=False)
    assert rows.height == 1 and rows["completion_tokens"][0] > 0 and rows["prompt_tokens"][0] > 0


def test_the_evaluation_compares_base_and_distilled_for_every_k(distilled_run):
    config = load_config(distilled_run)
    store = Store(config.store_root)
    curve = store.read(DISTILL_EVAL_TABLE)
    assert sorted(curve["explainer"].unique().to_list()) == ["base", "distilled"]
    for name in ("base", "distilled"):
        rows = curve.filter(pl.col("explainer") == name).sort("k")
        assert rows["k"].to_list() == list(range(1, K + 1))
        assert rows["features"].min() >= 1 and rows["mean_best_test"].is_finite().all()
        assert rows["mean_best_val"].to_list() == sorted(rows["mean_best_val"].to_list())  # the val max grows with k
    scores = store.read("distilled_explainer_eval_scores")
    heldout = set(store.read(DISTILLED_TABLE)["heldout_features"][0].to_list())
    scored = {feature_key(f) for f in _ids(scores)}
    assert scored <= heldout  # only held-out features are evaluated
    assert not scores["simulator_saw_feature"].fill_null(False).any()
    plot = Path(store.read(DISTILLED_TABLE)["path"][0]) / EVAL_PLOT
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the best-of-k picture beside the checkpoint


def test_a_stopped_distillation_resumes_to_the_same_weights(distilled_run, tmp_path):
    config = load_config(distilled_run)
    store = Store(config.store_root)
    settings = config.distill.model_copy(update={"epochs": 2})
    targets = best_descriptions(read_all(store, DESCRIPTIONS_TABLE))
    split = split_features(list(targets), settings.heldout_fraction, settings.seed)
    examples = _examples(config, store, [feature_key(f) for f in split.train])[:6]  # 3 steps an epoch

    def stop_at_3(step, total, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill_explainer(examples, settings, tmp_path / "a", split.heldout, log=lambda _: None, on_step=stop_at_3)
    assert list((tmp_path / "a").glob(".*.partial/.resume.pt"))
    resumed = distill_explainer(examples, settings, tmp_path / "a", split.heldout, log=lambda _: None)
    straight = distill_explainer(examples, settings, tmp_path / "b", split.heldout, log=lambda _: None)
    assert resumed.resumed and not straight.resumed and resumed.version == straight.version
    assert resumed.loss_curve == pytest.approx(straight.loss_curve, abs=1e-6)
    from safetensors.torch import load_file

    a, b = (load_file(r.path / "model.safetensors") for r in (resumed, straight))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    again = distill_explainer(examples, settings, tmp_path / "a", split.heldout, log=lambda _: None)
    assert again.version == resumed.version and (again.path / DISTILL_INFO).is_file()  # found, not trained again


def test_bf16_distillation_moves_through_fp32_master_weights(distilled_run, tmp_path):
    config = load_config(distilled_run)
    store = Store(config.store_root)
    settings = config.distill.model_copy(update={"epochs": 3, "dtype": "bfloat16", "learning_rate": 1e-5})
    targets = best_descriptions(read_all(store, DESCRIPTIONS_TABLE))
    split = split_features(list(targets), settings.heldout_fraction, settings.seed)
    examples = _examples(config, store, [feature_key(f) for f in split.train])[:8]
    trained = distill_explainer(examples, settings, tmp_path, split.heldout, log=lambda _: None)
    from safetensors.torch import load_file

    weights = load_file(trained.path / "model.safetensors")
    base = load_file(Path(settings.base_model) / "model.safetensors")
    assert trained.dtype == "bfloat16" and all(w.dtype == torch.bfloat16 for w in weights.values())
    moved = [float((weights[k].float() != base[k].to(torch.bfloat16).float()).float().mean()) for k in weights]
    assert np.mean(moved) > 0.2  # a plain bf16 step at 1e-5 would leave almost every weight where it was


def test_clear_errors_name_the_fix(distilled_run, tmp_path):
    config = load_config(distilled_run)
    with pytest.raises(DistillError, match="at least 500 training features .* this store has"):
        make_explainer_distilled(_with(config, min_train_features=500), "run")
    with pytest.raises(DistillError, match="no held-out feature"):
        make_explainer_distilled(_with(config, heldout_fraction=1e-12, min_train_features=1), "run")
    with pytest.raises(DistillError, match="cannot load distill.base_model .*allow_download"):
        make_explainer_distilled(_with(config, base_model=str(tmp_path / "no-model")), "run")
    empty = config.model_copy(update={"storage": config.storage.model_copy(update={"root": str(tmp_path / "empty")})})
    with pytest.raises(Exception, match="neuron_descriptions"):
        make_explainer_distilled(empty, "run")


def test_a_plain_run_leaves_the_distilled_explainer_out(distilled_run):
    from neuron_assets.stages.graph import in_plain_run

    config = load_config(distilled_run)
    assert not in_plain_run("explainer_distilled", config) and not in_plain_run("distilled_explainer_eval", config)
    assert in_plain_run("neuron_descriptions", config)
    on = config.model_copy(update={"distill": config.distill.model_copy(update={"in_run": True})})
    assert in_plain_run("explainer_distilled", on)


# -- helpers -------------------------------------------------------------------------------------


def _with(config, **distill):
    return config.model_copy(update={"distill": config.distill.model_copy(update=distill)})


def _examples(config, store, keys):
    from neuron_assets.excerpts import TokenDisplay
    from neuron_assets.llm.tokens import ChatTokenCounter
    from neuron_assets.subject import load_tokenizer

    targets = best_descriptions(read_all(store, DESCRIPTIONS_TABLE))
    chosen = [f for f in targets if feature_key(f) in set(keys)]
    tokenizer = load_base_tokenizer(config.distill)
    return build_examples(exemplars_of_features(store, sorted(chosen, key=feature_key)), targets, distill_explain_config(config),
                          config.distill.prompts_per_feature, ChatTokenCounter(tokenizer),
                          TokenDisplay.for_tokenizer(load_tokenizer(config.subject)), config.distill.seed)


def _ids(scores: pl.DataFrame):
    from neuron_assets.types import FeatureId, Polarity

    return {FeatureId(r["layer"], r["neuron"], Polarity(r["polarity"]), r["kind"])
            for r in scores.select("layer", "neuron", "polarity", "kind").unique().iter_rows(named=True)}
