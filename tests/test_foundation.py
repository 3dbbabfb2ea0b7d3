"""Corpus, subject model, exemplars, store: the base every later stage stands on."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from torch import nn

from neuron_assets.config import Config, ConfigError, config_from_dict, load_config
from neuron_assets.corpus import CorpusError, build_sequences
from neuron_assets.exemplars import Interrupted, collect_exemplars, load_feature_exemplars
from neuron_assets.stages import make_corpus, make_exemplars
from neuron_assets.store import Store
from neuron_assets.subject import SubjectError, find_sites, load_subject
from neuron_assets.types import Sample, Polarity, Split

POLARITIES = [Polarity.POS, Polarity.NEG]


def _subject_and_sequences(config_path, **corpus):
    config = load_config(config_path)
    subject = load_subject(config.subject)
    sequences = build_sequences(config.corpus.model_copy(update=corpus), subject.tokenizer)
    return config, subject, sequences


def _all_activations(subject, sequences, layers):
    """Brute force: every sequence's full activations, one sequence at a time, no early stop."""
    result = {layer: [] for layer in layers}
    for row in sequences.iter_rows(named=True):
        ids = torch.tensor([row["token_ids"]])
        acts = subject.activations(ids, torch.ones_like(ids), {layer: None for layer in layers})
        for layer in layers:
            result[layer].append(acts[layer][0].float().numpy())
    return result


# -- top-k exactness ------------------------------------------------------------------------


def test_streaming_topk_equals_brute_force_with_padding(tiny_config, chat_corpus, text_corpus):
    path = tiny_config(corpus__sources=[
        {"name": "texts", "kind": "text", "path": str(text_corpus)},
        {"name": "chats", "kind": "jsonl", "path": str(chat_corpus), "messages_field": "messages"},
    ], corpus__seq_len=64)
    config, subject, sequences = _subject_and_sequences(path)
    assert sequences["n_tokens"].min() < 64, "the chat source should leave padding in batches"
    layers = [0, 2]
    neurons = {layer: list(range(subject.neurons_per_layer(layer))) for layer in layers}
    k = config.exemplars.top_k
    tables = collect_exemplars(subject, sequences, neurons, POLARITIES, config.exemplars, batch_size=5, progress=False)
    brute = _all_activations(subject, sequences, layers)
    rows = sequences.to_dicts()
    for layer in layers:
        for polarity in POLARITIES:
            exemplars, _ = tables[(layer, polarity)]
            for split in Split:
                in_split = [i for i, r in enumerate(rows) if r["split"] == split.value]
                for neuron in (0, 17, 95):
                    extremes = np.array([
                        (brute[layer][i][rows[i]["prefix_len"] :, neuron] * polarity.sign).max() for i in in_split
                    ])
                    order = np.argsort(-extremes, kind="stable")[:k]
                    got = exemplars.filter(
                        (pl.col("neuron") == neuron) & (pl.col("split") == split.value) & (pl.col("sample") == "top")
                    ).sort("rank")
                    np.testing.assert_allclose(got["extreme"].to_numpy(), extremes[order], rtol=1e-5, atol=1e-6)
                    # Ties (repeated sentences) may pick another sequence of equal value: check identity by value.
                    by_seq = {rows[i]["seq_id"]: extremes[j] for j, i in enumerate(in_split)}
                    np.testing.assert_allclose([by_seq[s] for s in got["seq_id"]], got["extreme"].to_numpy(), rtol=1e-5, atol=1e-6)
                    assert got["seq_id"].n_unique() == k
                    for seq_id, stored in zip(got["seq_id"], got["activations"]):
                        truth = brute[layer][seq_id][:, neuron].copy()
                        truth[: rows[seq_id]["prefix_len"]] = 0
                        assert len(stored) == rows[seq_id]["n_tokens"]
                        np.testing.assert_allclose(np.asarray(stored, dtype=np.float32), truth, rtol=2e-3, atol=2e-3)


def test_quantile_and_random_samples_are_well_formed(tiny_config):
    config, subject, sequences = _subject_and_sequences(tiny_config())
    neurons = {1: list(range(8))}
    tables = collect_exemplars(subject, sequences, neurons, POLARITIES, config.exemplars, batch_size=8, progress=False)
    exemplars, stats = tables[(1, Polarity.POS)]
    random_rows = exemplars.filter(pl.col("sample") == "random")
    assert random_rows.group_by("split").agg(pl.col("seq_id").n_unique())["seq_id"].to_list() == [2, 2, 2]
    assert random_rows.group_by("neuron").len()["len"].unique().to_list() == [6]  # same sequences for every neuron
    quantile = exemplars.filter(pl.col("sample") == "quantile")
    assert (quantile["extreme"] > 0).all(), "quantile samples come from activating sequences"
    for (neuron, split), group in quantile.group_by("neuron", "split"):
        assert group.sort("bin")["extreme"].is_sorted()
    assert stats.height == 8 and (stats["frac_active"].is_between(0, 1)).all()
    assert (stats["q999"] >= stats["q50"]).all()


