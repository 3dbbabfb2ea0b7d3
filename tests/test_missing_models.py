"""A model that cannot be loaded is named with the fix that applies to how it was asked for."""

import pytest


def test_a_missing_backbone_or_base_model_names_the_fix_that_applies():
    """With allow_download off the fix is to turn it on (or download); with it on, the download
    itself failed, so the fix is the name, the network or the token."""
    from neuron_assets.simulate.finetuned import FinetunedSimulator, SimulatorLoadError

    for allowed in (False, True):
        with pytest.raises(SimulatorLoadError) as err:
            FinetunedSimulator.from_backbone("/no/such/backbone", allow_download=allowed)
        message = str(err.value)
        assert "cannot load the simulator backbone '/no/such/backbone'" in message
        assert ("simulate.finetuned.allow_download: true" in message) is not allowed, message
        assert ("the network" in message) is allowed
