"""The simulate-and-score stage in Dagster: simulator training data and checkpoint, description
scores, neuron descriptions, their checks, the rescore job and schedule, and the automation
sensor that re-scores when a new simulator checkpoint lands.

Asset bodies stay thin: read the config, call neuron_assets.stages, return metadata.
Per-feature assets use a single-run backfill policy and read ``context.partition_keys``, so a
range of partitions is one run that loads the simulator once.
"""


import dagster as dg
import numpy as np
import polars as pl

from neuron_assets.config import Config
from neuron_assets.defs.assets import log_partition_checks
from neuron_assets.defs.partitions import all_partitions_tags, parse_partition_keys, partition_key
from neuron_assets.defs.resources import NeuronAssetsConfig
from neuron_assets.defs.runs import RunSettings, StageRun
from neuron_assets.report.plots import (
    best_of_k_figure,
    loss_curve_figure,
    markdown_image,
    score_histograms,
    val_test_scatter,
)
from neuron_assets.report.render import markdown_table
from neuron_assets.score.crossfit import Scoring, leaked_rows
from neuron_assets.simulate.checkpoints import CHECKPOINTS_TABLE
from neuron_assets.stages import (
    DESCRIPTIONS_TABLE,
    SCORES_TABLE,
    TRAINING_TABLE,
    make_description_scores,
    make_neuron_descriptions,
    make_simulator_checkpoint,
    make_simulator_training_data,
    read_all,
)
from neuron_assets.score.select import CANDIDATE, SHUFFLED_CONTROL, best_of_k_curve, rows_of
from neuron_assets.simulate import needs_checkpoint, needs_gpu
from neuron_assets.store import Store

NO_NAN, IN_RANGE, EVERY_FEATURE_SCORED, EVERY_FEATURE_DESCRIBED, NEVER_SAW = (
    "no_nan_scores", "scores_in_range", "every_feature_scored", "every_feature_described",
    "simulator_never_saw_feature")
NEVER_SAW_DESCRIPTION = ("no row's score comes from a simulator that trained on its feature "
                         "(simulator_saw_feature is false or unknown on every row; cross-fitting)")

DESCRIPTION_SCORE_COLUMNS = ("val_score", "test_score", "control_val_score", "control_test_score")

AC = dg.AutomationCondition


def on_new_upstream(asset: str) -> dg.AutomationCondition:
    """Run when ``asset`` has a new materialization (not when other parents change), once its
    parents exist and none is running."""
    return (
        AC.any_deps_updated().allow(dg.AssetSelection.assets(asset)).since_last_handled()
        & ~AC.any_deps_missing() & ~AC.any_deps_in_progress() & ~AC.in_progress()
    ).with_label(f"on new {asset}")


