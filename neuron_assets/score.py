"""Scorers: how well a description predicts its feature on held-out text.

Every scorer takes one feature, its k candidate descriptions and a split, and returns one
:class:`Score` per description, so a scorer can batch the k candidates (the fine-tuned
simulator shares each exemplar's forward pass among them).

- ``correlation`` (Bills et al., Transluce): Pearson r between simulated and true
  activations over all tokens of E_split (the top-20 exemplars of the split plus its 5
  random sequences), concatenated; the true activations are relu(a) for pos and relu(-a)
  for neg; the fixed prefix is left out. Constant predictions score 0 and are flagged.
- ``detection`` and ``fuzzing`` (delphi): an LLM, through the explain backend's model, says
  which examples show the feature (detection) or whether the marked tokens are the
  feature's (fuzzing); the score is the balanced accuracy over *activating* examples (the
  split's sequences whose extreme exceeds ``exemplars.activating_fraction`` of the train
  max, drawn evenly from every activation decile and the top exemplars) and as many
  *non-activating* ones (the feature's own quiet sequences, below that threshold). They
  judge only the best ``score.judge_candidates`` candidates by the selecting scorer.
- ``embedding``: the description and each example embedded with MiniLM (mean pooling);
  the score is the AUC with which cosine similarity separates activating (top) from
  random examples.

Scorers are chosen by name from :data:`SCORERS` (``score.scorers``).
"""

from __future__ import annotations

import ast
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from neuron_assets.config import Config, ExplainConfig, ScoreConfig
from neuron_assets.simulate.base import Simulator
from neuron_assets.types import ActivationRecord, Exemplar, FeatureExemplars, FeatureId, Polarity, Split

CONSTANT_PREDICTION = "constant_prediction"
CONSTANT_ACTIVATION = "constant_activation"
TOO_FEW_TOKENS = "too_few_tokens"
NO_EXAMPLES = "no_examples"
NO_NEGATIVES = "no_negatives"
UNANSWERED = "unanswered"


@dataclass(frozen=True)
class Score:
    value: float  # in [-1, 1]; never NaN
    flags: tuple[str, ...] = ()  # why a value is a default (constant predictions, no examples, ...)
    n_examples: int = 0
    n_tokens: int = 0


class Scorer(Protocol):
    name: str
    simulator: str | None  # the simulator a score depends on, stored with it

    def score(self, feature: FeatureExemplars, descriptions: Sequence[str], split: Split) -> list[Score]: ...


class ScorerUnavailable(RuntimeError):
    """A scorer that cannot run with this configuration (no LLM for detection); the message says why."""


# -- the correlation scorer ------------------------------------------------------------------


def evaluation_records(feature: FeatureExemplars, split: Split, top: int = 20, random_count: int = 5) -> list[ActivationRecord]:
    """E_split: the split's top exemplars, then its random sequences (each sequence once)."""
    chosen = [e.record for e in feature.top(split)[:top]] + [e.record for e in feature.random(split)[:random_count]]
    return list({record.seq_id: record for record in chosen}.values())


def pearson_over_tokens(predicted: Sequence[np.ndarray], true: Sequence[np.ndarray]) -> Score:
    """Pearson r of two per-record token series, all records concatenated."""
    if len(predicted) != len(true):
        raise ValueError(f"{len(predicted)} predicted records for {len(true)} true ones")
    p = np.concatenate([np.asarray(x, dtype=np.float64) for x in predicted]) if predicted else np.zeros(0)
    t = np.concatenate([np.asarray(x, dtype=np.float64) for x in true]) if true else np.zeros(0)
    if p.shape != t.shape:
        raise ValueError(f"{p.size} predicted tokens for {t.size} true ones")
    n = int(p.size)
    if n < 2:
        return Score(0.0, (TOO_FEW_TOKENS,), len(true), n)
    p_centered, t_centered = p - p.mean(), t - t.mean()
    p_norm, t_norm = np.sqrt((p_centered**2).sum()), np.sqrt((t_centered**2).sum())
    if not p_norm > 1e-12 * max(1.0, np.abs(p).max()):
        return Score(0.0, (CONSTANT_PREDICTION,), len(true), n)
    if not t_norm > 0:
        return Score(0.0, (CONSTANT_ACTIVATION,), len(true), n)
    r = float((p_centered * t_centered).sum() / (p_norm * t_norm))
    return Score(float(np.clip(r, -1.0, 1.0)), (), len(true), n)


