"""Sparse autoencoders over a neuron site: recovery of known generators, exact resume, the
reconstruction score's ends, the sparsify / SAELens layouts, the corpus stream and the asset."""

from __future__ import annotations

import json
import typing

import dagster as dg
import numpy as np
import polars as pl
import pytest
import torch

from neuron_assets.config import SaeConfig, load_config
from neuron_assets.features.sae import (
    L1,
    SPARSITY_RULES,
    SaeError,
    SparseAutoencoder,
    TensorStream,
    TopK,
    TrainSettings,
    evaluate_sae,
    load_sae,
    log_frequency_histogram,
    reconstruction_score,
    save_sae,
    train_sae,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared machine run many times faster on one thread than on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic(n=4096, d=16, generators=24, active=2, seed=0):
    """Activations that are sums of ``active`` of ``generators`` unit directions."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(generators, d, generator=gen)
    directions /= directions.norm(dim=1, keepdim=True)
    chosen = torch.rand(n, generators, generator=gen).argsort(1)[:, :active]
    coefficients = torch.zeros(n, generators).scatter_(1, chosen, torch.rand(n, active, generator=gen) + 0.5)
    return coefficients @ directions, directions


def test_topk_sae_recovers_sparse_generators():
    x, directions = synthetic()
    settings = TrainSettings(kind="topk", k=2, expansion=2, steps=200, learning_rate=3e-3, resample_dead_after=100)
    trained = train_sae(TensorStream(x, 128), settings)
    cosine = (directions @ trained.sae.W_dec.detach().T).max(1).values
    assert float((cosine > 0.9).float().mean()) >= 0.9, cosine
    metrics = evaluate_sae(trained.sae, [x[:1024]])
    assert metrics.l0 <= 2 and metrics.fvu < 0.1
    assert torch.allclose(trained.sae.W_dec.norm(dim=1), torch.ones(trained.sae.d_latent), atol=1e-5)


def test_killed_run_resumes_to_the_same_sae(tmp_path):
    x, _ = synthetic(n=2048, seed=1)
    settings = TrainSettings(kind="topk", k=2, expansion=4, steps=60, checkpoint_every=20, resample_dead_after=5)
    whole = train_sae(TensorStream(x, 64), settings)
    folder = tmp_path / "ckpt"
    train_sae(TensorStream(x, 64), settings, checkpoint=folder, stop_after=33)  # killed after the step-20 checkpoint
    assert json.loads((folder / "state.json").read_text())["step"] == 20
    resumed = train_sae(TensorStream(x, 64), settings, checkpoint=folder)
    assert resumed.resumed_from == 20 and whole.resampled > 0
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(whole.sae, name), getattr(resumed.sae, name)), name
    assert resumed.losses == whole.losses


def test_damaged_checkpoint_is_set_aside(tmp_path):
    x, _ = synthetic(n=512)
    settings = TrainSettings(steps=4, checkpoint_every=2, expansion=1, k=2)
    folder = tmp_path / "ckpt"
    train_sae(TensorStream(x, 64), settings, checkpoint=folder)
    (folder / "state.safetensors").write_bytes(b"truncated")
    notes = []
    again = train_sae(TensorStream(x, 64), settings, checkpoint=folder, log=notes.append)
    assert again.resumed_from == 0 and (folder / "state.safetensors.damaged").exists()
    assert any("damaged" in note for note in notes)


def test_l1_sae_trains_sparse():
    x, directions = synthetic(seed=2)
    trained = train_sae(TensorStream(x, 128), TrainSettings(kind="l1", l1_coefficient=2.0, expansion=2, steps=500,
                                                            learning_rate=3e-3, resample_dead_after=100))
    metrics = evaluate_sae(trained.sae, [x[:1024]])
    assert metrics.l0 < 6 and metrics.fvu < 0.4  # L1 shrinks what it keeps
    assert float(((directions @ trained.sae.W_dec.detach().T).max(1).values > 0.9).float().mean()) >= 0.8


def test_config_kinds_are_the_registry():
    assert set(typing.get_args(SaeConfig.model_fields["kind"].annotation)) == set(SPARSITY_RULES)
    with pytest.raises(SaeError, match="exceeds"):
        train_sae(TensorStream(torch.randn(64, 4), 8), TrainSettings(k=40, expansion=2, steps=1))


def identity_sae(d: int) -> SparseAutoencoder:
    """relu(x) - relu(-x) = x: 2d ReLU latents reconstruct any input exactly."""
    sae = SparseAutoencoder(d, 2 * d, L1(1.0))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae


def test_reconstruction_score_is_one_for_identity_and_zero_for_zero(tiny_llama):
    from transformers import AutoModelForCausalLM

    from neuron_assets.subject import find_sites

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    site = find_sites(model)[1]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (4, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[3, 9:] = 0  # one padded sequence
    counted = mask.bool().clone()
    counted[:, :2] = False  # a two-token prefix
    batches = [(ids, mask, counted)]
    width = site.in_features
    identity = reconstruction_score(model, site, identity_sae(width), batches)
    zero = reconstruction_score(model, site, SparseAutoencoder(width, width, TopK(4)), batches)
    assert identity.zero_ablation_loss != pytest.approx(identity.clean_loss, abs=1e-4)
    assert identity.score == pytest.approx(1.0, abs=1e-4)
    assert zero.score == pytest.approx(0.0, abs=1e-6)


def _random_sae(d=8, latents=16, k=3, seed=0) -> SparseAutoencoder:
    gen = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(d, latents, TopK(k))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return sae


def test_sparsify_and_saelens_layouts_load(tmp_path):
    from safetensors.torch import save_file

    sae = _random_sae()
    x = torch.randn(32, 8)
    expected = sae(x)
    sparsify = tmp_path / "sparsify" / "layers.3.mlp"
    sparsify.mkdir(parents=True)
    (tmp_path / "sparsify" / "layers.13.mlp").mkdir()  # another layer's folder, without an SAE
    (sparsify / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 2, "normalize_decoder": True,
                                                   "num_latents": 16, "k": 3, "d_in": 8}))
    save_file({"encoder.weight": sae.W_enc.detach().T.contiguous(), "encoder.bias": sae.b_enc.detach(),
               "W_dec": sae.W_dec.detach(), "b_dec": sae.b_dec.detach()}, str(sparsify / "sae.safetensors"))
    loaded = load_sae(tmp_path / "sparsify", "sparsify", layer=3)
    assert torch.allclose(loaded(x), expected, atol=1e-5)

    saelens = tmp_path / "saelens" / "blocks.3.hook_mlp_out"
    saelens.mkdir(parents=True)
    (saelens / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 8, "d_sae": 16,
                                                  "activation_fn_kwargs": {"k": 3}, "apply_b_dec_to_input": True,
                                                  "normalize_activations": "none"}))
    save_file({name: getattr(sae, name).detach().contiguous() for name in ("W_enc", "b_enc", "W_dec", "b_dec")},
              str(saelens / "sae_weights.safetensors"))
    assert torch.allclose(load_sae(tmp_path / "saelens", "saelens", layer=3)(x), expected, atol=1e-5)

    native = save_sae(sae, tmp_path / "native")
    assert torch.allclose(load_sae(native)(x), expected, atol=1e-6)
    with pytest.raises(SaeError, match="no folder .* layer 7"):
        load_sae(tmp_path / "sparsify", "sparsify", layer=7)


def test_log_frequency_histogram_counts_every_latent():
    edges, counts, never = log_frequency_histogram([0.0, 0.001, 0.01, 0.1, 0.1, 0.0], bins=3)
    assert never == 2 and sum(counts) == 4 and len(edges) == 4


def test_corpus_stream_reads_counted_tokens_and_resumes_mid_block(tmp_path, tiny_config):
    from neuron_assets.features.site_activations import (
        CorpusSiteStream,
        load_site_subject,
        site_activations,
        split_table,
    )
    from neuron_assets.stages import make_corpus

    config = load_config(tiny_config(corpus__prefix="Note: "))
    make_corpus(config, "test")
    sequences = pl.read_parquet(config.root / "data/sequences/data.parquet")
    assert sequences["prefix_len"].min() > 0
    subject, causal = load_site_subject(config.subject)
    assert causal
    table = split_table(sequences, "train", subject.tokenizer)
    tokens = torch.cat(list(site_activations(subject, table, 1, 8)))
    assert tokens.shape[0] == int(table.counted_per_row.sum())  # no prefix, no padding
    rows = np.flatnonzero(table.counted_per_row > 0)[:1]
    batch = table.batch(rows)
    full = subject.activations(batch.ids, batch.mask, {1: None})[1][0]
    assert torch.allclose(next(site_activations(subject, table, 1, 8, rows)), full[int(table.prefix[rows[0]]):int(table.lengths[rows[0]])])
    stream = CorpusSiteStream(subject, table, 1, batch_tokens=32, block_sequences=8, seed=0, device=torch.device("cpu"))
    straight = [b for _, b in zip(range(12), stream.batches())]
    assert all(b.shape == (32, subject.neurons_per_layer(1)) for b in straight)
    resumed = [b for _, b in zip(range(5), stream.batches(start_step=7))]
    assert all(torch.equal(a, b) for a, b in zip(straight[7:], resumed))


def test_sae_checkpoint_asset_trains_measures_and_resumes(tiny_config):
    from neuron_assets.defs.definitions import build_definitions
    from neuron_assets.features.sae import SAE_INFO

    path = tiny_config(sae={"layers": [1], "expansion": 2, "k": 4, "steps": 30, "batch_tokens": 32,
                            "block_sequences": 8, "checkpoint_every": 10, "resample_dead_after": 10, "eval_sequences": 8})
    defs = build_definitions(str(path))
    dg.Definitions.validate_loadable(defs)
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([defs.resolve_assets_def("corpus")], instance=instance).success
    asset = defs.resolve_assets_def("sae_checkpoint")
    assert asset.partitions_def is None  # one step trains every sae.layers layer, each resumable
    result = dg.materialize([asset], instance=instance)
    assert result.success
    metadata = result.asset_materializations_for_node("sae_checkpoint")[0].metadata
    assert 0 < metadata["fvu"].value < 1.5 and metadata["l0"].value <= 4
    assert 0 <= metadata["dead_fraction"].value <= 1
    assert "reconstruction_score" in metadata and "data:image/png;base64" in metadata["latent_frequency"].value
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any(m.startswith("sae layer 1 evaluation: ") and "batches (100%) done" in m for m in messages), \
        "the evaluation (metrics and reconstruction score) reports its progress"
    config = load_config(path)
    folder = config.root / "checkpoints/sae/layer=1"
    info = json.loads((folder / SAE_INFO).read_text())
    assert info["metrics"]["fvu"] == pytest.approx(metadata["fvu"].value)
    loaded = load_sae(folder)
    assert loaded.d_latent == 2 * loaded.d_in
    again = dg.materialize([asset], instance=instance)  # the finished checkpoint is taken up
    assert again.asset_materializations_for_node("sae_checkpoint")[0].metadata["resumed_from_step"].value == 30


def test_default_config_has_no_sae_asset(tiny_config):
    from neuron_assets.defs.definitions import build_definitions

    keys = {spec.key.to_user_string() for spec in build_definitions(str(tiny_config())).resolve_all_asset_specs()}
    assert "sae_checkpoint" not in keys
