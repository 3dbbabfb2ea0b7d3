"""The distilled explainer in Dagster: `explainer_distilled` (a causal LM fine-tuned on the
best descriptions, neuron_assets.explain.distill) and `distilled_explainer_eval` (base vs
distilled explainer on held-out features, mean best-of-k score vs k). Neither runs in a
plain `neuron-assets run` (they cost minutes on CPU); `neuron-assets distill`, `run --select`
or the UI materialize them, and distill.in_run adds them to every run."""


import dagster as dg

from neuron_assets.config import Config
from neuron_assets.defs.resources import NeuronAssetsConfig
from neuron_assets.defs.runs import RunSettings, StageRun
from neuron_assets.report.render import markdown_table


def distill_assets() -> list[dg.AssetsDefinition]:
    @dg.asset(
        deps=["neuron_descriptions", "exemplars"],
        pool="gpu",
        description="The distilled explainer: distill.base_model fine-tuned (full, or LoRA for large models; bf16 "
        "with fp32 master weights on GPU) to answer the explainer prompt without a few-shot example with each "
        "training feature's selected description; training and held-out features are disjoint. A plain model folder "
        "(safetensors, tokenizer, distill.json with the loss curve, data size and feature lists) under "
        "checkpoints/explainer_distilled/<version>/ that explain.model takes by path (transformers, vllm); one row "
        "per checkpoint in table `explainer_distilled`. Resumes an interrupted training.",
        kinds={"pytorch", "safetensors"},
    )
    def explainer_distilled(context: dg.AssetExecutionContext, settings: NeuronAssetsConfig,
                            run: RunSettings) -> dg.MaterializeResult:
        from neuron_assets.stages import make_explainer_distilled

        config = settings.load()
        with run.stage(context, config) as stage:
            if not stage.todo():
                return dg.MaterializeResult(metadata={"skipped": "up to date", **stage.metadata()})
            written = make_explainer_distilled(config, context.run_id, log=context.log.info,
                                               on_step=_steps(stage, "distil"))
            stage.complete(None, [written.table_path, written.explainer.path / "distill.json"])
        return dg.MaterializeResult(metadata=distilled_metadata(written, config),
                                    data_version=dg.DataVersion(written.explainer.version))

    @dg.asset(
        deps=[explainer_distilled, "exemplars", "simulator_checkpoint"],
        pool="gpu",
        description="Base vs distilled explainer on the distilled explainer's held-out features (Transluce's Figure 5): "
        "distill.eval_k candidates each from the same prompts, scored by the run's selecting scorer; per k the mean "
        "test score of the val-best among k (table `distilled_explainer_eval`; every candidate's scores in "
        "`distilled_explainer_eval_scores`). A candidate without a usable description counts as 0.",
        kinds={"parquet"},
    )
    def distilled_explainer_eval(context: dg.AssetExecutionContext, settings: NeuronAssetsConfig,
                                 run: RunSettings) -> dg.MaterializeResult:
        from neuron_assets.stages import make_distilled_evaluation

        config = settings.load()
        with run.stage(context, config) as stage:
            if not stage.todo():
                return dg.MaterializeResult(metadata={"skipped": "up to date", **stage.metadata()})
            total = (config.distill.eval_features or 0) * config.distill.eval_k * 2 or None
            with stage.progress.task("distilled explainer evaluation", total, "candidate") as task:
                written = make_distilled_evaluation(config, context.run_id, log=context.log.info,
                                                    on_candidates=task.advance)
            stage.complete(None, [written.table_path, written.scores_path])
        return dg.MaterializeResult(metadata=evaluation_metadata(written, config))

    return [explainer_distilled, distilled_explainer_eval]


def _steps(stage: StageRun, label: str):
    tasks = {}

    def on_step(step: int, total: int, loss: float) -> None:
        task = tasks.get(label) or tasks.setdefault(label, stage.progress.start(label, total, "step"))
        task.advance(step - task.done, info=f"loss {loss:.3f}")
        if step >= total:
            task.finish()

    return on_step


def distilled_metadata(written, config: Config) -> dict:
    from neuron_assets.report.plots import loss_curve_figure, markdown_image

    trained = written.explainer
    return {
        "version": trained.version,
        "path": dg.MetadataValue.path(str(trained.path)),
        "base_model": trained.base_model,
        "method": trained.method,
        "dtype": trained.dtype,
        "train_features": written.train_features,
        "heldout_features": written.heldout_features,
        "examples": trained.examples,
        "answer_tokens_per_epoch": trained.answer_tokens,
        "epochs": trained.epochs,
        "steps": trained.steps,
        "first_loss": round(trained.loss_curve[0], 4),
        "last_loss": round(trained.loss_curve[-1], 4),
        "train_seconds": round(trained.seconds, 1),
        "resumed": trained.resumed,
        "loss_curve": dg.MetadataValue.md(markdown_image(
            loss_curve_figure({"distillation": trained.loss_curve}, "distilled explainer training loss"), "loss curve")),
        "config_hash": config.hash,
    }


def evaluation_metadata(written, config: Config) -> dict:
    from neuron_assets.report.plots import explainer_curves_figure, markdown_image

    rows = [(c.explainer, k, f"{t:.4f}", f"{v:.4f}", n) for c in written.curves
            for k, t, v, n in zip(c.k, c.mean_best_test, c.mean_best_val, c.features)]
    metadata = {
        "checkpoint": dg.MetadataValue.path(str(written.checkpoint)),
        "scorer": written.scorer,
        "heldout_features": written.features,
        "seconds": round(written.seconds, 1),
        "best_of_k": dg.MetadataValue.md(markdown_image(explainer_curves_figure(written.curves), "mean best-of-k score")),
        "table": dg.MetadataValue.md(markdown_table(
            ["explainer", "k", "mean best test", "mean best val (biased)", "features"], rows)),
        "path": dg.MetadataValue.path(str(written.table_path)),
        "config_hash": config.hash,
    }
    for curve in written.curves:
        metadata[f"{curve.explainer}_failed_candidates"] = f"{curve.failed_candidates} of {curve.candidates}"
    return metadata
