"""The sae_checkpoint asset: one sparse autoencoder per configured layer (sae.layers), trained
on the corpus's train split or loaded from sae.path; the core is neuron_assets.features.sae_stage.
One unpartitioned step trains them all in turn (each resumes its own checkpoint), so
`neuron-assets run` runs it before the exemplar pass like any other stage."""

import dagster as dg

from neuron_assets.config import Config
from neuron_assets.defs.template import Call, Report, stage_asset
from neuron_assets.report.metadata import saes_metadata


def compute_saes(call: Call):
    from neuron_assets.features.sae_stage import make_saes, sae_files

    steps, layers = call.config.sae.steps, sorted(set(call.config.sae.layers))
    with call.stage.progress.task(f"sae layers {layers}", steps * len(layers), "step") as task:
        offsets = {layer: i * steps for i, layer in enumerate(layers)}
        results = make_saes(call.config, log=call.log, progress=call.stage.progress,
                            on_step=lambda layer, done: task.advance(offsets[layer] + done - task.done))
    call.stage.complete(None, [f for layer in layers for f in sae_files(call.store, layer)])
    return results


def sae_assets(config: Config) -> list[dg.AssetsDefinition]:
    """The asset when sae.layers names a layer, else nothing (a config without an SAE)."""
    if not config.sae.layers:
        return []
    return [stage_asset(
        "sae_checkpoint", compute_saes, lambda call, results: Report(saes_metadata(results, call.config)),
        config=config, pool="gpu",
        description="A sparse autoencoder over each sae.layers layer's neuron site (top-k or L1), trained on the "
        "train split's activations (streamed, resumable) or loaded from sae.path (sparsify or SAELens layout); "
        "written under checkpoints/sae/layer=L/ with its MSE, FVU, L0, dead fraction, latent frequencies and "
        "reconstruction score. The exemplar pass reads its latents (sae.latents) as features of kind sae.",
        kinds={"pytorch", "safetensors"},
    )]