def test_exemplar_table_built_in_chunks_is_the_same_table_with_aligned_chunks(tiny_config, monkeypatch):
    """A table built in many small chunks equals the one-chunk table, and all its columns
    share the same chunks: polars copies a table whose columns are chunked differently into
    one chunk at the next with_columns or select (the activations included)."""
    from neuron_assets.exemplars import tables as tables_module

    config, subject, sequences = _subject_and_sequences(tiny_config())
    neurons = {1: list(range(24))}

    def tables():
        return collect_exemplars(subject, sequences, neurons, POLARITIES, config.exemplars, batch_size=8,
                                 progress=False)

    whole = tables()
    monkeypatch.setattr(tables_module, "FRAME_CHUNK_ROWS", 50)
    chunked = tables()
    for key, (exemplars, stats) in whole.items():
        assert exemplars.n_chunks() == 1
        pieces = chunked[key][0].n_chunks("all")
        assert pieces[0] > 3 and set(pieces) == {pieces[0]}, pieces
        assert chunked[key][0].equals(exemplars) and chunked[key][1].equals(stats)


def test_tables_built_in_threads_come_in_layer_order_and_equal_one_thread(tiny_config, monkeypatch):
    """The end-of-pass tables built several layers at once are the tables one thread builds,
    handed over in layer order; an error in one layer's build reaches the caller."""
    from neuron_assets.exemplars import tables as tables_module

    config, subject, sequences = _subject_and_sequences(tiny_config())
    neurons = {layer: list(range(16)) for layer in range(subject.num_layers)}
    assert len(neurons) > 2

    def tables(workers):
        monkeypatch.setattr(tables_module, "TABLE_WORKERS", workers)
        order = []
        collect_exemplars(subject, sequences, neurons, POLARITIES, config.exemplars, batch_size=8, progress=False,
                          on_tables=lambda layer, polarity, ex, st: order.append(((layer, polarity), ex, st)))
        return order

    one, three = tables(1), tables(3)
    assert [key for key, _, _ in one] == [(layer, p) for layer in sorted(neurons) for p in POLARITIES]
    assert [key for key, _, _ in three] == [key for key, _, _ in one]
    for (_, ex1, st1), (_, ex3, st3) in zip(one, three):
        assert ex1.equals(ex3) and st1.equals(st3)

    build = tables_module.layer_tables

    def failing(self, layer, *args):
        if layer == 1:
            raise RuntimeError("layer 1 failed")
        return build(self, layer, *args)

    monkeypatch.setattr(tables_module, "layer_tables", failing)
    with pytest.raises(RuntimeError, match="layer 1 failed"):
        tables(2)


def test_val_and_test_samples_keep_a_uniform_first_come_sample():
    """In val and test a sample keeps the first sequences read (keys fall with the batch
    number) of a split read in a seeded random order: over seeds, every sequence is kept
    equally often, and once the sample is full a batch changes nothing."""
    from neuron_assets.exemplars.batches import batch_keys, plan_batches
    from neuron_assets.exemplars.state import Chunk, KeptSequences

    n, k, batch, seq_len, seeds = 40, 8, 8, 4, 1500
    splits = np.array([Split.TRAIN.value] * 8 + [Split.VAL.value] * n)
    counted = torch.ones(batch, seq_len, dtype=torch.bool)
    kept_count = np.zeros(n)
    for seed in range(seeds):
        kept = KeptSequences.fresh(1, k, seq_len, "cpu", torch.float16)
        for batch_no, (split, rows) in enumerate(plan_batches(splits, batch, seed)):
            if split != Split.VAL.value:
                continue
            keys, _ = batch_keys(seed, batch_no, len(rows), seq_len, split)
            seq_ids = torch.as_tensor(rows - 8)
            acts = seq_ids.float().view(-1, 1, 1).expand(-1, seq_len, 1).contiguous()  # a row's value is its id
            before = kept.seq_ids.clone()
            kept.offer(slice(0, 1), keys.unsqueeze(1), acts[:, 0], seq_ids, Chunk(acts, counted, torch.float16))
            if batch_no > k // batch + 1:  # full since an earlier batch: nothing enters
                assert torch.equal(kept.seq_ids, before)
        ids = kept.seq_ids[0].numpy()
        assert len(set(ids.tolist())) == k and (kept.acts[0, :, 0].numpy() == ids).all()
        kept_count[ids] += 1
    expected = seeds * k / n  # 300 each
    chi2 = float(((kept_count - expected) ** 2 / expected).sum())
    assert chi2 < 80, f"not uniform: chi2 {chi2:.0f} on {n - 1} degrees of freedom"  # p < 1e-4 under uniformity


