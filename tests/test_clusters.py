"""Description clusters: average-linkage families of the selected descriptions' MiniLM vectors.
Known answer through the real encoder (two obvious families among unrelated descriptions), the
label and coherence, the sampled path, the LLM label through the client layer, bad input, and the
Dagster asset with `neuron-assets clusters` on a planted store."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist

from neuron_assets import clusters as C
from neuron_assets.cli import main
from neuron_assets.config import ConfigError, config_from_dict, load_config
from neuron_assets.search import descriptions_to_embed, embeddings_frame
from neuron_assets.store import Store, with_lineage

DATES = ["dates such as years and months", "the year in a date like 1999", "calendar dates and days of the month",
         "month names like January and March", "years written as four digits in dates"]
BRACKETS = ["closing brackets in code", "opening parentheses in Python function calls",
            "brackets and parentheses in source code", "curly braces in code blocks",
            "closing parentheses and brackets at the end of code lines"]
UNRELATED = ["emotional words such as anger and joy", "French words about cooking", "plural nouns ending in s",
             "email addresses and URLs", "capitalized names of cities and countries"]
PARTITIONS = [(0, "pos"), (0, "neg"), (1, "pos"), (1, "neg")]


@pytest.fixture(scope="module")
def encoder():
    from neuron_assets.embedding import sentence_encoder

    return sentence_encoder()


def plant(root, encoder, texts: list[str]) -> dict[str, tuple[int, str, int]]:
    """The texts as selected descriptions spread over PARTITIONS (round robin), written to
    neuron_descriptions and embedded into description_embeddings; text -> (layer, polarity, neuron)."""
    store = Store(root)
    where = {}
    for slot, (layer, polarity) in enumerate(PARTITIONS):
        mine = texts[slot::len(PARTITIONS)]
        store.write("neuron_descriptions", pl.DataFrame({
            "layer": layer, "polarity": polarity, "kind": "neuron", "neuron": list(range(len(mine))), "candidate": 0,
            "description": mine, "val_score": 0.5, "test_score": [0.1 * (i + 1) for i in range(len(mine))],
            "explainer_backend": "statistical", "model": "tiny", "config_hash": "test", "run_id": "test"}),
            layer, polarity)
        rows = descriptions_to_embed(store, layer, polarity)
        vectors = dict(zip(rows["text_hash"].to_list(), np.asarray(encoder(rows["description"].to_list()))))
        store.write("description_embeddings", with_lineage(
            embeddings_frame(rows, vectors, "builtin:all-MiniLM-L6-v2"), "tiny", "test", "test"), layer, polarity)
        where.update({text: (layer, polarity, neuron) for neuron, text in enumerate(mine)})
    return where


def config_at(root, **clusters):
    return config_from_dict({"storage": {"root": str(root)}, "clusters": clusters})


def families(table: pl.DataFrame) -> list[set[str]]:
    return [set(group["description"].to_list()) for _, group in table.group_by("cluster", maintain_order=True)]


def test_two_obvious_families_cluster_through_minilm(tmp_path, encoder):
    where = plant(tmp_path, encoder, DATES + BRACKETS + UNRELATED)
    written = C.make_description_clusters(config_at(tmp_path), "run-1")
    table = Store(tmp_path).read(C.CLUSTERS_TABLE)
    assert written.clusters == 2 and written.descriptions == 15 and written.left_out == 5
    assert sorted(map(frozenset, families(table)), key=sorted) == sorted([frozenset(DATES), frozenset(BRACKETS)], key=sorted)
    assert set(table["run_id"]) == {"run-1"} and {"model", "config_hash"} <= set(table.columns)
    for row in table.iter_rows(named=True):  # each member is the feature it was planted as
        assert (row["layer"], row["polarity"], row["neuron"]) == where[row["description"]] and row["kind"] == "neuron"
    for _, group in table.group_by("cluster"):
        group = group.sort("member_rank")
        assert group["label"].n_unique() == 1 and group["label"][0] == group["description"][0]  # a member: the nearest
        assert group["label_source"][0] == "centroid" and group["size"][0] == group.height == 5
        assert group["centroid_distance"].is_sorted() and group["member_rank"].to_list() == [1, 2, 3, 4, 5]
        assert group["layer"].n_unique() == 2 and group["polarity"].n_unique() == 2  # families across partitions

    # Coherence is the mean pairwise similarity: high for a family, low for unrelated descriptions.
    vectors = C.unit_rows(np.asarray(encoder(DATES)))
    assert table.filter(pl.col("description") == DATES[0])["coherence"][0] == pytest.approx(
        (vectors @ vectors.T)[np.triu_indices(5, 1)].mean(), abs=1e-5)
    unrelated = C.coherence(C.unit_rows(np.asarray(encoder(UNRELATED))))
    assert min(table["coherence"]) > 0.4 and unrelated < 0.15
    loose = C.coherence(C.unit_rows(np.asarray(encoder(DATES[:3] + BRACKETS[:2]))))
    assert min(table["coherence"]) > loose

    # Per layer x polarity, no cluster spans two partitions; min_size 1 keeps every description.
    C.make_description_clusters(config_at(tmp_path, scope="layer_polarity", min_size=1), "run-2")
    per_partition = Store(tmp_path).read(C.CLUSTERS_TABLE)
    assert per_partition.height == 15
    assert per_partition.group_by("cluster").agg(pl.col("layer").n_unique(), pl.col("polarity").n_unique()).select(
        (pl.col("layer") == 1) & (pl.col("polarity") == 1)).to_series().all()


def test_the_linkage_is_scipys_average_cosine_and_a_sample_assigns_the_rest():
    rng = np.random.default_rng(0)
    points = C.unit_rows(rng.normal(size=(300, 24)))
    assert np.allclose(C.cosine_condensed(points), pdist(points, "cosine"), atol=1e-6)
    reference = fcluster(linkage(points.astype(np.float64), method="average", metric="cosine"), 0.9, "distance")
    assert (C.cluster_vectors(points, 0.9) == reference - 1).all()

    centers = C.unit_rows(rng.normal(size=(4, 32)))
    family = np.repeat(np.arange(4), 60)
    tight = C.unit_rows(centers[family] + 0.05 * rng.normal(size=(240, 32)))
    far = C.unit_rows(rng.normal(size=(1, 32)))  # near no family: stays alone when it is not sampled
    vectors = np.vstack([tight, far])
    for max_points in (1000, 50):  # whole, and a sample of 50 with the other 191 assigned
        found = C.cluster_vectors(vectors, 0.3, max_points=max_points, seed=1)
        assert [len(set(found[:240][family == f])) for f in range(4)] == [1, 1, 1, 1]
        assert len(set(found[:240])) == 4 and found[240] not in set(found[:240])


def test_an_llm_names_each_cluster_through_the_client_layer(tmp_path, encoder, monkeypatch):
    from tests.support.openai_endpoint import LocalEndpoint, chat_completion

    prompts: list[str] = []

    class Namer(LocalEndpoint):
        def handle(self, handler, body):
            prompt = body["messages"][-1]["content"]
            prompts.append(prompt)
            name = "Calendar dates" if "1999" in prompt else "**Label:** \"code brackets\""
            handler.send(200, json.dumps(chat_completion(name, body["model"], 50, 5)))

    plant(tmp_path, encoder, DATES + BRACKETS)
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    with Namer() as server:
        config = config_from_dict({"storage": {"root": str(tmp_path)}, "explain": {
            "backend": "openai", "model": "namer", "base_url": server.base_url, "answer_cache": False}})
        written = C.make_description_clusters(config, "run")
    table = Store(tmp_path).read(C.CLUSTERS_TABLE)
    assert written.label_source == "llm" and set(table["label_source"]) == {"llm"}
    labels = {frozenset(group["description"]): group["label"][0] for _, group in table.group_by("cluster")}
    assert labels == {frozenset(DATES): "Calendar dates", frozenset(BRACKETS): "code brackets"}
    assert len(prompts) == 2 and all(text in "".join(prompts) for text in DATES + BRACKETS)

    # An LLM that answers nothing usable: the member nearest the centroid, as offline.
    members, _ = C.cluster_members(*C.read_selected_vectors(Store(tmp_path)), config)
    fallback = C.with_labels(members, lambda groups: [None] * len(groups), 12)
    assert set(fallback["label_source"]) == {"centroid"}
    assert (fallback.filter(pl.col("member_rank") == 1)["description"] ==
            fallback.filter(pl.col("member_rank") == 1)["label"]).all()


def test_bad_input_is_named_with_its_fix(tmp_path):
    with pytest.raises(LookupError, match=r"neuron-assets run --select description_embeddings"):
        C.make_description_clusters(config_at(tmp_path), "run")
    with pytest.raises(LookupError, match=r"neuron-assets run --select description_clusters"):
        C.read_clusters(Store(tmp_path))
    for distance in (0, 2.5, -0.1):
        with pytest.raises(ConfigError, match="clusters.distance"):
            config_at(tmp_path, distance=distance)
        with pytest.raises(ValueError, match="clusters.distance must be a cosine distance between 0 and 2"):
            C.cluster_vectors(np.eye(3), distance)
    with pytest.raises(ConfigError, match="clusters.min_size"):
        config_at(tmp_path, min_size=0)
    with pytest.raises(ValueError, match="clusters.labels: llm needs an LLM explainer"):
        C.uses_llm(config_at(tmp_path, labels="llm"))
    with pytest.raises(ValueError, match="NaN"):
        C.cluster_vectors(np.array([[1.0, np.nan], [0.0, 1.0]]), 0.5)


def test_the_asset_and_the_cli_on_a_planted_store(tiny_config, encoder, capsys):
    from neuron_assets.defs.materialize import materialize_config

    path = tiny_config(features__layers=[0, 1])  # PARTITIONS
    config = load_config(path)
    plant(config.root, encoder, DATES + BRACKETS + UNRELATED)
    outcome = materialize_config(str(path), ["description_embeddings", "description_clusters"])
    assert outcome.success, outcome.error
    assert Store(config.root).build_catalog().count("description_cluster_summary") == 1

    assert main(["--config", str(path), "clusters", "--format", "json", "--members", "2"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [c["cluster"] for c in listed] == [1, 2] and all(c["size"] == 5 and len(c["members"]) == 2 for c in listed)
    assert {c["label"] for c in listed} <= set(DATES + BRACKETS)
    assert main(["--config", str(path), "clusters", "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "cluster 1  size 5" in out and "cluster 2" not in out and "label: " in out
    assert main(["--config", str(path), "clusters", "--min-size", "6"]) == 0
    assert "no cluster with at least 6 members" in capsys.readouterr().out
    assert main(["--config", str(path), "sql", "select count(*) as n from description_cluster_summary",
                 "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 2}]

    from neuron_assets.stages.graph import in_plain_run

    assert in_plain_run("description_clusters", config) and not in_plain_run(
        "description_clusters", config_at(config.root, in_run=False))
