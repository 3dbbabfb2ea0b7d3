"""`neuron-assets`: run the pipeline, query the description database, look at a neuron.

    neuron-assets run                          materialize every asset of the config
    neuron-assets sql "select ..."             read-only SQL over the catalog
    neuron-assets show 3 975 --polarity pos    a neuron's description, every score, exemplars, activating tokens marked
    neuron-assets report --open                the static HTML report: layers, score histograms, neuron pages
    neuron-assets search "closing brackets"    descriptions nearest a text in meaning (--text: by words, BM25)
    neuron-assets export --format parquet OUT  the description database with provenance (jsonl, neuronpedia too)
    neuron-assets config                       the effective config, every field documented
    neuron-assets plan --device h100           each stage's memory, device-hours, disk and cost, before a run
    neuron-assets validate-scorers             how often each simulator ranks true descriptions first
    neuron-assets verify                       check every file of the store; name each damaged or missing one
    neuron-assets distill                      fine-tune a small explainer on the best descriptions, compare it with its base
    neuron-assets ui                           the Dagster UI on the same storage
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from neuron_assets.config import ConfigError, load_config
from neuron_assets.types import Sample, Partition


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted. Nothing half-written is left; rerun the same command to resume: finished stages "
              "and partitions are skipped, a stopped activation pass or training continues from its checkpoint",
              file=sys.stderr)
        return 130
    except (ValueError, LookupError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
    return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuron-assets", description=__doc__.split("\n\n")[0])
    config_help = "YAML config (default: $NEURON_ASSETS_CONFIG, else the embedded demo)"
    parser.add_argument("--config", help=config_help)
    commands = parser.add_subparsers(dest="command")

    run = commands.add_parser("run", help="materialize the configured assets in-process, then build the catalog; "
                              "a rerun skips what is up to date")
    run.add_argument("--select", help="comma-separated asset names (default: all)")
    run.add_argument("--force", action="store_true", help="recompute every selected asset, up to date or not")
    run.add_argument("--verbose", action="store_true", help="print a failed step's full trace")
    run.set_defaults(handler=cmd_run)

    sql = commands.add_parser("sql", help="run a read-only SQL query against the description database")
    sql.add_argument("query", help="SQL text, or @file.sql")
    sql.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table",
                     help="table (shown here), or csv, json, parquet: written to stdout or to --output")
    sql.add_argument("--output", metavar="FILE", help="write the result to FILE (csv, json, parquet) instead of stdout")
    sql.add_argument("--max-rows", type=_at_least_one("; to get every row use --format csv (or json, parquet)"), default=40,
                     help="rows shown in table format")
    sql.set_defaults(handler=cmd_sql)

    show = commands.add_parser("show", help="a neuron's statistics, descriptions with every score, and exemplars, "
                               "activating tokens marked")
    show.add_argument("layer", type=int)
    show.add_argument("neuron", type=int)
    show.add_argument("--polarity", choices=["pos", "neg"], default="pos")
    show.add_argument("--split", choices=["train", "val", "test"], default="train")
    show.add_argument("--sample", "--kind", dest="sample", choices=[k.value for k in Sample], default="top",
                      help="which exemplars: top (default), random, quantile or quiet (--kind is the older name)")
    show.add_argument("--feature", default="neuron", metavar="KIND",
                      help="the feature kind: neuron (default) or sae, an SAE latent of the layer (sae.latents)")
    show.add_argument("-n", type=_at_least_one(), default=10, help="exemplars shown")
    show.add_argument("--html", metavar="PATH", help="also write a self-contained page of the neuron to PATH: every "
                      "polarity side by side, candidates with scores, statistics, top and quantile exemplars as heat-maps")
    show.set_defaults(handler=cmd_show)

    report = commands.add_parser("report", help="build (or find, when up to date) the static HTML report of the store "
                                 "and print the path of its index")
    report.add_argument("--open", action="store_true", help="open the index in a web browser")
    report.add_argument("--rebuild", action="store_true", help="build it again even when it is up to date")
    report.set_defaults(handler=cmd_report)
    search = commands.add_parser("search", help="descriptions nearest a text in meaning (MiniLM vectors, HNSW), "
                                 "or by words with --text (BM25)")
    search.add_argument("text", help="what to look for, e.g. \"closing brackets in code\"")
    search.add_argument("--text", dest="full_text", action="store_true",
                        help="full-text search (BM25; ILIKE where the fts extension is missing) instead of semantic")
    search.add_argument("--top", type=_at_least_one(), default=10, help="hits shown")
    search.add_argument("--layer", type=int, help="only this layer")
    search.add_argument("--polarity", choices=["pos", "neg"], help="only this polarity")
    search.add_argument("--min-score", type=float, help="only descriptions whose test score is at least this")
    search.add_argument("--format", choices=["table", "csv", "json"], default="table")
    search.set_defaults(handler=cmd_search)

    export = commands.add_parser("export", help="write the description database out: one Parquet or JSONL file "
                                 "with provenance columns, or Neuronpedia's explanation batches")
    export.add_argument("out", metavar="OUT", help="the file (parquet, jsonl) or folder (neuronpedia) to write")
    export.add_argument("--format", choices=["parquet", "jsonl", "neuronpedia"], required=True)
    export.add_argument("--model-id", help="neuronpedia: the model id (default: from the subject model's name, "
                        "e.g. llama3.1-8b-it for meta-llama/Llama-3.1-8B-Instruct)")
    export.set_defaults(handler=cmd_export)

    show_config = commands.add_parser("config", help="print the effective config as YAML, every field documented")
    show_config.set_defaults(handler=cmd_config)

    plan = commands.add_parser("plan", help="predict each stage's peak device memory, device-hours, disk, explainer "
                               "tokens and cost from the config and the model's shape (no weights read)")
    plan.add_argument("--device", choices=["h100", "h200", "a100", "cpu"],
                      help="the device each stage runs on (default: h100 when subject.device is cuda or a GPU is here, else cpu)")
    plan.add_argument("--shape", help="the subject's config.json or model folder (default: beside the config as "
                      "<config>.shape.json, the model's folder, or the Hugging Face cache)")
    plan.add_argument("--tokens-per-s", type=float, help="measured bare-forward tokens/s of the subject on that device "
                      "(default: from FLOPs at --mfu of the bf16 peak)")
    plan.add_argument("--mfu", type=float, default=0.55, help="share of the bf16 peak a forward pass reaches")
    plan.add_argument("--collect-efficiency", type=float, help="collecting pass / bare pass tokens/s, from "
                      "bench/activations.py (default 0.9 on a GPU, 0.7 on CPU)")
    plan.add_argument("--disk-gb-per-s", type=float, default=1.5, help="write speed of the storage root's disk, for "
                      "the exemplar pass's checkpoints (default 1.5, a local NVMe disk)")
    plan.add_argument("--format", choices=["table", "json"], default="table")
    plan.set_defaults(handler=cmd_plan)
    validate = commands.add_parser(
        "validate-scorers", help="each simulator and scorer on puzzles with one true and several false descriptions")
    validate.add_argument("--puzzles", action="append", default=[], metavar="FILE",
                          help="also a puzzle file in OpenAI's layout {name: {explanation, sentences, "
                          "false_explanations}} (repeatable)")
    validate.add_argument("--format", choices=["table", "json"], default="table")
    validate.set_defaults(handler=cmd_validate_scorers)

    verify = commands.add_parser("verify", help="check every data file of the store in full (readable, unchanged since "
                                 "it was written, none missing that a run wrote) and name each bad one with the "
                                 "command that writes it again; exit 1 when any")
    verify.set_defaults(handler=cmd_verify)

    distill = commands.add_parser("distill", help="fine-tune distill.base_model into an explainer on the best "
                                  "descriptions (asset explainer_distilled), then compare it with its base on held-out "
                                  "features (distilled_explainer_eval); after a run")
    distill.add_argument("--no-eval", action="store_true", help="train (or find) the checkpoint only")
    distill.add_argument("--force", action="store_true", help="train and evaluate again even when up to date")
    distill.add_argument("--verbose", action="store_true", help="print a failed step's full trace")
    distill.set_defaults(handler=cmd_distill)

    ui = commands.add_parser("ui", help="start the Dagster UI (dagster dev) on this config's storage")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(handler=cmd_ui)
    for command in commands.choices.values():  # --config also after the command: `neuron-assets plan --config X`
        command.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
    return parser


# -- run ----------------------------------------------------------------------------------


def cmd_run(args) -> int:
    import uuid

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
        # the locks of this config's partitions: a run over other layers of the same root goes on
        with writer_lock(config.root, run_id, run_scopes(config, select), command="neuron-assets run"):
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


# -- sql ----------------------------------------------------------------------------------


def cmd_sql(args) -> int:
    import duckdb

    from neuron_assets.store import Store, read_only_statements

    config = load_config(args.config)
    store = Store(config.store_root)
    if args.output and args.format == "table":
        raise ValueError("--output writes csv, json or parquet; add --format csv (or json, parquet)")
    if args.format == "parquet" and not args.output and sys.stdout.isatty():
        raise ValueError("parquet is binary; add --output FILE or redirect stdout to a file (> result.parquet)")
    query = _read_query(args.query)
    statements, extensions = read_only_statements(query)
    if not store.has_data():
        raise LookupError(f"no data under {config.store_root}; run `neuron-assets run` first")
    with store.connect(extensions=extensions) as con:
        _report_damaged(con, store, args.config)
        try:
            for statement in statements[:-1]:
                con.execute(statement)
            relation = con.sql(statements[-1]) if statements else None
            if relation is None:
                return 0
            frame = relation.pl() if args.format != "table" else None
        except duckdb.CatalogException as err:
            views = ", ".join(store.views())
            raise LookupError(f"{str(err).splitlines()[0]}. Views in the catalog: {views or 'none yet'}") from None
        except duckdb.PermissionException as err:
            import re

            named = re.search(r'Cannot access (?:file|directory) "([^"]*)"', str(err))
            what = f"cannot read {named.group(1)}" if named else str(err).splitlines()[0]
            raise ValueError(f"{what}: `sql` reads only this store's tables (the files under {store.data_dir}), "
                             "through its views; list them with: neuron-assets sql \"show tables\"") from None
        except duckdb.Error as err:
            raise ValueError(_sql_error_message(err, store, args.config)) from None
        if frame is None:
            try:
                relation.show(max_rows=args.max_rows, max_width=200)
            except duckdb.Error as err:
                raise ValueError(_sql_error_message(err, store, args.config)) from None
            return 0
    _write_result(frame, args.format, args.output)
    return 0


def _read_query(text: str) -> str:
    if not text.startswith("@"):
        return text
    path = Path(text[1:]).expanduser()
    if not path.is_file():
        raise LookupError(f"query file {path} does not exist; give an existing .sql file after @ (e.g. @sql/examples/best_of_k.sql)")
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"query file {path} is not UTF-8 text; save it as UTF-8") from None


def _write_result(frame, format: str, output: str | None) -> None:
    """csv, json or parquet, to stdout or atomically to ``output`` (no torn file on failure)."""
    from neuron_assets.store import atomic_path

    def write(handle) -> None:
        if format == "csv":
            _nested_as_json(frame).write_csv(handle)
        elif format == "parquet":
            frame.write_parquet(handle)
        else:
            handle.write((json.dumps(frame.to_dicts(), default=str, indent=1) + "\n").encode())

    if output is None:
        sys.stdout.flush()
        write(sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return
    target = Path(output).expanduser()
    if target.is_dir():
        raise ValueError(f"--output {target} is a folder; give a file name")
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        write(handle)
    print(f"wrote {frame.height} rows to {target}", file=sys.stderr)


def _nested_as_json(frame):
    """CSV has no lists or structs: such a column is written as JSON text, one value a cell."""
    import polars as pl

    nested = [name for name, dtype in frame.schema.items() if dtype.is_nested()]
    return frame.with_columns(
        pl.Series(name, [None if v is None else json.dumps(v, default=str) for v in frame.get_column(name).to_list()],
                  dtype=pl.String) for name in nested)


def _report_damaged(con, store, config_path: str | None) -> None:
    """Warn, on stderr, of data files the views leave out because they cannot be read or are
    not what their writer wrote, and of files a run wrote that are gone."""
    rows = con.execute("SELECT table_name, path, layer, polarity, problem FROM store_files "
                       "WHERE problem IS NOT NULL ORDER BY path").fetchall()
    from neuron_assets.store import DamagedFile

    for table, path, layer, polarity, problem in rows:
        damaged = DamagedFile(table, store.file_at(path), layer, polarity, problem)
        print(f"warning: {damaged.path} is damaged ({problem}); the '{table}' view leaves it out. "
              f"Rerun that partition: {rerun_command(damaged, store, config_path)}", file=sys.stderr)
    for missing in store.missing_files():
        print(f"warning: {missing.path} is missing, though {missing.problem}; the '{missing.table}' view lacks "
              f"its rows. Rerun that partition: {rerun_command(missing, store, config_path)}", file=sys.stderr)


def rerun_command(damaged, store, config_path: str | None) -> str:
    """The command that materializes the asset partition that writes a damaged file again."""
    env = [f"DAGSTER_HOME={os.environ.get('DAGSTER_HOME') or store.local_dir}"]
    if config_path:
        env.append(f"NEURON_ASSETS_CONFIG={Path(config_path).resolve()}")
    partition = f" --partition '{damaged.partition}'" if damaged.partition else ""
    return f"{' '.join(env)} dagster asset materialize -m neuron_assets.defs --select {damaged.asset}{partition}"


def _sql_error_message(err, store, config_path: str | None) -> str:
    """The first line of a DuckDB error; for a file of the store that fails to read, the file
    and the command that writes it again."""
    first = str(err).splitlines()[0]
    data = str(store.data_dir) if store.remote else str(store.data_dir.resolve())
    if data in str(err):
        from neuron_assets.store import DamagedFile, parquet_problem

        for entry in store.data_files():
            if str(entry.path) in str(err):
                damaged = DamagedFile(entry.table, entry.path, entry.layer, entry.polarity,
                                      parquet_problem(entry.path) or first)
                return (f"{entry.path} is damaged ({first}); rerun that partition: "
                        f"{rerun_command(damaged, store, config_path)}")
    return f"SQL error: {first}"


def _at_least_one(hint: str = ""):
    """An argparse type: a whole number >= 1, with ``hint`` (the way to what the user wanted)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1, got {value}{hint}")
        return value

    return parse


