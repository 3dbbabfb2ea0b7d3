"""The simulate-and-score stage in Dagster: simulator training data and checkpoint, description
scores, neuron descriptions, the rescore job and schedule, and the automation sensor that
re-scores when a new simulator checkpoint lands. A range of partitions is one run that loads
the simulator once."""

import dagster as dg
import polars as pl

from neuron_assets import checks
from neuron_assets.checks import (
    EVERY_FEATURE_DESCRIBED,
    EVERY_FEATURE_SCORED,
    IN_RANGE,
    NEVER_SAW,
    NEVER_SAW_DESCRIPTION,
    NO_NAN,
)
from neuron_assets.config import Config
from neuron_assets.defs.partitions import all_partitions_tags
from neuron_assets.defs.template import Call, Report, check_result, on_new_upstream, skipped, stage_asset, step_progress
from neuron_assets.report.metadata import (
    checkpoint_metadata,
    descriptions_metadata,
    descriptions_partition_metadata,
    scores_metadata,
    training_data_metadata,
)
from neuron_assets.score.crossfit import Scoring
from neuron_assets.simulate import needs_checkpoint, needs_gpu
from neuron_assets.simulate.checkpoints import CHECKPOINTS_TABLE
from neuron_assets.stages import (
    SCORES_TABLE,
    TRAINING_TABLE,
    make_description_scores,
    make_neuron_descriptions,
    make_simulator_checkpoint,
    make_simulator_training_data,
)

NO_SIMULATOR_TO_TRAIN = ("no scored simulator is finetuned, or simulate.finetuned.checkpoint is set: "
                         "no simulator to train")


def compute_training_data(call: Call):
    if not needs_checkpoint(call.config):
        call.stage.complete(None, [])
        return None
    written = make_simulator_training_data(call.config, call.run_id, log=call.log)
    call.stage.complete(None, [written.path])
    return written


def report_training_data(call: Call, written) -> Report:
    if written is None:
        return skipped(call, NO_SIMULATOR_TO_TRAIN)
    return Report(training_data_metadata(call.config, written), data_version=f"{call.version}-{written.rows}")


def compute_checkpoint(call: Call):
    on_step = step_progress(call.stage)
    written = make_simulator_checkpoint(call.config, call.run_id, log=call.log,
                                        on_step=lambda name, *step: on_step(f"simulator {name}", *step))
    call.stage.complete(None, [*written.paths, call.store.path(CHECKPOINTS_TABLE)] if written.trained else [])
    return written


def report_checkpoint(call: Call, written) -> Report:
    if not written.trained:
        return skipped(call, written.reason)
    return Report(checkpoint_metadata(call.config, written), data_version=written.version)


def compute_scores(call: Call):
    scoring = Scoring.build(call.config, call.store)
    return scoring, make_description_scores(call.config, call.todo, call.run_id, scoring, call.stage.progress, call.log,
                                            on_partition=call.stage.complete)


def report_scores(call: Call, result) -> Report:
    scoring, written = result
    frame = pl.concat([call.store.read(SCORES_TABLE, w.layer, w.polarity) for w in written], how="diagonal_relaxed")
    overall, by_partition = checks.description_scores_checks(frame, written)
    return Report(scores_metadata(call.config, call.store, frame, scoring, written), overall, by_partition,
                  data_version=f"{call.version}-{scoring.simulator_version}")


def compute_descriptions(call: Call):
    scoring = Scoring.build(call.config, call.store)
    return scoring, make_neuron_descriptions(call.config, call.todo, call.run_id, scoring, call.stage.progress, call.log,
                                             on_partition=call.stage.complete)


def report_descriptions(call: Call, result) -> Report:
    scoring, written = result
    frame = pl.concat([w.frame for w in written], how="diagonal_relaxed")
    overall, by_partition = checks.neuron_descriptions_checks(call.store, frame, written)
    return Report(descriptions_metadata(call.config, call.store, frame, written), overall, by_partition,
                  data_version=f"{call.version}-{frame.height}-{scoring.simulator_version}",
                  partition_metadata=descriptions_partition_metadata(frame, written))


def score_assets(partitions: dg.MultiPartitionsDefinition, config: Config | None = None) -> list[dg.AssetsDefinition]:
    """simulator_training_data, simulator_checkpoint, description_scores, neuron_descriptions."""
    simulator_pool = "gpu" if config is None or needs_gpu(config) else None
    return [
        stage_asset(
            "simulator_training_data", compute_training_data, report_training_data, config=config,
            description="Fine-tuned simulator training rows (table `simulator_training_data`): for seeded, disjoint "
            "samples of features (held-out, stage 1, stage 2), train exemplars with activations discretized to 0-10 "
            "and the candidate descriptions (stage 1 and held-out: one random candidate; stage 2: all, re-ranked "
            "later).",
            kinds={"parquet"},
        ),
        stage_asset(
            "simulator_checkpoint", compute_checkpoint, report_checkpoint, config=config, pool="gpu",
            description="The fine-tuned simulator (Transluce): stage 1 on random candidates, stage 2 on the candidates "
            "the stage-1 simulator ranks best. A folder of safetensors weights, config, tokenizer and simulator.json "
            "under checkpoints/simulator/<version>/final; one row per trained version in table "
            "`simulator_checkpoints`. Resumes an interrupted training.",
            kinds={"pytorch", "safetensors"},
        ),
        stage_asset(
            "description_scores", compute_scores, report_scores, config=config, partitions=partitions,
            automation_condition=on_new_upstream("simulator_checkpoint"), pool=simulator_pool,
            description="Every candidate description x scorer on E_val (top-20 val exemplars + 5 random val "
            "sequences), and each feature's shuffled control (a description of another feature of the same layer and "
            "polarity, scored the same way) (table `description_scores`). Re-scores automatically on a new simulator "
            "checkpoint.",
            checks={NO_NAN: "no score is NaN", IN_RANGE: "every score is in [-1, 1]",
                    EVERY_FEATURE_SCORED: "every feature with exemplars has scored candidates",
                    NEVER_SAW: NEVER_SAW_DESCRIPTION},
            kinds={"parquet"},
        ),
        stage_asset(
            "neuron_descriptions", compute_descriptions, report_descriptions, config=config, partitions=partitions,
            automation_condition=on_new_upstream("description_scores"), pool=simulator_pool,
            description="Per neuron x polarity: the best of the k candidates by val score (score.select_by), its score "
            "on E_test (top-20 test exemplars + 5 random test sequences), and its shuffled control's val and test "
            "scores (table `neuron_descriptions`).",
            checks={NO_NAN: "no val or test score is NaN", IN_RANGE: "every score is in [-1, 1]",
                    EVERY_FEATURE_DESCRIBED: "every scored feature has a selected description",
                    NEVER_SAW: NEVER_SAW_DESCRIPTION},
            kinds={"parquet"},
        ),
    ]


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


def never_saw_check(frame: pl.DataFrame) -> dg.AssetCheckResult:
    """neuron_assets.checks.never_saw_check as Dagster's check result."""
    return check_result(checks.never_saw_check(frame))


__all__ = ["CHECKPOINTS_TABLE", "NEVER_SAW", "TRAINING_TABLE", "automation_sensor", "never_saw_check", "on_new_upstream", "rescore_job",
           "rescore_schedule", "score_assets", "score_definitions"]
