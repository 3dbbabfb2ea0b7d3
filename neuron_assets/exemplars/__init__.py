"""Exemplars: per feature and polarity, the sequences that show what the feature does, from
one planned pass over the corpus. One concern a module:

- :mod:`~neuron_assets.exemplars.collect`     the pass (:func:`collect_exemplars`) and its batch loop
- :mod:`~neuron_assets.exemplars.batches`     the corpus as the pass reads it: batches, read order, sample keys
- :mod:`~neuron_assets.exemplars.state`       what the pass keeps: kept sequences, chunks, split and pass state
- :mod:`~neuron_assets.exemplars.stats`       token statistics, quantiles, the positional and unigram filters
- :mod:`~neuron_assets.exemplars.tables`      table assembly: blocks, frames, layers across groups, feature kinds
- :mod:`~neuron_assets.exemplars.plan`        the plan before reading: bytes per feature, budget, pass groups
- :mod:`~neuron_assets.exemplars.checkpoint`  the run's signature; saving, resuming, finishing a checkpoint
- :mod:`~neuron_assets.exemplars.read`        reading the tables back (:func:`load_feature_exemplars`)

Which features a run reads (neurons, SAE latents, their kinds) is :mod:`neuron_assets.features.selection`;
the names below are re-exported for the stages that use them with the pass.
"""

from neuron_assets.exemplars.batches import SEQUENCE_COLUMNS
from neuron_assets.exemplars.checkpoint import checkpoint_name
from neuron_assets.exemplars.collect import Interrupted, collect_exemplars
from neuron_assets.exemplars.plan import ExemplarPlan, PassGroup, plan_exemplar_pass
from neuron_assets.exemplars.read import load_feature_exemplars
from neuron_assets.exemplars.stats import STAT_QUANTILES
from neuron_assets.features.selection import NEURON_KIND, SAE_KIND, SaeLatents, feature_axis, select_neurons

__all__ = [
    "NEURON_KIND",
    "SAE_KIND",
    "SEQUENCE_COLUMNS",
    "STAT_QUANTILES",
    "ExemplarPlan",
    "Interrupted",
    "PassGroup",
    "SaeLatents",
    "checkpoint_name",
    "collect_exemplars",
    "feature_axis",
    "load_feature_exemplars",
    "plan_exemplar_pass",
    "select_neurons",
]