# -- the subject model ----------------------------------------------------------------------


def test_gated_mlp_site_is_act_gate_times_up(tiny_llama):
    from neuron_assets.config import SubjectConfig

    subject = load_subject(SubjectConfig(model=str(tiny_llama)))
    mlp = subject.model.layers[1].mlp
    seen = {}
    handle = mlp.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    ids = torch.tensor([[5, 9, 33, 70, 12, 8]])
    acts = subject.activations(ids, torch.ones_like(ids), {1: None, 2: None})
    handle.remove()
    x = seen["x"]
    with torch.inference_mode():
        expected = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    torch.testing.assert_close(acts[1], expected)
    assert acts[1].shape == (1, 6, subject.neurons_per_layer(1)) == (1, 6, 96)


def test_sites_found_for_gpt2_and_minilm(tiny_gpt2):
    from neuron_assets.config import SubjectConfig

    gpt2 = load_subject(SubjectConfig(model=str(tiny_gpt2)))
    assert sorted(gpt2.sites) == [0, 1] and gpt2.neurons_per_layer(0) == 96
    minilm = load_subject(SubjectConfig(model="builtin:all-MiniLM-L6-v2"))
    assert sorted(minilm.sites) == list(range(6)) and minilm.neurons_per_layer(3) == 1536
    assert all(".attention." not in name for name, m in minilm.model.named_modules() if m in minilm.sites.values())


def test_unknown_architecture_names_the_modules_it_saw():
    class Strange(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4)) for _ in range(2)])

    with pytest.raises(SubjectError) as caught:
        find_sites(Strange())
    message = str(caught.value)
    assert "blocks.0.1" in message and "subject.site" in message
    assert sorted(find_sites(Strange(), r"blocks\.(\d+)\.1$")) == [0, 1]


