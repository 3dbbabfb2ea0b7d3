"""The steering endpoint's one steerer: made on first use, one call at a time.

:class:`neuron_assets.steer.Steerer` loads the subject model lazily and is not thread-safe,
so the app holds one and every request waits for the lock; the routes are plain functions,
which FastAPI runs in its threadpool, so a generation never blocks the event loop (search and
pages keep answering meanwhile).
"""

from __future__ import annotations

import threading

from neuron_assets.config import Config
from neuron_assets.store import Store


class SteeringUnavailable(RuntimeError):
    """This install has no steering package (neuron_assets.steer)."""


class Steering:
    def __init__(self, config: Config, store: Store):
        self.config = config
        self.store = store
        self._lock = threading.Lock()
        self._steerer = None

    def neuronpedia(self, body: dict) -> dict:
        """Neuronpedia's /api/steer request body -> its response body."""
        steer = _steer_module()
        request = steer.neuronpedia_request(body)
        return steer.neuronpedia_response(self._run(request))

    def select(self, body: dict) -> dict:
        """The select-by-description form (SteerRequest.from_dict) -> the result as a dict."""
        steer = _steer_module()
        return self._run(steer.SteerRequest.from_dict(body)).as_dict()

    def _run(self, request):
        with self._lock:
            if self._steerer is None:
                self._steerer = _steer_module().Steerer(self.config, self.store)
            return self._steerer.run(request)


def _steer_module():
    try:
        import neuron_assets.steer as steer
    except ImportError as err:
        raise SteeringUnavailable(f"steering is not available in this install ({err}); update neuron_assets "
                                  "to a version with neuron_assets.steer") from None
    return steer