def correlation_score(predicted: Sequence[np.ndarray], records: Sequence[ActivationRecord], polarity: Polarity) -> Score:
    """Pearson r over the records' tokens after their prefix; true = the polarity's activations."""
    return pearson_over_tokens(
        [np.asarray(p)[r.prefix_len :] for p, r in zip(predicted, records)],
        [r.polarity_activations(polarity)[r.prefix_len :] for r in records],
    )


class CorrelationScorer:
    name = "correlation"

    def __init__(self, simulator: Simulator, top: int = 20, random_count: int = 5):
        self.simulator_impl = simulator
        self.simulator = simulator.name
        self.top = top
        self.random_count = random_count

    def score(self, feature: FeatureExemplars, descriptions: Sequence[str], split: Split) -> list[Score]:
        records = evaluation_records(feature, split, self.top, self.random_count)
        if not records:
            return [Score(0.0, (NO_EXAMPLES,)) for _ in descriptions]
        simulated = self.simulator_impl.simulate(list(descriptions), records)
        return [correlation_score(per_record, records, feature.feature.polarity) for per_record in simulated]


# -- classification scorers (delphi) ---------------------------------------------------------


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
    return ([JudgedExample(_plain(e.record), True) for e in positives]
            + [JudgedExample(_plain(e.record), False) for e in negatives])


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


def _plain(record: ActivationRecord) -> str:
    from neuron_assets.explain.excerpts import defuse_control_tokens

    return defuse_control_tokens("".join(record.tokens[record.prefix_len :]).replace("\n", " "))


def _marked(record: ActivationRecord, positions: set[int]) -> str:
    from neuron_assets.explain.excerpts import defuse_control_tokens

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


