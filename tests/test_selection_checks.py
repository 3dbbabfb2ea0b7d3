"""A fine-tuned simulator may select descriptions only when it trained on enough pairs for its
backbone and beats its shuffled control; otherwise the run stops with the numbers and the fix."""

import polars as pl
import pytest

from neuron_assets.config import config_from_dict
from neuron_assets.simulate.training import STAGE1, STAGE2, backbone_parameters, minimum_training_pairs
from neuron_assets.stages.training import UndersizedTraining, check_training_size


def _rows(pairs_per_fold: int) -> pl.DataFrame:
    half = pairs_per_fold // 2
    return pl.DataFrame({"fold": [0] * pairs_per_fold + [1] * pairs_per_fold,
                         "role": ([STAGE1] * half + [STAGE2] * (pairs_per_fold - half)) * 2})


def test_the_minimum_grows_with_the_backbone():
    assert minimum_training_pairs(22e6) < minimum_training_pairs(300e6) < minimum_training_pairs(8e9) == 50_000


def test_a_selecting_simulator_on_too_few_pairs_is_refused_and_a_compared_one_warned():
    config = config_from_dict({"simulate": {"backend": "finetuned", "compare_with": ["lexical"]}})
    params = backbone_parameters(config.simulate.finetuned)  # the demo's 2-layer MiniLM, from its config.json
    assert 1e6 < params < 1e8
    with pytest.raises(UndersizedTraining) as refused:
        check_training_size(_rows(576), config, selects=True, log=print)
    message = str(refused.value)
    assert "576 pairs" in message and "1,000" in message and "simulate.training" in message
    assert "selection_checks: false" in message

    logged = []
    check_training_size(_rows(576), config, selects=False, log=logged.append)
    assert logged and logged[0].startswith("WARNING:") and "only compared" in logged[0]

    logged.clear()
    check_training_size(_rows(2_000), config, selects=True, log=logged.append)  # enough for its size
    assert logged == []
    unchecked = config_from_dict({"simulate": {"backend": "finetuned", "training": {"selection_checks": False}}})
    check_training_size(_rows(576), unchecked, selects=True, log=logged.append)
    assert "selects anyway" in logged[0]
