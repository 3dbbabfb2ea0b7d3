"""The sae_checkpoint asset: one sparse autoencoder per configured layer (sae.layers), trained
on the corpus's train split or loaded from sae.path; the core is neuron_assets.features."""


import dagster as dg

from neuron_assets.config import Config
from neuron_assets.defs.assets import corpus
from neuron_assets.defs.resources import NeuronAssetsConfig
from neuron_assets.defs.runs import RunSettings
from neuron_assets.report.render import markdown_table


def sae_assets(config: Config) -> list[dg.AssetsDefinition]:
    """The asset when sae.layers names a layer, else nothing (the default config trains none)."""
    if not config.sae.layers:
        return []
    partitions = dg.StaticPartitionsDefinition([str(layer) for layer in sorted(set(config.sae.layers))])

    @dg.asset(
        deps=[corpus],
        partitions_def=partitions,
        pool="gpu",
        description="A sparse autoencoder over one layer's neuron site (top-k or L1), trained on the train split's "
        "activations (streamed, resumable) or loaded from sae.path (sparsify or SAELens layout); written under "
        "checkpoints/sae/layer=L/ with its MSE, FVU, L0, dead fraction, latent frequencies and reconstruction score.",
        kinds={"pytorch", "safetensors"},
    )
    def sae_checkpoint(context: dg.AssetExecutionContext, settings: NeuronAssetsConfig, run: RunSettings) -> dg.MaterializeResult:
        from neuron_assets import runtime
        from neuron_assets.features.sae_stage import make_sae
        from neuron_assets.features.site_activations import load_site_subject

        config = settings.load()
        layer = int(context.partition_key)
        key = runtime.cache_key("site_subject", config.subject.model_dump(mode="json"))
        try:
            subject, causal = runtime.shared(key, lambda: load_site_subject(config.subject))
            with run.stage(context, config) as stage, \
                    stage.progress.task(f"sae layer {layer}", config.sae.steps, "step") as task:
                result = make_sae(config, layer, subject, causal, log=context.log.info,
                                  on_step=lambda done: task.advance(done - task.done))
        finally:
            runtime.release(key)  # the next GPU stage gets the memory back
        return dg.MaterializeResult(metadata=sae_metadata(result, config), data_version=dg.DataVersion(
            config.sections_hash("subject", "corpus", "sae")))

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
