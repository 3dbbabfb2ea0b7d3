"""Bills et al.'s all-at-once simulator: one prompt per sequence, read through logprobs.

The prompt shows one solved example (a description and its token<TAB>activation lines),
then the description to simulate and the sequence's tokens, each followed by a
*placeholder* activation (``unknown``). One forward pass over the prompt gives, at every
placeholder, the model's distribution over the next token; the prediction is the expected
value over the tokens ``0`` .. ``10`` (their probabilities renormalized; values that are not
one token, or not among an API's top logprobs, count as 0 probability).

Where the logprobs come from (``simulate.prompted.backend``, :data:`LOGPROB_SOURCES`):

- ``transformers``: a local forward pass; the full distribution is read.
- ``openai_completions``: an OpenAI-compatible completions endpoint (vLLM's server) with
  ``echo=True`` and ``logprobs=N``, which returns the top-N alternatives at every prompt
  token; each placeholder is found by its character offset.
"""

from __future__ import annotations

import bisect
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from neuron_assets.config import PromptedSimulatorConfig
from neuron_assets.simulate.base import NUM_CLASSES, SimulatedActivations, expected_value
from neuron_assets.types import ActivationRecord

SYSTEM = (
    "We're studying neurons in a neural network. Each neuron looks for some particular thing in a short document. "
    "Look at a summary of what the neuron does, and try to predict how it will fire on each token.\n\n"
    "The activation format is token<tab>activation, activations go from 0 to 10, \"unknown\" indicates an unknown "
    "activation. Most activations will be 0.\n"
)
VALUE_STRINGS = tuple(str(v) for v in range(NUM_CLASSES))


@dataclass(frozen=True)
class SolvedExample:
    description: str
    tokens: tuple[str, ...]
    activations: tuple[int, ...]


FEW_SHOT = SolvedExample(
    description='the word "and" joining two things',
    tokens=("The", " cat", " and", " the", " dog", " sat", " and", " slept", "."),
    activations=(0, 0, 10, 0, 0, 0, 8, 0, 0),
)


@dataclass(frozen=True)
class SimulationPrompt:
    text: str
    placeholder_offsets: tuple[int, ...]  # character offset of each placeholder, one per simulated token


def all_at_once_prompt(description: str, tokens: Sequence[str], placeholder: str = "unknown",
                       example: SolvedExample = FEW_SHOT) -> SimulationPrompt:
    """The prompt for one sequence (its tokens after the fixed prefix)."""
    text = SYSTEM
    text += _neuron_header(1, example.description)
    text += "".join(f"{_shown(t)}\t{a}\n" for t, a in zip(example.tokens, example.activations)) + "<end>\n"
    text += _neuron_header(2, description)
    offsets = []
    for token in tokens:
        text += f"{_shown(token)}\t"
        offsets.append(len(text))
        text += f"{placeholder}\n"
    text += "<end>\n"
    return SimulationPrompt(text, tuple(offsets))


def _neuron_header(number: int, description: str) -> str:
    from neuron_assets.simulate.alignment import description_text

    return (f"\n\nNeuron {number}\nExplanation of neuron {number} behavior: the main thing this neuron does is find "
            f"{description_text(description)}\nActivations:\n<start>\n")


def _shown(token: str) -> str:
    from neuron_assets.simulate.alignment import input_tokens

    shown = input_tokens(ActivationRecord(0, (token,), (0,), np.zeros(1, np.float32)))[0]
    return shown.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


class LogprobSource(Protocol):
    name: str

    def value_probabilities(self, prompts: Sequence[SimulationPrompt]) -> list[np.ndarray]:
        """Per prompt, (placeholders, 11): the probability of each value 0..10 at each
        placeholder, as the model gives it (not renormalized)."""
        ...


class PromptedSimulator:
    """Simulator ``prompted``."""

    name = "prompted"

    def __init__(self, source: LogprobSource, placeholder: str = "unknown"):
        self.source = source
        self.placeholder = placeholder

    def simulate(self, descriptions: Sequence[str], records: Sequence[ActivationRecord]) -> SimulatedActivations:
        prompts = [all_at_once_prompt(d, r.tokens[r.prefix_len :], self.placeholder) for d in descriptions for r in records]
        probabilities = self.source.value_probabilities(prompts)
        result: SimulatedActivations = []
        for i, _ in enumerate(descriptions):
            row = []
            for j, record in enumerate(records):
                values = np.zeros(len(record.tokens), dtype=np.float32)
                values[record.prefix_len :] = expected_value(probabilities[i * len(records) + j])
                row.append(values)
            result.append(row)
        return result


# -- logprobs from a local forward pass --------------------------------------------------------


