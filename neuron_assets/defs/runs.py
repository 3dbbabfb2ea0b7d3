"""What every asset body shares while it runs: the writer locks of what it writes, progress to the
Dagster run log (and the terminal, in `neuron-assets run`), and resume markers.

    with run.stage(context, config) as stage:
        for layer, polarity in stage.todo(requested):      # skips up-to-date partitions in a CLI run
            ... compute with progress=stage.progress, write ...
            stage.complete((layer, polarity), [paths])       # the partition's completion marker

A run launched from the UI recomputes what it was asked for (the defaults below); the CLI's
run sets ``skip_up_to_date`` (unless ``--force``) and ``terminal_progress``.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

import dagster as dg

from neuron_assets import runtime
from neuron_assets.config import Config
from neuron_assets.lock import scope, writer_lock
from neuron_assets.progress import LineSink, Progress, TerminalSink
from neuron_assets.stages.graph import STAGES, partitions_of
from neuron_assets.stages.markers import ALL, Markers
from neuron_assets.types import Partition


class RunSettings(dg.ConfigurableResource):
    """How a run reports progress and resumes."""

    terminal_progress: bool = False
    """Also draw progress on this process's stderr (a bar on a terminal, lines otherwise)."""
    skip_up_to_date: bool = False
    """Skip partitions whose completion marker says they are up to date (resume)."""
    log_every_s: float = 15.0
    """Least seconds between two progress events of one task in the Dagster run log."""
    lock_wait_s: float = 24 * 3600.0
    """How long an asset waits for writer locks held by another run: the locks of the partitions
    it writes (a second run over the same partitions queues behind the first) and of one-file
    tables (the corpus, simulator_checkpoints). Runs over other partitions never wait.
    `neuron-assets run` takes its partitions' locks before it starts and refuses at once instead."""

    @contextmanager
    def stage(self, context: dg.AssetExecutionContext, config: Config) -> Iterator["StageRun"]:
        asset = context.asset_key.to_user_string()
        with writer_lock(config.store_root, context.run_id, _scopes(context, asset),
                         command=f"dagster run {context.run_id} ({asset})",
                         wait_s=self.lock_wait_s, on_wait=context.log.warning):
            stage = StageRun(context, config, self)
            started = time.monotonic()
            try:
                yield stage
            finally:  # no model outlives its stage: the next GPU stage gets the memory back
                released = runtime.release_all()
            stage.progress.note(f"{asset}: done in {time.monotonic() - started:.1f} s"
                                + (f", {released} model(s) released" if released else ""))


class StageRun:
    def __init__(self, context: dg.AssetExecutionContext, config: Config, settings: RunSettings):
        self.context = context
        self.asset = context.asset_key.to_user_string()
        self.settings = settings
        self.markers = Markers(config, _partition_keys(config))
        sinks = [LineSink(context.log.info, settings.log_every_s)]
        if settings.terminal_progress:
            sinks.append(TerminalSink())
        self.progress = Progress(sinks)
        self.skipped: list[str] = []

    def todo(self, requested: list | None = None) -> list:
        """The requested (layer, polarity) partitions to compute (``None``: an unpartitioned
        asset, returned as ``[None]`` or ``[]``). Their old markers are removed first."""
        wanted = [ALL] if requested is None else list(requested)
        todo = []
        for partition in wanted:
            key = _key(partition)
            if self.settings.skip_up_to_date and self.markers.up_to_date(self.asset, key):
                self.skipped.append(key or "all")
            else:
                todo.append(partition)
        for partition in todo:
            self.markers.invalidate(self.asset, _key(partition))
        if requested is not None:
            self.progress.note(f"{self.asset}: {len(todo)} of {len(wanted)} partitions to compute"
                               + (f" ({len(self.skipped)} up to date, skipped)" if self.skipped else ""))
        else:
            self.progress.note(f"{self.asset}: " + ("up to date, skipped" if self.skipped else "computing"))
        return todo

    def complete(self, partition, files) -> None:
        self.markers.complete(self.asset, _key(partition), files, self.context.run_id)

    def metadata(self) -> dict:
        return {"skipped_up_to_date": ", ".join(self.skipped)} if self.skipped else {}


def run_scopes(config: Config, select: list[str] | None = None) -> list[str]:
    """The partition locks a `neuron-assets run` of ``config`` takes before it starts: every
    layer x polarity partition of every selected per-feature asset. One-file tables are locked
    by their stage alone, for as long as it writes, so that runs over other layers share them."""
    return [scope(asset, key) for asset, stage in STAGES.items() if stage.partitioned and (not select or asset in select)
            for key in _partition_keys(config)]


def _scopes(context: dg.AssetExecutionContext, asset: str) -> list[str]:
    if context.assets_def.partitions_def is None:
        return [scope(asset)]
    return [scope(asset, str(key)) for key in context.partition_keys]


def _key(partition) -> str | None:
    return None if partition is None else Partition.of(partition).key


def _partition_keys(config: Config) -> tuple[str, ...]:
    return _keys_of(config.model_dump_json())


@lru_cache(maxsize=8)
def _keys_of(config_json: str) -> tuple[str, ...]:  # the layer count may need the model's config read
    return tuple(p.key for p in partitions_of(Config.model_validate_json(config_json)))
