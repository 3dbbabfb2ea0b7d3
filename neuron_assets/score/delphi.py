"""delphi's classification scorers, ``detection`` and ``fuzzing``, and the LLM judge.

An LLM (the explain backend's model, through the LLM client layer) says which examples show
the feature (detection) or whether the marked tokens are the feature's (fuzzing). The score
is the balanced accuracy over *activating* examples (the split's sequences whose extreme
exceeds ``exemplars.activating_fraction`` of the feature's one activation scale, drawn in
turn from the top exemplars and every activation decile) and *non-activating* ones (the
feature's own quiet sequences, below that threshold). Judges see only the best
``score.judge_candidates`` candidates by the selecting scorer (:func:`judged_candidates`).
"""

from __future__ import annotations

import ast
import random
import re
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from neuron_assets.config import ExplainConfig
from neuron_assets.score.base import NO_EXAMPLES, NO_NEGATIVES, UNANSWERED, Score, Scorer, ScorerUnavailable, plain_text
from neuron_assets.types import ActivationRecord, Exemplar, FeatureExemplars, FeatureId, Split


@dataclass(frozen=True)
class JudgedExample:
    text: str
    is_positive: bool  # what a perfect judge answers


def balanced_accuracy(truth: Sequence[bool], answers: Sequence[bool | None]) -> Score:
    """(TPR + TNR) / 2 over the answered examples; unanswered ones are flagged, not guessed."""
    answered = [(t, a) for t, a in zip(truth, answers) if a is not None]
    flags = (f"{UNANSWERED}:{len(truth) - len(answered)}",) if len(answered) < len(truth) else ()
    positives = [a for t, a in answered if t]
    negatives = [a for t, a in answered if not t]
    if not positives or not negatives:
        return Score(0.5, flags + ((NO_NEGATIVES if positives else NO_EXAMPLES),), len(truth))
    tpr = sum(positives) / len(positives)
    tnr = sum(not a for a in negatives) / len(negatives)
    return Score(float((tpr + tnr) / 2), flags, len(truth))


class Judge(Protocol):
    """An LLM that answers chat prompts (the explain backend's model)."""

    name: str

    def answer(self, conversations: Sequence[Sequence[dict[str, str]]]) -> list[str | None]: ...


DETECTION_SYSTEM = (
    "You are an intelligent and meticulous linguistics researcher. You will be given a feature of text, "
    "such as \"male pronouns\" or \"text with negative sentiment\", and several numbered text examples. "
    "Decide for each example whether it contains the feature. Answer with a Python list of 0s and 1s, one per "
    "example in order (1 = contains the feature), and nothing else."
)
FUZZING_SYSTEM = (
    "You are an intelligent and meticulous linguistics researcher. You will be given a feature of text and "
    "several numbered text examples in which some tokens are marked <<like this>>. Decide for each example whether "
    "the marked tokens are where the feature is (1) or the marks are wrong (0). Answer with a Python list of 0s and "
    "1s, one per example in order, and nothing else."
)


JUDGE_SCORERS = ("detection", "fuzzing")
"""Scorers that ask an LLM per candidate; score.judge_candidates limits what they judge."""


@dataclass(frozen=True)
class JudgeSample:
    """How many examples a judge sees per feature (delphi's defaults: 50 activating, 5 from
    each of 10 deciles, 50 non-activating), and the activating threshold's fraction."""

    activating: int = 50
    quiet: int = 50
    fraction: float = 0.2


class ClassificationScorer:
    """Detection or fuzzing: examples are shown ``batch`` at a time, in a seeded order."""

    name: str
    system: str
    simulator = None

    def __init__(self, judge: Judge, examples: int = 50, batch: int = 5, seed: int = 0, quiet: int | None = None,
                 fraction: float = 0.2):
        """``examples`` activating and ``quiet`` (default: as many) non-activating examples per
        feature, ``batch`` per prompt; ``fraction``: exemplars.activating_fraction."""
        self.judge = judge
        self.sample = JudgeSample(examples, examples if quiet is None else quiet, fraction)
        self.batch = batch
        self.seed = seed

    @staticmethod
    def make_examples(feature: FeatureExemplars, split: Split, sample: JudgeSample,
                      rng: random.Random) -> list[JudgedExample]:
        raise NotImplementedError

    def score(self, feature: FeatureExemplars, descriptions: Sequence[str], split: Split) -> list[Score]:
        rng = random.Random(f"{self.seed}:{self.name}:{feature.feature}")
        examples = self.make_examples(feature, split, self.sample, rng)
        if not examples:
            return [Score(0.5, (NO_EXAMPLES,)) for _ in descriptions]
        rng.shuffle(examples)
        batches = [examples[i : i + self.batch] for i in range(0, len(examples), self.batch)]
        conversations = [self._prompt(d, b) for d in descriptions for b in batches]
        answers = self.judge.answer(conversations)
        scores = []
        for i, _ in enumerate(descriptions):
            judged: list[bool | None] = []
            for j, batch in enumerate(batches):
                judged += parse_judgements(answers[i * len(batches) + j], len(batch))
            scores.append(balanced_accuracy([e.is_positive for e in examples], judged))
        return scores

    def _prompt(self, description: str, batch: Sequence[JudgedExample]) -> list[dict[str, str]]:
        shown = "\n".join(f"Example {i}: {e.text}" for i, e in enumerate(batch))
        return [
            {"role": "system", "content": self.system},
            {"role": "user", "content": f"Feature: {description}\n\n{shown}\n\nAnswer with a list of {len(batch)} numbers."},
        ]


