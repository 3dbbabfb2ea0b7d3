"""Links into the explorer: its pages' paths, and full URLs for places outside it (the Dagster
UI's metadata). Light: no web framework is imported here.

The base URL is $NEURON_ASSETS_EXPLORER_URL, else http://127.0.0.1:8000 (`neuron-assets serve`'s
default host and port).
"""

from __future__ import annotations

import os

EXPLORER_URL_ENV = "NEURON_ASSETS_EXPLORER_URL"
DEFAULT_EXPLORER_URL = "http://127.0.0.1:8000"


def explorer_url() -> str:
    """The explorer's base URL, without a trailing slash."""
    return (os.environ.get(EXPLORER_URL_ENV) or DEFAULT_EXPLORER_URL).rstrip("/")


def feature_path(layer: int, polarity: str, index: int, kind: str = "neuron") -> str:
    """A feature's page (a path; its JSON is at /api + this path)."""
    return f"/features/{layer}/{polarity}/{index}" + ("" if kind == "neuron" else f"?kind={kind}")


def layer_path(layer: int, polarity: str, kind: str = "neuron") -> str:
    """A layer x polarity's page: its described features, best first."""
    return f"/layers/{layer}/{polarity}" + ("" if kind == "neuron" else f"?kind={kind}")


def feature_url(layer: int, polarity: str, index: int, kind: str = "neuron") -> str:
    return explorer_url() + feature_path(layer, polarity, index, kind)


def layer_url(layer: int, polarity: str, kind: str = "neuron") -> str:
    return explorer_url() + layer_path(layer, polarity, kind)
