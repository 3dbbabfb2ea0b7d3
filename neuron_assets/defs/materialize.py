"""Materializing a config's assets in-process, as `neuron-assets run` does: the stale layer x
polarity partitions in one run (range tags), recorded in the Dagster instance the UI reads.

Resume: before the run, the completion markers (neuron_assets.stages.markers) say which asset
partitions are up to date; only assets with something stale are selected, over the smallest
partition range that covers what is stale, and the asset bodies skip the up-to-date
partitions inside that range. ``force`` recomputes everything selected.
"""

from __future__ import annotations

import os
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
from dagster._core.definitions.materialize import EPHEMERAL_JOB_NAME
from dagster._core.execution.plan.objects import ErrorSource

from neuron_assets.config import load_config
from neuron_assets.defs.definitions import build_definitions
from neuron_assets.defs.executor import executor_name
from neuron_assets.defs.runs import RunSettings
from neuron_assets.stages.graph import STAGES, in_plain_run
from neuron_assets.stages.markers import Markers
from neuron_assets.types import Partition


@dataclass
class StepError:
    step: str
    summary: str  # one or two lines: the user-facing exception first
    trace: str  # Dagster's whole error chain, for --verbose


@dataclass
class RunOutcome:
    run_id: str
    success: bool = True
    interrupted: bool = False
    planned: dict[str, list] = field(default_factory=dict)  # asset -> partitions to compute
    up_to_date: dict[str, list] = field(default_factory=dict)  # asset -> partitions skipped
    seconds: dict[str, float] = field(default_factory=dict)  # asset -> step seconds
    failures: dict[str, dict[str, int]] = field(default_factory=dict)  # asset -> reason -> count
    error: StepError | None = None


def materialize_config(config_path: str | None, select: list[str] | None = None, force: bool = False,
                       terminal_progress: bool = False, run_id: str | None = None, verbose: bool = False,
                       on_plan=None) -> RunOutcome:
    """Run the selected assets (default: all) of a config, skipping what is up to date unless
    ``force``. A failed step's root cause is in ``outcome.error``; nothing is raised for it.
    ``on_plan(outcome)`` sees the plan (``planned``, ``up_to_date``) before anything runs."""
    config = load_config(config_path)
    defs = build_definitions(config_path)
    assets = list(defs.assets)
    names = [a.key.to_user_string() for a in assets if a.key.to_user_string() in STAGES]
    if select:
        unknown = set(select) - set(names)
        if unknown:
            raise ValueError(f"unknown asset(s) {sorted(unknown)}; the assets are {sorted(names)}")
    wanted = [n for n in names if (n in select if select else in_plain_run(n, config))]
    partitions = next(a.partitions_def for a in assets if a.partitions_def is not None)
    keys = partitions.get_partition_keys()
    outcome = RunOutcome(run_id or str(uuid.uuid4()))
    markers = Markers(config, keys)
    stale = {n: ([None] if not STAGES[n].partitioned else keys) for n in wanted} if force else markers.stale(wanted)
    outcome.planned = stale
    outcome.up_to_date = {n: [p for p in (keys if STAGES[n].partitioned else [None]) if p not in stale.get(n, [])]
                          for n in wanted}
    if on_plan is not None:
        on_plan(outcome)
    if not stale:
        return outcome
    home = Path(os.environ.get("DAGSTER_HOME") or config.root)  # the instance `neuron-assets ui` opens
    home.mkdir(parents=True, exist_ok=True)
    resources = {**defs.resources, "run": RunSettings(terminal_progress=terminal_progress, skip_up_to_date=not force)}
    job = dg.define_asset_job(EPHEMERAL_JOB_NAME, selection=dg.AssetSelection.assets(*stale))
    job_def = dg.Definitions(jobs=[job], assets=assets, resources=resources).resolve_job_def(EPHEMERAL_JOB_NAME)
    # Dagster's console logger prints every error with its whole trace; the CLI prints the cause
    log_level = "ERROR" if verbose else "CRITICAL"
    tags = _range_tags(partitions, [p for parts in stale.values() for p in parts if p is not None])
    with _instance_without_compute_logs(home) as instance:
        if executor_name() == "celery":  # every step a Celery task, on whichever worker takes it
            result = _execute_on_workers(config_path, instance, list(stale), tags, force, log_level)
            outcome.run_id = result.run_id
        else:
            result = job_def.execute_in_process(
                instance=instance, run_id=outcome.run_id, raise_on_error=False, tags=tags,
                run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
            )
        outcome.seconds = _step_seconds(instance, outcome.run_id)
    outcome.success = result.success
    outcome.failures = _failures(result)
    for event in result.all_events:
        if event.is_step_failure:
            data = event.step_failure_data
            if data.error_source == ErrorSource.INTERRUPT:
                outcome.interrupted = True
            if outcome.error is None:
                outcome.error = StepError(event.step_key, root_cause(data.error), data.error.to_string() if data.error else "")
        elif event.event_type == dg.DagsterEventType.RUN_CANCELED:
            outcome.interrupted = True
    if not result.success and outcome.error is None:
        outcome.error = StepError("run", "the run failed before any step did; rerun with --verbose", "")
    return outcome


