"""`neuron-assets run`: materialize the configured assets in-process, then build the catalog."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from pathlib import Path

from neuron_assets.config import load_config


def register(commands) -> None:
    """The `run` command."""
    run = commands.add_parser("run", help="materialize the configured assets in-process, then build the catalog; "
                              "a rerun skips what is up to date")
    run.add_argument("--select", help="comma-separated asset names (default: all)")
    run.add_argument("--force", action="store_true", help="recompute every selected asset, up to date or not")
    run.add_argument("--verbose", action="store_true", help="print a failed step's full trace")
    run.set_defaults(handler=cmd_run)


def cmd_run(args) -> int:
    import uuid

    from neuron_assets.defs.executor import executor_name
    from neuron_assets.defs.materialize import materialize_config, partition_count
    from neuron_assets.defs.runs import run_scopes
    from neuron_assets.lock import StoreLocked, writer_lock
    from neuron_assets.store import Store
    from neuron_assets.validate import check_storage_root, validate_config

    config = load_config(args.config)
    check_storage_root(config)
    validate_config(config)  # before any work, also when the corpus stage is up to date and skipped
    select = [name.strip() for name in args.select.split(",")] if args.select else None
    print(f"neuron-assets: config '{config.name}' ({config.hash}), model {config.subject.model}, "
          f"{partition_count(args.config)} partitions (layer x polarity), storage {config.store_root}", file=sys.stderr)
    started = time.time()
    run_id = str(uuid.uuid4())
    try:
        # the locks of this config's partitions: a run over other layers of the same root goes on.
        # On the celery executor the workers write, each step holding its own partitions' locks.
        scopes = [] if executor_name() == "celery" else run_scopes(config, select)
        with writer_lock(config.store_root, run_id, scopes, command="neuron-assets run"):
            outcome = materialize_config(args.config, select, force=args.force, terminal_progress=True,
                                         run_id=run_id, verbose=args.verbose, on_plan=_print_plan)
            if outcome.interrupted:
                raise KeyboardInterrupt
            if not outcome.success:
                _print_stage_times(outcome, sys.stderr)
                _print_failure(outcome, args.verbose)
                if outcome.error is not None and _disk_full_text(outcome.error.summary):
                    print(disk_full_message(config), file=sys.stderr)
                return 1
            store = Store(config.store_root)
            views = store.build_catalog()
    except StoreLocked as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # Dagster's event log (SQLite through SQLAlchemy) or the catalog on a full disk
        if not _disk_full(err):
            raise
        print(f"error: {disk_full_message(config, err)}", file=sys.stderr)
        return 1
    _print_summary(store, views, outcome, time.time() - started)
    return 0


def _disk_full(err: BaseException) -> bool:
    """Whether an exception, or one in its chain (SQLAlchemy keeps sqlite's in ``orig``), says the disk is full."""
    import errno

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT) or _disk_full_text(str(err)):
            return True
        err = getattr(err, "orig", None) or err.__cause__ or err.__context__
    return False


def _disk_full_text(text: str) -> bool:
    return any(words in text for words in ("No space left on device", "database or disk is full", "Disk quota exceeded"))


def disk_full_message(config, err: BaseException | None = None) -> str:
    """The disk is full: where (the storage root and DAGSTER_HOME, with their free space) and what to do."""
    import shutil

    home = Path(os.environ.get("DAGSTER_HOME") or config.root)
    places = ([f"the storage root {config.store_root} (Dagster's event log is there too)"] if home == config.root
              else [f"the storage root {config.store_root}", f"DAGSTER_HOME {home} (Dagster's event log)"])
    free = []
    for place in dict.fromkeys([config.root, home]):
        try:
            free.append(f"{place}: {shutil.disk_usage(place).free / 1e9:.1f} GB free")
        except OSError:
            pass
    what = f" ({str(err).splitlines()[0][:200]})" if err is not None and str(err) else ""
    return (f"the disk is full: the run could not write to {' or '.join(places)}{what}. "
            + (f"Now {'; '.join(free)}. " if free else "")
            + "Free space there, or point storage.root (or NEURON_ASSETS_HOME) and DAGSTER_HOME at a disk with room; "
            "then rerun the same command: finished stages and partitions are kept and skipped")


def _print_plan(outcome) -> None:
    """What the run skips (up to date) and what it computes, before it starts."""
    skipped = []
    for asset, parts in outcome.up_to_date.items():
        if parts and asset not in outcome.planned:
            skipped.append(asset + ("" if parts == [None] else f" ({len(parts)} partitions)"))
        elif parts:
            skipped.append(f"{asset} ({len(parts)} of {len(parts) + len(outcome.planned[asset])} partitions)")
    if skipped:
        print("up to date, skipped: " + ", ".join(skipped) + " (--force recomputes)", file=sys.stderr)
    if not outcome.planned:
        print("everything is up to date; nothing to compute", file=sys.stderr)
    else:
        print("to compute: " + ", ".join(asset + ("" if parts == [None] else f" ({len(parts)} partitions)")
                                        for asset, parts in outcome.planned.items()), file=sys.stderr)


def _print_failure(outcome, verbose: bool) -> None:
    error = outcome.error
    print(f"\nerror in {error.step}: {error.summary}", file=sys.stderr)
    if verbose and error.trace:
        print(f"\nfull trace:\n{error.trace}", file=sys.stderr)
    elif error.trace:
        print("(neuron-assets run --verbose prints the full trace)", file=sys.stderr)
    print("finished stages and partitions are kept: a rerun skips them", file=sys.stderr)


def _print_stage_times(outcome, stream) -> None:
    if not outcome.up_to_date and not outcome.seconds:
        return
    print(f"\n{'stage':<24} {'computed':>9} {'skipped':>8} {'seconds':>8}", file=stream)
    for asset in outcome.up_to_date:
        computed, skipped = len(outcome.planned.get(asset, [])), len(outcome.up_to_date.get(asset, []))
        seconds = outcome.seconds.get(asset)
        print(f"{asset:<24} {computed:>9} {skipped:>8} {'-' if seconds is None else f'{seconds:.1f}':>8}", file=stream)


def _print_summary(store, views: list[str], outcome, seconds: float) -> None:
    from neuron_assets.failures import format_reasons

    con = store.connect()
    files_of = Counter(entry.table for entry in store.data_files())
    print(f"\n{'table':<24} {'partitions':>10} {'rows':>10}")
    for view in views:
        rows = con.execute(f"select count(*) from {view}").fetchone()[0]
        files = files_of.get(view, 0)
        print(f"{view:<24} {files or '-':>10} {rows:>10}")
    con.close()
    _print_stage_times(outcome, sys.stdout)
    for asset, reasons in outcome.failures.items():
        total = sum(reasons.values())
        print(f"\nWARNING: {asset}: {total} failed ({format_reasons(reasons)}); the run went on with the rest. "
              f"See: neuron-assets sql \"select failure, count(*) from {asset} where failure is not null group by 1\"",
              file=sys.stderr)
    print(f"\ndone in {seconds:.0f} s. DuckDB catalog: {store.catalog_path}")
    report = store.local_dir / "report" / "index.html"
    if report.is_file():
        print(f"HTML report: {report} (neuron-assets report --open)")
    print('query it: neuron-assets sql "select layer, polarity, count(*) from exemplars group by all"')
