"""The commands that read the description database: sql, show, verify, report, search, export."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from neuron_assets.cli.args import at_least_one
from neuron_assets.config import load_config
from neuron_assets.types import Partition, Sample


def register(commands) -> None:
    """sql, show, report, search, verify and export."""
    sql = commands.add_parser("sql", help="run a read-only SQL query against the description database")
    sql.add_argument("query", help="SQL text, or @file.sql")
    sql.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table",
                     help="table (shown here), or csv, json, parquet: written to stdout or to --output")
    sql.add_argument("--output", metavar="FILE", help="write the result to FILE (csv, json, parquet) instead of stdout")
    sql.add_argument("--max-rows", type=at_least_one("; to get every row use --format csv (or json, parquet)"), default=40,
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
    show.add_argument("-n", type=at_least_one(), default=10, help="exemplars shown")
    show.add_argument("--html", metavar="PATH", help="also write a self-contained page of the neuron to PATH: every "
                      "polarity side by side, candidates with scores, statistics, top and quantile exemplars as heat-maps")
    show.set_defaults(handler=cmd_show)

    report = commands.add_parser("report", help="build (or find, when up to date) the static HTML report of the store "
                                 "and print the path of its index")
    report.add_argument("--open", action="store_true", help="open the index in a web browser")
    report.add_argument("--rebuild", action="store_true", help="build it again even when it is up to date")
    report.set_defaults(handler=cmd_report)
    search = commands.add_parser("search", help="descriptions nearest a text in meaning (MiniLM vectors, an IVF index), "
                                 "or by words with --text (BM25)")
    search.add_argument("text", help="what to look for, e.g. \"closing brackets in code\"")
    search.add_argument("--text", dest="full_text", action="store_true",
                        help="full-text search (BM25; ILIKE where the search index cannot be read) instead of semantic")
    search.add_argument("--top", type=at_least_one(), default=10, help="hits shown")
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

    verify = commands.add_parser("verify", help="check every data file of the store in full (readable, unchanged since "
                                 "it was written, none missing that a run wrote) and name each bad one with the "
                                 "command that writes it again; exit 1 when any")
    verify.set_defaults(handler=cmd_verify)


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


# -- show ---------------------------------------------------------------------------------


def cmd_show(args) -> int:
    from neuron_assets.report.neuron import load_neuron, neuron_text
    from neuron_assets.store import Store
    from neuron_assets.types import Polarity, Sample, Split

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
            with writer_lock(config.store_root, run_id, ["neuron_report"], command="neuron-assets report"):
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
    match = {"ivf": "cosine", "exact": "cosine", "bm25": "bm25", "ilike": "words"}[result.method]
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
