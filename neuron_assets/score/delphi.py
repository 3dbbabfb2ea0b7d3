"""delphi's classification scorers, ``detection`` and ``fuzzing``, and the LLM judge.

An LLM (the explain backend's model, through the LLM client layer) says which examples show
the feature (detection) or whether the marked tokens are the feature's (fuzzing). The score
is the balanced accuracy over *activating* examples (the split's sequences whose extreme
exceeds ``exemplars.activating_fraction`` of the feature's one activation scale, drawn in
turn from the top exemplars and every activation decile) and *non-activating* ones (the
feature's own quiet sequences, below that threshold). Judges see only the best
``score.judge_candidates`` candidates by the selecting scorer (:func:`judged_candidates`).

How a judge answers. A judge that reads logprobs (:class:`LLMJudge`: every LLM backend)
sees one example per prompt (after two solved ones) and is asked for one digit; its
decision is read from the model's distribution over the allowed first tokens "0" and "1"
(P("1") / (P("0") + P("1")) > 0.5), so a model that would never write a parseable answer,
like a 135M one, still decides every example. An example whose logprobs did not come (a server without
them) is asked again the chat way: examples shown ``batch`` at a time, answered with a
Python list of 0s and 1s (:func:`parse_judgements`), the only way for a judge that has no
logprobs. Flags: ``chat_answers:N`` (N examples fell back to the list), ``unanswered:N``
(N examples neither way decided: the parse-failure count, 0 when logprobs work).
"""

from __future__ import annotations

import ast
import logging
import math
import random
import re
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from neuron_assets.config import ExplainConfig
from neuron_assets.score.base import NO_EXAMPLES, NO_NEGATIVES, UNANSWERED, Score, Scorer, ScorerUnavailable, plain_text
from neuron_assets.types import ActivationRecord, Exemplar, FeatureExemplars, FeatureId, Split

log = logging.getLogger(__name__)

CHAT_ANSWERS = "chat_answers"  # flag: examples decided by a chat list answer, not by logprobs
ANSWER_CHOICES = ("0", "1")  # the digits a one-example prompt asks for: no, yes


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
    """An LLM that answers chat prompts (the explain backend's model). A judge that reads
    logprobs also has ``probabilities(conversations) -> list[float | None]``: per one-example
    prompt, the probability that the answer is "1", None where no logprobs came back."""

    name: str

    def answer(self, conversations: Sequence[Sequence[dict[str, str]]]) -> list[str | None]: ...


@dataclass(frozen=True)
class Judgement:
    """One example as a judge decided it: ``answer`` None when undecided; ``probability`` the
    judge's P("1") when it came from logprobs; ``by``: logprobs, chat or None."""

    is_positive: bool
    answer: bool | None
    probability: float | None = None
    by: str | None = None


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
# One example per prompt, answered by its first token (read through logprobs)
DETECTION_ONE_SYSTEM = (
    "You are an intelligent and meticulous linguistics researcher. You will be given a feature of text, "
    "such as \"male pronouns\" or \"text with negative sentiment\", and one text example. Decide whether the "
    "example contains the feature. Answer 1 if it does and 0 if it does not: that one digit and nothing else."
)
DETECTION_ONE_QUESTION = "Does the example contain the feature? Answer 1 or 0."
FUZZING_ONE_SYSTEM = (
    "You are an intelligent and meticulous linguistics researcher. You will be given a feature of text and one "
    "text example in which some tokens are marked <<like this>>. Decide whether the marked tokens are where the "
    "feature is. Answer 1 if they are and 0 if the marks are wrong: that one digit and nothing else."
)
FUZZING_ONE_QUESTION = "Are the marked tokens where the feature is? Answer 1 or 0."
# Two solved examples before the one asked, as earlier turns: with them SmolLM2-135M's P("1")
# ranks activating above quiet examples (AUC 0.61 pooled on planted features, 0.34 without)
DETECTION_SHOTS = (('the word "apple"', "She ate an apple after lunch.", "1"),
                   ('the word "apple"', "The train left the station late.", "0"))
