"""`neuron-assets clusters`: the families of descriptions (table description_clusters), largest first."""

from __future__ import annotations

import json

from neuron_assets.cli.args import at_least_one
from neuron_assets.config import load_config


def register(commands) -> None:
    """The `clusters` command."""
    clusters = commands.add_parser("clusters", help="families of similar descriptions (average-linkage clusters of "
                                   "their vectors): id, size, coherence, label and the members nearest the centroid")
    clusters.add_argument("--min-size", type=at_least_one(), default=1,
                          help="only clusters with at least this many members (the stored ones have clusters.min_size)")
    clusters.add_argument("--top", type=at_least_one(), default=20, help="clusters shown, largest first")
    clusters.add_argument("--members", type=at_least_one(), default=3,
                          help="members shown per cluster, nearest the centroid first")
    clusters.add_argument("--format", choices=["table", "json"], default="table")
    clusters.set_defaults(handler=cmd_clusters)


def cmd_clusters(args) -> int:
    from neuron_assets.clusters import cluster_summaries, read_clusters
    from neuron_assets.store import Store

    config = load_config(args.config)
    members = read_clusters(Store(config.store_root))
    summaries = cluster_summaries(members, min_size=args.min_size, top=args.top, shown=args.members)
    if args.format == "json":
        print(json.dumps(summaries, indent=1))
        return 0
    if not summaries:
        total = members["cluster"].n_unique() if members.height else 0
        print(f"no cluster with at least {args.min_size} members ({total} stored); lower --min-size, or raise "
              "clusters.distance (or lower clusters.min_size) and run `neuron-assets run` again")
        return 0
    stored = members["cluster"].n_unique()
    print(f"{len(summaries)} of {stored} clusters shown ({members.height} descriptions in clusters)")
    for summary in summaries:
        coherence = "-" if summary["coherence"] is None else f"{summary['coherence']:.2f}"
        layers = ",".join(map(str, summary["layers"]))
        print(f"\ncluster {summary['cluster']}  size {summary['size']}  coherence {coherence}  layers {layers}  "
              f"{'/'.join(summary['polarities'])}")
        print(f"  label: {summary['label']}" + (" (LLM)" if summary["label_source"] == "llm" else ""))
        for member in summary["members"]:
            kind = "" if member["kind"] == "neuron" else f" {member['kind']}"
            score = "-" if member["score"] is None else f"{member['score']:.2f}"
            print(f"  {member['layer']:>3} {member['polarity']} {member['neuron']:>6}{kind}  score {score}  "
                  f"{member['description']}")
    return 0