class DetectionScorer(ClassificationScorer):
    name = "detection"
    system = DETECTION_SYSTEM

    @staticmethod
    def make_examples(feature, split, sample, rng):
        return detection_examples(feature, split, sample, rng)


class FuzzingScorer(ClassificationScorer):
    name = "fuzzing"
    system = FUZZING_SYSTEM

    @staticmethod
    def make_examples(feature, split, sample, rng):
        return fuzzing_examples(feature, split, sample, rng)


def parse_judgements(answer: str | None, n: int) -> list[bool | None]:
    """The last Python list of n 0/1 values in an answer; anything else is n unanswered."""
    if answer:
        for candidate in reversed(re.findall(r"\[[^\[\]]*\]", answer)):
            try:
                values = ast.literal_eval(candidate)
            except (ValueError, SyntaxError):
                continue
            if isinstance(values, list) and len(values) == n and all(v in (0, 1) for v in values):
                return [bool(v) for v in values]
    return [None] * n


def detection_examples(feature: FeatureExemplars, split: Split, sample: JudgeSample,
                       rng: random.Random) -> list[JudgedExample]:
    """The split's activating examples (true) and quiet ones (false), shown plain."""
    positives, negatives, _ = activating_and_quiet(feature, split, sample, rng)
    return ([JudgedExample(plain_text(e.record), True) for e in positives]
            + [JudgedExample(plain_text(e.record), False) for e in negatives])


def fuzzing_examples(feature: FeatureExemplars, split: Split, sample: JudgeSample,
                     rng: random.Random) -> list[JudgedExample]:
    """delphi's fuzzing: each activating example marked at its activating tokens (above the
    threshold; true), each quiet example marked at the positions of a random activating
    example's marks (false), so both show marks of the same count and place."""
    polarity = feature.feature.polarity
    positives, negatives, threshold = activating_and_quiet(feature, split, sample, rng)
    marks = [fuzzing_marks(e.record.polarity_activations(polarity)[e.record.prefix_len :], threshold)
             for e in positives]
    examples = [JudgedExample(_marked(e.record, m), True) for e, m in zip(positives, marks)]
    for exemplar in negatives:
        length = len(exemplar.record.tokens) - exemplar.record.prefix_len
        borrowed = {p for p in rng.choice(marks) if p < length} if marks else set()
        examples.append(JudgedExample(_marked(exemplar.record, borrowed or _random_positions(exemplar.record, 1, rng)),
                                      False))
    return examples


def activating_threshold(feature: FeatureExemplars, fraction: float) -> float:
    """A sequence activates when its extreme exceeds this: fraction of the feature's one
    activation scale (FeatureStats.scale, its train max; 0 when it is not positive), the rule
    the exemplar pass splits quantile from quiet by and fuzzing marks tokens by."""
    return fraction * max(float(feature.stats.scale), 0.0)


def activating_and_quiet(feature: FeatureExemplars, split: Split, sample: JudgeSample,
                         rng: random.Random) -> tuple[list[Exemplar], list[Exemplar], float]:
    """(activating, non-activating, threshold) examples of one split.

    Activating: sequences above the threshold, drawn in turn from each stratum, the top
    exemplars and every activation-quantile bin (delphi samples every quantile, the top
    one included), so with at least as many wanted as strata every non-empty stratum is
    shown; each stratum is drawn at random. Non-activating: the feature's quiet sequences
    (at or below the threshold), then its random sequences below it, none shown twice."""
    threshold = activating_threshold(feature, sample.fraction)
    strata: dict[object, list[Exemplar]] = {"top": [e for e in feature.top(split) if e.extreme > threshold]}
    for exemplar in feature.quantile(split):
        if exemplar.extreme > threshold:
            strata.setdefault(exemplar.bin if exemplar.bin is not None else exemplar.rank, []).append(exemplar)
    positives, seen = [], set()
    order = ["top"] + sorted((k for k in strata if k != "top"), reverse=True)  # strongest first when few are wanted
    pools = [rng.sample(strata[key], len(strata[key])) for key in order]
    while len(positives) < sample.activating and any(pools):
        for pool in pools:
            while pool and pool[-1].record.seq_id in seen:
                pool.pop()
            if pool and len(positives) < sample.activating:
                exemplar = pool.pop()
                seen.add(exemplar.record.seq_id)
                positives.append(exemplar)
    negatives = []
    for exemplar in feature.quiet(split) + feature.random(split):
        if len(negatives) >= sample.quiet:
            break
        if exemplar.extreme <= threshold and exemplar.record.seq_id not in seen:
            seen.add(exemplar.record.seq_id)
            negatives.append(exemplar)
    return positives, negatives, threshold


