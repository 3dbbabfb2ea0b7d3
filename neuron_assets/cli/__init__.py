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
    neuron-assets serve                        the explorer: search, every feature's page, steering (web app + JSON API)
    neuron-assets steer "PROMPT" --select Q    baseline and steered continuations of features chosen by description
    neuron-assets clusters                     families of similar descriptions, labelled
"""

from __future__ import annotations

import argparse
import sys

from neuron_assets.config import ConfigError

CONFIG_HELP = "YAML config (default: $NEURON_ASSETS_CONFIG, else the embedded demo)"


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

# Each module registers its subcommands; their order is the order of `neuron-assets --help`.
COMMAND_MODULES = ("run", "database", "pipeline", "clusters", "steer", "serve")


def _parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="neuron-assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help=CONFIG_HELP)
    commands = parser.add_subparsers(dest="command")
    for name in COMMAND_MODULES:
        importlib.import_module(f"neuron_assets.cli.{name}").register(commands)
    for command in commands.choices.values():  # --config also after the command: `neuron-assets plan --config X`
        command.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
    return parser