class TransformersLogprobs:
    """A local causal LM. Each placeholder must begin a token: when the whole prompt's
    tokenization merges one with what precedes it, the prompt is tokenized piece by piece,
    split at the placeholders."""

    name = "transformers"

    def __init__(self, model, tokenizer, device, batch_size: int = 4):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("the prompted simulator needs a fast (Rust) tokenizer for character offsets")
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self.value_ids = value_token_ids(tokenizer)

    @classmethod
    def from_config(cls, config: PromptedSimulatorConfig) -> TransformersLogprobs:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from neuron_assets.simulate.finetuned import quiet_transformers, resolve_device, resolve_dtype
        from neuron_assets.subject import resolve_model_path

        if not config.model:
            raise ValueError("simulate.prompted.model is required: a local causal LM folder or a cached name")
        device = resolve_device(config.device)
        path = resolve_model_path(config.model)
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                         dtype=resolve_dtype(config.dtype, device))
        return cls(model.to(device).eval(), tokenizer, device, config.batch_size)

    def value_probabilities(self, prompts: Sequence[SimulationPrompt]) -> list[np.ndarray]:
        import torch

        encoded = [self._encode(p) for p in prompts]
        out = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start : start + self.batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (ids, _) in enumerate(chunk):
                input_ids[i, : len(ids)] = torch.tensor(ids)
                mask[i, : len(ids)] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for row, (_, positions) in zip(logits, chunk):
                # the distribution over the token at position p is predicted at p - 1
                probs = torch.softmax(row[torch.as_tensor(positions) - 1].float(), dim=-1).cpu().numpy()
                table = np.zeros((len(positions), NUM_CLASSES), dtype=np.float64)
                for value, token_id in self.value_ids.items():
                    table[:, value] = probs[:, token_id]
                out.append(table)
        return out

    def _encode(self, prompt: SimulationPrompt) -> tuple[list[int], list[int]]:
        """Input ids and the token index at which each placeholder begins."""
        encoded = self.tokenizer(prompt.text, add_special_tokens=True, return_offsets_mapping=True, verbose=False)
        starts = {s: i for i, (s, e) in enumerate(encoded["offset_mapping"]) if e > s}
        positions = [starts.get(c) for c in prompt.placeholder_offsets]
        if all(p is not None and p > 0 for p in positions):
            return list(encoded["input_ids"]), positions
        return self._encode_in_pieces(prompt)

    def _encode_in_pieces(self, prompt: SimulationPrompt) -> tuple[list[int], list[int]]:
        bounds = [0, *prompt.placeholder_offsets, len(prompt.text)]
        ids = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        positions = []
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            if i > 0:
                positions.append(len(ids))
            ids += self.tokenizer(prompt.text[a:b], add_special_tokens=False)["input_ids"]
        return ids, positions


def value_token_ids(tokenizer) -> dict[int, int]:
    """value -> the id of the single token spelling it; values that are not one token are left out."""
    found = {}
    for value, text in enumerate(VALUE_STRINGS):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            found[value] = ids[0]
    if 0 not in found or 1 not in found:
        raise ValueError("the prompted simulator's tokenizer does not spell 0 and 1 as single tokens")
    return found


# -- logprobs from an OpenAI-compatible completions endpoint ---------------------------------------


class OpenAICompletionsLogprobs:
    """``POST /v1/completions`` with ``echo=True, logprobs=N``: the top-N alternatives at
    every prompt token. Each placeholder is the token at its character offset; if the
    server's tokenizer merged it with the tab before it, alternatives spelling that tab
    followed by a value are read instead."""

    name = "openai_completions"

    def __init__(self, client, model: str, top_logprobs: int = 20, concurrency: int = 8, max_retries: int = 3):
        self.client = client
        self.model = model
        self.top_logprobs = top_logprobs
        self.concurrency = concurrency
        self.max_retries = max_retries

    @classmethod
    def from_config(cls, config: PromptedSimulatorConfig) -> OpenAICompletionsLogprobs:
        import openai

        if not config.model:
            raise ValueError("simulate.prompted.model is required: the model name the endpoint serves")
        key = os.environ.get(config.api_key_env) or ("unused" if config.base_url else None)
        if key is None:
            raise ValueError(f"the openai_completions backend needs an API key in ${config.api_key_env}")
        client = openai.OpenAI(base_url=config.base_url, api_key=key, timeout=config.timeout_s, max_retries=0)
        return cls(client, config.model, config.top_logprobs, config.concurrency, config.max_retries)

    def value_probabilities(self, prompts: Sequence[SimulationPrompt]) -> list[np.ndarray]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._one, prompts))

    def _one(self, prompt: SimulationPrompt) -> np.ndarray:
        choice = self._request(prompt.text).choices[0]
        logprobs = choice.logprobs
        shift = _prompt_start(logprobs.tokens, prompt.text)
        offsets = [o - shift for o in logprobs.text_offset]
        table = np.zeros((len(prompt.placeholder_offsets), NUM_CLASSES), dtype=np.float64)
        for row, offset in enumerate(prompt.placeholder_offsets):
            j = bisect.bisect_right(offsets, offset) - 1
            alternatives = logprobs.top_logprobs[j] if 0 <= j < len(logprobs.top_logprobs) else None
            if not alternatives:
                continue
            lead = prompt.text[offsets[j] : offset] if offsets[j] < offset else ""
            for value, text in enumerate(VALUE_STRINGS):
                logprob = alternatives.get(lead + text)
                if logprob is not None and math.isfinite(logprob):
                    table[row, value] = math.exp(logprob)
        return table

    def _request(self, text: str):
        import openai

        for attempt in range(self.max_retries + 1):
            try:
                return self.client.completions.create(model=self.model, prompt=text, max_tokens=1, temperature=0.0,
                                                      echo=True, logprobs=self.top_logprobs)
            except (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError,
                    openai.InternalServerError):
                if attempt == self.max_retries:
                    raise
                time.sleep(min(30.0, 2.0**attempt))


def _prompt_start(tokens: Sequence[str], prompt: str) -> int:
    """Where the prompt begins in the text the offsets count: vLLM counts a BOS token's text
    (``<|begin_of_text|>``) though it does not echo it."""
    found = "".join(tokens).find(prompt[:32])
    return max(found, 0)


LOGPROB_SOURCES: dict[str, Callable[[PromptedSimulatorConfig], LogprobSource]] = {
    TransformersLogprobs.name: TransformersLogprobs.from_config,
    OpenAICompletionsLogprobs.name: OpenAICompletionsLogprobs.from_config,
}
