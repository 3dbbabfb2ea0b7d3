"""Prompt formats: how exemplars (and the one solved puzzle) are written into a chat prompt.

A prompt is: a system message (the format's instructions, the notation, how to answer); the
puzzle's excerpts as a user turn and its known description as the assistant's answer; the
feature's excerpts as the last user turn. Every answer ends with a line that starts with
:data:`ANSWER_TAG`, which :func:`parse_description` reads.

Formats (``PromptFormat``): ``highlight`` (Transluce), ``token_activation`` (Bills et al.),
``contrastive`` (positives beside hard and random negatives). ``ChainOfThought`` asks for
reasoning before the answer line, with any of them. ``transluce_distilled`` is the exact
prompt of Transluce's distilled explainer (``Transluce/llama_8b_explainer``), with its own
system prompt and no puzzle.

Highlights follow Transluce's per-prompt rule (:func:`~neuron_assets.excerpts.highlight_threshold`):
over the excerpts one prompt shows, the threshold starts at 0.9 of their highest activation
and steps down the ladder 0.8, 0.7, ..., 0.1 until at least 3 token positions are marked.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import ClassVar, Protocol, Sequence

import numpy as np

from neuron_assets.config import ExplainConfig, PromptFormat
from neuron_assets.excerpts import (
    CHAT_TOKEN_STAND_INS,
    HIGHLIGHT_LADDER,
    Excerpt,
    TokenDisplay,
    defuse_control_tokens,
    distinct_token_peaks,
    excerpt_of,
    highlight_threshold,
    highlighted_text,
    plain_text,
    scaled_0_to_10,
    token_key,
    transluce_text,
)
from neuron_assets.types import ActivationRecord, FeatureExemplars, Split

ANSWER_TAG = "[DESCRIPTION]:"
MAX_DESCRIPTION_CHARS = 400

FEATURE_INTRO = (
    "We are studying a feature of a neural network language model: a number computed at every "
    "token of a text, large where the text holds some particular pattern."
)
DESCRIBE = (
    "Write one concise phrase, specific enough that a reader could predict which tokens of a new "
    "text the feature is active on."
)
NOTATION = "Special tokens of a chat format are shown as ⟨name⟩, line breaks as \\n and tabs as \\t."
OUTPUT_TOKENS_NOTE = (
    "Some excerpt lists end with the tokens the feature's output pushes the model to predict "
    "(read from its output weights). Take them as a hint; the excerpts decide."
)
DIRECT_ANSWER = f"Answer with one line: {ANSWER_TAG} followed by the description."
REASONED_ANSWER = (
    "First reason step by step: which tokens are most active, what they have in common, what "
    "comes before them; check the idea against every excerpt. Then end with one line: "
    f"{ANSWER_TAG} followed by the description."
)


class MalformedAnswer(ValueError):
    """An explainer's answer with no usable description; the message says what was wrong."""


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system, user, assistant
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Shown:
    """What one prompt shows of a feature (or a puzzle)."""

    positives: tuple[Excerpt, ...]
    negatives: tuple[Excerpt, ...] = ()
    ladder: tuple[float, ...] = HIGHLIGHT_LADDER  # fractions of the shown maximum, tried highest first
    scale: float | None = None  # the feature's activation normalizer (FeatureStats.scale); None: the shown max
    output_tokens: tuple[str, ...] = ()  # the feature's logit-lens tokens, shown after the excerpts

    @property
    def threshold(self) -> float:
        return highlight_threshold(self.positives, self.ladder)

    @property
    def seq_ids(self) -> tuple[int, ...]:
        """Every sequence shown, positives first, each once."""
        return tuple(dict.fromkeys(e.seq_id for e in (*self.positives, *self.negatives)))


@dataclass(frozen=True)
class SolvedPuzzle:
    """A puzzle as a prompt shows it: its excerpts and its known description."""

    name: str
    shown: Shown
    description: str