def score_assets(partitions: dg.MultiPartitionsDefinition, config: Config | None = None) -> list[dg.AssetsDefinition]:
    """simulator_training_data, simulator_checkpoint, description_scores, neuron_descriptions."""
    gpu_simulator = config is None or needs_gpu(config)

    @dg.asset(
        deps=["exemplars", "candidate_descriptions"],
        backfill_policy=dg.BackfillPolicy.single_run(),
        description="Fine-tuned simulator training rows (table `simulator_training_data`): for seeded, disjoint "
        "samples of features (held-out, stage 1, stage 2), train exemplars with activations discretized to 0-10 and "
        "the candidate descriptions (stage 1 and held-out: one random candidate; stage 2: all, re-ranked later).",
        kinds={"parquet"},
    )
    def simulator_training_data(context: dg.AssetExecutionContext, settings: NeuronAssetsConfig,
                                run: RunSettings) -> dg.MaterializeResult:
        config = settings.load()
        with run.stage(context, config) as stage:
            if not stage.todo():
                return _up_to_date(stage)
            if not needs_checkpoint(config):
                stage.complete(None, [])
                return _skipped(config, "no scored simulator is finetuned, or simulate.finetuned.checkpoint is set: "
                                        "no simulator to train")
            written = make_simulator_training_data(config, context.run_id, log=context.log.info)
            stage.complete(None, [written.path])
        return dg.MaterializeResult(
            metadata={"rows": written.rows, "features_by_role": written.features, "partitions": written.partitions,
                      "path": dg.MetadataValue.path(str(written.path)), "config_hash": config.hash},
            data_version=dg.DataVersion(f"{config.hash}-{written.rows}"),
        )

    @dg.asset(
        deps=[simulator_training_data],
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool="gpu",
        description="The fine-tuned simulator (Transluce): stage 1 on random candidates, stage 2 on the candidates "
        "the stage-1 simulator ranks best. A folder of safetensors weights, config, tokenizer and simulator.json "
        "under checkpoints/simulator/<version>/final; one row per trained version in table `simulator_checkpoints`. "
        "Resumes an interrupted training.",
        kinds={"pytorch", "safetensors"},
    )
    def simulator_checkpoint(context: dg.AssetExecutionContext, settings: NeuronAssetsConfig,
                             run: RunSettings) -> dg.MaterializeResult:
        config = settings.load()
        with run.stage(context, config) as stage:
            if not stage.todo():
                return _up_to_date(stage)
            written = make_simulator_checkpoint(config, context.run_id, log=context.log.info,
                                                on_step=_training_progress(stage))
            stage.complete(None, [*written.paths, Store(config.store_root).path(CHECKPOINTS_TABLE)] if written.trained else [])
        if not written.trained:
            return _skipped(config, written.reason)
        metadata = {
            "version": written.version,
            "folds": written.folds,
            "path": dg.MetadataValue.path(str(written.paths[0].parent.parent)),
            "heldout_correlation": round(written.heldout_correlation, 4),
            "heldout_shuffled_control": round(written.heldout_shuffled_correlation, 4),
            "stage1_heldout_correlation": round(written.stage1_heldout_correlation, 4),
            "steps": written.steps,
            "train_seconds": round(written.seconds, 1),
            "resumed": written.resumed,
            "loss_curve": dg.MetadataValue.md(markdown_image(loss_curve_figure(written.loss_curve), "loss curve")),
            "config_hash": config.hash,
        }
        return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(written.version))

    @dg.asset(
        deps=["candidate_descriptions", "exemplars", simulator_checkpoint],
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        automation_condition=on_new_upstream("simulator_checkpoint"),
        pool="gpu" if gpu_simulator else None,
        description="Every candidate description x scorer on E_val (top-20 val exemplars + 5 random val sequences), "
        "and each feature's shuffled control (a description of another feature of the same layer and polarity, "
        "scored the same way) (table `description_scores`). Re-scores automatically on a new simulator checkpoint.",
        check_specs=[
            dg.AssetCheckSpec(NO_NAN, asset="description_scores", description="no score is NaN"),
            dg.AssetCheckSpec(IN_RANGE, asset="description_scores", description="every score is in [-1, 1]"),
            dg.AssetCheckSpec(EVERY_FEATURE_SCORED, asset="description_scores",
                              description="every feature with exemplars has scored candidates"),
            dg.AssetCheckSpec(NEVER_SAW, asset="description_scores", description=NEVER_SAW_DESCRIPTION),
        ],
        kinds={"parquet"},
    )
    def description_scores(context: dg.AssetExecutionContext, settings: NeuronAssetsConfig,
                           run: RunSettings) -> dg.MaterializeResult:
        config = settings.load()
        store = Store(config.store_root)
        with run.stage(context, config) as stage:
            requested = stage.todo(_requested(context))
            if not requested:
                return _up_to_date(stage)
            scoring = Scoring.build(config, store)
            written = []
            for layer, polarity in requested:
                with _feature_task(stage, store, "score", layer, polarity) as task:
                    written.append(make_description_scores(config, layer, polarity, context.run_id, scoring,
                                                           log=context.log.info, on_features=task.advance))
                stage.complete((layer, polarity), [written[-1].path])
        frame = pl.concat([store.read(SCORES_TABLE, w.layer, w.polarity) for w in written], how="diagonal_relaxed")
        unscored = [(w.layer, w.polarity, n) for w in written for n in w.unscored]
        _log_partition_results(context, written, lambda w: _score_checks(_partition(frame, w), "score") + [
            dg.AssetCheckResult(check_name=EVERY_FEATURE_SCORED, passed=not w.unscored),
            never_saw_check(_partition(frame, w))])
        return dg.MaterializeResult(
            metadata={**_scores_metadata(config, store, frame, scoring, written), **stage.metadata()},
            data_version=dg.DataVersion(f"{config.hash}-{scoring.simulator_version}"),
            check_results=_score_checks(frame, "score") + [
                dg.AssetCheckResult(check_name=EVERY_FEATURE_SCORED, passed=not unscored,
                                    metadata={"unscored_features": len(unscored), "first": str(unscored[:10])}),
                never_saw_check(frame)],
        )

    @dg.asset(
        deps=[description_scores, "exemplars", simulator_checkpoint],
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        automation_condition=on_new_upstream("description_scores"),
        pool="gpu" if gpu_simulator else None,
        description="Per neuron x polarity: the best of the k candidates by val score (score.select_by), its score "
        "on E_test (top-20 test exemplars + 5 random test sequences), and its shuffled control's val and test scores "
        "(table `neuron_descriptions`).",
        check_specs=[
            dg.AssetCheckSpec(NO_NAN, asset="neuron_descriptions", description="no val or test score is NaN"),
            dg.AssetCheckSpec(IN_RANGE, asset="neuron_descriptions", description="every score is in [-1, 1]"),
            dg.AssetCheckSpec(EVERY_FEATURE_DESCRIBED, asset="neuron_descriptions",
                              description="every scored feature has a selected description"),
            dg.AssetCheckSpec(NEVER_SAW, asset="neuron_descriptions", description=NEVER_SAW_DESCRIPTION),
        ],
        kinds={"parquet"},
    )
    def neuron_descriptions(context: dg.AssetExecutionContext, settings: NeuronAssetsConfig,
                            run: RunSettings) -> dg.MaterializeResult:
        config = settings.load()
        store = Store(config.store_root)
        with run.stage(context, config) as stage:
            requested = stage.todo(_requested(context))
            if not requested:
                return _up_to_date(stage)
            scoring = Scoring.build(config, store)
            written = []
            for layer, polarity in requested:
                with _feature_task(stage, store, "test score", layer, polarity) as task:
                    written.append(make_neuron_descriptions(config, layer, polarity, context.run_id, scoring,
                                                            log=context.log.info, on_features=task.advance))
                stage.complete((layer, polarity), [written[-1].path])
        frame = pl.concat([w.frame for w in written], how="diagonal_relaxed")
        scored = pl.concat([store.read(SCORES_TABLE, w.layer, w.polarity).select("layer", "polarity", "neuron")
                            for w in written]).unique()
        missing = scored.join(frame.select("layer", "polarity", "neuron"), on=["layer", "polarity", "neuron"],
                              how="anti")
        checks = [c for column in DESCRIPTION_SCORE_COLUMNS for c in _score_checks(frame, column, suffix=column)]
        _log_partition_results(context, written, lambda w: [
            c for column in DESCRIPTION_SCORE_COLUMNS for c in _score_checks(_partition(frame, w), column)] + [
            dg.AssetCheckResult(check_name=EVERY_FEATURE_DESCRIBED,
                                passed=_partition(missing, w).height == 0),
            never_saw_check(_partition(frame, w))])
        return dg.MaterializeResult(
            metadata={**_descriptions_metadata(config, store, frame, written), **stage.metadata()},
            data_version=dg.DataVersion(f"{config.hash}-{frame.height}-{scoring.simulator_version}"),
            check_results=_merge_checks(checks) + [
                dg.AssetCheckResult(check_name=EVERY_FEATURE_DESCRIBED, passed=missing.height == 0,
                                    metadata={"features_without_description": missing.height}),
                never_saw_check(frame)],
        )

    return [simulator_training_data, simulator_checkpoint, description_scores, neuron_descriptions]


