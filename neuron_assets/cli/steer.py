"""The steer command: a prompt's baseline and steered continuations, side by side."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap

from neuron_assets.cli.args import at_least_one
from neuron_assets.config import load_config

SIDE_BY_SIDE_MIN = 100  # terminal columns below which the two texts are shown one after the other


def register(commands) -> None:
    """steer."""
    steer = commands.add_parser(
        "steer", help="steer the subject by description: set (or add to, or ablate) the features whose descriptions "
        "match a query, or given ids, and show the prompt's baseline and steered continuations side by side")
    steer.add_argument("prompt", help="the text to continue (a chat model gets it as the user's turn)")
    steer.add_argument("--select", metavar="QUERY", help="steer the features whose descriptions match QUERY "
                       "(semantic search; --text: by words)")
    steer.add_argument("--text", dest="full_text", action="store_true", help="select by words (BM25) instead of meaning")
    steer.add_argument("--top", type=at_least_one(), default=20, help="features selected by --select (default 20)")
    steer.add_argument("--layers", help="only these layers, e.g. 3,5 or 2-4")
    steer.add_argument("--polarity", choices=["pos", "neg"], help="only this polarity")
    steer.add_argument("--kind", choices=["neuron", "sae"], help="only this kind of feature")
    steer.add_argument("--min-score", type=float, help="only descriptions whose test score is at least this")
    steer.add_argument("--feature", action="append", default=[], metavar="L:N[:pos|neg][:sae]",
                       help="steer this feature too (repeatable), e.g. --feature 12:345 --feature 12:7:pos:sae")
    steer.add_argument("--cluster", type=int, metavar="ID", help="steer the members of this description cluster")
    steer.add_argument("--mode", choices=["set", "add", "ablate"], default="set",
                       help="set the activation to the value (default), add the value to it, or ablate the feature")
    steer.add_argument("--ablate-with", choices=["zero", "mean"], default="zero",
                       help="ablate to 0 (default) or to the feature's train mean")
    steer.add_argument("--strength", type=float, default=1.0,
                       help="times each feature's value (its q99 activation); 0 leaves the model as it is")
    steer.add_argument("--tokens", type=at_least_one(), default=32, help="tokens to generate (default 32)")
    steer.add_argument("--apply", choices=["prompt", "generated", "both"], default="both",
                       help="where to steer: the prompt's tokens, the generated ones, or both (default)")
    steer.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; else sampled")
    steer.add_argument("--seed", type=int, default=0, help="sampling seed, the same for both continuations")
    chat = steer.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="use the chat template (default: when the tokenizer has one)")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="the prompt as plain text")
    steer.add_argument("--torch-threads", type=at_least_one(), metavar="N",
                       help="threads per torch operation (default: torch's choice, every core); on a busy CPU 1 is "
                            "often several times faster, as threads wait on each other")
    steer.add_argument("--format", choices=["text", "json"], default="text")
    steer.set_defaults(handler=cmd_steer)


def request_of(args):
    from neuron_assets.steer import SteerRequest, parse_layers

    return SteerRequest(
        prompt=args.prompt, features=tuple(args.feature), select=args.select,
        select_mode="text" if args.full_text else "semantic",
        layers=parse_layers(args.layers) if args.layers else None, polarity=args.polarity, kind=args.kind,
        min_score=args.min_score, top=args.top, cluster=args.cluster, mode=args.mode, ablate_with=args.ablate_with,
        strength=args.strength, tokens=args.apply, n_tokens=args.tokens, temperature=args.temperature,
        seed=args.seed, chat=args.chat)


def cmd_steer(args) -> int:
    from neuron_assets.steer import Steerer

    config = load_config(args.config)
    request = request_of(args)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    result = Steerer(config).run(request)
    if args.format == "json":
        json.dump(result.as_dict(), sys.stdout, indent=1)
        print()
        return 0
    print(render(result, shutil.get_terminal_size((120, 24)).columns))
    return 0


def render(result, columns: int) -> str:
    """Baseline and steered side by side (or one after the other on a narrow terminal), then
    the features used."""
    lines = [f"prompt: {result.prompt}", ""]
    baseline, steered = result.baseline.text.strip(), result.steered.text.strip()
    if columns >= SIDE_BY_SIDE_MIN:
        width = (columns - 3) // 2
        left = ["BASELINE", *(textwrap.wrap(baseline, width) or [""])]
        right = ["STEERED", *(textwrap.wrap(steered, width) or [""])]
        for i in range(max(len(left), len(right))):
            a = left[i] if i < len(left) else ""
            b = right[i] if i < len(right) else ""
            lines.append(f"{a:<{width}} | {b}".rstrip())
    else:
        width = max(columns, 40)
        lines += ["BASELINE", *textwrap.wrap(baseline, width), "", "STEERED", *textwrap.wrap(steered, width)]
    s = result.settings
    active = [f for f in result.features if f.active]
    lines += ["", f"{len(active)} feature(s) {s['mode']}"
              + (f" to {s['ablate_with']}" if s["mode"] == "ablate" else f", strength {s['strength']:g}")
              + {"prompt": ", over the prompt's tokens", "generated": ", over the generated tokens",
                 "both": ", over the prompt's and the generated tokens"}[s["tokens"]]
              + (" (prompt through the chat template)" if s["chat"] else "")
              + f"; {s['seconds']:.1f} s"]
    if result.features:
        lines.append(f"  {'feature':<18} {'value':>8} {'score':>6}  description")
        for f in result.features:
            feature = f.feature
            name = f"{feature.layer}/{feature.index} {feature.polarity.value}" + \
                ("" if feature.kind == "neuron" else f" {feature.kind}")
            score = "-" if f.score is None else f"{f.score:.3f}"
            value = f"{f.value:8.3f}" if f.active else f"{'off':>8}"
            description = f.description or "(no description)"
            if len(description) > 80:
                description = description[:77] + "..."
            lines.append(f"  {name:<18} {value} {score:>6}  {description}")
    return "\n".join(lines)