# -- show ---------------------------------------------------------------------------------


def cmd_show(args) -> int:
    from neuron_assets.report.neuron import load_neuron, neuron_text
    from neuron_assets.store import Store
    from neuron_assets.types import Sample, Polarity, Split

    config = load_config(args.config)
    store = Store(config.store_root)
    for table, layer, polarity in (("exemplars", args.layer, args.polarity), ("neuron_stats", args.layer, args.polarity),
                                   ("sequences", None, None)):
        damaged = store.check_readable(table, layer, polarity)
        if damaged is not None:
            raise LookupError(f"{damaged.path} is damaged ({damaged.problem}); rerun that partition: "
                              f"{rerun_command(damaged, store, args.config)}")
    view = load_neuron(store, args.layer, args.neuron, Polarity(args.polarity), args.feature)  # its rows only
    if args.html:
        from neuron_assets.report.html import neuron_page
        from neuron_assets.store import atomic_path

        target = Path(args.html).expanduser()
        if target.is_dir():
            raise ValueError(f"--html {target} is a folder; give a file name (e.g. {target / 'neuron.html'})")
        with atomic_path(target) as tmp:
            tmp.write_text(neuron_page(view, Split(args.split), args.n), encoding="utf-8")
        print(f"wrote {target}", file=sys.stderr)
    print(neuron_text(view, Polarity(args.polarity), Split(args.split), Sample(args.sample), args.n, sys.stdout.isatty()))
    return 0


