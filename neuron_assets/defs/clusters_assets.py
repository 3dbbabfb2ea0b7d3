"""Description clusters in Dagster: the unpartitioned `description_clusters` asset over every
partition of `description_embeddings`; neuron_assets.clusters clusters, labels and writes."""

import dagster as dg

from neuron_assets.clusters import (
    CLUSTERS_TABLE,
    ClustersWritten,
    cluster_summaries,
    make_description_clusters,
    read_clusters,
)
from neuron_assets.defs.template import Call, Report, on_new_upstream, stage_asset
from neuron_assets.markdown import markdown_table
from neuron_assets.report.metadata import Markdown, location

SHOWN = 10  # clusters listed in the materialization's metadata


def compute_clusters(call: Call) -> ClustersWritten:
    written = make_description_clusters(call.config, call.run_id, log=call.log)
    call.stage.complete(None, [written.path])
    return written


def report_clusters(call: Call, written: ClustersWritten) -> Report:
    settings = call.config.clusters
    summaries = cluster_summaries(read_clusters(call.store), top=SHOWN, shown=1)
    rows = [[s["cluster"], s["size"], f"{s['coherence']:.2f}" if s["coherence"] is not None else "-", s["label"]]
            for s in summaries]
    metadata = {
        "clusters": written.clusters, "members": written.rows, "descriptions": written.descriptions,
        "left_out": written.left_out, "distance": settings.distance, "min_size": settings.min_size,
        "scope": settings.scope, "labels": written.label_source, "seconds": round(written.seconds, 2),
        "path": location(written.path),
    }
    if rows:
        metadata["largest_clusters"] = Markdown(markdown_table(["cluster", "size", "coherence", "label"], rows))
    return Report(metadata)


def clusters_assets(config=None) -> list[dg.AssetsDefinition]:
    local_llm = config is not None and config.explain.backend in ("vllm", "transformers") and \
        config.clusters.labels != "centroid"
    return [stage_asset(
        CLUSTERS_TABLE, compute_clusters, report_clusters, config=config, pool="gpu" if local_llm else None,
        automation_condition=on_new_upstream("description_embeddings"),  # new selections, new families
        description="Families of descriptions (table `description_clusters`, one row per member): the selected "
        "descriptions' search vectors clustered by average linkage on cosine distance, cut at clusters.distance; "
        "each cluster with its coherence (mean pairwise cosine similarity), size and a label (the member nearest "
        "the centroid, or with an LLM explainer a name from it). `neuron-assets clusters` lists them.",
        kinds={"scipy", "parquet"},
    )]
