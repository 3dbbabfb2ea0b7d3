"""Moved to :mod:`neuron_assets.excerpts` (the ground floor: simulate and score show tokens
through it too). Kept only for the names ``neuron_assets.stages`` still imports from here;
delete once it imports them from :mod:`neuron_assets.excerpts`."""

from neuron_assets.excerpts import TokenDisplay, special_tokens

__all__ = ["TokenDisplay", "special_tokens"]
