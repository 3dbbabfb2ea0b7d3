"""The candidate_descriptions asset in Dagster, and through `neuron-assets run | sql`."""

from __future__ import annotations

import csv
import io

import dagster as dg
import polars as pl

from neuron_assets.cli import main
from neuron_assets.config import load_config
from neuron_assets.defs.assets import corpus, exemplar_assets
from neuron_assets.defs.explain_assets import CHECK, ExplainerResource, explain_assets
from neuron_assets.defs.partitions import layer_polarity_partitions
from neuron_assets.defs.resources import NeuronAssetsConfig, SubjectModelResource
from neuron_assets.defs.runs import RunSettings
from neuron_assets.explain import CANDIDATE_SCHEMA
from neuron_assets.store import Store

K = 3


def test_candidate_descriptions_asset_fills_every_partition(tiny_config):
    path = tiny_config(explain__k=K)
    config = load_config(path)
    partitions = layer_polarity_partitions(config)
    assets = [corpus, *exemplar_assets(partitions), *explain_assets(partitions, config)]
    resources = {"settings": NeuronAssetsConfig(config_path=str(path)), "subject": SubjectModelResource(),
                 "explainer": ExplainerResource(), "run": RunSettings()}
    defs = dg.Definitions(assets=assets, resources=resources)
    dg.Definitions.validate_loadable(defs)
    keys = partitions.get_partition_keys()
    tags = {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([assets[0]], instance=instance, resources=resources).success
    assert dg.materialize([assets[1]], instance=instance, resources=resources, tags=tags).success
    result = dg.materialize([assets[2]], instance=instance, resources=resources, tags=tags)
    assert result.success

    store = Store(config.root)
    assert store.partitions("candidate_descriptions") == store.partitions("exemplars")
    for layer, polarity in store.partitions("candidate_descriptions"):
        frame = store.read("candidate_descriptions", layer, polarity)
        stats = store.read("neuron_stats", layer, polarity)
        expected = list(CANDIDATE_SCHEMA.items())
        expected.insert([name for name, _ in expected].index("polarity") + 1, ("kind", pl.String))  # neuron | sae
        assert frame.schema == pl.Schema(expected + [("model", pl.String), ("config_hash", pl.String),
                                                     ("run_id", pl.String)])
        assert frame["kind"].unique().to_list() == ["neuron"]
        assert frame.height == stats.height * K
        assert set(frame["neuron"]) == set(stats["neuron"])
        assert frame["config_hash"].unique().to_list() == [config.hash]
        assert frame["run_id"].unique().to_list() == [result.run_id]
        assert frame["backend"].unique().to_list() == ["statistical"]
        assert ((frame["description"].is_null()) ^ (frame["failure"].is_null())).all(), "a description or a reason"
        assert frame["description"].drop_nulls().str.contains('"').all()
    checks = result.get_asset_check_evaluations()
    assert checks and all(check.check_name == CHECK and check.passed for check in checks)
    assert {check.partition for check in checks} >= set(keys), "each partition gets its own check evaluation"
    materializations = result.asset_materializations_for_node("candidate_descriptions")
    assert sorted(m.partition for m in materializations) == sorted(keys)
    metadata = materializations[0].metadata
    features = sum(store.read("neuron_stats", layer, p).height for layer, p in store.partitions("exemplars"))
    assert metadata["rows"].value == features * K
    assert metadata["prompt_tokens"].value == 0 and "description" in metadata["examples"].value
    assert instance.get_materialized_partitions(dg.AssetKey("candidate_descriptions")) == set(keys)

    assert "candidate_descriptions" in store.build_catalog()
    with store.connect() as con:
        per_partition = con.sql("select layer, polarity, count(*) from candidate_descriptions group by all").fetchall()
    assert len(per_partition) == len(keys)


def test_neuron_assets_run_fills_candidate_descriptions_and_sql_reads_them(tiny_config, capsys):
    path = str(tiny_config(explain__k=K))
    assert main(["--config", path, "run"]) == 0, capsys.readouterr().err
    assert "candidate_descriptions" in capsys.readouterr().out
    query = ("select layer, polarity, count(*) as n, count(distinct neuron) as neurons, "
             "count(description) + count(failure) as settled from candidate_descriptions group by all order by 1, 2")
    assert main(["--config", path, "sql", query, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    expected = [(str(layer), p) for layer in range(3) for p in ("neg", "pos")]
    assert [(r["layer"], r["polarity"]) for r in rows] == expected
    assert all(int(r["n"]) == K * int(r["neurons"]) == int(r["settled"]) for r in rows)
    assert main(["--config", path, "sql", "@sql/examples/candidate_failures_and_tokens.sql"]) == 0
    assert "statistical" in capsys.readouterr().out
