"""The one asset template: every stage of neuron_assets.stages.graph becomes a Dagster asset here.

    stage_asset(name, compute, report, description=..., kinds=..., partitions=..., checks=...)

builds ``@dg.asset`` named ``name`` with the stage's upstream as deps (stages the config does
not have left out), partitioned by layer x polarity when the stage is, one run per range
(``BackfillPolicy.single_run``). Its body:

    config = settings.load()
    with run.stage(context, config) as stage:           # writer locks, progress, resume markers
        call = Call(..., todo=stage.todo(requested))     # skips what is up to date (CLI runs)
        if not call.todo: return "skipped: up to date"
        result = compute(call)                           # the core: compute, write, mark complete
    report(call, result) -> Report(metadata, checks)     # plain values, shown here as Dagster's

Metadata and checks are plain (neuron_assets.report.metadata, neuron_assets.checks); this
module alone turns them into Dagster's values.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import PurePath
from typing import Any

import dagster as dg

from neuron_assets.checks import ByPartition, Check
from neuron_assets.config import Config
from neuron_assets.defs.executor import QUEUE_TAG, step_queue
from neuron_assets.defs.partitions import parse_partition_keys
from neuron_assets.defs.runs import StageRun
from neuron_assets.report.metadata import Location, Markdown, Url
from neuron_assets.stages.graph import STAGES, stage_active, stage_version
from neuron_assets.store import Store

warnings.filterwarnings("ignore", category=dg.BetaWarning)  # BackfillPolicy is beta in dagster 1.13

AC = dg.AutomationCondition
NO_SAE = Config.model_validate({"sae": {"layers": []}})  # the stages a factory called without a config assumes


@dataclass
class Call:
    """One materialization of a stage, as its compute and report functions see it."""

    name: str
    context: dg.AssetExecutionContext
    config: Config
    stage: StageRun
    todo: list  # the Partitions to compute; unpartitioned: [None], or [] when up to date

    @cached_property
    def store(self) -> Store:
        return Store(self.config.store_root)

    @property
    def run_id(self) -> str:
        return self.context.run_id

    @property
    def log(self) -> Callable[[str], None]:
        return self.context.log.info

    @property
    def resources(self):
        return self.context.resources

    @property
    def version(self) -> str:
        """The stage's version (neuron_assets.stages.graph.stage_version): its data version."""
        return stage_version(self.config, self.name)


@dataclass
class Report:
    metadata: dict
    checks: list[Check] = field(default_factory=list)
    by_partition: ByPartition | None = None  # partition key -> its checks, recorded in a range run
    data_version: str | None = None  # default: the stage's version
    partition_metadata: dict[str, dict] | None = None  # partition key -> its own values, observed in a range run


def skipped(call: Call, reason: str) -> Report:
    """A stage the config leaves nothing to do for (it still counts as materialized)."""
    from neuron_assets.report.metadata import skipped as skipped_metadata

    return Report(skipped_metadata(call.config, reason), data_version=f"{call.version}-skipped")


def stage_asset(name: str, compute: Callable[[Call], Any], report: Callable[[Call, Any], Report], *,
                description: str, kinds: set[str], config: Config | None = None,
                partitions: dg.PartitionsDefinition | None = None, checks: dict[str, str | None] | None = None,
                pool: str | None = None, automation_condition: dg.AutomationCondition | None = None,
                resources: tuple[str, ...] = (), always: bool = False,
                up_to_date: str = "up to date") -> dg.AssetsDefinition:
    """The asset of stage ``name``. ``config`` decides which upstream stages exist (none given:
    those of a config without an SAE); ``checks``: check name -> description; ``resources``: what compute reads
    from ``call.resources`` besides settings and run; ``always``: compute and report even when
    every partition is up to date (``call.todo`` is then empty)."""
    stage = STAGES[name]
    if stage.partitioned and partitions is None:
        raise ValueError(f"{name} is partitioned: give its partitions")
    present = config if config is not None else NO_SAE
    deps = [dg.AssetKey(upstream) for upstream in stage.upstream if stage_active(upstream, present)]

    @dg.asset(
        name=name,
        deps=deps,
        partitions_def=partitions if stage.partitioned else None,
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool=pool,
        op_tags={QUEUE_TAG: step_queue(pool)},  # the celery executor's queue: gpu for the gpu pool, else cpu
        automation_condition=automation_condition,
        description=description,
        check_specs=[dg.AssetCheckSpec(check, asset=name, description=text) for check, text in (checks or {}).items()],
        kinds=kinds,
        required_resource_keys={"settings", "run", *resources},
    )
    def asset(context) -> dg.MaterializeResult:  # a dg.AssetExecutionContext
        config = context.resources.settings.load()
        requested = requested_partitions(context) if stage.partitioned else None
        with context.resources.run.stage(context, config) as run:
            call = Call(name, context, config, run, run.todo(requested))
            if not call.todo and not always:  # every check needs a result, also when nothing was recomputed
                kept = [dg.AssetCheckResult(check_name=check, passed=True,
                                            metadata={"skipped": f"{up_to_date}: checked when it was computed"})
                        for check in checks or {}]
                return dg.MaterializeResult(metadata={"skipped": up_to_date, **run.metadata()},
                                            check_results=kept or None)
            result = compute(call)
        made = report(call, result)
        log_partition_checks(context, made.by_partition or {})
        metadata = {**made.metadata, **log_partition_metadata(context, made.partition_metadata or {}), **run.metadata()}
        return dg.MaterializeResult(metadata=dagster_metadata(metadata),
                                    data_version=dg.DataVersion(made.data_version or call.version),
                                    check_results=[check_result(check) for check in made.checks] or None)

    return asset


