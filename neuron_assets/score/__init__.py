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

Scorers are chosen by name from :data:`SCORERS` (``score.scorers``). One module each:
``base`` (Score, the Scorer protocol), ``correlation``, ``delphi`` (detection, fuzzing and
the LLM judge), ``embedding``, ``registry``; ``select`` (best-of-k, shuffled controls,
best-of-k curve), ``crossfit`` (scoring each feature with a simulator that never saw it)
and ``validity`` (the scorer-validity benchmark).
"""

from neuron_assets.numeric import CONSTANT_ACTIVATION, CONSTANT_PREDICTION, TOO_FEW_TOKENS
from neuron_assets.score.base import (
    NO_EXAMPLES,
    NO_NEGATIVES,
    UNANSWERED,
    Score,
    Scorer,
    ScorerUnavailable,
    evaluation_records,
    plain_text,
)
from neuron_assets.score.correlation import CorrelationScorer, correlation_score, pearson_over_tokens
from neuron_assets.score.delphi import (
    JUDGE_SCORERS,
    DetectionScorer,
    FuzzingScorer,
    Judge,
    JudgedExample,
    JudgeSample,
    LLMJudge,
    activating_and_quiet,
    activating_threshold,
    balanced_accuracy,
    detection_examples,
    fuzzing_examples,
    fuzzing_marks,
    judged_candidates,
    parse_judgements,
)
from neuron_assets.score.embedding import EmbeddingScorer, roc_auc
from neuron_assets.score.registry import SCORERS, ScoringContext, build_scorers

__all__ = [
    "CONSTANT_ACTIVATION",
    "CONSTANT_PREDICTION",
    "CorrelationScorer",
    "DetectionScorer",
    "EmbeddingScorer",
    "FuzzingScorer",
    "JUDGE_SCORERS",
    "Judge",
    "JudgeSample",
    "JudgedExample",
    "LLMJudge",
    "NO_EXAMPLES",
    "NO_NEGATIVES",
    "SCORERS",
    "Score",
    "Scorer",
    "ScorerUnavailable",
    "ScoringContext",
    "TOO_FEW_TOKENS",
    "UNANSWERED",
    "activating_and_quiet",
    "activating_threshold",
    "balanced_accuracy",
    "build_scorers",
    "correlation_score",
    "detection_examples",
    "evaluation_records",
    "fuzzing_examples",
    "fuzzing_marks",
    "judged_candidates",
    "parse_judgements",
    "pearson_over_tokens",
    "plain_text",
    "roc_auc",
]
