"""What a steering run is asked to do: :class:`SteerRequest` and :class:`SteerFeature`, checked
when they are made, so a bad value fails with its fix before any model is loaded."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

from neuron_assets.types import FeatureId, Polarity

KINDS = ("neuron", "sae")
MODES = ("set", "add", "ablate")
ABLATE_WITH = ("zero", "mean")
TOKEN_RANGES = ("prompt", "generated", "both")
SELECT_MODES = ("semantic", "text")


def parse_feature_id(text: str) -> FeatureId:
    """``L:N`` (layer L, neuron N, pos), ``L:N:neg``, ``L:N:pos:sae`` or ``L:N:sae`` (an SAE
    latent of layer L's site): after layer and index, a polarity and a kind in either order."""
    parts = [p.strip() for p in str(text).strip().split(":")]
    example = "e.g. 12:345, 12:345:neg or 12:7:pos:sae"
    if len(parts) < 2 or len(parts) > 4:
        raise ValueError(f"feature id '{text}' is not layer:index[:polarity][:kind] ({example})")
    try:
        layer, index = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"feature id '{text}': layer and index must be whole numbers ({example})") from None
    polarity, kind = Polarity.POS, "neuron"
    for part in parts[2:]:
        if part in ("pos", "neg"):
            polarity = Polarity(part)
        elif part in KINDS:
            kind = part
        else:
            raise ValueError(f"feature id '{text}': '{part}' is neither a polarity (pos, neg) nor a kind "
                             f"({', '.join(KINDS)}) ({example})")
    return checked_feature(FeatureId(layer, index, polarity, kind))


def checked_feature(feature: FeatureId) -> FeatureId:
    """The feature with its polarity as a Polarity; refuses what no model can hold."""
    polarity = Polarity(feature.polarity)
    if feature.layer < 0 or feature.index < 0:
        raise ValueError(f"feature {feature.layer}:{feature.index}: layer and index must be 0 or more")
    if feature.kind not in KINDS:
        raise ValueError(f"feature kind '{feature.kind}' is not one of {', '.join(KINDS)}")
    if feature.kind == "sae" and polarity is Polarity.NEG:
        raise ValueError(f"SAE latent {feature.layer}:{feature.index} has no neg polarity (latents are never "
                         "negative); use pos")
    return FeatureId(feature.layer, feature.index, polarity, feature.kind)


def finite(name: str, value, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}; e.g. {name} = 1.0")
    if low is not None and value < low:
        raise ValueError(f"{name} must be at least {low:g}, got {value:g}")
    return value


def whole(name: str, value, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"{name} must be a whole number, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    return value


def one_of(name: str, value, allowed: tuple, optional: bool = False):
    if value is None and optional:
        return None
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}{' (or null)' if optional else ''}, got {value!r}")
    return value


@dataclass(frozen=True)
class SteerFeature:
    """One feature to steer. Its value is ``value`` (in the feature's activation units, signed
    by its polarity: a neg feature is set to -value) when given, else the feature's high
    quantile from ``neuron_stats``; times ``strength`` times the request's strength."""

    feature: FeatureId
    strength: float = 1.0
    value: float | None = None

    def __post_init__(self):
        if not isinstance(self.feature, FeatureId):
            raise ValueError(f"a SteerFeature's feature is a FeatureId, got {self.feature!r}")
        object.__setattr__(self, "feature", checked_feature(self.feature))
        object.__setattr__(self, "strength", finite("feature strength", self.strength))
        if self.value is not None:
            object.__setattr__(self, "value", finite("feature value", self.value))

    @classmethod
    def of(cls, item) -> "SteerFeature":
        """From a SteerFeature, a FeatureId, an id string (``12:345:neg``) or a dict
        ``{layer, index, polarity?, kind?, strength?, value?}`` (``id`` may replace layer and index)."""
        if isinstance(item, SteerFeature):
            return item
        if isinstance(item, FeatureId):
            return cls(item)
        if isinstance(item, str):
            return cls(parse_feature_id(item))
        if not isinstance(item, dict):
            raise ValueError(f"a feature is an id string (12:345:neg) or a dict with layer and index, got {item!r}")
        known = {"id", "layer", "index", "polarity", "kind", "strength", "value"}
        unknown = sorted(set(item) - known)
        if unknown:
            raise ValueError(f"unknown feature key(s) {', '.join(map(repr, unknown))}; a feature takes {', '.join(sorted(known))}")
        if "id" in item:
            base = parse_feature_id(item["id"])
        else:
            if "layer" not in item or "index" not in item:
                raise ValueError(f"a feature needs layer and index (or id, e.g. '12:345:neg'), got {item!r}")
            base = FeatureId(whole("feature layer", item["layer"], 0), whole("feature index", item["index"], 0),
                             Polarity.POS, "neuron")
        polarity = one_of("feature polarity", item.get("polarity", base.polarity.value), ("pos", "neg"))
        kind = one_of("feature kind", item.get("kind", base.kind), KINDS)
        return cls(FeatureId(base.layer, base.index, Polarity(polarity), kind), item.get("strength", 1.0),
                   item.get("value"))