# -- verify -------------------------------------------------------------------------------


def cmd_verify(args) -> int:
    from neuron_assets.store import Store

    config = load_config(args.config)
    store = Store(config.store_root)
    if not store.has_data():
        raise LookupError(f"no data under {config.store_root}; run `neuron-assets run` first")
    checked, problems = store.verify()
    for bad in problems:
        print(f"{'missing' if bad.missing else 'damaged'}: {bad.path}\n  {bad.problem}\n"
              f"  rerun: {rerun_command(bad, store, args.config)}")
    print(f"{checked} data files checked under {store.data_dir}: "
          + (f"{sum(not b.missing for b in problems)} damaged, {sum(b.missing for b in problems)} missing"
             if problems else "all readable and as written"), file=sys.stderr)
    return 1 if problems else 0


# -- report -------------------------------------------------------------------------------


def cmd_report(args) -> int:
    import uuid

    from neuron_assets.lock import StoreLocked, writer_lock
    from neuron_assets.report.site import build_report, report_index
    from neuron_assets.stages.markers import Markers
    from neuron_assets.store import Store
    from neuron_assets.validate import check_storage_root

    config = load_config(args.config)
    check_storage_root(config)
    store = Store(config.store_root)
    index = report_index(store)
    # the partitions the store holds (no model read, no Dagster import): the report is of them
    markers = Markers(config, [Partition.of(p).key for p in store.partitions("neuron_stats")])
    if args.rebuild or not index.is_file() or not markers.up_to_date("neuron_report"):
        run_id = str(uuid.uuid4())
        try:
            with writer_lock(config.root, run_id, ["neuron_report"], command="neuron-assets report"):
                markers.invalidate("neuron_report", None)
                written = build_report(store)
                markers.complete("neuron_report", None, [written.index.parent], run_id)
        except StoreLocked as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"built the report in {written.seconds:.1f} s: {written.partition_pages} layer x polarity pages, "
              f"{written.neuron_pages} neuron pages", file=sys.stderr)
    print(index)
    if args.open:
        import webbrowser

        if not webbrowser.open(index.resolve().as_uri()):
            print(f"no browser could be started here; open {index} on a machine with one", file=sys.stderr)
    return 0


