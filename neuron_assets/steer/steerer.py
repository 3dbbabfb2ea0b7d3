"""The steering run: select features, generate the baseline and the steered continuation of
one prompt with the same seed, return both with the features used."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neuron_assets.config import Config, load_config
from neuron_assets.store import Store
from neuron_assets.types import FeatureId

from neuron_assets.steer.generate import (
    Continuation,
    context_length,
    continue_prompt,
    next_token_logprobs,
    prompt_ids,
    stop_ids,
    uses_chat,
)
from neuron_assets.steer.intervene import TokenWindow, steering
from neuron_assets.steer.request import SteerRequest
from neuron_assets.steer.select import FeatureTables, SelectedFeature, candidates, feature_text, valued

BASELINES_KEPT = 16


@dataclass(frozen=True)
class SteerResult:
    prompt: str
    baseline: Continuation
    steered: Continuation
    features: tuple[SelectedFeature, ...]
    settings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-ready: prompt, baseline and steered ({text, tokens, token_ids, logprobs,
        top_logprobs, stopped}), features ({layer, index, polarity, kind, value, strength,
        description, score, ...}) and settings."""
        return {"prompt": self.prompt, "baseline": self.baseline.as_dict(), "steered": self.steered.as_dict(),
                "features": [f.as_dict() for f in self.features], "settings": dict(self.settings)}


