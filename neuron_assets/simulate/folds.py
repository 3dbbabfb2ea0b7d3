"""Cross-fitting folds: which simulator may score which feature.

Every feature x polarity belongs to one of ``folds`` folds by a stable hash of its id. The
fine-tuned simulator of fold f trains only on features of the other folds and scores only
the features of fold f (neuron_assets.simulate.training, neuron_assets.score.crossfit). Kept apart
from training.py so scoring can route features without importing torch.
"""

from __future__ import annotations

import hashlib

from neuron_assets.types import FeatureId, Polarity


def fold_of(feature: FeatureId, folds: int) -> int:
    """The fold of a feature: sha256 of layer/index/polarity, so a feature keeps its fold
    across runs, machines and Python versions (unlike hash())."""
    digest = hashlib.sha256(feature_key(feature).encode()).digest()
    return int.from_bytes(digest[:8], "big") % folds


def feature_key(feature: FeatureId) -> str:
    """The text form of a feature id, as a checkpoint lists the features it trained on."""
    key = f"{feature.layer}/{feature.index}/{Polarity(feature.polarity).value}"
    return key if feature.kind == "neuron" else f"{feature.kind}:{key}"  # a latent is not the neuron of its index
