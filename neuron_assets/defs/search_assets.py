"""Description search in Dagster: the `description_embeddings` asset (partitioned like
`neuron_descriptions`); neuron_assets.search embeds, writes and builds the search index."""

import dagster as dg

from neuron_assets.checks import UNIT_NORM, unit_norm
from neuron_assets.defs.template import Call, Report, on_new_upstream, stage_asset
from neuron_assets.report.metadata import embeddings_metadata
from neuron_assets.search import EMBEDDINGS_TABLE, build_index, make_description_embeddings


def compute_embeddings(call: Call):
    written = make_description_embeddings(call.config, call.todo, call.run_id, log=call.log,
                                          on_partition=call.stage.complete)
    return written, build_index(call.store, log=call.log)  # also when every partition was up to date


def report_embeddings(call: Call, result) -> Report:
    written, index = result
    return Report(embeddings_metadata(call.config, call.store, written, index), [unit_norm(call.store, written)])


def search_assets(partitions: dg.MultiPartitionsDefinition, config=None) -> list[dg.AssetsDefinition]:
    return [stage_asset(
        EMBEDDINGS_TABLE, compute_embeddings, report_embeddings, config=config, partitions=partitions, always=True,
        automation_condition=on_new_upstream("neuron_descriptions"),  # a rescore re-selects, then this re-embeds
        description="Sentence vectors (search.embedding_model, MiniLM by default) of every selected description, and "
        "with search.candidates of every candidate, keyed by the hash of the text so unchanged texts are not embedded "
        "again (table `description_embeddings`); then the search index over all partitions (a faiss IVF index and BM25 postings per "
        "partition, data/description_index/; a changed partition's shard is rebuilt) that `neuron-assets search` reads.",
        checks={UNIT_NORM: "every vector has length 1 (cosine similarity is a dot product)"},
        kinds={"parquet", "duckdb"},
    )]
