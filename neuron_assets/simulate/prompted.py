"""Bills et al.'s all-at-once simulator: one prompt per sequence, read through logprobs.

The prompt shows one solved example (a description and its token<TAB>activation lines),
then the description to simulate and the sequence's tokens, each followed by a
*placeholder* activation (``unknown``). One forward pass over the prompt gives, at every
placeholder, the model's distribution over the next token; the prediction is the expected
value over the tokens ``0`` .. ``10`` (their probabilities renormalized; values that are not
one token, or not among an API's top logprobs, count as 0 probability).

Where the logprobs come from (``simulate.prompted.backend``, :data:`LOGPROB_SOURCES`), both
through the LLM client layer (:mod:`neuron_assets.llm`):

- ``transformers``: a local forward pass; the full distribution is read. The model is the
  process's shared copy, e.g. the same SmolLM2 the transformers explainer uses.
- ``openai_completions``: an OpenAI-compatible completions endpoint (vLLM's server) with
  ``echo=True`` and ``logprobs=N``, which returns the top-N alternatives at every prompt
  token; each placeholder is found by its character offset.
- ``vllm``: vLLM's offline engine with ``prompt_logprobs`` (a GPU node).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from neuron_assets.config import PromptedSimulatorConfig
from neuron_assets.simulate.base import NUM_CLASSES, SimulatedActivations, expected_value
from neuron_assets.types import ActivationRecord

log = logging.getLogger(__name__)

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
        return self.simulate_many([(descriptions, records)])[0]

    def simulate_many(self, jobs: Sequence[tuple[Sequence[str], Sequence[ActivationRecord]]]) -> list[SimulatedActivations]:
        """Every job's prompts go to the logprob source in one call (vLLM schedules them all)."""
        prompts = [all_at_once_prompt(d, r.tokens[r.prefix_len :], self.placeholder)
                   for descriptions, records in jobs for d in descriptions for r in records]
        probabilities = iter(self.source.value_probabilities(prompts))
        results = []
        for descriptions, records in jobs:
            result: SimulatedActivations = []
            for _ in descriptions:
                row = []
                for record in records:
                    values = np.zeros(len(record.tokens), dtype=np.float32)
                    values[record.prefix_len :] = expected_value(next(probabilities))
                    row.append(values)
                result.append(row)
            results.append(result)
        return results


# -- logprobs through the LLM client layer ----------------------------------------------------


class LLMLogprobs:
    """Value probabilities from :meth:`neuron_assets.llm.LLM.continuation_logprobs`: the
    probability of each of "0".."10" being the text at each placeholder. A prompt whose
    logprobs never came (after the backend's retries) predicts 0 everywhere, and its reason
    is kept in ``failures`` and logged: one failed request never stops a scoring run."""

    name = "llm"

    def __init__(self, llm, max_attempts: int = 1):
        self.llm = llm
        self.max_attempts = max_attempts
        self.failures: list[str] = []
        self.prompt_tokens = 0

    def value_probabilities(self, prompts: Sequence[SimulationPrompt]) -> list[np.ndarray]:
        from neuron_assets.llm import LogprobRequest

        requests = [LogprobRequest(p.text, p.placeholder_offsets, VALUE_STRINGS) for p in prompts]
        out = []
        for prompt, reply in zip(prompts, self.llm.continuation_logprobs(requests, self.max_attempts)):
            self.prompt_tokens += reply.prompt_tokens
            if reply.logprobs is None:
                self.failures.append(reply.failure or "no logprobs")
                log.warning("prompted simulator: no logprobs for a prompt (%s); it predicts 0", reply.failure)
                out.append(np.zeros((len(prompt.placeholder_offsets), NUM_CLASSES), dtype=np.float64))
            else:
                out.append(np.exp(reply.logprobs).astype(np.float64))  # exp(-inf) = 0: a value not seen
        return out


class TransformersLogprobs(LLMLogprobs):
    """A local causal LM, one forward pass per prompt batch; the full distribution is read.
    Each placeholder must begin a token: when the whole prompt's tokenization merges one
    with what precedes it, the prompt is tokenized piece by piece, split at the placeholders."""

    name = "transformers"

    @classmethod
    def from_config(cls, config: PromptedSimulatorConfig) -> TransformersLogprobs:
        return cls(_with_local_tokenizer(_open(config)), 1)


class VLLMLogprobs(LLMLogprobs):
    """vLLM's offline engine: every prompt at once, ``prompt_logprobs=N`` (top_logprobs) at
    each position of the prompt, tokenized here so that each placeholder begins a token."""

    name = "vllm"

    @classmethod
    def from_config(cls, config: PromptedSimulatorConfig) -> VLLMLogprobs:
        return cls(_with_local_tokenizer(_open(config)), 1)


class OpenAICompletionsLogprobs(LLMLogprobs):
    """``POST /v1/completions`` with ``echo=True, logprobs=N`` (vLLM's server): the top-N
    alternatives at every prompt token; values outside them count as 0 probability."""

    name = "openai_completions"

    @classmethod
    def from_config(cls, config: PromptedSimulatorConfig) -> OpenAICompletionsLogprobs:
        return cls(_open(config), config.max_retries + 1)


def _open(config: PromptedSimulatorConfig):
    from neuron_assets.llm import LLMUnavailable, open_llm, settings_from_prompted

    if not config.model:
        raise ValueError("simulate.prompted.model is required: a local causal LM folder, a builtin: model or a cached "
                         "name (transformers), or the model name the endpoint serves (openai_completions)")
    try:
        return open_llm(settings_from_prompted(config), config.top_logprobs)
    except LLMUnavailable as err:
        raise ValueError(str(err)) from None


def _with_local_tokenizer(llm):
    if not getattr(llm.tokenizer, "is_fast", False):
        raise ValueError("the prompted simulator needs a fast (Rust) tokenizer for character offsets")
    value_token_ids(llm.tokenizer)  # 0 and 1 must be single tokens
    return llm


def value_token_ids(tokenizer) -> dict[int, int]:
    """value -> the id of the single token spelling it; values that are not one token are left out."""
    from neuron_assets.llm.tokens import single_token_ids

    found = {v: i for v, i in enumerate(single_token_ids(tokenizer, VALUE_STRINGS)) if i is not None}
    if 0 not in found or 1 not in found:
        raise ValueError("the prompted simulator's tokenizer does not spell 0 and 1 as single tokens")
    return found


LOGPROB_SOURCES: dict[str, Callable[[PromptedSimulatorConfig], LogprobSource]] = {
    TransformersLogprobs.name: TransformersLogprobs.from_config,
    OpenAICompletionsLogprobs.name: OpenAICompletionsLogprobs.from_config,
    VLLMLogprobs.name: VLLMLogprobs.from_config,
}