def _execute_on_workers(config_path: str | None, instance: dg.DagsterInstance, assets: list[str], tags: dict,
                        force: bool, log_level: str):
    """The run on the executor's workers (celery): the job is the code location's asset job,
    reconstructed by each worker from its own $NEURON_ASSETS_CONFIG; this process only
    orchestrates. Resume is the run config's (``skip_up_to_date``), as the steps build their
    own resources."""
    from dagster._core.definitions.assets.job.asset_job import IMPLICIT_ASSET_JOB_NAME
    from celery.exceptions import DuplicateTaskNameWarning
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    # dagster-celery registers its one task again for every step it submits: the same task, said each time
    warnings.filterwarnings("ignore", category=DuplicateTaskNameWarning)
    if config_path:
        os.environ["NEURON_ASSETS_CONFIG"] = str(Path(config_path).resolve())
    repository = ReconstructableRepository.for_module("neuron_assets.defs.definitions", "environment_definitions")
    job = repository.get_reconstructable_job(IMPLICIT_ASSET_JOB_NAME)
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}},
                  "resources": {"run": {"config": {"skip_up_to_date": not force}}}}
    return dg.execute_job(job, instance, run_config=run_config, tags=tags,
                          asset_selection=[dg.AssetKey(name) for name in assets])


def _instance_without_compute_logs(home: Path) -> dg.DagsterInstance:
    """The instance of ``home`` (the one the UI opens), but without capturing the steps'
    stdout and stderr: capture sends them through a file and a `tail` child process, so
    progress bars would not see the terminal, and Ctrl-C would reach those children too.
    The run's events, progress included, are still in the run log."""
    from dagster._core.instance.ref import InstanceRef

    import fcntl

    no_capture = {"module": "dagster._core.storage.noop_compute_log_manager", "class": "NoOpComputeLogManager"}
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".instance.lock", "w") as handle:
        # two runs starting on a fresh home would both create its SQLite storages and one fails
        # (UNIQUE constraint on alembic_version): the first creates them, the other waits
        fcntl.flock(handle, fcntl.LOCK_EX)
        instance = dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home), overrides={"compute_logs": no_capture}))
        _ = (instance.run_storage, instance.event_log_storage, instance.schedule_storage)
    return instance


def root_cause(error) -> str:
    """The first exception in a Dagster error chain that is not Dagster's own wrapper, as one
    line, plus the exception that caused it (if any) as a second."""
    if error is None:
        return "the step failed without an error"
    chain, node = [], error
    while node is not None:
        chain.append(node)
        node = node.cause or node.context
    user = next((e for e in chain if not _is_wrapper(e)), chain[-1])
    lines = [_one_line(user)]
    below = chain[chain.index(user) + 1:]
    if below and not _is_wrapper(below[-1]):
        lines.append(f"caused by {_one_line(below[-1])}")
    return "\n".join(lines)


def _is_wrapper(error) -> bool:
    return (error.cls_name or "").startswith("Dagster") and error.cls_name not in ("DagsterExecutionInterruptedError",)


def _one_line(error) -> str:
    text = " ".join(line.strip() for line in error.message.strip().splitlines() if line.strip())
    head, sep, rest = text.partition(": ")
    if sep and head.split(".")[-1] == error.cls_name:
        text = rest
    return text if error.cls_name in ("Failure", None) else f"{error.cls_name}: {text}"


def _range_tags(partitions: dg.MultiPartitionsDefinition, stale_keys: list[str]) -> dict[str, str]:
    """The smallest layer x polarity rectangle holding every stale partition (all when none)."""
    keys = partitions.get_partition_keys()
    chosen = [k for k in keys if k in set(stale_keys)] or keys
    dims = {d.name: d.partitions_def.get_partition_keys() for d in partitions.partitions_defs}
    layers, polarities = dims["layer"], dims["polarity"]
    layer_ix = [layers.index(str(Partition.of(k).layer)) for k in chosen]
    polarity_ix = [polarities.index(Partition.of(k).polarity.value) for k in chosen]
    start = f"{layers[min(layer_ix)]}|{polarities[min(polarity_ix)]}"
    end = f"{layers[max(layer_ix)]}|{polarities[max(polarity_ix)]}"
    return {"dagster/asset_partition_range_start": start, "dagster/asset_partition_range_end": end}


def _step_seconds(instance: dg.DagsterInstance, run_id: str) -> dict[str, float]:
    seconds = {}
    for stats in instance.get_run_step_stats(run_id):
        if stats.start_time is not None and stats.end_time is not None:
            seconds[stats.step_key] = stats.end_time - stats.start_time
    return seconds


def _failures(result) -> dict[str, dict[str, int]]:
    """asset -> failure reason -> count, from the materializations' (or a failed step's) metadata."""
    found: dict[str, dict[str, int]] = {}
    for event in result.all_events:
        metadata = None
        if event.is_step_materialization:
            metadata = event.step_materialization_data.materialization.metadata
            asset = event.step_materialization_data.materialization.asset_key.to_user_string()
        elif event.is_step_failure and event.step_failure_data.user_failure_data is not None:
            metadata = event.step_failure_data.user_failure_data.metadata
            asset = event.step_key
        reasons = (metadata or {}).get("failures_by_reason")
        if reasons is not None and reasons.value:
            found.setdefault(asset, {}).update(reasons.value)  # one event per partition, same counts
    return found


def partition_count(config_path: str | None) -> int:
    defs = build_definitions(config_path)
    return len(next(a.partitions_def for a in defs.assets if a.partitions_def is not None).get_partition_keys())
