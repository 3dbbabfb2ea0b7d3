"""Tables written by an earlier version read with today's column names, in one place (the store)."""

import polars as pl

from neuron_assets.store import Store


def test_older_exemplars_and_stats_read_with_todays_columns(tmp_path):
    store = Store(tmp_path)
    # exemplars before the rename: `kind` was how the row was drawn, `feature_kind` the feature's kind
    store.write("exemplars", pl.DataFrame({"layer": [0, 0], "polarity": ["pos", "pos"], "feature_kind": ["neuron", "sae"],
                                           "neuron": [3, 1], "split": ["train", "val"], "kind": ["top", "quantile"]}),
                0, "pos")
    # a table written before features had kinds: every row a neuron
    store.write("neuron_stats", pl.DataFrame({"layer": [0], "polarity": ["pos"], "neuron": [3], "max": [1.5]}), 0, "pos")

    exemplars = store.read("exemplars", 0, "pos")
    assert exemplars.select("kind", "sample").rows() == [("neuron", "top"), ("sae", "quantile")]
    assert "feature_kind" not in exemplars.columns
    assert store.scan("exemplars", 0, "pos").filter(pl.col("sample") == "top").select("kind").collect().item() == "neuron"
    assert store.read("exemplars", 0, "pos", columns=["sample"])["sample"].to_list() == ["top", "quantile"]
    assert store.read("neuron_stats", 0, "pos")["kind"].to_list() == ["neuron"]
    assert store.scan("neuron_stats", 0, "pos").select("kind").collect().item() == "neuron"

    # today's tables pass through untouched
    today = pl.DataFrame({"layer": [0], "polarity": ["neg"], "kind": ["sae"], "neuron": [2], "sample": ["random"]})
    store.write("exemplars", today, 0, "neg")
    assert store.read("exemplars", 0, "neg").equals(today)
