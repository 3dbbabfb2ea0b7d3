"""Output-side context: the tokens a feature promotes, read through the logit lens.

A neuron's output direction is its column of the MLP's down-projection (for an SAE latent,
its decoder row). Projected through the final norm's scale and the unembedding,
``W_U (gamma * w_out)``, it says which next tokens the feature pushes up when it fires: the
highest logits for the positive polarity, the lowest for the negative one (a negative
activation flips the direction). The table ``output_tokens`` (per layer x polarity) keeps
the top ``exemplars.output_tokens`` of them per feature: neuron, rank, token_id, token, logit.

Only causal language models have an unembedding to read; for others (an encoder such as
MiniLM) :func:`unembedding` returns None and no table is written. A model whose unembedding
is not tied to its input embeddings (Llama-3.1-8B) keeps it outside the base model that the
exemplar pass loads; it is read from the checkpoint's safetensors files alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import torch
from torch import nn

from neuron_assets.types import Polarity

OUTPUT_TOKENS_TABLE = "output_tokens"
OUTPUT_TOKENS_SCHEMA = {"neuron": pl.Int64, "rank": pl.Int64, "token_id": pl.Int64, "token": pl.String,
                        "logit": pl.Float32}
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
CHUNK_ELEMENTS = 1 << 26  # (features x vocabulary) logits computed at a time: 256 MB of float32


def output_directions(site: nn.Module, neurons: torch.Tensor) -> torch.Tensor:
    """(len(neurons), d_model) output directions of a layer's neurons: columns of an
    ``nn.Linear`` down-projection (out = d_model), rows of GPT-2's Conv1D (kept as in x out)."""
    weight = site.weight
    if isinstance(site, nn.Linear):
        return weight[:, neurons].T
    return weight[neurons, :]


def latent_output_directions(site: nn.Module, sae, latents: torch.Tensor) -> torch.Tensor:
    """(len(latents), d_model) output directions of SAE latents over a layer's neuron site:
    each latent's decoder row (in the site's units: divided by the SAE's input scale) through
    the down-projection, i.e. the mix of neuron output directions the latent writes."""
    every = output_directions(site, torch.arange(sae.d_in, device=site.weight.device)).float()  # (d_in, d_model)
    rows = (sae.W_dec.detach()[latents.to(sae.W_dec.device)] / sae.input_scale).to(every.device)
    return rows @ every


def unembedding(model: nn.Module, folder: str | None) -> torch.Tensor | None:
    """(vocab, d_model) unembedding of a causal LM, or None for a model without one. Tied
    models share the input embeddings; an untied head is read from ``folder``'s safetensors
    (``lm_head.weight``, the name every Hugging Face causal LM uses)."""
    config = getattr(model, "config", None)
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return None
    if getattr(config, "tie_word_embeddings", False):
        return model.get_input_embeddings().weight
    return _read_tensor(folder, "lm_head.weight") if folder else None


def final_norm_scale(model: nn.Module) -> torch.Tensor | None:
    """The final norm's elementwise scale (gamma), or None when the model has none."""
    for name in FINAL_NORMS:
        norm = getattr(model, name, None)
        weight = getattr(norm, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 1:
            return weight
    return None


@torch.inference_mode()
def promoted_tokens(directions: torch.Tensor, unembed: torch.Tensor, scale: torch.Tensor | None,
                    polarity: Polarity, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, token ids), each (features, top): the highest logits of ``sign * W_U (scale *
    direction)``, computed in float32 in chunks of features so memory stays bounded."""
    unembed = unembed.float()
    scale = scale.float().to(unembed.device) if scale is not None else None
    top = min(top, unembed.shape[0])
    rows = max(1, CHUNK_ELEMENTS // unembed.shape[0])
    values, ids = [], []
    for start in range(0, directions.shape[0], rows):
        chunk = directions[start : start + rows].float().to(unembed.device)
        if scale is not None:
            chunk = chunk * scale
        logits = chunk @ unembed.T * polarity.sign
        best = logits.topk(top, dim=1)
        values.append(best.values.cpu())
        ids.append(best.indices.cpu())
    empty = torch.zeros((0, top))
    return (torch.cat(values) if values else empty), (torch.cat(ids) if ids else empty.long())


def output_tokens_frame(neurons: list[int], values: torch.Tensor, ids: torch.Tensor, tokenizer) -> pl.DataFrame:
    """The ``output_tokens`` rows of one layer x polarity (logits in the polarity's orientation)."""
    rows = {name: [] for name in OUTPUT_TOKENS_SCHEMA}
    tokens = tokenizer.convert_ids_to_tokens(ids.flatten().tolist()) if ids.numel() else []
    strings = [tokenizer.convert_tokens_to_string([t]) if t is not None else "" for t in tokens]
    for i, neuron in enumerate(neurons):
        for rank in range(ids.shape[1]):
            rows["neuron"].append(int(neuron))
            rows["rank"].append(rank)
            rows["token_id"].append(int(ids[i, rank]))
            rows["token"].append(strings[i * ids.shape[1] + rank])
            rows["logit"].append(float(values[i, rank]))
    return pl.DataFrame(rows, schema=OUTPUT_TOKENS_SCHEMA)


def subject_output_tokens(subject, neurons: dict[int, torch.Tensor], polarities: list[Polarity], top: int,
                          folder: str | None, latents: dict | None = None) -> dict[tuple[int, Polarity], pl.DataFrame]:
    """(layer, polarity) -> its ``output_tokens`` rows for the selected ``neurons`` of each
    layer (a LongTensor of indices per layer), with a ``kind`` column; ``latents[layer]`` =
    (sae, LongTensor of latent indices) adds those SAE latents (kind 'sae') to the positive
    polarity's rows. Empty when the subject has no unembedding."""
    unembed = unembedding(subject.model, folder) if top > 0 else None
    if unembed is None:
        return {}
    scale = final_norm_scale(subject.model)
    latents = latents or {}
    out = {}
    for layer, indices in neurons.items():
        site = subject.sites[layer]
        kinds = [("neuron", indices, output_directions(site, indices.to(site.weight.device)))]
        if layer in latents:
            sae, chosen = latents[layer]
            kinds.append(("sae", chosen, latent_output_directions(site, sae, chosen)))
        for polarity in polarities:
            frames = []
            for kind, chosen, directions in kinds:
                if kind == "sae" and polarity is not Polarity.POS:
                    continue  # latents are never negative
                values, ids = promoted_tokens(directions, unembed, scale, polarity, top)
                frames.append(output_tokens_frame(chosen.tolist(), values, ids, subject.tokenizer)
                              .with_columns(pl.lit(kind).alias("kind")).select("kind", *OUTPUT_TOKENS_SCHEMA))
            out[(layer, polarity)] = pl.concat(frames)
    return out


def _read_tensor(folder: str, name: str) -> torch.Tensor | None:
    """One tensor from a checkpoint folder's safetensors files (sharded or not), or None."""
    from safetensors import safe_open

    root = Path(folder)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        shard = json.loads(index.read_text()).get("weight_map", {}).get(name)
        files = [root / shard] if shard else []
    else:
        files = sorted(root.glob("*.safetensors"))
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            if name in handle.keys():
                return handle.get_tensor(name)
    return None
