"""End to end: `neuron-assets run` on a tiny Llama with planted neurons, then the Dagster
side of scoring (checks, automation on a new checkpoint, the rescore schedule)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import yaml

from neuron_assets.cli import main
from neuron_assets.config import load_config
from neuron_assets.stages import read_all
from neuron_assets.score.select import best_of_k_curve
from neuron_assets.store import Store, sql_dir
from tests.support.planted_model import PlantedNeuron, plant_neurons
from tests.support.tiny_models import make_tiny_llama

PLANTED = [
    PlantedNeuron(0, 5, " king"),
    PlantedNeuron(0, 9, " teacher"),
    PlantedNeuron(1, 2, " old", sign=-1),
    PlantedNeuron(1, 7, " small"),
]
NEURONS = [2, 5, 7, 9, 11, 13]


@pytest.fixture(scope="module")
def planted_llama(tmp_path_factory, tiny_tokenizer) -> Path:
    folder = make_tiny_llama(tmp_path_factory.mktemp("planted-llama"), tiny_tokenizer, num_layers=2, hidden=64,
                             intermediate=96, heads=1)
    return plant_neurons(folder, PLANTED)


def _write_config(folder: Path, model: Path, corpus: Path, **simulate) -> Path:
    raw = {
        "name": "planted",
        "storage": {"root": str(folder / "home")},
        "subject": {"model": str(model), "batch_size": 16},
        "corpus": {"sources": [{"name": "texts", "kind": "text", "path": str(corpus)}], "seq_len": 32,
                   "sequences_per_split": 60},
        "features": {"layers": [0, 1], "neurons": NEURONS}, "sae": {"layers": []},
        "exemplars": {"top_k": 20, "random_per_split": 5, "per_quantile": 1, "quantile_bins": 4,
                      "quantile_reservoir": 16, "stats_token_sample": 256},
        "explain": {"k": 3},
        "simulate": simulate or {"backend": "lexical", "compare_with": []},
        "score": {"scorers": ["correlation", "embedding"], "schedule": "0 3 * * *"},
    }
    path = folder / f"config-{simulate.get('backend', 'lexical')}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def lexical_run(tmp_path_factory, planted_llama, text_corpus):
    folder = tmp_path_factory.mktemp("pipeline")
    config_path = _write_config(folder, planted_llama, text_corpus)
    assert main(["--config", str(config_path), "run"]) == 0
    return config_path


def _planted_rows(frame: pl.DataFrame) -> pl.DataFrame:
    keys = pl.DataFrame({"layer": [p.layer for p in PLANTED], "neuron": [p.index for p in PLANTED],
                         "polarity": ["pos" if p.sign > 0 else "neg" for p in PLANTED],
                         "word": [p.word for p in PLANTED]})
    return frame.join(keys, on=["layer", "neuron", "polarity"])


def test_run_describes_planted_neurons_far_above_the_shuffled_control(lexical_run):
    store = Store(load_config(lexical_run).root)
    described = read_all(store, "neuron_descriptions")
    assert described.height == 2 * 2 * len(NEURONS)  # every layer x polarity x neuron
    planted = _planted_rows(described)
    assert planted.height == len(PLANTED)
    for row in planted.iter_rows(named=True):
        assert row["word"] in row["description"].lower(), row
        assert row["test_score"] > 0.8 and row["val_score"] > 0.8, row
        assert row["control_test_score"] < 0.3, row
    others = described.join(planted.select("layer", "neuron", "polarity"), on=["layer", "neuron", "polarity"], how="anti")
    assert planted["test_score"].mean() > others["test_score"].mean() + 0.3
    for column in ("val_score", "test_score", "control_val_score", "control_test_score"):
        values = described[column].drop_nulls().to_numpy()
        assert not np.isnan(values).any() and (np.abs(values) <= 1).all()


def test_catalog_views_and_example_queries(lexical_run):
    store = Store(load_config(lexical_run).root)
    views = set(store.views())
    assert {"description_scores", "neuron_descriptions", "layer_summary", "best_of_k_curve"} <= views
    with store.connect() as con:
        summary = con.execute("select layer, polarity, neurons, mean_test_score, mean_control_test_score "
                              "from layer_summary order by all").fetchall()
        assert [(r[0], r[1], r[2]) for r in summary] == [(0, "neg", 6), (0, "pos", 6), (1, "neg", 6), (1, "pos", 6)]
        curve = con.execute("select k, mean_best, neurons, fit_a, fit_b from best_of_k_curve "
                            "where scorer = 'correlation' and simulator = 'lexical' order by k").fetchall()
        known = {p.stem for p in sql_dir().glob("*.sql")}
        ran = 0
        for example in sorted((sql_dir() / "examples").glob("*.sql")):
            text = example.read_text()
            if {name for name in known if name in text} <= views:  # this run has every view it reads
                con.execute(text).fetchall()
                ran += 1
        assert ran >= 5
    python_curve = best_of_k_curve(read_all(store, "description_scores"), "correlation", "lexical")
    assert [r[0] for r in curve] == list(python_curve.k)
    np.testing.assert_allclose([r[1] for r in curve], python_curve.mean_best, rtol=1e-9)
    assert [r[2] for r in curve] == list(python_curve.features)
    if python_curve.fit_a is not None:
        assert curve[0][3] == pytest.approx(python_curve.fit_a) and curve[0][4] == pytest.approx(python_curve.fit_b)


def test_finetuned_simulator_trains_and_scores_in_the_run(lexical_run, planted_llama, text_corpus):
    folder = lexical_run.parent
    config_path = _write_config(
        folder, planted_llama, text_corpus, backend="finetuned", compare_with=["lexical"],
        finetuned={"backbone_layers": 1, "max_length": 96},
        training={"stage1_features": 12, "stage2_features": 4, "heldout_features": 4, "exemplars_per_feature": 3,
                  "stage1_epochs": 2, "stage2_epochs": 1, "batch_size": 8, "selection_checks": False},
    )
    raw = yaml.safe_load(config_path.read_text())
    raw["storage"]["root"] = str(folder / "home")  # the lexical run's corpus, exemplars and candidates
    config_path.write_text(yaml.safe_dump(raw))
    selection = "simulator_training_data,simulator_checkpoint,description_scores,neuron_descriptions"
    assert main(["--config", str(config_path), "run", "--select", selection]) == 0
    store = Store(load_config(config_path).root)
    checkpoints = store.read("simulator_checkpoints").sort("fold")
    assert checkpoints["fold"].to_list() == [0, 1] and min(checkpoints["stage2_steps"]) > 0
    versions = dict(zip(checkpoints["fold"], checkpoints["version"]))
    for path in checkpoints["path"]:
        assert (Path(path) / "model.safetensors").is_file() and (Path(path) / "simulator.json").is_file()
    # cross-fitting: each fold's simulator trained only on the other fold's features, and every
    # finetuned score comes from the simulator of the feature's own fold
    from neuron_assets.simulate.folds import feature_key, fold_of
    from neuron_assets.types import FeatureId, Polarity

    for fold, trained in zip(checkpoints["fold"], checkpoints["trained_features"].to_list()):
        assert trained and all(fold_of(FeatureId(int(k.split("/")[0]), int(k.split("/")[1]), Polarity(k.split("/")[2])), 2)
                               != fold for k in trained)
    scores = read_all(store, "description_scores").filter(pl.col("scorer") == "correlation")
    assert set(scores["simulator"]) == {"finetuned", "lexical"}
    assert not scores["simulator_saw_feature"].any() and scores["simulator_saw_feature"].null_count() == 0
    assert scores.filter(pl.col("simulator") == "lexical")["simulator_version"].null_count() == \
        scores.filter(pl.col("simulator") == "lexical").height
    for layer, polarity, neuron, version in scores.filter(pl.col("simulator") == "finetuned").select(
            "layer", "polarity", "neuron", "simulator_version").unique().iter_rows():
        assert version == versions[fold_of(FeatureId(layer, neuron, Polarity(polarity)), 2)]
    described = read_all(store, "neuron_descriptions")
    assert described.height == 24 and described["test_score"].is_nan().sum() == 0
    assert set(described["simulator"]) == {"finetuned"}  # simulate.backend selects; lexical is compared
    assert (described["test_simulator_version"] == described["simulator_version"]).all()
    assert not described["simulator_saw_feature"].any() and described["simulator_saw_feature"].null_count() == 0
    assert feature_key(FeatureId(0, 1, Polarity.POS)) == "0/1/pos"
    version = versions[0]
    # the features were picked before their exemplars loaded: the rows are those of planning over every feature
    from neuron_assets.config import Config
    from neuron_assets.exemplars import load_feature_exemplars
    from neuron_assets.simulate.checkpoints import latest_checkpoint
    from neuron_assets.stages import candidate_partitions, read_candidates
    from neuron_assets.simulate.training import plan_training_data

    config = load_config(config_path)
    features, candidates = [], {}
    for layer, polarity in candidate_partitions(store, config):
        features += load_feature_exemplars(store, layer, polarity)
        candidates.update(read_candidates(store, layer, polarity))
    expected = plan_training_data(features, candidates, config.simulate.training)
    assert store.read("simulator_training_data").select(expected.columns).equals(expected)
    # a checkpoint is used only by a config with the same simulator settings
    assert latest_checkpoint(store, config)[0] in versions.values()
    changed = config.model_dump()
    changed["simulate"]["training"]["seed"] += 1
    assert latest_checkpoint(store, Config.model_validate(changed)) is None


def _report(instance, asset: str, partitions=(None,)):
    for key in partitions:
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=asset, partition=key))


def test_new_checkpoint_triggers_rescoring_and_the_schedule_covers_every_partition(lexical_run):
    from neuron_assets.defs.definitions import build_definitions

    defs = build_definitions(str(lexical_run))
    dg.Definitions.validate_loadable(defs)
    sensor = defs.resolve_sensor_def("default_automation_condition_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assets = {a.key.to_user_string(): a for a in defs.assets}
    partitions = assets["description_scores"].partitions_def.get_partition_keys()
    scores, selected = dg.AssetKey("description_scores"), dg.AssetKey("neuron_descriptions")
    instance = dg.DagsterInstance.ephemeral()
    for name in ("corpus", "simulator_training_data", "simulator_checkpoint"):
        _report(instance, name)
    for name in ("exemplars", "candidate_descriptions", "description_scores", "neuron_descriptions"):
        _report(instance, name, partitions)
    settled = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    settled = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=settled.cursor)
    assert settled.get_num_requested(scores) == 0
    _report(instance, "candidate_descriptions", partitions[:1])  # new candidates alone do not re-score
    quiet = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=settled.cursor)
    assert quiet.get_num_requested(scores) == 0
    result = dg.materialize([assets["simulator_checkpoint"]], instance=instance, resources=defs.resources)
    assert result.success
    after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=quiet.cursor)
    assert after.get_num_requested(scores) == len(partitions) == 4  # a new checkpoint re-scores everything
    assert after.get_num_requested(selected) == 4  # the selection follows the scores being requested
    again = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=after.cursor)
    assert again.get_num_requested(scores) == 0 and again.get_num_requested(selected) == 0  # handled once
    # the schedule asks for every partition in one run
    schedule = defs.resolve_schedule_def("rescore_schedule")
    when = datetime(2025, 1, 2, 3, 0, tzinfo=timezone.utc)
    with dg.build_schedule_context(instance=instance, scheduled_execution_time=when,
                                   repository_def=defs.get_repository_def()) as context:
        [request] = list(schedule.evaluate_tick(context).run_requests)
    assert request.tags["dagster/asset_partition_range_start"] == partitions[0]
    assert request.tags["dagster/asset_partition_range_end"] == partitions[-1]
    assert defs.resolve_job_def("rescore") is not None


def test_a_range_run_records_each_partitions_checks_and_values(lexical_run):
    """One range run over every partition: each check is recorded once per partition, and as
    Dagster copies one materialization's metadata to every partition, each partition's own rows
    and mean scores come as an observation of that partition, the materialization saying that
    its values cover the run."""
    from neuron_assets.defs.definitions import build_definitions
    from neuron_assets.stages.tables import DESCRIPTIONS_TABLE

    defs = build_definitions(str(lexical_run))
    assets = {a.key.to_user_string(): a for a in defs.assets}
    keys = assets["description_scores"].partitions_def.get_partition_keys()
    tags = {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
    result = dg.materialize([assets["description_scores"], assets["neuron_descriptions"]],
                            instance=dg.DagsterInstance.ephemeral(), resources=defs.resources, tags=tags)
    assert result.success
    by_check: dict[tuple, set] = {}
    for check in result.get_asset_check_evaluations():
        by_check.setdefault((check.asset_key.to_user_string(), check.check_name), set()).add(check.partition)
    assert len(by_check) == 8  # four checks on each asset (simulator_never_saw_feature among them)
    for (asset, name), partitions in by_check.items():
        assert set(keys) <= partitions, (asset, name, partitions)

    observed = {event.partition: event.asset_observation_data.asset_observation.metadata
                for event in result.all_events if event.event_type_value == "ASSET_OBSERVATION"
                and event.asset_key == dg.AssetKey("neuron_descriptions")}
    assert set(observed) == set(keys)
    store = Store(load_config(lexical_run).root)
    for key in keys:
        layer, polarity = key.split("|")
        rows = store.read(DESCRIPTIONS_TABLE, int(layer), polarity)
        assert observed[key]["rows"].value == rows.height
        assert observed[key]["mean_test_score"].value == pytest.approx(float(rows["test_score"].mean()), abs=1e-4)
    materialization = result.asset_materializations_for_node("neuron_descriptions")[0]
    assert "cover the 4 partitions" in materialization.metadata["scope"].value
