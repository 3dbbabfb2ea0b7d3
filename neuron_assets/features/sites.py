"""Reading features at a layer's site: the neurons and SAE latents of a layer as one tensor."""

from __future__ import annotations

import torch

from neuron_assets.features.selection import SaeLatents


def site_reader(positions: list[int], width: int, latents: SaeLatents, counted: torch.Tensor):
    """The hook's reader of a layer whose features include SAE latents (``positions`` on the
    layer's feature axis, :func:`neuron_assets.features.selection.feature_axis`): the chosen
    neurons and the chosen latents of the encoded site input, side by side, in the site's
    dtype. Only the counted tokens are encoded (a top-k SAE computes every latent of a token,
    so the prefix and the padding would cost as much); the others read 0, and nothing reads
    them."""
    index = torch.tensor(positions, dtype=torch.long)
    neuron_index, latent_index = index[index < width], index[index >= width] - width
    sae = latents.sae
    sae_device = next(sae.parameters()).device

    def read(hidden: torch.Tensor) -> torch.Tensor:
        parts = []
        if neuron_index.numel():
            parts.append(hidden.index_select(-1, neuron_index.to(hidden.device)))
        if latent_index.numel():
            mask = counted.to(hidden.device)
            encoded = sae.encode(hidden[mask].to(sae_device, torch.float32)).index_select(-1, latent_index.to(sae_device))
            full = hidden.new_zeros((*hidden.shape[:-1], latent_index.numel()))
            full[mask] = encoded.to(hidden.device, hidden.dtype)
            parts.append(full)
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    return read