def rescore_job(partitions: dg.MultiPartitionsDefinition):
    """Re-score every candidate and re-select: description_scores, then neuron_descriptions."""
    return dg.define_asset_job(
        "rescore", selection=dg.AssetSelection.assets("description_scores", "neuron_descriptions"),
        partitions_def=partitions, description="Re-score every candidate description and re-select the best.",
    )


def rescore_schedule(job, partitions: dg.MultiPartitionsDefinition,
                     cron: str = "0 3 * * *") -> dg.ScheduleDefinition:
    """Every partition in one run (range tags: a daemon backfill of a 2-D partition set splits it)."""

    @dg.schedule(job=job, cron_schedule=cron, name="rescore_schedule",
                 description="Re-score all partitions in one run.")
    def rescore(context: dg.ScheduleEvaluationContext):
        return dg.RunRequest(run_key=f"rescore-{context.scheduled_execution_time}",
                             tags=all_partitions_tags(partitions))

    return rescore


automation_sensor = dg.AutomationConditionSensorDefinition(
    "default_automation_condition_sensor", target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Evaluates automation conditions; on by default, so a new simulator checkpoint re-scores.",
)


def score_definitions(partitions: dg.MultiPartitionsDefinition, config: Config) -> dict:
    """Keyword arguments for dg.Definitions: this stage's assets, job, schedule and sensor."""
    job = rescore_job(partitions)
    schedules = [rescore_schedule(job, partitions, config.score.schedule)] if config.score.schedule else []
    return {"assets": score_assets(partitions, config), "jobs": [job], "schedules": schedules,
            "sensors": [automation_sensor]}