def requested_partitions(context: dg.AssetExecutionContext) -> list:
    """The run's partitions; a dg.Failure for an empty range."""
    requested = parse_partition_keys(context.partition_keys)
    if not requested:
        raise dg.Failure("no partitions in the requested range: a layer x polarity range is a rectangle and "
                         "polarity runs pos...neg, e.g. '0|pos...5|neg'")
    return requested


def on_new_upstream(asset: str) -> dg.AutomationCondition:
    """Run when ``asset`` has a new materialization (not when other parents change), once its
    parents exist and none is running."""
    return (
        AC.any_deps_updated().allow(dg.AssetSelection.assets(asset)).since_last_handled()
        & ~AC.any_deps_missing() & ~AC.any_deps_in_progress() & ~AC.in_progress()
    ).with_label(f"on new {asset}")


def step_progress(stage: StageRun) -> Callable[[str, int, int, float], None]:
    """``on_step(label, step, total, loss)`` for a training loop: one progress task per label,
    its loss shown."""
    tasks = {}

    def on_step(label: str, step: int, total: int, loss: float) -> None:
        task = tasks.get(label) or tasks.setdefault(label, stage.progress.start(label, total, "step"))
        task.advance(step - task.done, info=f"loss {loss:.3f}")
        if step >= total:
            task.finish()

    return on_step


# -- plain values as Dagster's ----------------------------------------------------------------


def dagster_metadata(metadata: dict) -> dict:
    """Plain metadata (neuron_assets.report.metadata) as Dagster metadata values."""
    return {key: dagster_value(value) for key, value in metadata.items()}


def dagster_value(value):
    if isinstance(value, Markdown):
        return dg.MetadataValue.md(str(value))
    if isinstance(value, Url):
        return dg.MetadataValue.url(str(value))
    if isinstance(value, (PurePath, Location)):
        return dg.MetadataValue.path(str(value))
    if isinstance(value, (dict, list)):
        return dg.MetadataValue.json(value)
    return value


def check_result(check: Check) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(check_name=check.name, passed=bool(check.passed), metadata=dagster_metadata(check.metadata),
                               severity=dg.AssetCheckSeverity.WARN if check.warn else dg.AssetCheckSeverity.ERROR)


def log_partition_metadata(context: dg.AssetExecutionContext, by_partition: dict[str, dict]) -> dict:
    """In a range run Dagster copies the one materialization's metadata to every partition, so
    each partition's own values go into an observation of that partition (its page in the UI
    lists them under Observations), and the materialization says that its values cover the
    whole run. A single-partition run returns its values as they are."""
    if not by_partition or len(context.partition_keys) <= 1:
        return {}
    for key, values in by_partition.items():
        context.log_event(dg.AssetObservation(asset_key=context.asset_key, partition=key,
                                              metadata=dagster_metadata(values)))
    keys = sorted(by_partition)
    return {"scope": f"these values cover the {len(keys)} partitions this run computed ({', '.join(keys)}); "
                     "each partition's own values are in its observation"}


def log_partition_checks(context: dg.AssetExecutionContext, by_partition: ByPartition) -> None:
    """In a range run, each check once per partition (Dagster stores the returned results
    without a partition; a single-partition run records them itself): passed when all of the
    partition's checks of that name passed."""
    if not by_partition or len(context.partition_keys) <= 1:  # a resumed range run may compute only one
        return
    passed: dict[str, dict[str, bool]] = {}
    for key, checks in by_partition.items():
        for check in checks:
            by_key = passed.setdefault(check.name, {})
            by_key[key] = by_key.get(key, True) and bool(check.passed)
    for name, by_key in passed.items():
        for key, ok in by_key.items():
            context.log_event(dg.AssetCheckEvaluation(asset_key=context.asset_key, check_name=name, passed=ok,
                                                      partition=key))
