"""A feature that never reaches a polarity (a neuron that is never negative) is skipped with a
line that says so, instead of k failed candidates with an infinite threshold."""

import numpy as np

from neuron_assets.stages.descriptions import reaching_polarity
from neuron_assets.types import ActivationRecord, Exemplar, FeatureExemplars, FeatureId, FeatureStats, Polarity, Sample, Split


def _feature(index: int, peak: float) -> FeatureExemplars:
    record = ActivationRecord(index, (" a", " b"), (1, 2), np.array([0.0, -peak], np.float32))
    return FeatureExemplars(FeatureId(3, index, Polarity.NEG), FeatureStats(peak, 0.0, 0.1, 0.1),
                            (Exemplar(Split.TRAIN, Sample.TOP, 0, peak, record),))


def test_features_that_never_reach_the_polarity_are_skipped_and_named():
    logged = []
    kept = reaching_polarity([_feature(0, 1.5), _feature(1, 0.0), _feature(2, -0.2)], 3, Polarity.NEG, "neuron",
                             logged.append)
    assert [f.feature.index for f in kept] == [0]
    assert logged == ["layer 3 neg: 2 neuron features never reach this polarity (their train max is not above 0): "
                      "no activation of that sign to describe, skipped"]
    logged.clear()
    assert reaching_polarity([_feature(0, 1.5)], 3, Polarity.NEG, "neuron", logged.append) and logged == []