# -- helpers ------------------------------------------------------------------------------


def requested_partitions(context: dg.AssetExecutionContext):
    """(layer, polarity) of the run's partitions; a dg.Failure for an empty range."""
    requested = parse_partition_keys(context.partition_keys)
    if not requested:
        raise dg.Failure("no partitions requested: a layer|polarity range is a rectangle and polarity runs "
                         "pos...neg, e.g. '0|pos...5|neg'")
    return requested


_requested = requested_partitions


def _partition(frame: pl.DataFrame, written) -> pl.DataFrame:
    return frame.filter((pl.col("layer") == written.layer) & (pl.col("polarity") == written.polarity))


def _log_partition_results(context: dg.AssetExecutionContext, written, checks_of) -> None:
    """In a range run, each check once per partition (Dagster stores the returned results
    without a partition); ``checks_of(w)`` gives one written partition's results."""
    passed_by_check: dict[str, dict] = {}
    for w in written:
        key = partition_key(w.layer, w.polarity)
        for result in checks_of(w):
            by_key = passed_by_check.setdefault(result.check_name, {})
            by_key[key] = by_key.get(key, True) and result.passed
    for name, passed_by_key in passed_by_check.items():
        log_partition_checks(context, name, passed_by_key)


def _up_to_date(stage: StageRun) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"skipped": "up to date", **stage.metadata()})


def _feature_task(stage: StageRun, store: Store, label: str, layer: int, polarity):
    """A progress task over one partition's features (counted from neuron_stats, cheaply)."""
    total = (store.scan("neuron_stats", layer, polarity.value).select(pl.len()).collect().item()
             if store.exists("neuron_stats", layer, polarity.value) else None)
    return stage.progress.task(f"{label} {layer}|{polarity.value}", total, "feature")


def _training_progress(stage: StageRun):
    """on_step for the simulator's training: one task per training stage, its loss shown."""
    tasks = {}

    def on_step(name: str, step: int, total: int, loss: float) -> None:
        task = tasks.get(name) or tasks.setdefault(name, stage.progress.start(f"simulator {name}", total, "step"))
        task.advance(step - task.done, info=f"loss {loss:.3f}")
        if step >= total:
            task.finish()

    return on_step


def _skipped(config: Config, reason: str) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"skipped": reason, "config_hash": config.hash},
                                data_version=dg.DataVersion(f"{config.hash}-skipped"))


def never_saw_check(frame: pl.DataFrame) -> dg.AssetCheckResult:
    """Fails when any row was scored by a simulator that trained on its feature."""
    leaked = leaked_rows(frame)
    unknown = int(frame["simulator_saw_feature"].null_count()) if "simulator_saw_feature" in frame.columns else 0
    return dg.AssetCheckResult(check_name=NEVER_SAW, passed=leaked == 0,
                               metadata={"rows_scored_by_a_simulator_that_saw_the_feature": leaked,
                                         "rows_with_unknown_training_features": unknown})


def _score_checks(frame: pl.DataFrame, column: str, suffix: str = "") -> list[dg.AssetCheckResult]:
    values = frame[column].drop_nulls().to_numpy() if frame.height else np.zeros(0)
    nans = int(np.isnan(values).sum())
    outside = int(((values < -1) | (values > 1)).sum())
    return [
        dg.AssetCheckResult(check_name=NO_NAN, passed=nans == 0, metadata={f"nan_{suffix or column}": nans}),
        dg.AssetCheckResult(check_name=IN_RANGE, passed=outside == 0, metadata={f"outside_{suffix or column}": outside}),
    ]


def _merge_checks(results: list[dg.AssetCheckResult]) -> list[dg.AssetCheckResult]:
    """One result per check name: passed when all passed, metadata merged."""
    merged: dict[str, tuple[bool, dict]] = {}
    for result in results:
        passed, metadata = merged.get(result.check_name, (True, {}))
        merged[result.check_name] = (passed and result.passed,
                                     {**metadata, **{k: v.value for k, v in result.metadata.items()}})
    return [dg.AssetCheckResult(check_name=name, passed=passed, metadata=metadata)
            for name, (passed, metadata) in merged.items()]