class PromptFormatter(Protocol):
    name: str

    @property
    def instructions(self) -> str: ...

    def show(self, feature: FeatureExemplars, positives: Sequence[Excerpt], display: TokenDisplay,
             rng: random.Random) -> Shown:
        """The prompt's exemplars: ``positives`` plus whatever else the format shows."""
        ...

    def render(self, shown: Shown) -> str:
        """The user message that shows ``shown``."""
        ...


def prompt_builder_for(config: ExplainConfig) -> PromptBuilder:
    """The configured format, with reasoning before the answer when ``config.cot``."""
    return PromptBuilder(FORMATS[config.prompt_format](), ChainOfThought() if config.cot else DirectAnswer(),
                         output_tokens=config.output_tokens)


def parse_description(answer: str | None) -> str:
    """The description on the answer's last line that starts with :data:`ANSWER_TAG`."""
    if answer is None or not answer.strip():
        raise MalformedAnswer("empty answer")
    at = answer.lower().rfind(ANSWER_TAG.lower())
    if at < 0:
        raise MalformedAnswer(f"no '{ANSWER_TAG}' line in the answer")
    lines = answer[at + len(ANSWER_TAG) :].strip().splitlines()
    description = lines[0].strip() if lines else ""
    if len(description) >= 2 and description[0] == description[-1] == '"' and description.count('"') == 2:
        description = description[1:-1].strip()
    if not description:
        raise MalformedAnswer(f"nothing after '{ANSWER_TAG}'")
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise MalformedAnswer(f"description of {len(description)} characters (at most {MAX_DESCRIPTION_CHARS})")
    return description


# -- the formats ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HighlightFormat:
    """Transluce: one line per excerpt, active tokens in {{ }}."""

    name: str = PromptFormat.HIGHLIGHT.value

    @property
    def instructions(self) -> str:
        return (
            f"{FEATURE_INTRO} Below are excerpts of text on which the feature is strongly active, with "
            "the tokens where it is active marked {{like this}}. Describe what the feature responds to: "
            "what the marked tokens have in common, and the context before them when it matters. "
            f"{DESCRIBE}"
        )

    def show(self, feature, positives, display, rng) -> Shown:
        return Shown(tuple(positives))

    def render(self, shown: Shown) -> str:
        threshold = shown.threshold
        return "\n".join(
            f"Excerpt {i}: {highlighted_text(e, threshold).lstrip(' ')}" for i, e in enumerate(shown.positives, start=1)
        )


@dataclass(frozen=True)
class TokenActivationFormat:
    """Bills et al.: token<TAB>activation lines, activations scaled to integers 0-10; when
    fewer than ``repeat_below`` of the tokens are non-zero, the non-zero pairs again."""

    name: str = PromptFormat.TOKEN_ACTIVATION.value
    repeat_below: float = 0.2

    @property
    def instructions(self) -> str:
        return (
            f"{FEATURE_INTRO} Below are excerpts of text on which the feature is strongly active, one "
            "token per line as token<tab>activation, between <start> and <end>. Activations go from 0 "
            "to 10; the higher the value, the stronger the match. Describe what the feature responds "
            "to: what the tokens with high activations have in common, and the context before them "
            f"when it matters. {DESCRIBE}"
        )

    def show(self, feature, positives, display, rng) -> Shown:
        stats = getattr(feature, "stats", None)
        return Shown(tuple(positives), scale=stats.scale if stats is not None else None)

    def render(self, shown: Shown) -> str:
        scaled = scaled_0_to_10(shown.positives, shown.scale)
        blocks = [_token_lines(i, e, levels, False) for i, (e, levels) in enumerate(zip(shown.positives, scaled), 1)]
        text = "\n\n".join(blocks)
        total = sum(len(levels) for levels in scaled)
        non_zero = sum(level > 0 for levels in scaled for level in levels)
        if total and non_zero / total < self.repeat_below:
            repeated = [
                _token_lines(i, e, levels, True)
                for i, (e, levels) in enumerate(zip(shown.positives, scaled), 1)
                if any(levels)
            ]
            text += "\n\nSame activations, but with all zeros filtered out:\n" + "\n\n".join(repeated)
        return text


