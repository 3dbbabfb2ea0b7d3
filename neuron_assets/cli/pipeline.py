"""The commands around a run: config, plan, validate-scorers, distill and the Dagster UI."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from neuron_assets.cli.args import check_port
from neuron_assets.config import load_config


def register(commands) -> None:
    """config, plan, validate-scorers, distill and ui."""
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
    from neuron_assets.cli.run import cmd_run

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
    check_port(args.port)
    # dagster dev starts the webserver and code server as commands of its own: they come from
    # the same environment, also when it is not activated.
    env["PATH"] = os.pathsep.join([str(Path(dagster).parent), env.get("PATH", "")]).rstrip(os.pathsep)
    workspace = Path(__file__).resolve().parent.parent / "workspace.yaml"
    command = [dagster, "dev", "-p", str(args.port)] + (["-w", str(workspace)] if workspace.exists() else ["-m", "neuron_assets.defs"])
    os.execve(command[0], command, env)
    return 0  # not reached


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
