"""One activation scale per feature x polarity: its train max (neuron_stats.scale).

The token_activation prompt, the simulator's training labels and the fuzzing marks all
express a token's activation as a share of it, so a token at 60% of the train max reads 6 in
the prompt, is class 6 for the simulator and is marked by fuzzing, in every record."""

from __future__ import annotations

import random

import numpy as np

from neuron_assets.config import SimulatorTrainingConfig
from neuron_assets.excerpts import excerpt_of
from neuron_assets.explain.formats import TokenActivationFormat
from neuron_assets.score import activating_threshold, fuzzing_marks
from neuron_assets.simulate.training import STAGE1, plan_training_data
from neuron_assets.types import (
    ActivationRecord,
    Exemplar,
    Sample,
    FeatureExemplars,
    FeatureId,
    FeatureStats,
    Polarity,
    Split,
)


def test_prompt_levels_training_labels_and_fuzzing_marks_share_the_train_max():
    feature_id = FeatureId(0, 3, Polarity.NEG)
    # the train max (10.0) is in a record that the prompt below does not show
    tokens = ("<s>", " a", " b", " c", " d")
    weak = ActivationRecord(1, tokens, (0, 1, 2, 3, 4), -np.array([9.0, 0.0, 3.0, 6.0, 1.0], np.float32), 1)
    strong = ActivationRecord(2, tokens, (0, 1, 2, 3, 4), -np.array([9.0, 10.0, 0.0, 0.0, 0.0], np.float32), 1)
    exemplars = (Exemplar(Split.TRAIN, Sample.TOP, 0, 10.0, strong),
                 Exemplar(Split.TRAIN, Sample.TOP, 1, 6.0, weak))
    feature = FeatureExemplars(feature_id, FeatureStats(10.0, 0.5, 1.0, 0.3), exemplars)
    assert feature.stats.scale == 10.0

    prompt_format = TokenActivationFormat()
    shown = prompt_format.show(feature, [excerpt_of(weak, Polarity.NEG)], None, random.Random(0))
    text = prompt_format.render(shown)
    assert " c\t6" in text and " b\t3" in text and " d\t1" in text  # not " c\t10": the shown max is not the scale

    frame = plan_training_data([feature], {feature_id: ["the letters"]}, SimulatorTrainingConfig(),
                               roles={0: {feature_id: STAGE1}})
    labels = {row["seq_id"]: row["labels"] for row in frame.iter_rows(named=True)}
    assert labels[1] == [0, 0, 3, 6, 1] and labels[2] == [0, 10, 0, 0, 0]

    values = weak.polarity_activations(Polarity.NEG)[weak.prefix_len:]
    threshold = activating_threshold(feature, 0.5)
    assert threshold == 5.0  # half the train max, not half the record's own max (6)
    assert fuzzing_marks(values, threshold) == {2}  # " c" (6 > 5), not " b" (3)
    assert fuzzing_marks(np.array([0.0, 2.0, 1.0]), threshold) == {1}  # a weak record marks its peak
    assert fuzzing_marks(np.zeros(3), threshold) == set()
