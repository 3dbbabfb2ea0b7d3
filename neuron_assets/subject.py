"""The subject model: load a Hugging Face model, find its neuron sites, read activations.

A *neuron site* is the input of a layer's MLP output projection: for a gated MLP that is
act(gate) * up, for a plain MLP the post-activation hidden state. One forward pass reads
every requested layer, and the pass stops right after the deepest one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from neuron_assets.config import SubjectConfig
from neuron_assets.runtime import cache_argument, choose_device, choose_dtype, quiet_transformers

# Regular expressions over module names, one group = the layer number, by architecture
# family. The first that matches a model's modules is used.
SITE_PATTERNS: dict[str, str] = {
    "gated (Llama, Mistral, Qwen2, Gemma)": r"layers\.(\d+)\.mlp\.down_proj$",
    "GPT-2": r"\bh\.(\d+)\.mlp\.c_proj$",
    "GPT-NeoX": r"layers\.(\d+)\.mlp\.dense_4h_to_h$",
    "BERT / MiniLM": r"layer\.(\d+)\.output\.dense$",
    "OPT": r"layers\.(\d+)\.fc2$",
}


class SubjectError(ValueError):
    """A subject model that cannot be loaded or read; the message says how to fix it."""


def resolve_model_path(name: str) -> str:
    """The path or hub name transformers should load; a ``builtin:`` model resolves to its
    local folder (SmolLM2 is converted from its GGUF file on first use)."""
    from neuron_assets.builtin_models import BuiltinModelError, resolve_builtin

    try:
        return resolve_builtin(name)
    except BuiltinModelError as err:
        raise SubjectError(str(err)) from None


def load_tokenizer(config: SubjectConfig):
    from transformers import AutoTokenizer

    path = resolve_model_path(config.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, local_files_only=not config.allow_download, trust_remote_code=config.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise SubjectError(model_not_found_message(config, err)) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def count_layers(config: SubjectConfig) -> int:
    """Number of layers, read from the model's config alone (no weights loaded)."""
    from transformers import AutoConfig

    path = resolve_model_path(config.model)
    try:
        model_config = AutoConfig.from_pretrained(
            path, local_files_only=not config.allow_download, trust_remote_code=config.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise SubjectError(model_not_found_message(config, err)) from None
    text_config = getattr(model_config, "text_config", None) or model_config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(text_config, attr, None) is not None:
            return int(getattr(text_config, attr))
    raise SubjectError(f"cannot tell how many layers {config.model} has; list them in features.layers")


def load_subject(config: SubjectConfig) -> SubjectModel:
    from transformers import AutoModel

    device = choose_device(config.device)
    dtype = choose_dtype(config.dtype, device)
    path = resolve_model_path(config.model)
    try:
        with quiet_transformers():  # loading a causal LM's base model reports its unused LM head
            model = AutoModel.from_pretrained(
                path, dtype=dtype, local_files_only=not config.allow_download, trust_remote_code=config.trust_remote_code
            )
    except (OSError, ValueError) as err:
        raise SubjectError(model_not_found_message(config, err)) from None
    model.to(device).eval()
    return SubjectModel(name=config.model, model=model, tokenizer=load_tokenizer(config),
                        sites=find_sites(model, config.site), device=device, dtype=dtype)


def find_sites(model: nn.Module, pattern: str | None = None) -> dict[int, nn.Module]:
    """layer -> the module whose input is that layer's neurons."""
    names = [name for name, _ in model.named_modules()]
    patterns = [pattern] if pattern else list(SITE_PATTERNS.values())
    modules = dict(model.named_modules())
    for regex in patterns:
        compiled = re.compile(regex)
        sites = {}
        for name in names:
            match = compiled.search(name)
            if match:
                sites[int(match.group(1))] = modules[name]
        if sites:
            return dict(sorted(sites.items()))
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    shown = [n for n in names if re.search(r"\.(\d+)\.", n)][:12] or names[:12]
    tried = f"the pattern {pattern!r}" if pattern else "the known families (" + ", ".join(SITE_PATTERNS) + ")"
    raise SubjectError(
        f"no neuron site found in model type '{model_type}' with {tried}. Modules seen include: "
        + ", ".join(shown)
        + ". Set subject.site to a regular expression over these names whose one group is the layer number, "
        "matching the MLP's output projection."
    )


@dataclass
class SubjectModel:
    name: str
    model: nn.Module
    tokenizer: object
    sites: dict[int, nn.Module]
    device: torch.device
    dtype: torch.dtype
    stop_after_deepest: bool = True  # off only to measure the cost of running every layer

    @property
    def num_layers(self) -> int:
        return len(self.sites)

    def neurons_per_layer(self, layer: int) -> int:
        site = self.sites[layer]
        if isinstance(site, nn.Linear):
            return site.in_features
        weight = getattr(site, "weight", None)  # GPT-2's Conv1D keeps weight as (in, out)
        if weight is not None and weight.dim() == 2:
            return weight.shape[0]
        raise SubjectError(f"cannot tell the neuron count of layer {layer}'s site {type(site).__name__}")

    def check_layers(self, layers: list[int]) -> None:
        bad = [layer for layer in layers if layer not in self.sites]
        if bad:
            raise SubjectError(
                f"layer {bad[0]} is out of range: {self.name} has {self.num_layers} layers "
                f"(0-{self.num_layers - 1}); fix features.layers"
            )

    @torch.inference_mode()
    def activations(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        neurons: dict[int, torch.Tensor | None],
        readers: dict[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        past: object | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> dict[int, torch.Tensor]:
        """One forward pass; layer -> activations (batch, tokens, selected neurons).

        ``neurons[layer]`` holds the neuron indices to keep (None keeps all). ``readers[layer]``,
        where given, replaces that selection: it maps the site's whole (batch, tokens, width)
        input to the features kept (an SAE's latents beside the neurons, say), inside the
        hook, so nothing site-wide outlives the layer. The pass is cut short after the deepest
        requested layer, so later layers cost nothing.

        ``past``, where given, is a key/value cache of earlier tokens (a transformers Cache) the
        tokens of ``input_ids`` continue, at ``position_ids``; ``attention_mask`` then covers the
        cached tokens and these (:mod:`neuron_assets.features.prefix_cache` runs a shared prefix
        once this way). The cache grows by the layers the pass reaches.
        """
        self.check_layers(list(neurons))
        deepest = max(neurons)
        captured: dict[int, torch.Tensor] = {}
        handles = []

        def hook_for(layer: int):
            index = neurons[layer]
            if index is not None:
                index = index.to(self.device)
            reader = (readers or {}).get(layer)

            def read_site(module, args):
                hidden = args[0]
                if reader is not None:
                    captured[layer] = reader(hidden)
                else:
                    captured[layer] = hidden if index is None else hidden.index_select(-1, index)
                if layer == deepest and self.stop_after_deepest:
                    raise _StopForward

            return read_site

        for layer in neurons:
            handles.append(self.sites[layer].register_forward_pre_hook(hook_for(layer)))
        inputs = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
        if past is not None:
            inputs.update({cache_argument(self.model): past, "use_cache": True})
            if position_ids is not None:
                inputs["position_ids"] = position_ids.to(self.device)
        try:
            self.model(**inputs)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return captured


class _StopForward(Exception):
    """Raised inside the deepest site's hook to end the forward pass early."""


def model_not_found_message(config: SubjectConfig, err: Exception) -> str:
    if config.model.startswith(("/", ".", "~")) and not Path(config.model).expanduser().exists():
        return f"subject model path '{config.model}' does not exist. Fix: point subject.model at a folder holding config.json and the weights."
    from neuron_assets.builtin_models import missing_model_fix

    local = Path(config.model).exists()
    where = "as a local path" if local else ("from the Hugging Face hub" if config.allow_download
                                             else "in the local Hugging Face cache")
    fix = ("check that the folder holds config.json and the weights" if local
           else missing_model_fix(config.model, "subject", config.allow_download))
    return f"subject model '{config.model}' could not be loaded {where}: {str(err).splitlines()[0]}. Fix: {fix}."
