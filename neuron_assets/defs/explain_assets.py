"""The explainer stage in Dagster: the `candidate_descriptions` asset and the explainer resource.
One run covers a range of partitions, so the explainer (a vLLM engine, say) is built once."""

import dagster as dg

from neuron_assets.checks import EVERY_FEATURE_HAS_K_CANDIDATES as CHECK
from neuron_assets.checks import every_feature_has_k_candidates
from neuron_assets.config import Config, ExplainConfig
from neuron_assets.defs.template import Call, Report, dagster_metadata, stage_asset
from neuron_assets.explain import EXPLAINERS, Explainer, make_explainer
from neuron_assets.failures import StageFailed, check_candidates
from neuron_assets.report.metadata import candidates_metadata
from neuron_assets.stages import CANDIDATES_TABLE as TABLE
from neuron_assets.stages import make_candidate_descriptions


class ExplainerResource(dg.ConfigurableResource):
    """The configured explainer backend, built on first use and shared in the process through
    neuron_assets.runtime (a vLLM engine or a local model loads once for every partition, and
    runtime.release_all gives its memory back when the stage is done)."""

    def get(self, config: ExplainConfig) -> Explainer:
        from neuron_assets import runtime

        return runtime.shared(runtime.cache_key("explainer", config.model_dump(mode="json")),
                              lambda: make_explainer(config))


def compute_candidates(call: Call):
    made = make_candidate_descriptions(call.config, call.todo, call.run_id, call.resources.explainer.get(call.config.explain),
                                       call.stage.progress, call.log)
    try:
        reasons = check_candidates(made.frame)
    except StageFailed as err:  # no marker: a rerun tries again
        raise dg.Failure(str(err), metadata=dagster_metadata({"failures_by_reason": err.reasons})) from None
    for partition, written in zip(call.todo, made.written):
        call.stage.complete(partition, [written.path])
    return made, reasons


def report_candidates(call: Call, result) -> Report:
    made, reasons = result
    checks, by_partition = every_feature_has_k_candidates(made.missing, call.todo)
    return Report(candidates_metadata(call.config, call.store, made, reasons), checks, by_partition)


def explain_assets(partitions: dg.MultiPartitionsDefinition, config: Config | None = None) -> list[dg.AssetsDefinition]:
    """The candidate_descriptions asset over ``partitions``; GPU backends of ``config`` put
    it in the gpu pool."""
    return [stage_asset(
        TABLE, compute_candidates, report_candidates, config=config, partitions=partitions,
        pool="gpu" if config is not None and EXPLAINERS[config.explain.backend].needs_gpu else None,
        resources=("explainer",), up_to_date="every partition is up to date",
        description="Per neuron x polarity: k candidate descriptions (best-of-k), each with the backend, explainer "
        "model, prompt format, exemplars and puzzle that made it, token counts and latency; a failed candidate is a "
        "row with its reason in `failure` (table `candidate_descriptions`).",
        checks={CHECK: "every selected feature has k candidates, each a description or a recorded failure"},
        kinds={"parquet"},
    )]
