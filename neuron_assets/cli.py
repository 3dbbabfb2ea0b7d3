"""`neuron-assets`: run the pipeline, query the description database, look at a neuron.

    neuron-assets run                          materialize every asset of the config
    neuron-assets sql "select ..."             read-only SQL over the catalog
    neuron-assets show 3 975 --polarity pos    a neuron's description and exemplars, activating tokens marked
    neuron-assets config                       the effective config, every field documented
    neuron-assets validate-scorers             how often each simulator ranks true descriptions first
    neuron-assets ui                           the Dagster UI on the same storage
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from neuron_assets.config import ConfigError, load_config


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
        print("interrupted; a rerun resumes from the last checkpoint", file=sys.stderr)
        return 130
    except (ValueError, LookupError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
    return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuron-assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config (default: $NEURON_ASSETS_CONFIG, else the embedded demo)")
    commands = parser.add_subparsers(dest="command")

    run = commands.add_parser("run", help="materialize the configured assets in-process, then build the catalog")
    run.add_argument("--select", help="comma-separated asset names (default: all)")
    run.set_defaults(handler=cmd_run)

    sql = commands.add_parser("sql", help="run a read-only SQL query against the description database")
    sql.add_argument("query", help="SQL text, or @file.sql")
    sql.add_argument("--format", choices=["table", "csv", "json"], default="table")
    sql.add_argument("--max-rows", type=int, default=40, help="rows shown in table format")
    sql.set_defaults(handler=cmd_sql)

    show = commands.add_parser("show", help="a neuron's statistics and exemplars, activating tokens marked")
    show.add_argument("layer", type=int)
    show.add_argument("neuron", type=int)
    show.add_argument("--polarity", choices=["pos", "neg"], default="pos")
    show.add_argument("--split", choices=["train", "val", "test"], default="train")
    show.add_argument("--kind", choices=["top", "random", "quantile"], default="top")
    show.add_argument("-n", type=int, default=10, help="exemplars shown")
    show.set_defaults(handler=cmd_show)

    show_config = commands.add_parser("config", help="print the effective config as YAML, every field documented")
    show_config.set_defaults(handler=cmd_config)

    validate = commands.add_parser(
        "validate-scorers", help="each simulator and scorer on puzzles with one true and several false descriptions")
    validate.add_argument("--puzzles", action="append", default=[], metavar="FILE",
                          help="also a puzzle file in OpenAI's layout {name: {explanation, sentences, "
                          "false_explanations}} (repeatable)")
    validate.add_argument("--format", choices=["table", "json"], default="table")
    validate.set_defaults(handler=cmd_validate_scorers)

    ui = commands.add_parser("ui", help="start the Dagster UI (dagster dev) on this config's storage")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(handler=cmd_ui)
    return parser


# -- run ----------------------------------------------------------------------------------


def cmd_run(args) -> int:
    from neuron_assets.defs.materialize import materialize_config, partition_count
    from neuron_assets.store import Store

    config = load_config(args.config)
    config.root.mkdir(parents=True, exist_ok=True)
    select = [name.strip() for name in args.select.split(",")] if args.select else None
    print(f"neuron-assets: config '{config.name}' ({config.hash}), model {config.subject.model}, "
          f"{partition_count(args.config)} partitions (layer x polarity), storage {config.root}", file=sys.stderr)
    started = time.time()
    try:
        materialize_config(args.config, select)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    store = Store(config.root)
    views = store.build_catalog()
    _print_summary(store, views, time.time() - started)
    return 0


def _print_summary(store, views: list[str], seconds: float) -> None:
    import duckdb

    con = duckdb.connect(str(store.catalog_path), read_only=True)
    print(f"\n{'table':<24} {'partitions':>10} {'rows':>10}")
    for view in views:
        rows = con.execute(f"select count(*) from {view}").fetchone()[0]
        files = len(list((store.data_dir / view).rglob("*.parquet"))) if (store.data_dir / view).exists() else 0
        print(f"{view:<24} {files or '-':>10} {rows:>10}")
    con.close()
    print(f"\ndone in {seconds:.0f} s. DuckDB catalog: {store.catalog_path}")
    print('query it: neuron-assets sql "select layer, polarity, count(*) from exemplars group by all"')


# -- sql ----------------------------------------------------------------------------------


def cmd_sql(args) -> int:
    import duckdb

    from neuron_assets.store import Store

    config = load_config(args.config)
    store = Store(config.root)
    query = Path(args.query[1:]).read_text() if args.query.startswith("@") else args.query
    if not store.data_dir.exists():
        raise LookupError(f"no data under {config.root}; run `neuron-assets run` first")
    con = store.connect(read_only=True)
    try:
        relation = con.sql(query)
    except duckdb.CatalogException as err:
        views = ", ".join(store.views())
        raise LookupError(f"{str(err).splitlines()[0]}. Views in the catalog: {views or 'none yet'}") from None
    except duckdb.Error as err:
        raise ValueError(f"SQL error: {str(err).splitlines()[0]}") from None
    if relation is None:
        return 0
    if args.format == "table":
        relation.show(max_rows=args.max_rows, max_width=200)
    elif args.format == "csv":
        relation.pl().write_csv(sys.stdout)
    else:
        json.dump(relation.pl().to_dicts(), sys.stdout, default=str, indent=1)
        print()
    return 0


# -- show ---------------------------------------------------------------------------------


def cmd_show(args) -> int:
    from neuron_assets.exemplars import load_feature_exemplars
    from neuron_assets.render import highlight_terminal
    from neuron_assets.store import Store
    from neuron_assets.types import ExemplarKind, Polarity, Split

    config = load_config(args.config)
    store = Store(config.root)
    features = {f.feature.index: f for f in load_feature_exemplars(store, args.layer, Polarity(args.polarity))}
    feature = features.get(args.neuron)
    if feature is None:
        some = ", ".join(str(n) for n in sorted(features)[:20])
        raise LookupError(f"neuron {args.neuron} of layer {args.layer} was not collected; collected neurons include {some} "
                          "(set features.neurons to collect others)")
    stats = feature.stats
    color = sys.stdout.isatty()
    print(f"{feature.feature}: max {stats.max:.3f}, mean {stats.mean:.3f}, std {stats.std:.3f}, "
          f"active on {stats.frac_active:.1%} of tokens; q99 {stats.quantiles[0.99]:.3f}")
    descriptions = _best_description(store, feature.feature)
    if descriptions:
        print(descriptions)
    print(f"\n{args.kind} {args.split} exemplars (tokens at >= half the strongest exemplar's activation "
          + ("in bold" if color else "in {{ }}") + "):")
    exemplars = feature.select(Split(args.split), ExemplarKind(args.kind))[: args.n]
    reference = max((e.extreme for e in exemplars), default=0.0)
    for exemplar in exemplars:
        print(f"{exemplar.rank:>3} {exemplar.extreme:>8.3f}  {highlight_terminal(exemplar.record, feature.feature.polarity, color, reference)}")
    return 0


def _best_description(store, feature) -> str | None:
    if not store.exists("neuron_descriptions", feature.layer, feature.polarity.value):
        return None
    import polars as pl

    rows = store.read("neuron_descriptions", feature.layer, feature.polarity.value).filter(pl.col("neuron") == feature.index)
    if rows.height == 0 or "description" not in rows.columns:
        return None
    return f"description: {rows['description'][0]}"


def cmd_config(args) -> int:
    from neuron_assets.config import documented_yaml

    print(documented_yaml(load_config(args.config)), end="")
    return 0


# -- validate-scorers -----------------------------------------------------------------------


def cmd_validate_scorers(args) -> int:
    from neuron_assets.validity import report_table, validate_scorers

    config = load_config(args.config)
    report = validate_scorers(config, puzzle_files=args.puzzles, log=lambda line: print(line, file=sys.stderr))
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


# -- ui -----------------------------------------------------------------------------------


def cmd_ui(args) -> int:
    config = load_config(args.config)
    env = dict(os.environ, DAGSTER_HOME=os.environ.get("DAGSTER_HOME") or str(config.root))
    if args.config:
        env["NEURON_ASSETS_CONFIG"] = str(Path(args.config).resolve())
    workspace = Path(__file__).resolve().parent.parent / "workspace.yaml"
    command = ["dagster", "dev", "-p", str(args.port)] + (["-w", str(workspace)] if workspace.exists() else ["-m", "neuron_assets.defs"])
    os.execvpe(command[0], command, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
