"""The explainer stage in Dagster: the `candidate_descriptions` asset, its check, and the
explainer resource.

The asset body is thin: call neuron_assets.stages.make_candidate_descriptions on the
requested partitions, check the result, return metadata. It has a
single-run backfill policy, so a range of partitions is one run that builds the explainer
(a vLLM engine, say) once.
"""


import dagster as dg

from neuron_assets.config import Config, ExplainConfig
from neuron_assets.defs.assets import log_partition_checks
from neuron_assets.defs.partitions import partition_key
from neuron_assets.defs.score_assets import requested_partitions
from neuron_assets.defs.resources import NeuronAssetsConfig
from neuron_assets.defs.runs import RunSettings
from neuron_assets.explain import (
    EXPLAINERS,
    Explainer,
    make_explainer,
    summarize_candidates,
)
from neuron_assets.failures import StageFailed, check_candidates
from neuron_assets.report.render import markdown_table
from neuron_assets.stages import CANDIDATES_TABLE as TABLE, make_candidate_descriptions
from neuron_assets.store import Store

CHECK = "every_feature_has_k_candidates"

class ExplainerResource(dg.ConfigurableResource):
    """The configured explainer backend, built on first use and shared in the process through
    neuron_assets.runtime (a vLLM engine or a local model loads once for every partition, and
    runtime.release_all gives its memory back when the stage is done)."""

    def get(self, config: ExplainConfig) -> Explainer:
        from neuron_assets import runtime

        return runtime.shared(runtime.cache_key("explainer", config.model_dump(mode="json")),
                              lambda: make_explainer(config))


def explain_assets(partitions: dg.MultiPartitionsDefinition, config: Config | None = None) -> list[dg.AssetsDefinition]:
    """The candidate_descriptions asset over ``partitions``; GPU backends of ``config`` put
    it in the gpu pool."""

    @dg.asset(
        name=TABLE,
        deps=["exemplars", "corpus"],
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool="gpu" if config is not None and EXPLAINERS[config.explain.backend].needs_gpu else None,
        description="Per neuron x polarity: k candidate descriptions (best-of-k), each with the backend, explainer "
        "model, prompt format, exemplars and puzzle that made it, token counts and latency; a failed candidate is a "
        "row with its reason in `failure` (table `candidate_descriptions`).",
        check_specs=[dg.AssetCheckSpec(CHECK, asset=TABLE, description="every selected feature has k candidates, "
                                       "each a description or a recorded failure")],
        kinds={"parquet"},
    )
    def candidate_descriptions(context: dg.AssetExecutionContext, settings: NeuronAssetsConfig,
                               explainer: ExplainerResource, run: RunSettings) -> dg.MaterializeResult:
        config = settings.load()
        store = Store(config.store_root)
        with run.stage(context, config) as stage:
            requested = stage.todo(requested_partitions(context))
            if not requested:
                return dg.MaterializeResult(metadata={"skipped": "every partition is up to date", **stage.metadata()})
            made = make_candidate_descriptions(config, requested, context.run_id, explainer.get(config.explain),
                                               stage.progress, context.log.info)
            everything, missing = made.frame, made.missing
            written = [(w.layer, w.polarity, w.rows, w.path) for w in made.written]
            try:
                reasons = check_candidates(everything)
            except StageFailed as err:  # no marker: a rerun tries again
                raise dg.Failure(str(err), metadata={"failures_by_reason": dg.MetadataValue.json(err.reasons)}) from None
            for (layer, polarity), (_, _, _, path) in zip(requested, written):
                stage.complete((layer, polarity), [path])
        log_partition_checks(context, CHECK, {partition_key(layer, polarity): not any((l, p) == (layer, polarity.value)
                                                                                      for l, p, _ in missing)
                                              for layer, polarity in requested})
        summary = summarize_candidates(everything, config.explain)
        metadata = {
            "failures_by_reason": dg.MetadataValue.json(reasons),
            **stage.metadata(),
            "rows": summary.rows,
            "features": summary.features,
            "described": summary.described,
            "failed": summary.failed,
            "prompt_tokens": summary.prompt_tokens,
            "completion_tokens": summary.completion_tokens,
            "mean_latency_s": round(summary.mean_latency_s, 4),
            "backend": made.backend,
            "config_hash": config.hash,
            "examples": dg.MetadataValue.md(summary.examples_markdown),
            "failures": dg.MetadataValue.md(summary.failures_markdown),
            "written": dg.MetadataValue.md(_written_table(written)),
            "root": dg.MetadataValue.path(str(store.table_dir(TABLE))),
        }
        if summary.cost_usd is not None:
            metadata["cost_usd"] = round(summary.cost_usd, 4)
        return dg.MaterializeResult(
            metadata=metadata,
            data_version=dg.DataVersion(config.hash),
            check_results=[dg.AssetCheckResult(check_name=CHECK, passed=not missing,
                                               metadata={"features_missing_candidates": len(missing),
                                                         "first_missing": str(missing[:10])})],
        )

    return [candidate_descriptions]


def _written_table(written: list[tuple]) -> str:
    return markdown_table(["layer", "polarity", "rows", "path"],
                          [(layer, polarity, rows, f"`{path}`") for layer, polarity, rows, path in written])
