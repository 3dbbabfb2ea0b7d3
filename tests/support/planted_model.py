"""A tiny Llama whose chosen MLP neurons fire on chosen tokens, for end-to-end tests.

For each planted neuron (layer, index) and its token t, one residual dimension d is reserved:
token t's embedding gets a large value there (every other token 0), no attention layer
writes to it, and the neuron's gate and up rows read it, so act(gate) * up is large (times
the polarity's sign) at t and near 0 elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class PlantedNeuron:
    layer: int
    index: int
    token: str  # one token of the tiny tokenizer, with its leading space
    sign: int = 1  # -1: the neuron is strongly negative at the token

    @property
    def word(self) -> str:
        return self.token.strip()


def plant_neurons(model_dir: Path, planted: list[PlantedNeuron], strength: float = 1.0) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hidden = model.config.hidden_size
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        for number, neuron in enumerate(planted):
            ids = tokenizer(neuron.token, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"{neuron.token!r} is {len(ids)} tokens of the tiny tokenizer; plant single tokens")
            dimension = hidden - 1 - number
            embeddings[:, dimension] = 0.0
            embeddings[ids[0], dimension] = strength
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight[dimension, :] = 0.0
                layer.mlp.down_proj.weight[dimension, :] = 0.0
            mlp = model.model.layers[neuron.layer].mlp
            mlp.gate_proj.weight[neuron.index, dimension] = 1.0
            mlp.up_proj.weight[neuron.index, dimension] = float(neuron.sign)
    model.save_pretrained(model_dir)
    return Path(model_dir)