class EmbeddingScorer:
    """AUC of cos(description, example) separating the split's top exemplars from its random
    sequences that peak below every one of them. Sequence embeddings are cached by seq_id
    (random sequences are shared by every feature)."""

    name = "embedding"
    simulator = None

    def __init__(self, embed: Callable[[list[str]], np.ndarray], top: int = 20, random_count: int = 5):
        self.embed = embed
        self.top = top
        self.random_count = random_count
        self._cache: dict[int, np.ndarray] = {}

    def score(self, feature: FeatureExemplars, descriptions: Sequence[str], split: Split) -> list[Score]:
        top = feature.top(split)[: self.top]
        positives = [e.record for e in top]
        weakest = min((e.extreme for e in top), default=0.0)
        negatives = [e.record for e in feature.random(split)[: self.random_count]
                     if e.extreme < weakest and e.record.seq_id not in {r.seq_id for r in positives}]
        if not positives or not negatives:
            return [Score(0.5, (NO_NEGATIVES if positives else NO_EXAMPLES,), len(positives) + len(negatives))
                    for _ in descriptions]
        records = positives + negatives
        missing = [r for r in records if r.seq_id not in self._cache]
        if missing:
            for record, vector in zip(missing, self.embed([_plain(r) for r in missing])):
                self._cache[record.seq_id] = vector
        examples = np.stack([self._cache[r.seq_id] for r in records])
        queries = self.embed([d or "" for d in descriptions])
        labels = np.array([True] * len(positives) + [False] * len(negatives))
        return [Score(roc_auc(examples @ q, labels), (), len(records)) for q in queries]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random positive outranks a random negative (ties count half)."""
    from scipy.stats import rankdata

    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return 0.5
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


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


# -- the registry -------------------------------------------------------------------------------


@dataclass
class ScoringContext:
    """What scorers are built from. ``simulator_factory(name)`` builds a simulator; it and the
    judge are made on first use."""

    config: Config
    simulator_factory: Callable[[str], Simulator]
    simulators: tuple[str, ...] = ()  # correlation is scored with each; the first selects
    judge: Judge | None = None
    embedder: Callable[[list[str]], np.ndarray] | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # scorer -> why it did not run

    def make_judge(self) -> Judge:
        if self.judge is None:
            explain = self.config.explain
            from neuron_assets.llm import BACKENDS

            if explain.backend not in BACKENDS:
                raise ScorerUnavailable(
                    f"detection and fuzzing need an LLM: explain.backend '{explain.backend}' has none "
                    f"(use one of {', '.join(BACKENDS)}; a vLLM server is the openai backend with base_url)"
                )
            self.judge = LLMJudge(explain)
        return self.judge

    def make_embedder(self) -> Callable[[list[str]], np.ndarray]:
        if self.embedder is None:
            from neuron_assets.embedding import sentence_encoder

            self.embedder = sentence_encoder(self.config.score.embedding_model)
        return self.embedder


ScorerFactory = Callable[[ScoringContext], list[Scorer]]


def _correlation(context: ScoringContext) -> list[Scorer]:
    """One correlation scorer per simulator; a simulator after the first that cannot be built
    here is left out (the first, which selects, must build)."""
    from neuron_assets.simulate import SimulatorUnavailable

    score = context.config.score
    scorers = []
    for i, name in enumerate(context.simulators):
        try:
            simulator = context.simulator_factory(name)
        except SimulatorUnavailable as err:
            if i == 0:
                raise ScorerUnavailable(str(err)) from None
            context.skipped[f"correlation/{name}"] = str(err)
            continue
        scorers.append(CorrelationScorer(simulator, score.top_exemplars, score.random_exemplars))
    return scorers


def _judge_settings(config: Config) -> dict:
    score = config.score
    return dict(examples=score.judge_examples, batch=score.judge_batch, seed=score.control_seed,
                quiet=score.judge_quiet, fraction=config.exemplars.activating_fraction)


def _detection(context: ScoringContext) -> list[Scorer]:
    return [DetectionScorer(context.make_judge(), **_judge_settings(context.config))]


def _fuzzing(context: ScoringContext) -> list[Scorer]:
    return [FuzzingScorer(context.make_judge(), **_judge_settings(context.config))]


def _embedding(context: ScoringContext) -> list[Scorer]:
    score = context.config.score
    return [EmbeddingScorer(context.make_embedder(), score.top_exemplars, score.random_exemplars)]


SCORERS: dict[str, ScorerFactory] = {
    "correlation": _correlation,
    "detection": _detection,
    "fuzzing": _fuzzing,
    "embedding": _embedding,
}


def build_scorers(config: ScoreConfig, context: ScoringContext) -> tuple[list[Scorer], dict[str, str]]:
    """The configured scorers (the selecting one first), and for each one that cannot run
    here, why it was skipped. The selecting scorer is the first one named score.select_by."""
    unknown = [name for name in config.scorers if name not in SCORERS]
    if unknown:
        raise ScorerUnavailable(f"unknown scorer(s) {', '.join(unknown)} in score.scorers; known: {', '.join(SCORERS)}")
    if config.select_by not in config.scorers:
        raise ScorerUnavailable(f"score.select_by '{config.select_by}' is not in score.scorers {config.scorers}")
    context.skipped = {}
    scorers: list[Scorer] = []
    for name in sorted(dict.fromkeys(config.scorers), key=lambda n: n != config.select_by):
        try:
            scorers += SCORERS[name](context)
        except ScorerUnavailable as err:
            if name == config.select_by:
                raise
            context.skipped[name] = str(err)
    return scorers, dict(context.skipped)