def judged_candidates(scores, candidates: dict[FeatureId, Sequence[str | None]], selector: Scorer,
                      limit: int | str) -> dict[FeatureId, list[str | None]]:
    """The candidates the judges see: per feature, the best ``limit`` by the selector's val
    score in ``scores`` (ties: the lower number; unscored ones last), the others None so the
    candidate numbers stay; every candidate when ``limit`` is 'all'."""
    if limit == "all":
        return {feature: list(options) for feature, options in candidates.items()}
    import polars as pl

    rows = scores.filter((pl.col("scorer") == selector.name) & (pl.col("role") == "candidate")
                         & (pl.col("split") == Split.VAL.value)
                         & (pl.col("simulator").is_null() if selector.simulator is None
                            else pl.col("simulator") == selector.simulator))
    value = {(r["layer"], r["polarity"], r["neuron"], r["candidate"]): r["score"] for r in rows.iter_rows(named=True)}
    chosen = {}
    for feature, options in candidates.items():
        key = (feature.layer, feature.polarity.value, feature.index)
        ranked = sorted((c for c, d in enumerate(options) if d),
                        key=lambda c: (-value.get((*key, c), -np.inf), c))[: int(limit)]
        chosen[feature] = [d if c in ranked else None for c, d in enumerate(options)]
    return chosen


def fuzzing_marks(values: np.ndarray, threshold: float) -> set[int]:
    """The tokens a correct fuzzing example marks: positions (after the prefix) whose
    activation exceeds the activating threshold; the strongest one when none does; none
    when nothing is positive."""
    if not (values.size and values.max() > 0):
        return set()
    above = set(np.nonzero(values > threshold)[0].tolist())
    return above or {int(values.argmax())}


def _marked(record: ActivationRecord, positions: set[int]) -> str:
    from neuron_assets.excerpts import defuse_control_tokens

    parts = []
    for i, token in enumerate(record.tokens[record.prefix_len :]):
        token = token.replace("\n", " ")
        core = token.lstrip()
        parts.append(token[: len(token) - len(core)] + f"<<{core}>>" if i in positions and core else token)
    return defuse_control_tokens("".join(parts))


def _random_positions(record: ActivationRecord, count: int, rng: random.Random) -> set[int]:
    n = len(record.tokens) - record.prefix_len
    return set(rng.sample(range(n), min(count, n))) if n > 0 else set()


# -- the embedding scorer ---------------------------------------------------------------------


# -- the judge: the explain backend's model answering classification prompts ---------------------


class LLMJudge:
    """The explain section's model (openai, vllm or transformers) through the LLM client
    layer, greedy. The same loaded model as the explainer's in one process (a transformers
    or vllm model is cached by neuron_assets.runtime). An answer that never came (a timeout
    or 5xx after the client's retries, a prompt beyond the model's context) is None:
    unanswered, counted in the flags. A refused configuration (401, 404, a wrong model)
    raises neuron_assets.llm.LLMConfigurationError naming the setting to fix."""

    max_tokens = 64  # a list of 0/1 for a batch of examples, with room for a short preamble

    def __init__(self, config: ExplainConfig):
        from neuron_assets.llm import LLMUnavailable, open_llm, settings_from_explain

        if not config.model:
            raise ScorerUnavailable("detection and fuzzing need explain.model (the judge model)")
        try:
            self.llm = open_llm(settings_from_explain(config))
        except LLMUnavailable as err:
            raise ScorerUnavailable(f"detection and fuzzing: {err}") from None
        except (ValueError, RuntimeError) as err:  # e.g. too little free GPU memory beside the simulator
            raise ScorerUnavailable(
                f"detection and fuzzing: {config.backend} could not start {config.model} here ({err}); on a GPU "
                "shared with the simulator, leave it room with explain.engine_kwargs.gpu_memory_utilization") from None
        self.name = config.backend
        self.max_attempts = config.max_retries + 1
        self.prompt_tokens = self.completion_tokens = self.unanswered = 0
        self.failures: list[str] = []  # the reasons of unanswered prompts, for the run log

    def answer(self, conversations: Sequence[Sequence[dict[str, str]]]) -> list[str | None]:
        from neuron_assets.llm import Request, ask

        requests = [Request(messages=tuple(dict(m) for m in c), max_tokens=self.max_tokens) for c in conversations]
        # every text is accepted (a greedy answer does not change when asked again; parse_judgements
        # reads what it can): the attempts go to transport failures, retried by the backend
        answers = ask(self.llm, requests, lambda reply: reply.text, self.max_attempts)
        for a in answers:
            self.prompt_tokens += a.prompt_tokens
            self.completion_tokens += a.completion_tokens
            if a.failure is not None:
                self.unanswered += 1
                self.failures.append(a.failure)
        return [a.value if a.failure is None else None for a in answers]
