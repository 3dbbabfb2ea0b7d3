"""Description search in Dagster: the `description_embeddings` asset (partitioned like
`neuron_descriptions`) and its check. The body is thin: neuron_assets.search embeds, writes and
builds the search index; this reads the config and returns metadata.
"""

import dagster as dg

from neuron_assets.defs.resources import NeuronAssetsConfig
from neuron_assets.defs.runs import RunSettings
from neuron_assets.defs.score_assets import on_new_upstream, requested_partitions
from neuron_assets.search import EMBEDDINGS_TABLE, build_index, make_description_embeddings
from neuron_assets.store import Store

UNIT_NORM = "vectors_are_unit_length"


def search_assets(partitions: dg.MultiPartitionsDefinition) -> list[dg.AssetsDefinition]:
    @dg.asset(
        name=EMBEDDINGS_TABLE,
        deps=["neuron_descriptions", "candidate_descriptions"],
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        automation_condition=on_new_upstream("neuron_descriptions"),  # a rescore re-selects, then this re-embeds
        description="Sentence vectors (search.embedding_model, MiniLM by default) of every selected description, and "
        "with search.candidates of every candidate, keyed by the hash of the text so unchanged texts are not embedded "
        "again (table `description_embeddings`); then the search index over all partitions (HNSW and BM25, "
        "data/description_index/index.duckdb) that `neuron-assets search` reads.",
        check_specs=[dg.AssetCheckSpec(UNIT_NORM, asset=EMBEDDINGS_TABLE,
                                       description="every vector has length 1 (cosine similarity is a dot product)")],
        kinds={"parquet", "duckdb"},
    )
    def description_embeddings(context: dg.AssetExecutionContext, settings: NeuronAssetsConfig,
                               run: RunSettings) -> dg.MaterializeResult:
        config = settings.load()
        store = Store(config.store_root)
        with run.stage(context, config) as stage:
            requested = stage.todo(requested_partitions(context))
            written = []
            for layer, polarity in requested:
                written.append(make_description_embeddings(config, layer, polarity, context.run_id,
                                                           log=context.log.info))
                stage.complete((layer, polarity), [written[-1].path])
            index = build_index(store, log=context.log.info)  # also when every partition was up to date
        worst = max((_norm_error(store, w.layer, w.polarity) for w in written), default=0.0)
        return dg.MaterializeResult(
            metadata={"rows": sum(w.rows for w in written), "embedded": sum(w.embedded for w in written),
                      "reused": sum(w.reused for w in written), "partitions": len(written),
                      "index_rows": index.rows, "index_hnsw": index.hnsw, "index_bm25": index.fts,
                      "index_seconds": round(index.seconds, 2), "model": config.search.embedding_model,
                      "index": dg.MetadataValue.path(str(index.path)),
                      "root": dg.MetadataValue.path(str(store.table_dir(EMBEDDINGS_TABLE))),
                      "config_hash": config.hash, **stage.metadata()},
            check_results=[dg.AssetCheckResult(check_name=UNIT_NORM, passed=worst < 1e-3,
                                               metadata={"largest_norm_error": round(worst, 6)})],
        )

    return [description_embeddings]


def _norm_error(store: Store, layer: int, polarity: str) -> float:
    import numpy as np

    frame = store.read(EMBEDDINGS_TABLE, layer, polarity, columns=["embedding"])
    if frame.height == 0:
        return 0.0
    matrix = np.asarray(frame["embedding"].to_numpy(), dtype=np.float32).reshape(frame.height, -1)
    return float(np.abs(np.linalg.norm(matrix, axis=1) - 1.0).max())
