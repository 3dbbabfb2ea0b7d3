"""delphi's feature filters in neuron_stats, through the real collector: a planted positional
neuron and a planted one-token neuron are flagged, a random neuron is not, and a neuron that
reads a token only in the context the corpus always gives it is a unigram candidate that the
scrambled-context probe does not confirm."""

from __future__ import annotations

import numpy as np
import torch

from neuron_assets.config import ExemplarsConfig, config_from_dict
from neuron_assets.exemplars.stats import STAT_QUANTILES, STATS_BLOCK, TokenStats, positional_information, quantile_column
from neuron_assets.stages import make_candidate_descriptions, make_corpus, make_exemplars
from neuron_assets.store import Store
from neuron_assets.types import Polarity
from tests.support.tiny_models import make_tiny_gpt2, sample_texts

TOKEN_NEURON, POSITION_NEURON, RANDOM_NEURON, CONTEXT_NEURON = 5, 9, 3, 12


def test_positional_information_is_the_entropy_when_position_decides_and_zero_when_independent():
    bins = np.repeat(np.arange(10), 100)
    decided = (bins == 0)[:, None]  # active exactly in the first bin: MI = H(0.1)
    entropy = -(0.1 * np.log2(0.1) + 0.9 * np.log2(0.9))
    assert abs(positional_information(decided, bins, 10)[0] - entropy) < 1e-6
    independent = np.tile(np.arange(100) % 10 == 0, 10)[:, None]  # active 10% in every bin
    assert positional_information(independent, bins, 10)[0] < 1e-9


