"""The intervention: a forward pre-hook on each steered layer's neuron site (the input of the
MLP's output projection, the vector of the layer's neuron activations: the site the exemplar
pass reads), changing the features at the chosen token positions.

- a neuron: ``set`` writes its value, ``add`` adds it, ``ablate`` writes 0 or the mean;
- an SAE latent z_j: its decoder direction d_j (W_dec row j over the SAE's input scale, in the
  site's units) is added: ``add`` adds value * d_j, ``set`` adds (value - z_j) * d_j so the
  latent reads ``value``, ``ablate`` adds (a - z_j) * d_j with a = 0 or the mean; z_j is the
  SAE's encoding of the site at that token.

Positions: the generation loop tells the :class:`TokenWindow` the absolute positions of each
forward pass's tokens (the whole prompt first, then one new token at a time, with the KV cache).
The baseline and the steered run are generated one after the other, each as a batch of one:
two rows of one batch would read the weights once, but a batch's rows are not computed
bit-identically on CPU, and strength 0 must give the baseline exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from neuron_assets.steer.select import SelectedFeature


class TokenWindow:
    """Which (row, position) cells of a batch are steered. Rows: ``rows[r]`` says whether row r
    is (one row, steered, unless told otherwise). Positions: ``prompt`` (the prompt's tokens,
    after a leading BOS), ``generated`` (the tokens the model writes: the first of them is
    still predicted from the unsteered prompt), or ``both``."""

    def __init__(self, tokens: str, prompt_len: int, first: int | torch.Tensor = 0, rows: tuple[bool, ...] = (True,)):
        self.tokens, self.prompt_len, self.first = tokens, prompt_len, first  # first: one for all rows, or (B,)
        self.rows = torch.tensor(rows, dtype=torch.bool)
        self.positions: torch.Tensor | None = None  # (T,) absolute positions of the current pass

    def mask(self, device) -> torch.Tensor:
        """(B, T) bool."""
        positions = self.positions.to(device)[None, :]
        first = self.first.to(device)[:, None] if isinstance(self.first, torch.Tensor) else self.first
        in_prompt = (positions >= first) & (positions < self.prompt_len)
        generated = positions >= self.prompt_len
        steps = {"prompt": in_prompt, "generated": generated, "both": in_prompt | generated}[self.tokens]
        return self.rows.to(device)[:, None] & steps


def site_hook(mode: str, window: TokenWindow, neurons: torch.Tensor, neuron_values: torch.Tensor,
              sae=None, latents: torch.Tensor | None = None, latent_values: torch.Tensor | None = None):
    """The pre-hook of one site: ``neurons``/``neuron_values`` (k,) and, with an SAE,
    ``latents``/``latent_values`` (m,)."""
    directions = None
    if sae is not None and latents is not None and latents.numel():
        directions = (sae.W_dec.detach()[latents.to(sae.W_dec.device)] / sae.input_scale).float()  # (m, width)

    def hook(module, args):
        hidden = args[0]
        where = window.mask(hidden.device)
        if not bool(where.any()):
            return None
        hidden = hidden.clone()
        at = where.unsqueeze(-1)  # (B, T, 1)
        if neurons.numel():
            index = neurons.to(hidden.device)
            current = hidden.index_select(-1, index)
            values = neuron_values.to(hidden.device, hidden.dtype)
            new = current + values if mode == "add" else values.expand_as(current)
            hidden[..., index] = torch.where(at, new, current)
        if directions is not None:
            d = directions.to(hidden.device)
            amounts = latent_values.to(hidden.device).float().expand(*hidden.shape[:-1], -1)  # (B, T, m)
            if mode != "add":
                sae_device = next(sae.parameters()).device
                z = sae.encode(hidden.to(sae_device, torch.float32)).index_select(-1, latents.to(sae_device))
                amounts = amounts - z.to(hidden.device)
            delta = (amounts @ d).to(hidden.dtype)
            hidden = hidden + torch.where(at, delta, torch.zeros_like(delta))
        return (hidden, *args[1:])

    return hook


@contextmanager
def steering(sites: dict[int, torch.nn.Module], selected: Sequence[SelectedFeature], mode: str, window: TokenWindow,
             sae_for: Callable[[int], object]) -> Iterator[None]:
    """The hooks of every layer with an active feature, removed on leaving."""
    by_layer: dict[int, list[SelectedFeature]] = {}
    for s in selected:
        if s.active:
            by_layer.setdefault(s.feature.layer, []).append(s)
    handles = []
    try:
        for layer, chosen in sorted(by_layer.items()):
            neurons = [s for s in chosen if s.feature.kind == "neuron"]
            latents = [s for s in chosen if s.feature.kind == "sae"]
            hook = site_hook(
                mode, window, torch.tensor([s.feature.index for s in neurons], dtype=torch.long),
                torch.tensor([s.value for s in neurons], dtype=torch.float32),
                sae_for(layer) if latents else None,
                torch.tensor([s.feature.index for s in latents], dtype=torch.long),
                torch.tensor([s.value for s in latents], dtype=torch.float32))
            handles.append(sites[layer].register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
