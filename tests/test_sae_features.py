"""SAE latents as features of kind `sae`: read in the exemplar pass beside the neurons, and
described, scored and stored like them by `neuron-assets run`."""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import torch

from neuron_assets.cli import main
from neuron_assets.config import load_config
from neuron_assets.exemplars import collect_exemplars
from neuron_assets.features.sae import TopK, init_sae
from neuron_assets.features.selection import SaeLatents
from neuron_assets.stages import make_corpus
from neuron_assets.store import Store
from neuron_assets.subject import load_subject
from neuron_assets.types import Polarity

FAST = {"simulate__backend": "lexical", "simulate__compare_with": [], "score__scorers": ["correlation"]}  # no model to load
SAE = {"layers": [1], "expansion": 2, "k": 4, "steps": 20, "batch_tokens": 32, "block_sequences": 8,
       "checkpoint_every": 10, "resample_dead_after": 0, "eval_sequences": 4, "latents": {"sample": 3, "seed": 0}}


def test_collector_latent_exemplars_equal_brute_force(tiny_config):
    """The collector's top sequence of each latent is the one the SAE, applied to the site's
    activations directly, gives its largest value over counted tokens; neurons beside them
    are unchanged by the latents."""
    config = load_config(tiny_config())
    make_corpus(config, "test")
    subject = load_subject(config.subject)
    sequences = Store(config.root).read("sequences")
    width = subject.neurons_per_layer(1)
    sample = torch.randn(256, width, generator=torch.Generator().manual_seed(0))
    sae = init_sae(width, 2 * width, TopK(4), sample, seed=0).eval()
    latents = [0, 5, 17, 40]
    neurons = {1: [2, 7]}
    args = (subject, sequences, neurons, [Polarity.POS], config.exemplars)
    with_sae = collect_exemplars(*args, batch_size=8, progress=False, saes={1: SaeLatents(sae, latents, "test")})
    alone = collect_exemplars(*args, batch_size=8, progress=False)
    exemplars, stats = with_sae[(1, Polarity.POS)]
    assert stats.select("kind", "neuron").rows() == [("neuron", 2), ("neuron", 7)] + [("sae", j) for j in latents]
    assert exemplars.filter(pl.col("kind") == "neuron").equals(alone[(1, Polarity.POS)][0])

    # brute force: every train sequence through the model, the SAE on its site activations
    train = sequences.filter(pl.col("split") == "train").sort("seq_id")
    best = {j: (-np.inf, None) for j in latents}
    for row in train.iter_rows(named=True):
        ids = torch.tensor([row["token_ids"]])
        site = subject.activations(ids, torch.ones_like(ids), {1: None})[1][0]
        encoded = sae.encode(site)[row["prefix_len"]:, latents].max(dim=0).values
        for j, value in zip(latents, encoded.tolist()):
            if value > best[j][0]:
                best[j] = (value, row["seq_id"])
    top = exemplars.filter((pl.col("kind") == "sae") & (pl.col("split") == "train") & (pl.col("sample") == "top")
                           & (pl.col("rank") == 0))
    for j in latents:
        got = top.filter(pl.col("neuron") == j).row(0, named=True)
        assert got["extreme"] == np.float32(best[j][0]) or abs(got["extreme"] - best[j][0]) < 1e-4
        if best[j][0] > 0:
            assert got["seq_id"] == best[j][1]


def test_run_with_an_sae_section_describes_latents_beside_neurons(tiny_config, capsys):
    path = tiny_config(sae=SAE, features__layers=[0, 1], **FAST)
    stages = "corpus,sae_checkpoint,exemplars,candidate_descriptions,description_scores,neuron_descriptions"
    assert main(["--config", str(path), "run", "--select", stages]) == 0
    out = capsys.readouterr().out
    assert "sae_checkpoint" in out
    store = Store(load_config(path).root)
    described = pl.concat([store.read("neuron_descriptions", layer, p) for layer, p in store.partitions("neuron_descriptions")],
                          how="diagonal_relaxed")
    latents = described.filter(pl.col("kind") == "sae")
    assert latents.height > 0 and set(latents["layer"]) == {1} and set(latents["polarity"]) == {"pos"}
    assert described.filter(pl.col("kind") == "neuron").height > 0
    assert main(["--config", str(path), "sql", "select kind, count(*) as n from neuron_descriptions where layer = 1 "
                 "group by kind order by kind", "--format", "json"]) == 0
    assert '"sae"' in capsys.readouterr().out
    first = latents["neuron"][0]
    assert main(["--config", str(path), "show", "1", str(first), "--feature", "sae"]) == 0
    assert f"sae L1/{first} pos" in capsys.readouterr().out

    # the HTML report lists the latents beside the neurons, with their kind, and links their pages
    assert main(["--config", str(path), "report"]) == 0
    capsys.readouterr()
    report = store.root / "report"
    index = report.joinpath("index.html").read_text()
    assert re.search(r'layer-1-pos\.html">layer 1 pos</a></td><td>SAE latent</td><td class="n"[^>]*>3<', index), index
    layer_page = report.joinpath("layer-1-pos.html").read_text()
    linked = set(re.findall(r'href="neurons/L1-SAE(\d+)\.html"', layer_page))
    assert linked == {str(j) for j in latents["neuron"]} and layer_page.count("<td>SAE latent</td>") == 3
    assert re.findall(r'href="neurons/L1-N\d+\.html"', layer_page), "the layer's neurons beside them"
    for j in linked:
        page = report.joinpath(f"neurons/L1-SAE{j}.html").read_text()
        assert f"<title>SAE latent L1/{j}</title>" in page and "layer 1 pos" in page and "layer 1 neg" not in page
    assert "SAE" not in report.joinpath("layer-1-neg.html").read_text(), "latents are pos only"