# -- search and export ------------------------------------------------------------------------


def cmd_search(args) -> int:
    from neuron_assets.search import Filters, search
    from neuron_assets.store import Store

    config = load_config(args.config)
    store = Store(config.store_root)
    if not store.has_data():
        raise LookupError(f"no data under {config.store_root}; run `neuron-assets run` first")
    result = search(store, args.text, top=args.top, mode="text" if args.full_text else "semantic",
                    filters=Filters(args.layer, args.polarity, args.min_score),
                    log=lambda line: print(line, file=sys.stderr))
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    rows = [hit.as_dict() for hit in result.hits]
    if args.format == "json":
        json.dump(rows, sys.stdout, indent=1)
        print()
        return 0
    if args.format == "csv":
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else ["rank"])
        writer.writeheader()
        writer.writerows(rows)
        return 0
    if not rows:
        print("no description matches" + (" these filters" if args.layer is not None or args.polarity or
                                          args.min_score is not None else ""))
        return 0
    match = {"hnsw": "cosine", "exact": "cosine", "bm25": "bm25", "ilike": "words"}[result.method]
    print(f"{'#':>3} {match:>7} {'score':>6} {'feature':<12} description")
    for hit in result.hits:
        score = "-" if hit.score is None else f"{hit.score:.3f}"
        feature = f"{hit.layer}/{hit.neuron} {hit.polarity}"
        description = hit.description if len(hit.description) <= 90 else hit.description[:87] + "..."
        extra = "" if hit.source == "selected" else f" (candidate {hit.candidate})"
        print(f"{hit.rank:>3} {hit.match:>7.3f} {score:>6} {feature:<12} {description}{extra}")
        print(f"{'':>30}{hit.show_command}")
    print(f"({result.method} search; score: the description's test score)", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from neuron_assets.export import export
    from neuron_assets.store import Store

    config = load_config(args.config)
    written = export(Store(config.store_root), args.format, Path(args.out).expanduser(), model_id=args.model_id)
    print(f"wrote {written.rows} descriptions to {written.path}" + (f" ({written.files} files)" if written.files > 1 else ""),
          file=sys.stderr)
    return 0


def cmd_config(args) -> int:
    from neuron_assets.config import documented_yaml

    print(documented_yaml(load_config(args.config)), end="")
    return 0


# -- plan ---------------------------------------------------------------------------------


def cmd_plan(args) -> int:
    from neuron_assets.plan import Rates, find_model_shape, plan_run

    config = load_config(args.config)
    device = args.device
    if device is None:
        wants_gpu = config.subject.device.startswith("cuda")
        if config.subject.device == "auto":
            import torch

            wants_gpu = torch.cuda.is_available()
        device = "h100" if wants_gpu else "cpu"
    shape, source = find_model_shape(config, args.config, args.shape)
    explainer = None
    if config.explain.model:
        try:
            explainer, _ = find_model_shape(config, args.config, model=config.explain.model)
        except ValueError:
            explainer = None  # the explainer's size then defaults to 8B
    efficiency = args.collect_efficiency or (0.7 if device == "cpu" else 0.9)
    rates = Rates(subject_tokens_per_s=args.tokens_per_s, mfu=args.mfu, collect_efficiency=efficiency,
                  checkpoint_write_bytes_per_s=args.disk_gb_per_s * 1e9)
    result = plan_run(config, shape, source, device, rates, explainer)
    if args.format == "json":
        json.dump(result.as_dict(), sys.stdout, indent=1)
        print()
    else:
        print(result.table())
    return 0


# -- validate-scorers -----------------------------------------------------------------------


def cmd_validate_scorers(args) -> int:
    from neuron_assets.score.validity import report_table, validate_scorers

    config = load_config(args.config)
    untrained = _untrained_finetuned(config)
    from neuron_assets.progress import Progress, TerminalSink

    report = validate_scorers(config, puzzle_files=args.puzzles, log=lambda line: print(untrained(line), file=sys.stderr),
                              progress=Progress([TerminalSink()]))
    report = replace(report, skipped={scorer: untrained(why) for scorer, why in report.skipped.items()})
    if args.format == "json":
        json.dump({"selecting": report.selecting, "rows": [r.as_dict() for r in report.rows],
                   "skipped": dict(report.skipped)}, sys.stdout, indent=1)
        print()
    else:
        header, rows = report_table(report)
        widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
        for line in [header, *rows]:
            print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())
        for scorer, why in report.skipped.items():
            print(f"skipped {scorer}: {why}")
    beats = report.selecting_beats_chance
    if beats is False:
        print(f"warning: the selecting scorer {report.selecting} does not beat chance clearly on the project's "
              "puzzles; its scores rank descriptions little better than at random", file=sys.stderr)
    return 0