def test_one_forward_pass_serves_all_layers_and_stops_early(tiny_config):
    config, subject, sequences = _subject_and_sequences(tiny_config())
    calls = {"embed": 0, "last_mlp": 0}
    embed = subject.model.embed_tokens.register_forward_hook(lambda *a: calls.__setitem__("embed", calls["embed"] + 1))
    last = subject.model.layers[2].mlp.register_forward_hook(lambda *a: calls.__setitem__("last_mlp", calls["last_mlp"] + 1))
    batches = -(-sequences.filter(pl.col("split") == "train").height // 8) * 3
    try:
        collect_exemplars(subject, sequences, {0: [1, 2], 2: [3]}, POLARITIES, config.exemplars, batch_size=8, progress=False)
        assert calls["embed"] == batches + 1, "one forward pass per batch for layers {0, 2}, and one of the shared prefix"
        calls["embed"] = calls["last_mlp"] = 0
        collect_exemplars(subject, sequences, {0: [1, 2]}, POLARITIES, config.exemplars, batch_size=8, progress=False)
        assert calls["embed"] == batches + 1 and calls["last_mlp"] == 0, "the pass stops after the deepest requested layer"
    finally:
        embed.remove()
        last.remove()


# -- corpus ---------------------------------------------------------------------------------


def test_splits_equal_disjoint_and_deterministic(tiny_config, chat_corpus, text_corpus, tiny_tokenizer):
    sources = [
        {"name": "texts", "kind": "text", "path": str(text_corpus), "weight": 2.0},
        {"name": "chats", "kind": "jsonl", "path": str(chat_corpus), "messages_field": "messages", "weight": 1.0},
    ]
    config = load_config(tiny_config(corpus__sources=sources, corpus__sequences_per_split=30))
    first = build_sequences(config.corpus, tiny_tokenizer)
    counts = first.group_by("split", "source").len()
    assert sorted(counts.filter(pl.col("source") == "texts")["len"].to_list()) == [20, 20, 20]
    assert sorted(counts.filter(pl.col("source") == "chats")["len"].to_list()) == [10, 10, 10]
    docs = first.group_by("source", "doc_id").agg(pl.col("split").n_unique())
    assert (docs["split"] == 1).all(), "a document's windows stay in one split"
    assert first["seq_id"].n_unique() == first.height
    assert first.equals(build_sequences(config.corpus, tiny_tokenizer))
    other = build_sequences(config.corpus.model_copy(update={"seed": 7}), tiny_tokenizer)
    assert not first.equals(other)
    texts = first.filter(pl.col("source") == "texts")
    assert (texts["n_tokens"] == 16).all() and (texts["prefix_len"] == 1).all()
    assert all("".join(t).startswith("<|begin_of_text|>") for t in texts["tokens"].head(5))
    chats = first.filter(pl.col("source") == "chats")
    assert (chats["prefix_len"] == 2).all(), "a chat's leading <|begin_of_text|><|start_header_id|> never count"


def test_builtin_corpus_fills_the_demo(tiny_tokenizer):
    corpus = Config().corpus
    frame = build_sequences(corpus, tiny_tokenizer)
    assert frame.group_by("split").len()["len"].to_list() == [corpus.sequences_per_split] * 3
    assert set(frame["source"].unique()) == {"pydoc_topics", "stdlib_docstrings"}


# -- resume ---------------------------------------------------------------------------------


def test_killed_run_resumes_to_the_same_tables(tiny_config, tmp_path):
    config, subject, sequences = _subject_and_sequences(tiny_config(exemplars__checkpoint_every=2))
    neurons = {0: [0, 5, 9], 2: [1, 4]}
    whole = collect_exemplars(subject, sequences, neurons, POLARITIES, config.exemplars, batch_size=4, progress=False)

    checkpoint = tmp_path / "ckpt.pt"

    def die_after_five(done):
        if done == 5:
            raise Interrupted("killed")

    with pytest.raises(Interrupted):
        collect_exemplars(subject, sequences, neurons, POLARITIES, config.exemplars, batch_size=4,
                          checkpoint=checkpoint, progress=False, on_batch=die_after_five)
    assert checkpoint.exists()
    seen = []
    resumed = collect_exemplars(subject, sequences, neurons, POLARITIES, config.exemplars, batch_size=4,
                                checkpoint=checkpoint, progress=False, on_batch=seen.append)
    assert seen[0] == 5, "the resumed run starts after the checkpointed batch 4, redoing only batch 5"
    assert not checkpoint.exists()
    for key in whole:
        for got, expected in zip(resumed[key], whole[key]):
            assert got.equals(expected), key


# -- bad input ------------------------------------------------------------------------------


def _no_files(root):
    return not root.exists() or not [p for p in root.rglob("*") if p.is_file() and "checkpoints" not in p.parts]


def test_unknown_config_key_is_named(tiny_config, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("subject:\n  modle: gpt2\n")
    with pytest.raises(ConfigError, match=r"unknown key 'subject.modle'.*model"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_missing_model_path_is_a_clear_error(tiny_config, tmp_path):
    config = load_config(tiny_config(subject__model=str(tmp_path / "no-such-model")))
    with pytest.raises(SubjectError, match="does not exist"):
        make_corpus(config, "run-1")
    hub = config_from_dict({"subject": {"model": "someone/not-cached-model"}, "storage": {"root": str(tmp_path / "h")}})
    with pytest.raises(SubjectError, match="allow_download"):
        make_corpus(hub, "run-1")
    assert _no_files(tmp_path / "home") and _no_files(tmp_path / "h")


def test_empty_corpus_and_too_long_seq_len(tiny_config, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    config = load_config(tiny_config(corpus__sources=[{"name": "empty", "kind": "text", "path": str(empty)}]))
    with pytest.raises(CorpusError, match="no documents|long enough"):
        make_corpus(config, "run-1")
    config = load_config(tiny_config(corpus__seq_len=2000))  # within the model's 2048 positions
    with pytest.raises(CorpusError, match=r"longest document has \d+.*lower corpus.seq_len"):
        make_corpus(config, "run-1")
    assert _no_files(config.root)


def test_layer_out_of_range(tiny_config):
    config = load_config(tiny_config(features__layers=[0, 7]))
    with pytest.raises(ConfigError, match=r"features.layers: layer 7 is out of range.*3 layers"):
        make_corpus(config, "run-1")  # checked before the corpus is tokenized
    assert _no_files(config.root)
    make_corpus(load_config(tiny_config()), "run-1")
    with pytest.raises(SubjectError, match=r"layer 7 is out of range.*3 layers"):
        make_exemplars(config, [(0, Polarity.POS), (7, Polarity.POS)], "run-1", progress=False)
    assert not (config.root / "data" / "exemplars").exists()
    assert not list(config.root.rglob("*.tmp"))


# -- store ----------------------------------------------------------------------------------


def test_tables_round_trip_through_the_catalog(tiny_config):
    config = load_config(tiny_config())
    make_corpus(config, "run-7")
    partitions = [(layer, polarity) for layer in range(3) for polarity in POLARITIES]
    make_exemplars(config, partitions, "run-7", progress=False)
    store = Store(config.root)
    assert set(store.build_catalog()) >= {"sequences", "exemplars", "neuron_stats"}
    with store.connect() as con:
        per_partition = con.execute("select layer, polarity, count(distinct neuron) from neuron_stats group by all").fetchall()
        assert sorted(per_partition) == sorted((layer, p.value, 6) for layer, p in partitions)
        lineage = con.execute("select distinct model, config_hash, run_id from exemplars").fetchall()
        assert lineage == [(config.subject.model, config.hash, "run-7")]
        assert con.execute("select typeof(activations) from exemplars limit 1").fetchone()[0] == "FLOAT[]"
    features = load_feature_exemplars(store, 1, Polarity.POS)
    assert len(features) == 6
    top = features[0].top(Split.TRAIN)
    assert len(top) == 3 and top[0].extreme >= top[-1].extreme and top[0].record.tokens[0] == "<|begin_of_text|>"
    assert features[0].select(Split.VAL, Sample.RANDOM)


# -- the planned pass -----------------------------------------------------------------------


def test_a_budget_that_forces_several_passes_gives_the_same_tables(tiny_config, tmp_path, monkeypatch):
    from neuron_assets.exemplars import collect, plan_exemplar_pass

    config, subject, sequences = _subject_and_sequences(tiny_config())
    neurons = {layer: [0, 3, 7, 20, 41, 95] for layer in range(3)}
    seq_len = int(sequences["n_tokens"].max())
    args = (neurons, POLARITIES, config.exemplars, seq_len, 8, subject.device, subject.dtype)
    one = plan_exemplar_pass(*args, budget_bytes=10**12)
    assert one.passes == 1
    whole = collect_exemplars(subject, sequences, neurons, POLARITIES, config.exemplars, batch_size=8, progress=False, plan=one)

    # Room for one layer's six features: one pass per layer, each stopping after its layer.
    per_layer = plan_exemplar_pass(*args, budget_bytes=one.fixed_bytes + 6 * one.per_feature_bytes)
    assert [sorted(g.neurons) for g in per_layer.groups] == [[0], [1], [2]]
    assert "3 passes" in per_layer.describe()
    deepest = []
    original = subject.activations
    subject.activations = lambda ids, mask, index, *more, **cache: deepest.append(max(index)) or original(ids, mask, index,
                                                                                                    *more, **cache)
    try:
        grouped = collect_exemplars(subject, sequences, neurons, POLARITIES, config.exemplars, batch_size=8,
                                    progress=False, plan=per_layer)
    finally:
        subject.activations = original
    assert sorted(set(deepest)) == [0, 1, 2] and deepest.count(0) == deepest.count(2)
    for key in whole:
        for got, expected in zip(grouped[key], whole[key]):
            assert got.equals(expected), key

    # Room for four: each layer is cut in two pieces of three; killed in the fourth pass and
    # resumed from the checkpoint, the tables are still those of one pass.
    pieces = plan_exemplar_pass(*args, budget_bytes=one.fixed_bytes + 4 * one.per_feature_bytes)
    assert pieces.passes == 6 and all(g.features == 3 for g in pieces.groups)
    checkpoint = tmp_path / "ckpt"
    batches = len(range(0, 24, 8)) * 3

    def die_in_the_fourth_pass(done):
        if done == 3 * batches + 4:
            raise Interrupted("killed")

    with pytest.raises(Interrupted):
        collect_exemplars(subject, sequences, neurons, POLARITIES, config.exemplars, batch_size=8, progress=False,
                          plan=pieces, checkpoint=checkpoint, on_batch=die_in_the_fourth_pass)
    assert len(list(checkpoint.glob("group-*.done"))) == 3
    seen, saved = [], []
    save = collect.save_group_table
    monkeypatch.setattr(collect, "save_group_table",
                        lambda folder, group, *rest: saved.append(group) or save(folder, group, *rest))
    resumed = collect_exemplars(subject, sequences, neurons, POLARITIES, config.exemplars, batch_size=8, progress=False,
                                plan=one, checkpoint=checkpoint, on_batch=seen.append)
    assert seen[0] == 3 * batches + 4, "the resumed run keeps the checkpoint's grouping and redoes no finished split"
    assert sorted(set(saved)) == [3, 4], "the last group's tables are built after the checkpoint is needed: not kept"
    assert not checkpoint.exists()
    for key in whole:
        for got, expected in zip(resumed[key], whole[key]):
            assert got.equals(expected), key