@dataclass(frozen=True)
class ContrastiveFormat:
    """Active excerpts beside inactive ones: hard negatives (windows that hold the feature's
    most active tokens where it stays quiet) and random inactive sequences, all from train."""

    name: str = PromptFormat.CONTRASTIVE.value
    hard_negatives: int = 5
    random_negatives: int = 3
    window: int = 24  # tokens of a hard negative, around the shared token
    top_tokens: int = 5  # the feature's most active distinct tokens that hard negatives share
    quiet_share: float = 0.1  # "not active": below this share of the positives' peak

    @property
    def instructions(self) -> str:
        return (
            f"{FEATURE_INTRO} Below are excerpts of text on which the feature is strongly active, with "
            "the tokens where it is active marked {{like this}}, followed by excerpts on which it is "
            "not active at all; some of those contain the same words as the marked tokens. Describe "
            "what the feature responds to, and in particular what separates the active excerpts from "
            f"the inactive ones. {DESCRIBE}"
        )

    def show(self, feature, positives, display, rng) -> Shown:
        return Shown(tuple(positives), tuple(self.negatives_for(feature, positives, HIGHLIGHT_LADDER, display, rng)))

    def negatives_for(self, feature: FeatureExemplars, positives: Sequence[Excerpt], ladder, display,
                      rng) -> list[Excerpt]:
        threshold = highlight_threshold(positives, ladder)
        quiet = min(threshold, self.quiet_share * max((e.peak for e in positives), default=0.0))
        if quiet <= 0:
            return []
        peaks = distinct_token_peaks([e for e in positives])
        shared = set(sorted(peaks, key=peaks.get, reverse=True)[: self.top_tokens])
        pool = {}
        for exemplar in feature.exemplars:
            if exemplar.split is Split.TRAIN:
                pool.setdefault(exemplar.record.seq_id, (exemplar.sample.value, exemplar.record))
        hard, calm = [], []
        for kind, record in pool.values():
            excerpt = excerpt_of(record, feature.feature.polarity, display)
            window = _quiet_window_with(excerpt, shared, quiet, self.window)
            if window is not None:
                hard.append(window)
            elif kind == "random" and excerpt.peak < quiet:
                calm.append(excerpt)
        rng.shuffle(hard)
        rng.shuffle(calm)
        return hard[: self.hard_negatives] + calm[: self.random_negatives]

    def render(self, shown: Shown) -> str:
        threshold = shown.threshold
        active = [f"Excerpt {i}: {highlighted_text(e, threshold).lstrip(' ')}"
                  for i, e in enumerate(shown.positives, 1)]
        start = len(shown.positives) + 1
        inactive = [f"Excerpt {i}: {plain_text(e).lstrip(' ')}" for i, e in enumerate(shown.negatives, start)]
        inactive = inactive or ["(none found)"]
        return "Active excerpts:\n" + "\n".join(active) + "\n\nInactive excerpts:\n" + "\n".join(inactive)


# The distilled explainer's system prompt, verbatim: SYS_PROMPT_NO_COT in TransluceAI/observatory,
# lib/explanations/explanations/explainer_prompts.py (selected by explainer_system_prompt_type:
# no_cot in project/expgen/configs/distilled_llama.yaml).
TRANSLUCE_NO_COT_SYSTEM_PROMPT = """\
You are a meticulous AI researcher conducting an important investigation into a specific neuron inside a language model that activates in response to text excerpts. Your overall task is to describe features of text excerpts that cause the neuron to strongly activate.

You will receive a list of text excerpts on which the neuron activates. Tokens causing activation will appear between delimiters like {{this}}. Consecutive activating tokens will also be accordingly delimited {{just like this}}. If no tokens are highlighted with {{}}, then the neuron does not activate on any tokens in the excerpt.

Note: Neurons activate on a word-by-word basis. Also, neuron activations can only depend on words before the word it activates on, so the description cannot depend on words that come after, and should only depend on words that come before the activation."""


