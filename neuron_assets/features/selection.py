"""Which features a run reads: the neurons the config selects, the SAE latents read beside
them, and the feature axis that puts both kinds of a layer side by side."""

from __future__ import annotations

import random
from dataclasses import dataclass

from neuron_assets.config import FeaturesConfig
from neuron_assets.subject import SubjectError

SAE_KIND = "sae"  # a feature's kind, as the tables name it
NEURON_KIND = "neuron"


def select_neurons(features: FeaturesConfig, num_layers: int, neurons_per_layer) -> dict[int, list[int]]:
    """layer -> sorted neuron indices, from features.layers and features.neurons.

    ``neurons_per_layer`` is a function layer -> count (layers may differ in width).
    """
    layers = list(range(num_layers)) if features.layers == "all" else sorted(set(features.layers))
    if not layers:
        raise SubjectError("features.layers is empty; list at least one layer or use 'all'")
    for layer in layers:
        if not 0 <= layer < num_layers:
            raise SubjectError(
                f"layer {layer} is out of range: the subject model has {num_layers} layers (0-{num_layers - 1}); "
                "fix features.layers"
            )
    chosen = {}
    for layer in layers:
        width = neurons_per_layer(layer)
        if features.neurons == "all":
            chosen[layer] = list(range(width))
        elif isinstance(features.neurons, list):
            bad = [n for n in features.neurons if not 0 <= n < width]
            if bad:
                raise SubjectError(f"neuron {bad[0]} is out of range: layer {layer} has {width} neurons; fix features.neurons")
            chosen[layer] = sorted(set(features.neurons))
        else:
            draw = random.Random(features.neurons.seed + layer)
            chosen[layer] = sorted(draw.sample(range(width), min(features.neurons.sample, width)))
    return chosen


@dataclass(frozen=True)
class SaeLatents:
    """The latents of one layer's SAE that the exemplar pass reads beside the layer's neurons."""

    sae: object  # neuron_assets.features.sae.SparseAutoencoder over the layer's neuron site
    latents: list[int]  # sorted latent indices
    identity: str  # what tells this SAE from another (its stored metadata), for checkpoints


def feature_axis(neurons: dict[int, list[int]], saes: dict[int, SaeLatents], width_of) -> dict[int, list[int]]:
    """layer -> positions on the layer's feature axis: its neurons (0 .. width-1), then its
    SAE's latents (latent j at width + j). The pass, its plan and its groups work on these
    positions; the tables name each feature by kind and index within the kind."""
    axis = {}
    for layer, indices in neurons.items():
        width = width_of(layer)
        latents = saes[layer].latents if layer in saes else []
        axis[layer] = list(indices) + [width + j for j in latents]
    return axis
