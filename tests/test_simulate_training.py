"""Training the fine-tuned simulator: the data plan, learning a planted task, resuming."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from neuron_assets.config import FinetunedSimulatorConfig, SimulatorTrainingConfig
from neuron_assets.simulate.base import discretize
from neuron_assets.simulate.finetuned import FinetunedSimulator
from neuron_assets.simulate.training import (
    HELDOUT,
    STAGE1,
    STAGE2,
    features_of,
    plan_training_data,
    train_simulator,
)
from neuron_assets.types import ExemplarKind
from tests.support.planted import planted_candidates, planted_corpus, planted_feature, planted_words


@pytest.fixture(scope="module")
def planted():
    corpus = planted_corpus(per_split=120)
    words = planted_words(corpus)
    features = [planted_feature(corpus, w, i) for i, w in enumerate(words)]
    candidates = {f.feature: planted_candidates(w) for f, w in zip(features, words)}
    return features, candidates


def test_training_data_plan(planted):
    features, candidates = planted
    config = SimulatorTrainingConfig(stage1_features=20, stage2_features=10, heldout_features=5, exemplars_per_feature=6)
    frame = plan_training_data(features, candidates, config)
    per_role = frame.group_by("role").agg(pl.col("neuron").n_unique()).sort("role")
    assert dict(per_role.iter_rows()) == {HELDOUT: 5, STAGE1: 20, STAGE2: 10}
    assert frame.group_by("neuron").agg(pl.col("role").n_unique())["role"].max() == 1  # disjoint samples
    assert frame.filter(pl.col("role") == STAGE2)["description"].null_count() == frame.filter(pl.col("role") == STAGE2).height
    by_index = {f.feature.index: f for f in features}
    for row in frame.filter(pl.col("role") == STAGE1).head(12).iter_rows(named=True):
        feature = by_index[row["neuron"]]
        assert row["description"] in candidates[feature.feature]
        values = np.asarray(row["activations"], dtype=np.float32)
        assert row["labels"][0] == 0  # the prefix (activation 3.0 there) is never a label
        np.testing.assert_array_equal(np.asarray(row["labels"][1:]), discretize(values, feature.stats.max)[1:])
    kinds = frame.filter(pl.col("role") == STAGE1).group_by("neuron").agg(pl.col("exemplar_kind").unique())
    assert all(ExemplarKind.TOP.value in k and len(k) > 1 for k in kinds["exemplar_kind"])  # top and quiet ones
    heldout = features_of(frame, HELDOUT)
    assert all(f.control_description and f.control_description not in candidates[f.feature] for f in heldout)
    assert plan_training_data(features, candidates, config).equals(frame)  # seeded


def test_planted_task_is_learned_far_above_the_shuffled_control(planted, tmp_path):
    """Descriptions name the word that fires; held-out features fire on words never trained on."""
    features, candidates = planted
    training = SimulatorTrainingConfig(stage1_features=96, stage2_features=6, heldout_features=16,
                                       exemplars_per_feature=4, stage1_epochs=3, stage2_epochs=1,
                                       learning_rate=4e-4, rerank_exemplars=2)
    model = FinetunedSimulatorConfig(backbone_layers=2, max_length=128)
    frame = plan_training_data(features, candidates, training)
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
    frame = plan_training_data(features[:8], {f.feature: candidates[f.feature] for f in features[:8]}, training)

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
    frame = plan_training_data(features[:6], {f.feature: candidates[f.feature] for f in features[:6]}, training)
    stage1 = tmp_path / f".{training_version(frame, model, training, ())}.partial" / "stage1"
    stage1.mkdir(parents=True)
    (stage1 / "simulator.json").write_text("{}")  # complete-looking, but no stage1.json beside it
    logs = []
    result = train_simulator(frame, model, training, tmp_path, log=logs.append)
    assert not any("already trained" in line for line in logs) and result.steps[STAGE1] > 0
    assert (result.stage1_path / "model.safetensors").is_file()
