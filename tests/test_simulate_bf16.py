"""Training a simulator whose backbone is loaded in bfloat16 (the GPU path at 8B), and LoRA.

A plain optimizer step on bf16 weights at Transluce's learning rate (1e-5) rounds most updates
away; fit() trains through fp32 master weights, so the same model moves and learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuron_assets.config import FinetunedSimulatorConfig, SimulatorTrainingConfig
from neuron_assets.finetune import MasterWeights, TrainingSettings
from neuron_assets.simulate.finetuned import FinetunedSimulator
from neuron_assets.simulate.training import (
    HELDOUT,
    STAGE1,
    STAGE2,
    TrainingExample,
    features_of,
    fit,
    plan_training_data,
    train_simulator,
)
from tests.support.planted import planted_candidates, planted_corpus, planted_feature, planted_words


@pytest.fixture(scope="module")
def planted():
    corpus = planted_corpus(per_split=40)
    words = planted_words(corpus)[:24]
    features = [planted_feature(corpus, w, i) for i, w in enumerate(words)]
    return features, {f.feature: planted_candidates(w) for f, w in zip(features, words)}


def _bf16_simulator() -> FinetunedSimulator:
    return FinetunedSimulator.from_backbone("builtin:all-MiniLM-L6-v2", backbone_layers=1, max_length=64,
                                            device="cpu", dtype="bfloat16", seed=0)


def _examples(planted, n=16) -> list[TrainingExample]:
    features, candidates = planted
    frame = plan_training_data(features, candidates, SimulatorTrainingConfig(
        stage1_features=12, stage2_features=0, heldout_features=2, exemplars_per_feature=2))
    rows = features_of(frame.filter(frame["fold"] == 0), STAGE1)
    return [e for f in rows for e in f.examples][:n]


def _body(model) -> dict[str, torch.Tensor]:
    """The transformer layers' weight matrices (not embeddings, whose rows only move where
    their tokens occur, nor the new head), as they are now."""
    return {n: p.detach().float().clone() for n, p in model.named_parameters()
            if p.requires_grad and "encoder" in n and p.ndim == 2}


def _changed_share(before: dict, model) -> float:
    now = dict(model.named_parameters())
    changed = sum(int((now[n].detach().float() != w).sum()) for n, w in before.items())
    return changed / sum(w.numel() for w in before.values())


def test_a_naive_bf16_adamw_step_at_1e_5_leaves_most_weights_unchanged(planted):
    """Why master weights: the update is below bf16's rounding step for most weights."""
    simulator = _bf16_simulator()
    model = simulator.model.train()
    before = _body(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    examples = _examples(planted, 8)
    input_ids, mask = simulator.collate([simulator.encoder.encode(e.description, e.record) for e in examples])
    for _ in range(3):
        logits = simulator.class_logits(input_ids, mask)
        loss = logits.float().logsumexp(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert _changed_share(before, model) < 0.1  # measured: 6% even after 12 such steps


def test_a_bf16_backbone_moves_and_learns_at_1e_5_through_master_weights(planted):
    simulator = _bf16_simulator()
    assert next(simulator.model.parameters()).dtype == torch.bfloat16
    before = _body(simulator.model)
    examples = _examples(planted, 8)
    settings = TrainingSettings(epochs=12, batch_size=4, learning_rate=1e-5, warmup_share=0.0, grad_accum_steps=2)
    losses = fit(simulator, examples, settings, active_weight=5.0, log=lambda _: None)
    assert len(losses) == 12  # 2 micro-batches of 4 per step: one step per epoch
    assert next(simulator.model.parameters()).dtype == torch.bfloat16  # the model stays bf16
    # updates accumulate in fp32 until they show in bf16 (measured 22% after 12 steps, 6% naive)
    assert _changed_share(before, simulator.model) > 0.15
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.01, losses


def test_master_weights_are_off_for_fp32_weights():
    weight = torch.nn.Parameter(torch.ones(3))
    masters = MasterWeights([weight])
    assert not masters.active and masters.params[0] is weight and masters.state() is None


def test_lora_trains_saves_merged_reloads_and_scores(planted, tmp_path):
    features, candidates = planted
    training = SimulatorTrainingConfig(method="lora", lora_rank=4, lora_alpha=8, stage1_features=10, stage2_features=2,
                                       heldout_features=3, exemplars_per_feature=2, stage1_epochs=2, stage2_epochs=1,
                                       batch_size=4, learning_rate=2e-3, gradient_checkpointing=True)
    model = FinetunedSimulatorConfig(backbone_layers=1, max_length=64, device="cpu")
    frame = plan_training_data(features, candidates, training)
    frame = frame.filter(frame["fold"] == 0)
    logs = []
    result = train_simulator(frame, model, training, tmp_path, log=logs.append)
    lora_lines = [line for line in logs if line.startswith("LoRA rank 4")]
    assert len(lora_lines) == 2  # fresh adapters for each stage
    assert result.steps[STAGE1] > 0 and result.steps[STAGE2] > 0
    assert result.loss_curve[STAGE1][-1] < result.loss_curve[STAGE1][0]
    # the saved folder is a plain model (adapters merged) that loads and scores like any other
    assert not (result.path / "adapter_config.json").exists()
    loaded = FinetunedSimulator.load(result.path, device="cpu")
    untrained = FinetunedSimulator.from_backbone("builtin:all-MiniLM-L6-v2", backbone_layers=1, max_length=64,
                                                 device="cpu", seed=training.seed)
    trained_weights = dict(loaded.model.named_parameters())
    moved = [n for n, p in untrained.model.named_parameters()
             if "query" in n and n in trained_weights and not torch.equal(p, trained_weights[n])]
    assert moved  # the merged adapters changed the attention weights
    record = features_of(frame, HELDOUT)[0].examples[0].record
    values = loaded.simulate(["a", "b"], [record])
    assert values[0][0].shape == (len(record.tokens),) and np.isfinite(values[0][0]).all()
