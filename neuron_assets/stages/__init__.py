"""Every stage as a plain function: read config and upstream tables, compute, write through
the store, return a small summary (rows and paths per partition) that the caller turns into
metadata. Dagster assets (neuron_assets.defs) and the CLI call these; tests call them directly.

Every stage takes the config first; a per-feature stage then the partitions to compute (a list of
:class:`~neuron_assets.types.Partition`, looped over here, each written as soon as it is done
and reported through ``on_partition``), then the run id. The stage graph (inputs,
partitioning, the config sections that make a stage stale) is declared once, in
:mod:`neuron_assets.stages.graph`; :mod:`neuron_assets.stages.markers` judges from it what is
up to date.

Modules: ``tables`` (table names, shared readers), ``foundation`` (corpus, exemplars),
``descriptions`` (candidates), ``training`` (the simulator's data and checkpoint), ``scoring``
(scores, selected descriptions), ``distilled`` (the distilled explainer), ``graph``, ``markers``.

corpus -> exemplars -> candidate_descriptions -> simulator_training_data ->
simulator_checkpoint -> description_scores -> neuron_descriptions

Tables the scoring stages write:

- ``simulator_training_data`` (one file): every fold's held-out, stage-1 and stage-2 rows;
- ``simulator_checkpoints`` (one file, one row per trained simulator, appended): where each
  checkpoint is, its fold, the features it trained on, its loss curve summary and held-out
  correlation;
- ``description_scores`` (per layer x polarity): every candidate x scorer on val, with the
  shuffled controls;
- ``neuron_descriptions`` (per layer x polarity): the best candidate by val, its test
  score, and its shuffled control's val and test scores.

Every score row carries the simulator's version and ``simulator_saw_feature``
(:mod:`neuron_assets.score.crossfit`): false on every row a score is reported from.
"""

from neuron_assets.stages.descriptions import CandidatesWritten, make_candidate_descriptions
from neuron_assets.stages.distilled import (
    DISTILL_EVAL_SCORES_TABLE,
    DISTILL_EVAL_TABLE,
    DISTILLED_TABLE,
    EVAL_PLOT,
    DistilledWritten,
    DistillEvalWritten,
    make_distilled_evaluation,
    make_explainer_distilled,
)
from neuron_assets.stages.foundation import ExemplarRun, make_corpus, make_exemplars, sae_latents
from neuron_assets.stages.graph import STAGES, Stage, in_plain_run, partitions_of, stage_active, stage_version
from neuron_assets.stages.scoring import (
    DescriptionsWritten,
    ScoresWritten,
    make_description_scores,
    make_neuron_descriptions,
)
from neuron_assets.stages.tables import (
    CANDIDATES_TABLE,
    DESCRIPTIONS_TABLE,
    SCORES_TABLE,
    SEQUENCES_TABLE,
    TRAINING_TABLE,
    Written,
    candidate_partitions,
    features_by_kind,
    read_all,
    read_candidates,
    with_kind,
)
from neuron_assets.stages.training import (
    CheckpointWritten,
    TrainingDataWritten,
    make_simulator_checkpoint,
    make_simulator_training_data,
)

__all__ = [
    "CANDIDATES_TABLE",
    "CandidatesWritten",
    "CheckpointWritten",
    "DESCRIPTIONS_TABLE",
    "DISTILLED_TABLE",
    "DISTILL_EVAL_SCORES_TABLE",
    "DISTILL_EVAL_TABLE",
    "DescriptionsWritten",
    "DistillEvalWritten",
    "DistilledWritten",
    "EVAL_PLOT",
    "ExemplarRun",
    "SCORES_TABLE",
    "SEQUENCES_TABLE",
    "STAGES",
    "ScoresWritten",
    "Stage",
    "TRAINING_TABLE",
    "TrainingDataWritten",
    "Written",
    "candidate_partitions",
    "features_by_kind",
    "in_plain_run",
    "make_candidate_descriptions",
    "make_corpus",
    "make_description_scores",
    "make_distilled_evaluation",
    "make_exemplars",
    "make_explainer_distilled",
    "make_neuron_descriptions",
    "make_simulator_checkpoint",
    "make_simulator_training_data",
    "partitions_of",
    "read_all",
    "read_candidates",
    "sae_latents",
    "stage_active",
    "stage_version",
    "with_kind",
]