FUZZING_SHOTS = (('the word "apple"', "She ate an <<apple>> after lunch.", "1"),
                 ('the word "apple"', "The <<train>> left the station late.", "0"))


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
    """Detection or fuzzing, over the examples in a seeded order: one example per prompt read
    through logprobs where the judge can, the rest ``batch`` at a time as a chat list."""

    name: str
    system: str
    one_system: str
    one_question: str
    one_shots: tuple[tuple[str, str, str], ...]  # (description, example, answer) shown before the one asked
    simulator = None

    def __init__(self, judge: Judge, examples: int = 50, batch: int = 5, seed: int = 0, quiet: int | None = None,
                 fraction: float = 0.2):
        """``examples`` activating and ``quiet`` (default: as many) non-activating examples per
        feature, ``batch`` per chat prompt; ``fraction``: exemplars.activating_fraction."""
        self.judge = judge
        self.sample = JudgeSample(examples, examples if quiet is None else quiet, fraction)
        self.batch = batch
        self.seed = seed

    @staticmethod
    def make_examples(feature: FeatureExemplars, split: Split, sample: JudgeSample,
                      rng: random.Random) -> list[JudgedExample]:
        raise NotImplementedError

    def score(self, feature: FeatureExemplars, descriptions: Sequence[str], split: Split) -> list[Score]:
        judged = self.judgements(feature, descriptions, split)
        if judged is None:
            return [Score(0.5, (NO_EXAMPLES,)) for _ in descriptions]
        scores = []
        for judgements in judged:
            score = balanced_accuracy([j.is_positive for j in judgements], [j.answer for j in judgements])
            by_chat = sum(j.by == "chat" for j in judgements) if self._reads_logprobs else 0
            flags = ((f"{CHAT_ANSWERS}:{by_chat}",) if by_chat else ()) + score.flags
            scores.append(Score(score.value, flags, score.n_examples, score.n_tokens))
        return scores

    def judgements(self, feature: FeatureExemplars, descriptions: Sequence[str],
                   split: Split) -> list[list[Judgement]] | None:
        """Per description, every example as the judge decided it (None: no examples)."""
        rng = random.Random(f"{self.seed}:{self.name}:{feature.feature}")
        examples = self.make_examples(feature, split, self.sample, rng)
        if not examples:
            return None
        rng.shuffle(examples)
        judged: list[list[Judgement]] = [[Judgement(e.is_positive, None) for e in examples] for _ in descriptions]
        if self._reads_logprobs:
            prompts = [self._one_prompt(d, e) for d in descriptions for e in examples]
            probabilities = iter(self.judge.probabilities(prompts))  # type: ignore[attr-defined]
            for row in judged:
                for j, example in enumerate(examples):
                    p = next(probabilities)
                    if p is not None:
                        row[j] = Judgement(example.is_positive, p > 0.5, p, "logprobs")
        self._ask_as_lists(descriptions, examples, judged)
        return judged

    @property
    def _reads_logprobs(self) -> bool:
        return callable(getattr(self.judge, "probabilities", None))

    def _ask_as_lists(self, descriptions: Sequence[str], examples: Sequence[JudgedExample],
                      judged: list[list[Judgement]]) -> None:
        """The examples no logprobs decided, ``batch`` per prompt, answered as a chat list."""
        batches = []  # (description index, example indices)
        for i, _ in enumerate(descriptions):
            pending = [j for j, judgement in enumerate(judged[i]) if judgement.by is None]
            batches += [(i, pending[k : k + self.batch]) for k in range(0, len(pending), self.batch)]
        if not batches:
            return
        answers = self.judge.answer([self._prompt(descriptions[i], [examples[j] for j in batch])
                                     for i, batch in batches])
        for (i, batch), answer in zip(batches, answers):
            for j, value in zip(batch, parse_judgements(answer, len(batch))):
                judged[i][j] = Judgement(examples[j].is_positive, value, None, "chat" if value is not None else None)

    def _prompt(self, description: str, batch: Sequence[JudgedExample]) -> list[dict[str, str]]:
        shown = "\n".join(f"Example {i}: {e.text}" for i, e in enumerate(batch))
        return [
            {"role": "system", "content": self.system},
            {"role": "user", "content": f"Feature: {description}\n\n{shown}\n\nAnswer with a list of {len(batch)} numbers."},
        ]

    def _one_prompt(self, description: str, example: JudgedExample) -> list[dict[str, str]]:
        # what every prompt shares first, the description before the example: a server's prefix
        # cache computes the system message and the solved examples once
        messages = [{"role": "system", "content": self.one_system}]
        for shown, text, answer in self.one_shots:
            messages += [{"role": "user", "content": self._one_question(shown, text)},
                         {"role": "assistant", "content": answer}]
        return messages + [{"role": "user", "content": self._one_question(description, example.text)}]

    def _one_question(self, description: str, text: str) -> str:
        return f"Feature: {description}\n\nExample: {text}\n\n{self.one_question}"


