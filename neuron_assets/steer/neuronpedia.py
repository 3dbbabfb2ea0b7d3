"""Neuronpedia's steering API (``POST /api/steer``), mapped onto a :class:`SteerRequest`.

Request: ``prompt``, ``modelId``, ``features: [{modelId, layer, index, strength}]``,
``temperature``, ``n_tokens``, ``freq_penalty``, ``seed``, ``strength_multiplier``,
``steer_method`` (SIMPLE_ADDITIVE | ORTHOGONAL_DECOMP); also read: ``n_completion_tokens`` (the
inference server's name for n_tokens), ``n_logprobs``, ``normalize_steering``, ``stream``.

- ``layer`` is Neuronpedia's source id: ``"12-res-jb"``, ``"12-mlp"`` (what ``neuron-assets
  export --format neuronpedia`` writes for neurons), ``"12-mlp-sae"`` (its SAE latents), or a
  bare number. The leading number is the layer; a source whose name has a part ``sae`` is an
  SAE latent, any other an MLP neuron of that layer. Polarity is pos (a negative strength
  pushes the other way).
- Neuronpedia adds ``strength_multiplier * strength`` times the feature's direction at every
  position. Here that is mode ``add`` with the feature's value = ``strength`` and the request's
  strength = ``strength_multiplier``: a neuron's activation (the coefficient of its output
  direction) goes up by the product, an SAE latent's decoder direction is added that many
  times. ORTHOGONAL_DECOMP (replace the component along the direction) is mode ``set``.
- Every token is steered (tokens ``both``), the prompt is plain text (no chat template: the
  endpoint is Neuronpedia's completion one), a BOS is prepended where the tokenizer adds one.
- ``modelId`` is not checked against the subject; ``normalize_steering`` is refused (values
  are in the feature's own activation units); ``stream`` is ignored (one answer).

Response: ``{"STEERED": text, "DEFAULT": text, "steeredLogProbs": [...], "defaultLogProbs":
[...], "id": null, "shareUrl": null, "limit": null}``; each text is the prompt followed by the
continuation, as Neuronpedia returns it; each logprob is ``{token, logprob, topLogprobs:
[{token, logprob}] | null}``.
"""

from __future__ import annotations

import re

from neuron_assets.types import FeatureId, Polarity

from neuron_assets.steer.request import SteerFeature, SteerRequest, finite, whole

METHODS = {"SIMPLE_ADDITIVE": "add", "ORTHOGONAL_DECOMP": "set"}
KNOWN_KEYS = {"prompt", "modelId", "features", "temperature", "n_tokens", "n_completion_tokens", "freq_penalty", "seed",
              "strength_multiplier", "steer_method", "normalize_steering", "stream", "n_logprobs", "types"}
FEATURE_KEYS = {"modelId", "layer", "index", "strength", "source", "model"}


def source_layer(source) -> tuple[int, str]:
    """(layer, kind) of a Neuronpedia source id: ``12``, ``"12"``, ``"12-res-jb"``,
    ``"12-mlp"`` -> neuron, ``"12-mlp-sae"`` -> sae."""
    if isinstance(source, int) and not isinstance(source, bool):
        return source, "neuron"
    match = re.fullmatch(r"\s*(\d+)(?:-([A-Za-z0-9._-]*))?\s*", str(source))
    if not match:
        raise ValueError(f"feature layer {source!r} is not a Neuronpedia source id: a layer number, or the layer "
                         "then a name, e.g. 12, '12-mlp' (a neuron) or '12-mlp-sae' (an SAE latent)")
    parts = (match.group(2) or "").lower().split("-")
    return int(match.group(1)), "sae" if "sae" in parts else "neuron"


def neuronpedia_request(body: dict) -> SteerRequest:
    """A SteerRequest from the body of a Neuronpedia ``/api/steer`` request."""
    if not isinstance(body, dict):
        raise ValueError("a Neuronpedia steering request is a JSON object")
    unknown = sorted(set(body) - KNOWN_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))} in the Neuronpedia steering request; it "
                         f"takes {', '.join(sorted(KNOWN_KEYS))}")
    if "prompt" not in body:
        raise ValueError("the Neuronpedia steering request has no prompt")
    raw = body.get("features")
    if not isinstance(raw, list) or not raw:
        raise ValueError("features must be a non-empty list of {layer, index, strength}, e.g. "
                         "[{\"layer\": \"12-mlp\", \"index\": 345, \"strength\": 4}]")
    features = []
    for item in raw:
        if not isinstance(item, dict):
            raise ValueError(f"a feature is an object {{layer, index, strength}}, got {item!r}")
        extra = sorted(set(item) - FEATURE_KEYS)
        if extra:
            raise ValueError(f"unknown feature key(s) {', '.join(map(repr, extra))}; a feature takes layer, index, "
                             "strength (and modelId)")
        missing = [k for k in ("index", "strength") if k not in item] + \
            ([] if "layer" in item or "source" in item else ["layer"])
        if missing:
            raise ValueError(f"feature {item!r} lacks {', '.join(missing)}")
        layer, kind = source_layer(item.get("layer", item.get("source")))
        index = whole("feature index", item["index"], 0)
        features.append(SteerFeature(FeatureId(layer, index, Polarity.POS, kind), 1.0,
                                     finite("feature strength", item["strength"])))
    method = body.get("steer_method", "SIMPLE_ADDITIVE")
    if method not in METHODS:
        raise ValueError(f"steer_method must be one of {', '.join(METHODS)}, got {method!r}")
    if body.get("normalize_steering"):
        raise ValueError("normalize_steering is not supported: strengths are in the feature's own activation units "
                         "(a neuron's activation, an SAE latent's value); leave it out or false")
    n_tokens = body.get("n_tokens", body.get("n_completion_tokens", 32))
    return SteerRequest(
        prompt=body["prompt"], features=tuple(features), mode=METHODS[method],
        strength=finite("strength_multiplier", body.get("strength_multiplier", 1.0)), tokens="both",
        n_tokens=n_tokens, temperature=body.get("temperature", 0.0), seed=body.get("seed", 0), chat=False,
        freq_penalty=body.get("freq_penalty", 0.0), top_logprobs=body.get("n_logprobs") or 0)


def _logprobs(continuation) -> list[dict]:
    tops = continuation.top_logprobs
    return [{"token": token, "logprob": logprob,
             "topLogprobs": [{"token": t, "logprob": lp} for t, lp in tops[i]] if i < len(tops) else None}
            for i, (token, logprob) in enumerate(zip(continuation.tokens, continuation.logprobs))]


def neuronpedia_response(result) -> dict:
    """A SteerResult in the shape of Neuronpedia's ``/api/steer`` answer."""
    return {"STEERED": result.prompt + result.steered.text, "DEFAULT": result.prompt + result.baseline.text,
            "steeredLogProbs": _logprobs(result.steered), "defaultLogProbs": _logprobs(result.baseline),
            "id": None, "shareUrl": None, "limit": None}
