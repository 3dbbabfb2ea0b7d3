"""Where models run: the device and dtype choice, and the process's model cache.

One loaded model is shared by everything in a process that asks for the same thing (the
transformers explainer, the detection/fuzzing judge and the prompted simulator reading one
SmolLM2; the vllm explainer and judge sharing one engine). The cache is explicit: a stage
that is done with a model calls :func:`release` (or :func:`release_all`), which drops the
reference and empties the accelerator's cache, so the next GPU stage gets its memory back.
"""

from __future__ import annotations

import gc
import json
import threading
from contextlib import contextmanager
from typing import Callable, TypeVar

T = TypeVar("T")

_lock = threading.RLock()  # re-entrant: building one cached object may load another (an explainer its LLM)
_models: dict[str, object] = {}


def choose_device(name: str = "auto"):
    """A torch device: ``auto`` is cuda when one is visible, else cpu."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def choose_dtype(name: str, device):
    """``auto`` is bfloat16 on a GPU and float32 on CPU (bf16 matmuls on CPU are slow or lossy)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"unknown dtype '{name}'; use auto, float32, bfloat16 or float16") from None


@contextmanager
def quiet_transformers():
    """transformers without its warnings and progress bars, restored afterwards."""
    from transformers.utils import logging as hf_logging

    previous, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar would interleave with the run's own
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


def cache_argument(model) -> str | None:
    """The name under which a transformers model's forward takes a key/value cache of earlier
    tokens (``cache`` from transformers 5.2x, ``past_key_values`` before), or None if it takes
    none (the exemplar pass's shared header and the LLM tiers' shared prompt prefix use it)."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def cache_key(kind: str, *parts: object) -> str:
    return json.dumps([kind, *parts], sort_keys=True, default=str)


def shared(key: str, build: Callable[[], T]) -> T:
    """The object cached under ``key``, built by ``build()`` on first use. Built under a
    lock, so two threads never load the same model twice."""
    with _lock:
        if key not in _models:
            _models[key] = build()
        return _models[key]  # type: ignore[return-value]


def loaded() -> list[str]:
    """The keys of the models held now."""
    with _lock:
        return list(_models)


def release(key: str) -> bool:
    """Drop one cached model and give its memory back; False when nothing was cached."""
    with _lock:
        model = _models.pop(key, None)
    if model is None:
        return False
    shutdown = getattr(model, "shutdown", None)  # vLLM engines stop their workers
    if callable(shutdown):
        try:
            shutdown()
        except Exception:  # noqa: BLE001 - a failing shutdown must not keep the memory
            pass
    del model
    _free_accelerator_memory()
    return True


def release_all() -> int:
    """Drop every cached model; the number dropped."""
    return sum(release(key) for key in loaded())


def _free_accelerator_memory() -> None:
    gc.collect()
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