class DetectionScorer(ClassificationScorer):
    name = "detection"
    system = DETECTION_SYSTEM
    one_system = DETECTION_ONE_SYSTEM
    one_question = DETECTION_ONE_QUESTION
    one_shots = DETECTION_SHOTS

    @staticmethod
    def make_examples(feature, split, sample, rng):
        return detection_examples(feature, split, sample, rng)


class FuzzingScorer(ClassificationScorer):
    name = "fuzzing"
    system = FUZZING_SYSTEM
    one_system = FUZZING_ONE_SYSTEM
    one_question = FUZZING_ONE_QUESTION
    one_shots = FUZZING_SHOTS

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
    or vllm model is cached by neuron_assets.runtime).

    :meth:`probabilities` reads each one-example prompt's answer from the logprobs of "0"
    and "1" (every backend: a local forward pass, vLLM's prompt logprobs, a server's chat
    logprobs); a server that gives none fails those requests, and after a round in which
    every request failed so, the judge stops asking for logprobs and answers as chat lists
    (:meth:`answer`). An answer that never came (a timeout or 5xx after the client's
    retries, a prompt beyond the model's context) is None: unanswered, counted in the
    flags. A refused configuration (401, 404, a wrong model) raises
    neuron_assets.llm.LLMConfigurationError naming the setting to fix. With ``cache`` (a
    neuron_assets.llm.AnswerCache) every answer is kept and a rerun pays for none twice."""

    max_tokens = 64  # a list of 0/1 for a batch of examples, with room for a short preamble

    def __init__(self, config: ExplainConfig, cache=None):
        from neuron_assets.llm import LLMUnavailable, open_llm, settings_from_explain, with_answer_cache

        if not config.model:
            raise ScorerUnavailable("detection and fuzzing need explain.model (the judge model)")
        try:
            self.llm = with_answer_cache(open_llm(settings_from_explain(config)), cache)
        except LLMUnavailable as err:
            raise ScorerUnavailable(f"detection and fuzzing: {err}") from None
        except (ValueError, RuntimeError) as err:  # e.g. too little free GPU memory beside the simulator
            raise ScorerUnavailable(
                f"detection and fuzzing: {config.backend} could not start {config.model} here ({err}); on a GPU "
                "shared with the simulator, leave it room with explain.engine_kwargs.gpu_memory_utilization") from None
        self.name = config.backend
        self.max_attempts = config.max_retries + 1
        self.prompt_tokens = self.completion_tokens = self.unanswered = 0
        self.decided_by_logprobs = 0
        self.failures: list[str] = []  # the reasons of unanswered prompts, for the run log
        self.reads_logprobs = hasattr(self.llm, "choice_logprobs")

    def probabilities(self, conversations: Sequence[Sequence[dict[str, str]]]) -> list[float | None]:
        """Per one-example prompt, P("1") / (P("0") + P("1")) of the answer's first token; None
        where no logprobs came back (the caller asks those as a chat list)."""
        if not self.reads_logprobs or not conversations:
            return [None] * len(conversations)
        from neuron_assets.llm import ChoiceRequest

        requests = [ChoiceRequest(tuple(dict(m) for m in c), ANSWER_CHOICES) for c in conversations]
        replies = self.llm.choice_logprobs(requests, self.max_attempts)
        out: list[float | None] = []
        missing: list[str] = []
        for reply in replies:
            self.prompt_tokens += reply.prompt_tokens
            self.completion_tokens += reply.completion_tokens
            p = yes_probability(reply.logprobs[0]) if reply.logprobs is not None else None
            if p is None:
                missing.append(reply.failure or 'neither "0" nor "1" among the likely first tokens of the answer')
            out.append(p)
        self.decided_by_logprobs += len(out) - len(missing)
        if missing and len(missing) == len(replies) and all(_no_logprobs_here(m) for m in missing):
            self.reads_logprobs = False
            log.warning("the judge %s gives no logprobs (%s); detection and fuzzing ask for chat lists instead",
                        self.llm.model, missing[0])
        return out

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


def yes_probability(logprobs) -> float | None:
    """P("1") / (P("0") + P("1")) from the log-probabilities of ("0", "1"); None when neither
    is known (-inf)."""
    no, yes = (float(v) for v in logprobs[:2])
    if math.isinf(no) and math.isinf(yes):
        return None
    if math.isinf(yes):
        return 0.0
    if math.isinf(no):
        return 1.0
    return 1.0 / (1.0 + math.exp(no - yes))


def _no_logprobs_here(failure: str) -> bool:
    """A failure that asking again will not change: the server refuses or lacks logprobs."""
    return failure.startswith(("HTTP 400", "HTTP 422", "no logprobs"))