def _untrained_finetuned(config):
    """A rewrite of the finetuned simulator's "materialize simulator_checkpoint first" for a config
    that names no finetuned simulator: simulator_checkpoint then trains none, and says so."""
    from neuron_assets.simulate import FINETUNED, simulator_names

    if FINETUNED in simulator_names(config) or config.simulate.finetuned.checkpoint:
        return lambda text: text
    reason = ("no finetuned simulator is configured (simulate.backend and simulate.compare_with do not name "
              "finetuned), so simulator_checkpoint trains none; to measure it add finetuned to simulate.compare_with "
              "and run neuron-assets run, or set simulate.finetuned.checkpoint to a trained simulator folder")
    return lambda text: text.split("the finetuned simulator has no checkpoint")[0] + reason \
        if "materialize simulator_checkpoint first" in text else text


# -- distill ------------------------------------------------------------------------------


def cmd_distill(args) -> int:
    """`run --select explainer_distilled,distilled_explainer_eval`, then the checkpoint and the curves."""
    from neuron_assets.stages import DISTILL_EVAL_TABLE, DISTILLED_TABLE, EVAL_PLOT
    from neuron_assets.store import Store

    args.select = "explainer_distilled" + ("" if args.no_eval else ",distilled_explainer_eval")
    status = cmd_run(args)
    if status:
        return status
    store = Store(load_config(args.config).store_root)
    latest = store.read(DISTILLED_TABLE).sort("created_at").tail(1).row(0, named=True)
    print(f"distilled explainer: {latest['path']}\n  {latest['examples']} prompts from {len(latest['train_features'])} "
          f"features, {latest['epochs']} epochs, {latest['steps']} steps, loss {latest['first_loss']:.3f} -> "
          f"{latest['last_loss']:.3f}, {latest['seconds']:.0f} s\n  explain with it: explain.backend transformers "
          f"(or vllm), explain.model {latest['path']}, explain.prompt_format {latest['prompt_format']}, "
          "explain.few_shot false")
    if not args.no_eval and store.exists(DISTILL_EVAL_TABLE):
        curve = store.read(DISTILL_EVAL_TABLE)
        print(f"mean best-of-k test score on held-out features ({curve['scorer'][0]}, {curve['simulator'][0]}):")
        for row in curve.sort("k", "explainer").iter_rows(named=True):
            print(f"  k={row['k']:<3} {row['explainer']:<10} {row['mean_best_test']:.4f}  ({row['features']} features)")
        plot = Path(latest["path"]) / EVAL_PLOT
        if plot.is_file():
            print(f"plot: {plot}")
    return 0


