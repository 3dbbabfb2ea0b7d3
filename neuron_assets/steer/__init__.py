"""Steering: act on descriptions. Select features by a description query (the semantic or text
search of :mod:`neuron_assets.search`), by id, or by cluster; intervene at each feature's own
site (set, add, ablate) over chosen tokens; generate the baseline and the steered continuation
of a prompt with the same seed. Plain Python (no Dagster); docs/steering.md.

    from neuron_assets.steer import SteerRequest, Steerer
    steerer = Steerer(config)                       # loads the subject once, on first use
    result = steerer.run(SteerRequest("Write a poem", select="closing brackets", top=10))
    result.baseline.text, result.steered.text, result.as_dict()

:class:`Steerer` is not thread-safe: callers run one request at a time.
"""

from neuron_assets.steer.generate import Continuation
from neuron_assets.steer.neuronpedia import neuronpedia_request, neuronpedia_response
from neuron_assets.steer.request import SteerFeature, SteerRequest, parse_feature_id, parse_layers
from neuron_assets.steer.select import SelectedFeature
from neuron_assets.steer.steerer import Steerer, SteerResult, steer

__all__ = ["Continuation", "SelectedFeature", "SteerFeature", "SteerRequest", "SteerResult", "Steerer",
           "neuronpedia_request", "neuronpedia_response", "parse_feature_id", "parse_layers", "steer"]
