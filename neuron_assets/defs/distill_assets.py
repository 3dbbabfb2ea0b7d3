"""The distilled explainer in Dagster: `explainer_distilled` (a causal LM fine-tuned on the
best descriptions, neuron_assets.distill) and `distilled_explainer_eval` (base vs distilled
explainer on held-out features, mean best-of-k score vs k). Neither runs in a plain
`neuron-assets run` (they cost minutes on CPU); `neuron-assets distill`, `run --select` or the
UI materialize them, and distill.in_run adds them to every run."""

import dagster as dg

from neuron_assets.defs.template import Call, Report, stage_asset, step_progress
from neuron_assets.report.metadata import distilled_metadata, evaluation_metadata, write_evaluation_plot


def compute_distilled(call: Call):
    from neuron_assets.stages import make_explainer_distilled

    on_step = step_progress(call.stage)
    written = make_explainer_distilled(call.config, call.run_id, log=call.log,
                                       on_step=lambda *step: on_step("distil", *step))
    call.stage.complete(None, [written.table_path, written.explainer.path / "distill.json"])
    return written


def compute_evaluation(call: Call):
    from neuron_assets.stages import make_distilled_evaluation

    distill = call.config.distill
    total = (distill.eval_features or 0) * distill.eval_k * 2 or None
    with call.stage.progress.task("distilled explainer evaluation", total, "candidate") as task:
        written = make_distilled_evaluation(call.config, call.run_id, log=call.log, on_candidates=task.advance)
    write_evaluation_plot(written)
    call.stage.complete(None, [written.table_path, written.scores_path])
    return written


def distill_assets(config=None) -> list[dg.AssetsDefinition]:
    return [
        stage_asset(
            "explainer_distilled", compute_distilled,
            lambda call, written: Report(distilled_metadata(written, call.config), data_version=written.explainer.version),
            config=config, pool="gpu",
            description="The distilled explainer: distill.base_model fine-tuned (full, or LoRA for large models; bf16 "
            "with fp32 master weights on GPU) to answer the explainer prompt without a few-shot example with each "
            "training feature's selected description; training and held-out features are disjoint. A plain model "
            "folder (safetensors, tokenizer, distill.json with the loss curve, data size and feature lists) under "
            "checkpoints/explainer_distilled/<version>/ that explain.model takes by path (transformers, vllm); one "
            "row per checkpoint in table `explainer_distilled`. Resumes an interrupted training.",
            kinds={"pytorch", "safetensors"},
        ),
        stage_asset(
            "distilled_explainer_eval", compute_evaluation,
            lambda call, written: Report(evaluation_metadata(written, call.config)),
            config=config, pool="gpu",
            description="Base vs distilled explainer on the distilled explainer's held-out features (Transluce's "
            "Figure 5): distill.eval_k candidates each from the same prompts, scored by the run's selecting scorer; "
            "per k the mean test score of the val-best among k (table `distilled_explainer_eval`; every candidate's "
            "scores in `distilled_explainer_eval_scores`). A candidate without a usable description counts as 0.",
            kinds={"parquet"},
        ),
    ]