# -- ui -----------------------------------------------------------------------------------


def cmd_ui(args) -> int:
    config = load_config(args.config)
    env = dict(os.environ, DAGSTER_HOME=os.environ.get("DAGSTER_HOME") or str(config.root))
    if args.config:
        env["NEURON_ASSETS_CONFIG"] = str(Path(args.config).resolve())
    dagster = _dagster_executable()
    _check_port(args.port)
    # dagster dev starts the webserver and code server as commands of its own: they come from
    # the same environment, also when it is not activated.
    env["PATH"] = os.pathsep.join([str(Path(dagster).parent), env.get("PATH", "")]).rstrip(os.pathsep)
    workspace = Path(__file__).resolve().parent.parent / "workspace.yaml"
    command = [dagster, "dev", "-p", str(args.port)] + (["-w", str(workspace)] if workspace.exists() else ["-m", "neuron_assets.defs"])
    os.execve(command[0], command, env)
    return 0  # not reached


def _check_port(port: int) -> None:
    """Refuse a port that `dagster dev` could not listen on: it would log the error and keep
    running with no web server."""
    import socket

    def bind(number: int) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server does
            probe.bind(("127.0.0.1", number))
            return probe.getsockname()[1]

    if not 1 <= port <= 65535:
        raise ValueError(f"--port {port} is not a port number; pick one from 1024 to 65535, e.g. --port 3000")
    try:
        bind(port)
    except OSError as err:
        raise OSError(f"port {port} on 127.0.0.1 is not free ({err.strerror or err}); stop what listens there, "
                      f"or pick another port: neuron-assets ui --port {bind(0)}") from None


def _dagster_executable() -> str:
    """`dagster` beside this interpreter (`.venv/bin/neuron-assets ui` works without activating
    the venv), else the one on PATH."""
    import shutil

    beside = Path(sys.executable).parent / ("dagster.exe" if os.name == "nt" else "dagster")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("dagster")
    if found is None:
        raise LookupError(f"no `dagster` command beside {sys.executable} or on PATH; install the UI into this "
                          f"environment: {sys.executable} -m pip install dagster dagster-webserver")
    return found


if __name__ == "__main__":
    sys.exit(main())