def _scores_metadata(config: Config, store: Store, frame: pl.DataFrame, scoring: Scoring, written) -> dict:
    selector = scoring.selector
    chosen = rows_of(frame, selector.name, selector.simulator).filter(pl.col("split") == "val")
    candidates = chosen.filter(pl.col("role") == CANDIDATE)
    controls = chosen.filter(pl.col("role") == SHUFFLED_CONTROL)
    by_layer = {k[0]: g["score"].to_list() for k, g in candidates.group_by("layer")}
    control_by_layer = {k[0]: g["score"].to_list() for k, g in controls.group_by("layer")}
    curve = best_of_k_curve(frame, selector.name, selector.simulator)
    label = _label(selector)
    metadata = {
        "rows": frame.height,
        "partitions": len(written),
        "scorers": ", ".join(_label(s) for s in scoring.scorers),
        "selects": label,
        "simulator_checkpoint": scoring.simulator_version or "none",
        "means": dg.MetadataValue.md(_means_table(frame, scoring)),
        "flagged_constant_predictions": int(candidates["flags"].list.len().gt(0).sum()) if candidates.height else 0,
        "per_layer_histogram": dg.MetadataValue.md(markdown_image(
            score_histograms(by_layer, control_by_layer, f"candidates, {label} (val), per layer"), "histogram")),
        "best_of_k": dg.MetadataValue.md(markdown_image(best_of_k_figure(curve, f"mean test score of the val-best of k, {label}"), "best of k")
                                         + f"\n\nfit: mean_best(k) = {curve.fit_a} * k^{curve.fit_b}"),
        "root": dg.MetadataValue.path(str(store.table_dir(SCORES_TABLE))),
        "seconds": round(sum(w.seconds for w in written), 1),
        "config_hash": config.hash,
    }
    for name, reason in scoring.skipped.items():
        metadata[f"skipped {name}"] = reason
    return metadata


def _label(scorer) -> str:
    return scorer.name + (f" ({scorer.simulator})" if scorer.simulator else "")


def _means_table(frame: pl.DataFrame, scoring: Scoring) -> str:
    table = []
    for scorer in scoring.scorers:
        rows = rows_of(frame, scorer.name, scorer.simulator).filter(pl.col("split") == "val")
        table.append((_label(scorer), _mean(rows.filter(pl.col("role") == CANDIDATE)["score"]),
                      _mean(rows.filter(pl.col("role") == SHUFFLED_CONTROL)["score"])))
    return markdown_table(["scorer", "candidates (val)", "shuffled control (val)"], table)


def _descriptions_metadata(config: Config, store: Store, frame: pl.DataFrame, written) -> dict:
    everything = read_all(store, DESCRIPTIONS_TABLE)
    by_layer = {k[0]: g["test_score"].to_list() for k, g in everything.group_by("layer")} if everything.height else {}
    control_by_layer = ({k[0]: g["control_test_score"].drop_nulls().to_list() for k, g in everything.group_by("layer")}
                        if everything.height else {})
    with_control = frame.filter(pl.col("control_test_score").is_not_null() & pl.col("control_val_score").is_not_null())
    return {
        "rows": frame.height,
        "partitions": len(written),
        "mean_val_score": _mean(frame["val_score"]),
        "mean_test_score": _mean(frame["test_score"]),
        "val_minus_test": round(_mean(frame["val_score"]) - _mean(frame["test_score"]), 4),
        "mean_control_test_score": _mean(frame["control_test_score"]),
        "above_control_on_test": round(float((with_control["test_score"] > with_control["control_test_score"]).mean()), 4)
        if with_control.height else None,
        "val_vs_test": dg.MetadataValue.md(markdown_image(val_test_scatter(
            frame["val_score"].to_list(), frame["test_score"].to_list(), with_control["control_val_score"].to_list(),
            with_control["control_test_score"].to_list()),
            "val vs test")),
        "per_layer_histogram_all_partitions": dg.MetadataValue.md(markdown_image(
            score_histograms(by_layer, control_by_layer, "selected description, test score, per layer"), "histogram")),
        "root": dg.MetadataValue.path(str(store.table_dir(DESCRIPTIONS_TABLE))),
        "config_hash": config.hash,
    }


def _mean(series: pl.Series) -> float:
    values = series.drop_nulls()
    return round(float(values.mean()), 4) if values.len() else 0.0


__all__ = ["CHECKPOINTS_TABLE", "NEVER_SAW", "TRAINING_TABLE", "automation_sensor", "never_saw_check", "on_new_upstream", "rescore_job",
           "rescore_schedule", "score_assets", "score_definitions"]