class Steerer:
    """Steering runs over one config's subject and store. The subject (a causal LM) is loaded
    on first use and kept, so a server or a notebook pays for it once; SAEs likewise.

    The baseline of a prompt does not depend on the features, so the last few baselines are
    kept: steering one prompt again with other features generates only the steered text.

    Not thread-safe: a run puts hooks on the shared model while it generates. Callers run one
    request at a time (the server holds a lock around :meth:`select` and :meth:`run`).
    ``encoder`` replaces the sentence encoder of semantic selection (tests use a small one).
    """

    def __init__(self, config: Config | str | Path | None = None, store: Store | None = None, encoder=None):
        self.config = config if isinstance(config, Config) else load_config(config)
        self.store = store if store is not None else Store(self.config.store_root)
        self.encoder = encoder
        self._subject = None
        self._saes: dict[int, object] = {}
        self._baselines: dict[tuple, Continuation] = {}  # the last BASELINES_KEPT baselines, by prompt and settings

    # -- the model ----------------------------------------------------------------------
    @property
    def subject(self):
        """The subject with its LM head (loaded once)."""
        if self._subject is None:
            from neuron_assets.features.site_activations import load_site_subject

            from neuron_assets.runtime import quiet_transformers

            with quiet_transformers():
                subject, causal = load_site_subject(self.config.subject)
            if not causal:
                raise ValueError(f"subject model {self.config.subject.model} is not a causal language model: it has no "
                                 "next-token head to generate with, so it cannot be steered")
            self._subject = subject
        return self._subject

    def sae_for(self, layer: int):
        """Layer ``layer``'s SAE, from the store's sae_checkpoint folder."""
        if layer not in self._saes:
            from neuron_assets.features.sae import SAE_INFO, load_sae
            from neuron_assets.features.sae_stage import sae_folder

            folder = sae_folder(self.store, layer)
            if not (folder / SAE_INFO).exists():
                raise LookupError(f"an SAE latent of layer {layer} needs the layer's SAE checkpoint, and there is none "
                                  f"under {folder}; materialize it (neuron-assets run --select sae_checkpoint, with "
                                  f"sae.layers including {layer}) or steer neurons")
            subject = self.subject
            sae = load_sae(folder).to(subject.device).eval()
            width = subject.neurons_per_layer(layer)
            if sae.d_in != width:
                raise ValueError(f"the SAE under {folder} reads {sae.d_in} dimensions but layer {layer}'s site has "
                                 f"{width}; re-materialize sae_checkpoint for {self.config.subject.model}")
            self._saes[layer] = sae
        return self._saes[layer]

    def check(self, feature: FeatureId) -> None:
        """Refuse a feature the subject does not have."""
        subject = self.subject
        if feature.layer not in subject.sites:
            n = subject.num_layers
            raise ValueError(f"feature {feature_text(feature)}: layer {feature.layer} is out of range: {subject.name} "
                             f"has {n} layers (0-{n - 1})")
        if feature.kind == "sae":
            latents = self.sae_for(feature.layer).d_latent
            if feature.index >= latents:
                raise ValueError(f"feature {feature_text(feature)}: latent {feature.index} is out of range: layer "
                                 f"{feature.layer}'s SAE has {latents} latents (0-{latents - 1})")
            return
        width = subject.neurons_per_layer(feature.layer)
        if feature.index >= width:
            raise ValueError(f"feature {feature_text(feature)}: neuron {feature.index} is out of range: layer "
                             f"{feature.layer} has {width} neurons (0-{width - 1})")

    def forget_baselines(self) -> None:
        """Drop the kept baselines (the next run generates its baseline again)."""
        self._baselines.clear()

    # -- selecting and running ------------------------------------------------------------
    def select(self, request: SteerRequest | dict) -> list[SelectedFeature]:
        """The features the request steers, each with its value, description and score."""
        request = as_request(request)
        chosen = candidates(request, self.store, self.encoder)
        return valued(chosen, request, FeatureTables(self.store), self.check)

    def prompt_ids(self, request: SteerRequest) -> tuple[list[int], bool]:
        """The prompt's token ids and whether the chat template was used; refuses a prompt that
        leaves no room for ``n_tokens`` in the model's context."""
        subject = self.subject
        chat = uses_chat(subject.tokenizer, request.chat)
        ids = prompt_ids(subject.tokenizer, request.prompt, chat)
        if not ids:
            raise ValueError("the prompt has no tokens; give some text")
        limit = context_length(subject.model)
        if limit is not None and len(ids) + request.n_tokens > limit:
            raise ValueError(f"the prompt is {len(ids)} tokens{' with the chat template' if chat else ''}; with "
                             f"n_tokens {request.n_tokens} that passes {subject.name}'s context of {limit} tokens. "
                             f"Shorten the prompt to at most {max(limit - request.n_tokens, 0)} tokens or ask for fewer "
                             "tokens")
        return ids, chat

    def window(self, request: SteerRequest, ids: list[int]) -> TokenWindow:
        """The steered positions; a leading BOS token is never steered (changing the attention
        sink's activations wrecks any model)."""
        bos = getattr(self.subject.tokenizer, "bos_token_id", None)
        return TokenWindow(request.tokens, len(ids), 1 if bos is not None and ids[0] == bos else 0)

    def run(self, request: SteerRequest | dict) -> SteerResult:
        """Baseline and steered continuations of the prompt, same seed; the features used."""
        request = as_request(request)
        started = time.perf_counter()
        selected = self.select(request)
        subject = self.subject
        ids, chat = self.prompt_ids(request)
        window = self.window(request, ids)
        stops = stop_ids(subject.model, subject.tokenizer)

        def generate() -> Continuation:
            return continue_prompt(subject.model, subject.tokenizer, ids, request.n_tokens, request.temperature,
                                   request.seed, window, subject.device, stops, request.freq_penalty,
                                   request.top_logprobs)[0]

        key = (tuple(ids), request.n_tokens, request.temperature, request.seed, request.freq_penalty,
               request.top_logprobs)
        baseline = self._baselines.pop(key, None)
        if baseline is None:
            baseline = generate()
        self._baselines[key] = baseline  # the most recent last
        while len(self._baselines) > BASELINES_KEPT:
            self._baselines.pop(next(iter(self._baselines)))
        with steering(subject.sites, selected, request.mode, window, self.sae_for):
            steered = generate()
        settings = {
            "model": subject.name, "device": str(subject.device), "dtype": str(subject.dtype).removeprefix("torch."),
            "mode": request.mode, "ablate_with": request.ablate_with, "strength": request.strength,
            "tokens": request.tokens, "n_tokens": request.n_tokens, "temperature": request.temperature,
            "seed": request.seed, "chat": chat, "freq_penalty": request.freq_penalty, "quantile": request.quantile,
            "select": request.select, "select_mode": request.select_mode,
            "layers": list(request.layers) if request.layers is not None else None, "polarity": request.polarity,
            "kind": request.kind, "min_score": request.min_score, "top": request.top, "cluster": request.cluster,
            "prompt_tokens": len(ids), "steered_from_position": window.first,
            "seconds": round(time.perf_counter() - started, 3),
        }
        return SteerResult(request.prompt, baseline, steered, tuple(selected), settings)

    def next_token_logprobs(self, request: SteerRequest | dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(baseline, steered) log-probabilities over the vocabulary of the token after the
        prompt (steering at the prompt's positions: use tokens prompt or both)."""
        request = as_request(request)
        selected = self.select(request)
        subject = self.subject
        ids, _ = self.prompt_ids(request)
        window = self.window(request, ids)
        baseline = next_token_logprobs(subject.model, ids, window, subject.device)[0]
        with steering(subject.sites, selected, request.mode, window, self.sae_for):
            steered = next_token_logprobs(subject.model, ids, window, subject.device)[0]
        return baseline, steered


def as_request(request: SteerRequest | dict) -> SteerRequest:
    if isinstance(request, SteerRequest):
        return request
    if isinstance(request, dict):
        return SteerRequest.from_dict(request)
    raise ValueError(f"a steering request is a SteerRequest or a dict, got {type(request).__name__}")


def steer(config: Config | str | Path | None, request: SteerRequest | dict, store: Store | None = None) -> SteerResult:
    """One steering run (loads the subject; keep a :class:`Steerer` to run several)."""
    return Steerer(config, store).run(request)