def _plant(folder, tokenizer):
    """A tiny GPT-2 with neuron TOKEN_NEURON reading a residual dimension only " old" writes,
    POSITION_NEURON one that only the first four positions' embeddings write, and
    CONTEXT_NEURON one that fires on " more" only when " then" came before it (its one head
    attends to " then" wherever it is and writes a context dimension; the neuron needs both):
    the corpus only ever says " more" a few tokens after " then" ("then 57 more"), so in the
    corpus it looks like a one-token neuron."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder)
    [old], [more], [then] = (tokenizer(word, add_special_tokens=False)["input_ids"] for word in (" old", " more", " then"))
    hidden = model.config.n_embd
    token_dim, position_dim, more_dim, then_dim, context_dim = (hidden - i for i in range(1, 6))
    block = model.transformer.h[0]
    fc = block.mlp.c_fc
    with torch.no_grad():
        # a random tiny GPT-2's position embeddings are as large as its token embeddings, so its
        # random neurons really are positional (MI about 0.1 bits): only the planted one may be
        model.transformer.wpe.weight.zero_()
        for dimension in (token_dim, position_dim, more_dim, then_dim, context_dim):
            model.transformer.wte.weight[:, dimension] = 0.0
            for projection in (block.attn.c_proj, block.mlp.c_proj):  # nothing else writes it
                projection.weight[:, dimension] = 0.0
                projection.bias[dimension] = 0.0
        for neuron, inputs, bias in ((TOKEN_NEURON, {token_dim: 1.0}, 0.0), (POSITION_NEURON, {position_dim: 1.0}, 0.0),
                                     (CONTEXT_NEURON, {more_dim: 2.0, context_dim: 2.0}, -19.0)):
            fc.weight[:, neuron] = 0.0
            fc.bias[neuron] = bias
            for dimension, weight in inputs.items():
                fc.weight[dimension, neuron] = weight
        model.transformer.wte.weight[old, token_dim] = 1.0
        model.transformer.wpe.weight[:4, position_dim] = 1.0
        model.transformer.wte.weight[more, more_dim] = 1.0
        model.transformer.wte.weight[then, then_dim] = 1.0
        # the head: a constant query, keys that are large only at " then" (so it attends to
        # " then" when there is one, else evenly), one value channel carrying " then"'s mark,
        # written (only) into the context dimension
        attention = block.attn.c_attn
        attention.weight[:, : 2 * hidden] = 0.0
        attention.bias[: 2 * hidden] = 0.0
        attention.bias[0] = 20.0
        attention.weight[then_dim, hidden] = 1.0
        attention.weight[:, 2 * hidden] = 0.0
        attention.bias[2 * hidden] = 0.0
        attention.weight[then_dim, 2 * hidden] = 1.0
        block.attn.c_proj.weight[0, :] = 0.0
        block.attn.c_proj.weight[0, context_dim] = 0.125
    model.save_pretrained(folder)
    return folder


def _token_sample(values: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor) -> TokenStats:
    stats = TokenStats.fresh(values.shape[1], values.shape[0], "cpu", torch.float32)
    stats.token_keys, stats.token_values = torch.rand(values.shape[0]), values
    stats.token_ids, stats.token_positions = ids, positions
    stats.sums["n_tokens"] += values.shape[0]
    return stats


def test_sample_statistics_do_not_depend_on_blocks_and_filters_read_only_tokens_of_known_position():
    """The token sample's quantiles and filters are computed STATS_BLOCK features at a time:
    a feature's row is the same alone or among others on either side of a block's edge. The
    quantiles read every sample token; the filters only those whose position is known (all,
    except in a sample resumed from an older checkpoint)."""
    generator = torch.Generator().manual_seed(0)
    n, features = 600, STATS_BLOCK + 44
    positions = torch.randint(0, 48, (n,), generator=generator)
    ids = torch.randint(0, 40, (n,), generator=generator)
    values = torch.randn(n, features, generator=generator)
    values[:, ::3] += (positions < 8).float().unsqueeze(1) * 4  # positional features
    values[:, 1::3] += (ids < 2).float().unsqueeze(1) * 4  # few-token features
    positions[:90] = -1  # not known
    config = ExemplarsConfig()
    maxima = {Polarity.POS: values.amax(0).numpy(), Polarity.NEG: (-values).amax(0).numpy()}
    stats, known_only = _token_sample(values, ids, positions), _token_sample(values[90:], ids[90:], positions[90:])
    whole = stats.frames(slice(0, features), maxima, stats.sample_tokens(), config)
    known = known_only.frames(slice(0, features), maxima, known_only.sample_tokens(), config)
    filters = ["positional_mi", "is_positional", "unigram_tokens", "is_unigram"]
    for polarity, sign in ((Polarity.POS, 1), (Polarity.NEG, -1)):
        ordered = np.sort((values * sign).numpy(), axis=0)
        for q in STAT_QUANTILES:
            np.testing.assert_array_equal(whole[polarity][quantile_column(q)].to_numpy(), ordered[round(q * (n - 1))])
        assert whole[polarity].select(filters).equals(known[polarity].select(filters))
        assert whole[polarity]["is_positional"].sum() > 0 and whole[polarity]["unigram_tokens"].drop_nulls().len() > 0
    for feature in (0, STATS_BLOCK - 1, STATS_BLOCK, features - 1):
        alone = stats.frames(slice(feature, feature + 1), {p: m[feature : feature + 1] for p, m in maxima.items()},
                             stats.sample_tokens(), config)
        for polarity in maxima:
            assert alone[polarity].equals(whole[polarity][feature])


def test_unigram_count_is_the_distinct_ids_of_the_strongest_active_tokens_with_ties_in_token_order():
    """The unigram filter's count, against a brute force feature by feature: the ids of the
    ceil(80%) strongest active sample tokens, ties broken by sample order, on integer
    activations (many ties at the cut); null for a feature with too few active tokens."""
    generator = torch.Generator().manual_seed(1)
    n, features = 300, 40
    ids = torch.randint(0, 150, (n,), generator=generator)
    values = torch.randint(-4, 5, (n, features), generator=generator).float()
    values[:, :4] = torch.where(torch.rand(n, 4, generator=generator) < 0.02, values[:, :4], 0.0)  # too few active
    config = ExemplarsConfig(unigram_tokens=3)
    maxima = {Polarity.POS: values.amax(0).numpy(), Polarity.NEG: (-values).amax(0).numpy()}
    stats = _token_sample(values, ids, torch.zeros(n, dtype=torch.long))
    frames = stats.frames(slice(0, features), maxima, stats.sample_tokens(), config)
    for polarity, sign in ((Polarity.POS, 1), (Polarity.NEG, -1)):
        signed = (values * sign).numpy()
        expected = []
        for f in range(features):
            active = np.nonzero(signed[:, f] > config.activating_fraction * max(maxima[polarity][f], 0.0))[0]
            if len(active) < 2 * config.unigram_tokens:
                expected.append(None)
                continue
            strongest = active[np.argsort(-signed[active, f], kind="stable")][: int(np.ceil(0.8 * len(active)))]
            expected.append(len(set(ids[strongest].tolist())))
        assert frames[polarity]["unigram_tokens"].to_list() == expected
        assert expected[:4] == [None] * 4 and None not in expected[4:]


def test_planted_positional_and_one_token_neurons_are_flagged_and_a_context_one_and_a_random_one_are_not(tmp_path, tiny_tokenizer):
    texts = tmp_path / "texts"
    texts.mkdir()
    sentences = sample_texts(800, seed=3)
    for i in range(100):
        (texts / f"doc{i:03d}.txt").write_text(" ".join(sentences[i * 8 : (i + 1) * 8]))
    model = _plant(make_tiny_gpt2(tmp_path / "model", tiny_tokenizer, num_layers=1, hidden=64, intermediate=32,
                                  heads=1), tiny_tokenizer)
    config = config_from_dict({
        "name": "filters",
        "storage": {"root": str(tmp_path / "home")},
        "subject": {"model": str(model), "batch_size": 64},
        "corpus": {"sources": [{"name": "texts", "kind": "text", "path": str(texts)}], "seq_len": 32,
                   "chat_prefix": None, "sequences_per_split": 100},
        "features": {"layers": [0], "neurons": [RANDOM_NEURON, TOKEN_NEURON, POSITION_NEURON, CONTEXT_NEURON]}, "sae": {"layers": []},
        "exemplars": {"top_k": 2, "random_per_split": 2, "quantile_bins": 2, "per_quantile": 1, "quantile_reservoir": 4,
                      "quiet_per_split": 2, "stats_token_sample": 2048, "unigram_tokens": 3},
    })
    make_corpus(config, "test")
    make_exemplars(config, [(0, Polarity.POS)], "test", progress=False)
    stats = {row["neuron"]: row for row in Store(config.root).read("neuron_stats", 0, "pos").iter_rows(named=True)}

    assert stats[POSITION_NEURON]["is_positional"] and stats[POSITION_NEURON]["positional_mi"] > 0.2
    assert not stats[POSITION_NEURON]["is_unigram"]
    token = stats[TOKEN_NEURON]
    assert token["unigram_tokens"] == 1 and token["unigram_confirmed"] and token["unigram_survival"] > 0.8, token
    assert token["is_unigram"]
    # " more" after " then" is one token in the corpus, but in scrambled context it survives only
    # where " then" happened to be drawn: a candidate, not confirmed
    context = stats[CONTEXT_NEURON]
    assert context["unigram_tokens"] == 1 and context["unigram_confirmed"] is False, context
    assert context["unigram_survival"] < 0.5 and not context["is_unigram"]
    assert not context["is_positional"]
    assert stats[POSITION_NEURON]["unigram_confirmed"] is None and stats[RANDOM_NEURON]["unigram_confirmed"] is None
    assert not stats[TOKEN_NEURON]["is_positional"]
    random = stats[RANDOM_NEURON]
    assert not random["is_positional"] and not random["is_unigram"], random

    # the explain stage skips the flagged features, or explains only them
    for choice, described in (("skip", {RANDOM_NEURON, CONTEXT_NEURON}), ("only", {TOKEN_NEURON, POSITION_NEURON})):
        chosen = config.model_copy(update={"explain": config.explain.model_copy(update={"flagged_features": choice})})
        made = make_candidate_descriptions(chosen, [(0, Polarity.POS)], "test")
        assert set(made.frame["neuron"].to_list()) == described, choice


def test_unigram_probes_plant_each_top_token_in_its_own_scrambled_contexts():
    """Every candidate's top tokens are planted exactly unigram_contexts times, never two of
    one candidate in a probe, after the template's prefix and at least FIRST_PLANT random
    tokens, PLANT_SPACING apart; the same seed gives the same probes."""
    import polars as pl

    from neuron_assets.features.unigram import FIRST_PLANT, PLANT_SPACING, UnigramCandidate, _probes

    rng = np.random.default_rng(0)
    prefix = [1, 2, 3]
    sequences = pl.DataFrame({"seq_id": range(50), "split": ["train"] * 40 + ["val"] * 10,
                              "token_ids": [prefix + rng.integers(10, 60, size=29).tolist() for _ in range(50)],
                              "prefix_len": [3] * 50, "n_tokens": [32] * 50})
    candidates = [UnigramCandidate(i % 2, Polarity.POS, "neuron", i, tuple(int(t) for t in rng.choice(20, 3, replace=False)),
                                   (1.0,) * 3, (1.0,) * 3) for i in range(12)]
    probes = _probes(sequences, candidates, 5, seed=7)
    planted = [token for probe in probes for token in probe.planted.values()]
    assert {t: planted.count(t) for t in set(planted)} == {t: 5 for c in candidates for t in c.tokens}
    for probe in probes:
        assert probe.prefix.tolist() == prefix and len(probe.filler) == probe.length - len(prefix)
        for candidate in candidates:
            assert len(set(candidate.tokens) & set(probe.planted.values())) <= 1
        positions = sorted(probe.planted)
        assert positions[0] >= len(prefix) + FIRST_PLANT and np.all(np.diff(positions) == PLANT_SPACING)
        assert probe.length == positions[-1] + 1
    again = _probes(sequences, candidates, 5, seed=7)
    assert [(p.planted, p.filler.tolist()) for p in again] == [(p.planted, p.filler.tolist()) for p in probes]