@dataclass(frozen=True)
class SteerRequest:
    """A steering run: the prompt, which features (explicit ``features``, a description query
    ``select`` with its filters, and/or a ``cluster`` of description_clusters; their union), how
    to intervene, and how to generate. Checked when made; :meth:`from_dict` builds one from JSON."""

    prompt: str
    features: tuple[SteerFeature, ...] = ()
    select: str | None = None
    select_mode: Literal["semantic", "text"] = "semantic"
    layers: tuple[int, ...] | None = None
    polarity: Literal["pos", "neg"] | None = None
    kind: Literal["neuron", "sae"] | None = None
    min_score: float | None = None
    top: int = 20
    cluster: int | None = None
    mode: Literal["set", "add", "ablate"] = "set"
    ablate_with: Literal["zero", "mean"] = "zero"
    strength: float = 1.0
    tokens: Literal["prompt", "generated", "both"] = "both"
    n_tokens: int = 32
    temperature: float = 0.0
    seed: int = 0
    chat: bool | None = None  # None: the chat template when the tokenizer has one
    freq_penalty: float = 0.0  # subtracted from a token's logit per earlier generated occurrence (Neuronpedia's)
    top_logprobs: int = 5  # alternatives listed with each generated token's logprob
    quantile: Literal["q50", "q90", "q99", "q999", "max"] = "q99"  # the default value's neuron_stats column

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("the prompt is empty; give the text to continue")
        set_("features", tuple(SteerFeature.of(f) for f in (self.features or ())))
        if self.select is not None and (not isinstance(self.select, str) or not self.select.strip()):
            raise ValueError("select is empty; give a description query (e.g. 'closing brackets') or leave it out")
        one_of("select_mode", self.select_mode, SELECT_MODES)
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) and not isinstance(self.layers, bool) else self.layers
            if not isinstance(layers, (list, tuple)) or not layers:
                raise ValueError(f"layers must be a list of layer numbers (or null for all), got {self.layers!r}")
            set_("layers", tuple(sorted({whole("layers", layer, 0) for layer in layers})))
        one_of("polarity", self.polarity, ("pos", "neg"), optional=True)
        one_of("kind", self.kind, KINDS, optional=True)
        if self.min_score is not None:
            set_("min_score", finite("min_score", self.min_score))
        set_("top", whole("top", self.top, 1))
        if self.cluster is not None:
            set_("cluster", whole("cluster", self.cluster))
        one_of("mode", self.mode, MODES)
        one_of("ablate_with", self.ablate_with, ABLATE_WITH)
        set_("strength", finite("strength", self.strength))
        one_of("tokens", self.tokens, TOKEN_RANGES)
        set_("n_tokens", whole("n_tokens", self.n_tokens, 1))
        set_("temperature", finite("temperature", self.temperature, 0.0))
        set_("seed", whole("seed", self.seed))
        if self.chat is not None and not isinstance(self.chat, bool):
            raise ValueError(f"chat must be true, false or null (null: the chat template when the model has one), got {self.chat!r}")
        set_("freq_penalty", finite("freq_penalty", self.freq_penalty))
        set_("top_logprobs", whole("top_logprobs", self.top_logprobs, 0))
        one_of("quantile", self.quantile, ("q50", "q90", "q99", "q999", "max"))
        if not self.features and self.select is None and self.cluster is None:
            raise ValueError("nothing to steer: give features (e.g. 12:345:pos), a description query (select) "
                             "or a cluster id")

    @classmethod
    def from_dict(cls, data: dict) -> "SteerRequest":
        """A request from JSON-like data (the field names above); unknown keys and bad values
        raise ValueError naming the key and what it takes."""
        if not isinstance(data, dict):
            raise ValueError(f"a steering request is a JSON object, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))} in the steering request; the keys "
                             f"are {', '.join(names)}")
        if "prompt" not in data:
            raise ValueError("the steering request has no prompt")
        values = dict(data)
        if values.get("features") is not None:
            if not isinstance(values["features"], (list, tuple)):
                raise ValueError("features must be a list of feature ids or {layer, index, ...} objects")
            values["features"] = tuple(SteerFeature.of(f) for f in values["features"])
        else:
            values.pop("features", None)
        if isinstance(values.get("layers"), str):
            values["layers"] = parse_layers(values["layers"])
        return cls(**values)

    def as_dict(self) -> dict:
        """JSON-ready, in the shape :meth:`from_dict` reads."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["features"] = [{"layer": s.feature.layer, "index": s.feature.index, "polarity": s.feature.polarity.value,
                            "kind": s.feature.kind, "strength": s.strength, "value": s.value} for s in self.features]
        out["layers"] = list(self.layers) if self.layers is not None else None
        return out


def parse_layers(text: str) -> tuple[int, ...]:
    """``"3,5"`` or ``"3-5"`` (a range, both ends included) or a mix: ``"0,3-5"``."""
    layers = set()
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        low, dash, high = part.partition("-")
        try:
            layers.update(range(int(low), int(high) + 1) if dash else [int(low)])
        except ValueError:
            raise ValueError(f"layers '{text}' is not a list of layer numbers, e.g. 3,5 or 2-4") from None
    if not layers:
        raise ValueError(f"layers '{text}' lists no layer; e.g. 3,5 or 2-4")
    return tuple(sorted(layers))