@dataclass(frozen=True)
class TransluceDistilledFormat:
    """The prompt Transluce's distilled explainer was trained on (distilled_llama.yaml:
    no_cot, examples_placement no_examples): its system prompt alone, then one user turn of
    ``Excerpt {i}:{text}`` lines, each ending in a newline. As in observatory's
    ``ExplainerPromptFormatterWithHighlights``, an excerpt is the whole sequence, chat prefix
    included, with Llama's chat tokens written as the explainer tokenizer's stand-ins
    (``<||eot_id||>``), line breaks kept, and each run of activating tokens in one ``{{ }}``
    with its spaces outside. Prefix tokens are never highlighted here (no score counts them).

    The highlight threshold is the project's per-prompt rule (at least 3 positions, lowered
    down the ladder of the shown maximum); Transluce's steps down the neuron's activation
    quantiles 1-1e-8 ... 1-1e-4 over the whole corpus, which the exemplar tables do not hold.
    """

    name: str = PromptFormat.TRANSLUCE_DISTILLED.value
    system_prompt: ClassVar[str] = TRANSLUCE_NO_COT_SYSTEM_PROMPT

    @property
    def instructions(self) -> str:
        return self.system_prompt

    def show(self, feature, positives, display, rng) -> Shown:
        records = {e.record.seq_id: e.record for e in feature.exemplars}
        polarity = feature.feature.polarity
        return Shown(tuple(transluce_excerpt(records[p.seq_id], polarity) if p.seq_id in records else p
                           for p in positives))

    def render(self, shown: Shown) -> str:
        threshold = shown.threshold
        return "".join(f"Excerpt {i}:{transluce_highlighted(e, threshold)}\n"
                       for i, e in enumerate(shown.positives, start=1))


FORMATS: dict[PromptFormat, type[PromptFormatter]] = {
    PromptFormat.HIGHLIGHT: HighlightFormat,
    PromptFormat.TOKEN_ACTIVATION: TokenActivationFormat,
    PromptFormat.CONTRASTIVE: ContrastiveFormat,
    PromptFormat.TRANSLUCE_DISTILLED: TransluceDistilledFormat,
}


# -- how the answer is asked for -----------------------------------------------------------


@dataclass(frozen=True)
class DirectAnswer:
    suffix: str = ""
    instruction: str = DIRECT_ANSWER

    def worked_answer(self, puzzle: SolvedPuzzle) -> str:
        return f"{ANSWER_TAG} {puzzle.description}"


@dataclass(frozen=True)
class ChainOfThought:
    """Step-by-step reasoning before the answer line; the puzzle's worked answer names its
    most active tokens before giving its description."""

    suffix: str = "+cot"
    instruction: str = REASONED_ANSWER

    def worked_answer(self, puzzle: SolvedPuzzle) -> str:
        peaks = distinct_token_peaks(puzzle.shown.positives)
        top = sorted(peaks, key=lambda key: (-peaks[key], key))[:5]
        quoted = [f'"{token_key(t)}"' for t in top]
        named = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + f" and {quoted[-1]}"
        return (
            f"Step 1: the most active tokens are {named}.\n"
            f"Step 2: what they have in common, checked against every excerpt: {puzzle.description}.\n"
            f"{ANSWER_TAG} {puzzle.description}"
        )


