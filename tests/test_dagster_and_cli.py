"""The Dagster code location and the `neuron-assets` command, end to end on a tiny config."""

from __future__ import annotations

import csv
import io
import json

import dagster as dg
import polars as pl
import pytest

from neuron_assets.cli import main
from neuron_assets.config import load_config
from neuron_assets.defs.definitions import build_definitions
from neuron_assets.store import Store


def test_definitions_load(tiny_config):
    defs = build_definitions(str(tiny_config()))
    dg.Definitions.validate_loadable(defs)
    keys = {spec.key.to_user_string() for spec in defs.resolve_all_asset_specs()}
    assert {"corpus", "exemplars"} <= keys
    exemplars = defs.resolve_assets_def("exemplars")
    assert exemplars.partitions_def.get_partition_keys()[:2] == ["0|pos", "0|neg"]
    assert len(exemplars.partitions_def.get_partition_keys()) == 6


def test_partition_range_materialization_writes_every_partition(tiny_config, tmp_path):
    path = tiny_config()
    config = load_config(path)
    defs = build_definitions(str(path))
    instance = dg.DagsterInstance.ephemeral()
    corpus = dg.materialize([defs.resolve_assets_def("corpus")], instance=instance)
    assert corpus.success
    exemplars = defs.resolve_assets_def("exemplars")
    keys = exemplars.partitions_def.get_partition_keys()
    result = dg.materialize(
        [exemplars], instance=instance,
        tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]},
    )
    assert result.success
    store = Store(config.root)
    assert store.partitions("exemplars") == store.partitions("neuron_stats") == [
        (layer, polarity) for layer in range(3) for polarity in ("neg", "pos")
    ]
    materialized = instance.get_materialized_partitions(dg.AssetKey("exemplars"))
    assert materialized == set(keys)
    checks = result.get_asset_check_evaluations()
    assert checks and all(check.passed for check in checks)
    assert {check.partition for check in checks} >= set(keys), "each partition gets its own check evaluation"


def test_run_then_sql_and_show(tiny_config, capsys, monkeypatch):
    from neuron_assets import runtime

    path = str(tiny_config())
    released: list[list[str]] = []  # what each stage held when it ended
    release_all = runtime.release_all
    monkeypatch.setattr(runtime, "release_all", lambda: released.append(runtime.loaded()) or release_all())
    assert main(["--config", path, "run"]) == 0
    out = capsys.readouterr()
    assert "catalog.duckdb" in out.out and "exemplars" in out.out
    # no model outlives its stage: the subject is gone before the explainer or simulator load
    assert runtime.loaded() == []
    holding_subject = [i for i, keys in enumerate(released) if any(k.startswith('["subject"') for k in keys)]
    assert len(holding_subject) == 1 and holding_subject[0] < len(released) - 1, released
    assert not any(k.startswith('["subject"') for keys in released[holding_subject[0] + 1:] for k in keys)

    assert main(["--config", path, "sql", "select layer, polarity, count(*) as n from exemplars group by all order by 1, 2",
                 "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["layer"], r["polarity"]) for r in rows] == [(str(layer), p) for layer in range(3) for p in ("neg", "pos")]
    assert all(int(r["n"]) > 0 for r in rows)

    assert main(["--config", path, "sql", "select count(*) as n from sequences", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 72}]
    assert main(["--config", path, "sql", "select layer, polarity, count(distinct neuron) as f, max(rank) as r "
                 "from output_tokens group by all order by 1, 2", "--format", "json"]) == 0
    lens = json.loads(capsys.readouterr().out)  # the logit lens of every described partition
    assert [(r["layer"], r["polarity"]) for r in lens] == [(layer, p) for layer in range(3) for p in ("neg", "pos")]
    assert all(r["f"] > 0 and r["r"] == 9 for r in lens)

    neuron = Store(load_config(path).root).read("neuron_stats", 1, "pos")["neuron"][0]
    assert main(["--config", path, "show", "1", str(neuron), "-n", "2"]) == 0
    shown = capsys.readouterr().out
    assert f"L1/{neuron} pos" in shown and "{{" in shown

    assert main(["--config", path, "sql", "select * from no_such_view"]) == 1
    assert "Views in the catalog" in capsys.readouterr().err
    assert main(["--config", path, "sql", "create table t as select 1"]) == 1, "the catalog is read-only"


def test_run_reports_bad_config_clearly(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("corpus:\n  seq_length: 10\n")
    assert main(["--config", str(bad), "run"]) == 1
    assert "unknown key 'corpus.seq_length'" in capsys.readouterr().err


@pytest.mark.parametrize("config_file", ["configs/demo.yaml", "configs/llama31_8b_instruct.yaml",
                                         "configs/transluce_llama31_8b.yaml"])
def test_shipped_configs_are_valid(config_file):
    from neuron_assets.config import REPO_ROOT

    config = load_config(REPO_ROOT / config_file)
    assert config.name
    if "demo" in config_file:
        assert config.model_dump(exclude={"storage"}) == type(config)().model_dump(exclude={"storage"}), \
            "demo.yaml spells out the defaults"


def test_store_writes_atomically(tmp_path):
    store = Store(tmp_path)
    frame = pl.DataFrame({"a": [1, 2]})

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        from neuron_assets.store import atomic_path

        with atomic_path(store.path("t")) as tmp:
            frame.write_parquet(tmp)
            raise Boom
    assert not store.exists("t") and not list(tmp_path.rglob("*.tmp"))
    store.write("t", frame, 0, "pos")
    assert store.read("t", 0, "pos").equals(frame)


def test_a_run_that_finds_its_partition_up_to_date_still_reports_every_check(tiny_config):
    """What a run meets when another run finished its partition while it waited for the lock:
    nothing to compute, and still a result for each of the asset's checks (Dagster needs one)."""
    from neuron_assets.defs.runs import RunSettings

    defs = build_definitions(str(tiny_config()))
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([defs.resolve_assets_def("corpus")], instance=instance).success
    exemplars = defs.resolve_assets_def("exemplars")
    assert dg.materialize([exemplars], instance=instance, partition_key="1|pos").success
    unbound = [a for a in defs.assets if a.key == dg.AssetKey("exemplars")]  # without the resources bound above
    resuming = dg.Definitions(assets=unbound, jobs=[dg.define_asset_job("again", selection=["exemplars"])],
                              resources={**defs.resources, "run": RunSettings(skip_up_to_date=True)})
    again = resuming.resolve_job_def("again").execute_in_process(instance=instance, partition_key="1|pos")
    assert again.success
    [check] = again.get_asset_check_evaluations()
    assert check.passed and "checked when it was computed" in check.metadata["skipped"].value
    assert again.asset_materializations_for_node("exemplars")[0].metadata["skipped"].value == "every partition is up to date"
