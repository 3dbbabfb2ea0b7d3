"""neuron_assets: natural-language descriptions of model features, scored and served."""
__version__ = "0.1.0"
