"""Training the fine-tuned simulator: the data plan, learning a planted task, resuming."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import polars as pl
import pytest
import torch

from neuron_assets.config import FinetunedSimulatorConfig, SimulatorTrainingConfig
from neuron_assets.simulate.base import discretize
from neuron_assets.simulate.finetuned import FinetunedSimulator
from neuron_assets.simulate.folds import feature_key, fold_of
from neuron_assets.simulate.training import (
    HELDOUT,
    RERANK,
    STAGE1,
    STAGE2,
    features_of,
    plan_training_data,
    seen_features,
    train_simulator,
)
from neuron_assets.types import Sample, FeatureId, Polarity
from tests.support.planted import planted_candidates, planted_corpus, planted_feature, planted_words


@pytest.fixture(scope="module")
def planted():
    corpus = planted_corpus(per_split=120)
    words = planted_words(corpus)
    features = [planted_feature(corpus, w, i) for i, w in enumerate(words)]
    candidates = {f.feature: planted_candidates(w) for f, w in zip(features, words)}
    return features, candidates


def one_fold(frame: pl.DataFrame, fold: int = 0) -> pl.DataFrame:
    return frame.filter(pl.col("fold") == fold)


def test_training_data_plan(planted):
    features, candidates = planted
    config = SimulatorTrainingConfig(stage1_features=20, stage2_features=10, heldout_features=5, exemplars_per_feature=6)
    whole = plan_training_data(features, candidates, config)
    assert sorted(whole["fold"].unique()) == [0, 1]
    frame = one_fold(whole)
    per_role = frame.group_by("role").agg(pl.col("neuron").n_unique()).sort("role")
    assert dict(per_role.iter_rows()) == {HELDOUT: 5, STAGE1: 20, STAGE2: 10, RERANK: 10}
    trained_roles = frame.filter(pl.col("role") != RERANK)
    assert trained_roles.group_by("neuron").agg(pl.col("role").n_unique())["role"].max() == 1  # disjoint samples
    assert frame.filter(pl.col("role") == STAGE2)["description"].null_count() == frame.filter(pl.col("role") == STAGE2).height
    by_index = {f.feature.index: f for f in features}
    for row in frame.filter(pl.col("role") == STAGE1).head(12).iter_rows(named=True):
        feature = by_index[row["neuron"]]
        assert row["description"] in candidates[feature.feature]
        values = np.asarray(row["activations"], dtype=np.float32)
        assert row["labels"][0] == 0  # the prefix (activation 3.0 there) is never a label
        np.testing.assert_array_equal(np.asarray(row["labels"][1:]), discretize(values, feature.stats.max)[1:])
    kinds = frame.filter(pl.col("role") == STAGE1).group_by("neuron").agg(pl.col("sample").unique())
    assert all(Sample.TOP.value in k and len(k) > 1 for k in kinds["sample"])  # top and quiet ones
    # stage 2 re-ranks on val exemplars, and trains on train ones
    val_ids = {e.record.seq_id for f in features for e in f.exemplars if e.split.value == "val"}
    assert set(frame.filter(pl.col("role") == RERANK)["seq_id"]) <= val_ids
    assert not set(frame.filter(pl.col("role") == STAGE2)["seq_id"]) & val_ids
    heldout = features_of(frame, HELDOUT)
    assert all(f.control_description and f.control_description not in candidates[f.feature] for f in heldout)
    assert plan_training_data(features, candidates, config).equals(whole)  # seeded


def test_every_fold_trains_only_on_other_folds_and_holds_out_its_own(planted):
    features, candidates = planted
    config = SimulatorTrainingConfig(folds=3, stage1_features=20, stage2_features=10, heldout_features=5,
                                     exemplars_per_feature=2)
    frame = plan_training_data(features, candidates, config)
    assert sorted(frame["fold"].unique()) == [0, 1, 2]
    for row in frame.select("fold", "role", "layer", "neuron", "polarity").unique().iter_rows(named=True):
        own = fold_of(FeatureId(row["layer"], row["neuron"], Polarity(row["polarity"])), 3)
        assert (own == row["fold"]) == (row["role"] == HELDOUT), row
    seen = seen_features(frame)
    every = {feature_key(f.feature) for f in features}
    assert all(seen[fold] and seen[fold] <= every for fold in range(3))
    # the fold of a feature is a stable hash, not Python's salted hash()
    assert fold_of(FeatureId(3, 17, Polarity.NEG), 2) == int(hashlib.sha256(b"3/17/neg").hexdigest()[:16], 16) % 2


def test_a_planted_leak_fails_the_check(planted):
    """Provenance is read from what each fold trained on: move one trained feature's rows into
    the fold that scores it and its scores are flagged, and the asset check fails."""
    from neuron_assets.defs.score_assets import never_saw_check
    from neuron_assets.score.crossfit import Scoring, leaked_rows, with_provenance
    from neuron_assets.simulate.checkpoints import FoldCheckpoint

    features, candidates = planted
    config = SimulatorTrainingConfig(stage1_features=20, stage2_features=4, heldout_features=4, exemplars_per_feature=2)
    frame = plan_training_data(features, candidates, config)

    def scoring_from(training_rows: pl.DataFrame) -> Scoring:
        seen = seen_features(training_rows)
        folds = {f: FoldCheckpoint(f, f"v{f}", tmp, seen[f]) for f, tmp in ((0, "a"), (1, "b"))}
        return Scoring([], {}, "v0+v1", folds)

    scored = pl.DataFrame([{"layer": f.feature.layer, "polarity": f.feature.polarity.value, "neuron": f.feature.index,
                            "simulator": simulator} for f in features for simulator in ("finetuned", "lexical")])
    clean = with_provenance(scored, scoring_from(frame))
    assert leaked_rows(clean) == 0 and clean["simulator_saw_feature"].null_count() == 0
    assert never_saw_check(clean).passed
    finetuned = clean.filter(pl.col("simulator") == "finetuned")
    assert all(v == f"v{fold_of(FeatureId(l, n, Polarity(p)), 2)}"
               for l, p, n, v in finetuned.select("layer", "polarity", "neuron", "simulator_version").iter_rows())
    assert clean.filter(pl.col("simulator") == "lexical")["simulator_version"].null_count() == len(features)
    # plant the leak: fold 1 also trains on a stage-1 feature of fold 1 (which it scores)
    victim = frame.filter((pl.col("fold") == 0) & (pl.col("role") == STAGE1)).row(0, named=True)
    assert fold_of(FeatureId(victim["layer"], victim["neuron"], Polarity(victim["polarity"])), 2) == 1
    leaky = pl.concat([frame, frame.filter((pl.col("fold") == 0) & (pl.col("neuron") == victim["neuron"])
                                           & (pl.col("polarity") == victim["polarity"])
                                           & (pl.col("layer") == victim["layer"])).with_columns(fold=pl.lit(1, pl.Int64))])
    dirty = with_provenance(scored, scoring_from(leaky))
    assert leaked_rows(dirty) == 1
    check = never_saw_check(dirty)
    assert not check.passed and check.metadata["rows_scored_by_a_simulator_that_saw_the_feature"].value == 1
    assert leaked_rows(scored) == scored.height  # no provenance column: nothing says it is clean


def test_planted_task_is_learned_far_above_the_shuffled_control(planted, tmp_path):
    """Descriptions name the word that fires; held-out features fire on words never trained on.
    One fold's simulator: it trains on the other fold's features (about half of them), so five
    epochs make about the steps three did over every feature."""
    features, candidates = planted
    training = SimulatorTrainingConfig(stage1_features=96, stage2_features=6, heldout_features=16,
                                       exemplars_per_feature=4, stage1_epochs=5, stage2_epochs=1,
                                       learning_rate=4e-4, rerank_exemplars=2)
    model = FinetunedSimulatorConfig(backbone_layers=2, max_length=128)
    frame = one_fold(plan_training_data(features, candidates, training))
    heldout_words = {f.feature.index for f in features_of(frame, HELDOUT)}
    trained_words = {f.feature.index for f in features_of(frame, STAGE1)}
    assert not heldout_words & trained_words
    logs = []
    result = train_simulator(frame, model, training, tmp_path, log=logs.append)
    stage1 = result.heldout[STAGE1]
    assert stage1.described > 0.5 and stage1.described > stage1.shuffled + 0.4, result.heldout
    final = result.heldout[STAGE2]
    assert final.described > final.shuffled + 0.3, result.heldout
    assert np.mean(result.loss_curve[STAGE1][-5:]) < 0.5 * np.mean(result.loss_curve[STAGE1][:5])
    # the checkpoint: safetensors + config + tokenizer + spec, and metadata with the loss curve
    for name in ("model.safetensors", "config.json", "tokenizer.json", "simulator.json"):
        assert (result.path / name).is_file() and (result.stage1_path / name).is_file()
    metadata = json.loads((tmp_path / result.version / "metadata.json").read_text())
    assert metadata["loss_curve"]["stage1"] == result.loss_curve[STAGE1]
    assert metadata["heldout"]["stage1"]["described"] == pytest.approx(stage1.described)
    assert not list(tmp_path.glob(".*partial*"))
    # a finished version is never trained again
    again = train_simulator(frame, model, training, tmp_path, log=logs.append)
    assert again.version == result.version and "already trained" in logs[-1]
    # the saved simulator predicts what the trained one did
    loaded = FinetunedSimulator.load(result.path)
    record = features_of(frame, HELDOUT)[0].examples[0].record
    assert loaded.simulate(["x"], [record])[0][0].shape == (len(record.tokens),)


class _Interrupt(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_weights(planted, tmp_path):
    features, candidates = planted
    training = SimulatorTrainingConfig(stage1_features=6, stage2_features=0, heldout_features=2, exemplars_per_feature=2,
                                       stage1_epochs=3, batch_size=4, save_every_steps=3)
    model = FinetunedSimulatorConfig(backbone_layers=1, max_length=96)
    frame = one_fold(plan_training_data(features[:12], {f.feature: candidates[f.feature] for f in features[:12]}, training))

    def interrupt_after_step_5(line: str):
        if line.startswith("step 5/"):
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train_simulator(frame, model, training, tmp_path / "a", log=interrupt_after_step_5)
    assert list((tmp_path / "a").glob(".*.partial/.resume-stage1.pt"))
    logs = []
    resumed = train_simulator(frame, model, training, tmp_path / "a", log=logs.append)
    assert any(line.startswith("resuming at step 3/9") for line in logs) and resumed.resumed
    straight = train_simulator(frame, model, training, tmp_path / "b", log=lambda _: None)
    assert resumed.loss_curve[STAGE1] == pytest.approx(straight.loss_curve[STAGE1], abs=1e-6)
    a = FinetunedSimulator.load(resumed.path).model.state_dict()
    b = FinetunedSimulator.load(straight.path).model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_stage1_folder_without_its_completion_marker_is_retrained_not_a_crash(planted, tmp_path):
    """A crash between saving stage1/ and writing stage1.json leaves a folder that is not done."""
    from neuron_assets.simulate.training import training_version

    features, candidates = planted
    training = SimulatorTrainingConfig(stage1_features=4, stage2_features=0, heldout_features=2,
                                       exemplars_per_feature=2, stage1_epochs=1, batch_size=4)
    model = FinetunedSimulatorConfig(backbone_layers=1, max_length=96)
    frame = one_fold(plan_training_data(features[:10], {f.feature: candidates[f.feature] for f in features[:10]}, training))
    stage1 = tmp_path / f".{training_version(frame, model, training, ())}.partial" / "stage1"
    stage1.mkdir(parents=True)
    (stage1 / "simulator.json").write_text("{}")  # complete-looking, but no stage1.json beside it
    logs = []
    result = train_simulator(frame, model, training, tmp_path, log=logs.append)
    assert not any("already trained" in line for line in logs) and result.steps[STAGE1] > 0
    assert (result.stage1_path / "model.safetensors").is_file()