@dataclass(frozen=True)
class PromptBuilder:
    """A format and an answer style: builds the chat messages of one prompt."""

    formatter: PromptFormatter
    answer: DirectAnswer | ChainOfThought
    output_tokens: bool = False  # show each feature's logit-lens tokens after its excerpts

    @property
    def name(self) -> str:
        """Stored as ``prompt_format``: e.g. ``highlight`` or ``highlight+cot``."""
        return self.formatter.name + self.answer.suffix

    @property
    def system(self) -> str:
        own = getattr(self.formatter, "system_prompt", None)  # a format a model was trained on keeps its own
        if own is not None:
            return own
        note = f"\n\n{OUTPUT_TOKENS_NOTE}" if self.output_tokens else ""
        return f"{self.formatter.instructions}\n\n{NOTATION}{note}\n\n{self.answer.instruction}"

    def show(self, feature, positives, display, rng) -> Shown:
        shown = self.formatter.show(feature, positives, display, rng)
        if self.output_tokens and feature.output_tokens:
            shown = replace(shown, output_tokens=tuple(display.show(t) for t in feature.output_tokens))
        return shown

    def messages(self, shown: Shown, puzzle: SolvedPuzzle | None) -> list[ChatMessage]:
        messages = [ChatMessage("system", self.system)]
        if puzzle is not None:
            messages += [
                ChatMessage("user", self.formatter.render(puzzle.shown)),
                ChatMessage("assistant", self.answer.worked_answer(puzzle)),
            ]
        messages.append(ChatMessage("user", self.formatter.render(shown) + _output_tokens_line(shown)))
        return messages


# -- helpers -------------------------------------------------------------------------------


def _output_tokens_line(shown: Shown) -> str:
    if not shown.output_tokens:
        return ""
    return "\n\nOutput tokens the feature promotes: " + ", ".join(f'"{t}"' for t in shown.output_tokens)


def transluce_excerpt(record: ActivationRecord, polarity) -> Excerpt:
    """A whole sequence as the distilled explainer saw its exemplars (see TransluceDistilledFormat)."""
    activations = record.polarity_activations(polarity).copy()
    activations[: record.prefix_len] = 0.0
    tokens = tuple(defuse_control_tokens(transluce_text(token)) for token in record.tokens)
    return Excerpt(record.seq_id, tokens, activations.astype(np.float32))


def restore_chat_tokens(description: str) -> str:
    """Llama's chat tokens written as Transluce's stand-ins (``<||eot_id||>``, as the distilled
    explainer writes them) put back as themselves, as observatory's tokenizer wrapper does
    with every answer (``update_output``)."""
    for original, stand_in in CHAT_TOKEN_STAND_INS:
        description = description.replace(stand_in, original)
    return description


def transluce_highlighted(excerpt: Excerpt, threshold: float) -> str:
    """Runs of tokens above ``threshold`` (and above 0) merged into one ``{{ }}``, their
    leading and trailing spaces (spaces only) outside the marks; a run of spaces alone is
    marked whole."""
    parts: list[str] = []
    run: list[str] = []

    def close_run() -> None:
        text = "".join(run)
        run.clear()
        core = text.strip(" ")
        if not core:
            parts.append("{{" + text + "}}")
            return
        lead = len(text) - len(text.lstrip(" "))
        trail = len(text) - len(text.rstrip(" "))
        parts.append(text[:lead] + "{{" + core + "}}" + text[len(text) - trail :])

    for token, value in zip(excerpt.tokens, excerpt.activations):
        if value > 0 and value >= threshold:
            run.append(token)
            continue
        if run:
            close_run()
        parts.append(token)
    if run:
        close_run()
    return "".join(parts)


def _token_lines(index: int, excerpt: Excerpt, levels: list[int], non_zero_only: bool) -> str:
    lines = [f"{token}\t{level}" for token, level in zip(excerpt.tokens, levels) if level or not non_zero_only]
    return f"Excerpt {index}:\n<start>\n" + defuse_control_tokens("\n".join(lines)) + "\n<end>"


def _quiet_window_with(excerpt: Excerpt, shared: set[str], quiet: float, length: int) -> Excerpt | None:
    """A window of ``excerpt`` around an occurrence of a ``shared`` token where every
    activation stays below ``quiet``; None when there is none."""
    for position, token in enumerate(excerpt.tokens):
        if token_key(token) not in shared:
            continue
        start = max(0, min(position - length // 2, len(excerpt.tokens) - length))
        window = excerpt.span(start, start + length)
        if window.peak < quiet:
            return window
    return None
