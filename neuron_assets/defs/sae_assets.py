"""The sae_checkpoint asset: one sparse autoencoder per configured layer (sae.layers), trained
on the corpus's train split or loaded from sae.path; the core is neuron_assets.features.sae_stage.
One unpartitioned step trains them all in turn (each resumes its own checkpoint), so
`neuron-assets run` runs it before the exemplar pass like any other stage."""


import dagster as dg

from neuron_assets.config import Config
from neuron_assets.defs.assets import corpus
from neuron_assets.defs.resources import NeuronAssetsConfig
from neuron_assets.defs.runs import RunSettings
from neuron_assets.report.render import markdown_table


def sae_assets(config: Config) -> list[dg.AssetsDefinition]:
    """The asset when sae.layers names a layer, else nothing (a config without an SAE)."""
    if not config.sae.layers:
        return []

    @dg.asset(
        deps=[corpus],
        pool="gpu",
        description="A sparse autoencoder over each sae.layers layer's neuron site (top-k or L1), trained on the "
        "train split's activations (streamed, resumable) or loaded from sae.path (sparsify or SAELens layout); "
        "written under checkpoints/sae/layer=L/ with its MSE, FVU, L0, dead fraction, latent frequencies and "
        "reconstruction score. The exemplar pass reads its latents (sae.latents) as features of kind sae.",
        kinds={"pytorch", "safetensors"},
    )
    def sae_checkpoint(context: dg.AssetExecutionContext, settings: NeuronAssetsConfig, run: RunSettings) -> dg.MaterializeResult:
        from neuron_assets.features.sae_stage import make_saes, sae_files
        from neuron_assets.store import Store

        config = settings.load()
        layers = sorted(set(config.sae.layers))
        with run.stage(context, config) as stage:
            if not stage.todo():
                return dg.MaterializeResult(metadata={"skipped": "up to date", **stage.metadata()})
            with stage.progress.task(f"sae layers {layers}", config.sae.steps * len(layers), "step") as task:
                offsets = {layer: i * config.sae.steps for i, layer in enumerate(layers)}
                results = make_saes(config, log=context.log.info,
                                    on_step=lambda layer, done: task.advance(offsets[layer] + done - task.done))
            store = Store(config.store_root)
            stage.complete(None, [f for layer in layers for f in sae_files(store, layer)])
        if len(results) == 1:
            metadata = sae_metadata(results[0], config)
        else:
            metadata = {f"layer {r.layer} {key}": value for r in results for key, value in sae_metadata(r, config).items()}
        return dg.MaterializeResult(metadata={**metadata, **stage.metadata()},
                                    data_version=dg.DataVersion(config.sections_hash("subject", "corpus", "sae")))

    return [sae_checkpoint]


def sae_metadata(result, config: Config) -> dict:
    from neuron_assets.features.sae import log_frequency_histogram
    from neuron_assets.report.plots import latent_frequency_histogram, markdown_image, sae_loss_figure

    metrics = result.metrics
    metadata: dict = {
        "source": result.source,
        "path": dg.MetadataValue.path(str(result.folder)),
        "latents": result.sae.d_latent,
        "d_in": result.sae.d_in,
        "eval_tokens": metrics.tokens,
        "mse": metrics.mse,
        "fvu": metrics.fvu,
        "l0": metrics.l0,
        "dead_fraction": metrics.dead_fraction,
        "config_hash": config.hash,
    }
    if result.reconstruction is not None:
        score = result.reconstruction
        metadata.update(reconstruction_score=score.score, clean_loss=score.clean_loss, spliced_loss=score.spliced_loss,
                        zero_ablation_loss=score.zero_ablation_loss)
    if result.dead_fraction_train is not None:
        metadata.update(dead_fraction_train=result.dead_fraction_train, resampled=result.resampled,
                        resumed_from_step=result.resumed_from)
    edges, counts, dead = log_frequency_histogram(metrics.frequencies)
    metadata["latent_frequency"] = dg.MetadataValue.md(markdown_image(latent_frequency_histogram(edges, counts, dead),
                                                                      "log10 latent frequency"))
    metadata["latent_frequency_table"] = dg.MetadataValue.md(markdown_table(
        ["log10 frequency from", "to", "latents"],
        [(f"{edges[i]:.2f}", f"{edges[i + 1]:.2f}", counts[i]) for i in range(len(counts))] + [("never", "", dead)]))
    if result.losses:
        metadata["loss_curve"] = dg.MetadataValue.md(markdown_image(sae_loss_figure(result.losses), "loss"))
    return metadata
