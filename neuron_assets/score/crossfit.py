"""Scoring a run's features so that no score comes from a simulator that saw its feature.

:class:`Scoring` builds the configured scorers once per run. With the fine-tuned simulator
trained here, one simulator is trained per fold (simulate.training.folds) and its correlation
scorer is a :class:`CrossFitScorer`: each feature is scored by the simulator of its own fold,
which never trained on it. :func:`with_provenance` stamps every score row with the
simulator's version and ``simulator_saw_feature``; :func:`leaked_rows` counts the rows where
it is true (the score assets' check fails on any)."""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from neuron_assets import runtime
from neuron_assets.config import Config
from neuron_assets.score.base import Scorer
from neuron_assets.score.correlation import CorrelationScorer
from neuron_assets.score.registry import ScoringContext, build_scorers
from neuron_assets.simulate import FINETUNED, build_simulator, needs_checkpoint, simulator_names
from neuron_assets.simulate.checkpoints import FoldCheckpoint, latest_fold_checkpoints
from neuron_assets.simulate.folds import feature_key, fold_of
from neuron_assets.store import Store
from neuron_assets.types import FeatureExemplars, FeatureId, Polarity, Split



@dataclass
class Scoring:
    """The scorers of one run, built once (the simulators load once for every partition).

    With the fine-tuned simulator trained here, its correlation scorer is a
    :class:`CrossFitScorer`: each feature is scored by the simulator of its own fold, which
    never trained on it."""

    scorers: list[Scorer]
    skipped: dict[str, str]  # scorer -> why it did not run
    simulator_version: str | None  # the fine-tuned simulator's version(s), '+'-joined per fold
    folds: dict[int, FoldCheckpoint] = field(default_factory=dict)  # empty: not cross-fitted
    external_checkpoint: bool = False  # simulate.finetuned.checkpoint: its training features are unknown

    @classmethod
    def build(cls, config: Config, store: Store, judge=None) -> Scoring:
        """The configured scorers on the latest checkpoints, held in the runtime cache: the last
        one built is reused while neither the config nor the checkpoints change, until the
        stage ends and runtime.release_all drops it with the simulators it loaded."""
        names = simulator_names(config)
        folds = {}
        if needs_checkpoint(config):  # none yet: the fine-tuned simulator is unavailable, as it says
            folds = latest_fold_checkpoints(store, config) or {}
        external = FINETUNED in names and bool(config.simulate.finetuned.checkpoint)
        version = ("+".join(folds[f].version for f in sorted(folds)) if folds else
                   (config.simulate.finetuned.checkpoint if FINETUNED in names else None))
        key = runtime.cache_key("scoring", config.model_dump_json(), str(store.root), version, id(judge))
        for other in runtime.loaded():  # only the last one built is kept
            if other.startswith('["scoring"') and other != key:
                runtime.release(other)

        def simulator(name: str):
            checkpoint = folds[0].path if (name == FINETUNED and folds) else None
            return build_simulator(config, checkpoint, name)

        def build() -> Scoring:
            context = ScoringContext(config, simulator, tuple(names), judge)
            scorers, skipped = build_scorers(config.score, context)
            if folds:
                scorers = [CrossFitScorer.of(s, config, folds) if _is_finetuned_correlation(s) else s for s in scorers]
            return cls(scorers, skipped, version, folds, external)

        return runtime.shared(key, build)

    @property
    def selector(self) -> Scorer:
        """The scorer whose val score selects (score.select_by; with the simulate.backend simulator)."""
        return self.scorers[0]

    def provenance(self, feature: FeatureId, simulator: str | None) -> tuple[str | None, bool | None]:
        """(simulator version, whether that simulator trained on ``feature``) for a row scored
        with ``simulator``: a simulator not trained here never saw a feature; a checkpoint
        given in simulate.finetuned.checkpoint has unknown training features (None)."""
        if simulator != FINETUNED:
            return None, False
        if not self.folds:
            return self.simulator_version, None if self.external_checkpoint else False
        fold = self.folds[fold_of(feature, len(self.folds))]
        return fold.version, feature_key(feature) in fold.trained_features


def _is_finetuned_correlation(scorer) -> bool:
    return isinstance(scorer, CorrelationScorer) and scorer.simulator == FINETUNED


class CrossFitScorer:
    """The correlation scorer of the fine-tuned simulator, cross-fitted: a feature of fold f
    is scored by fold f's simulator (trained only on other folds' features)."""

    name = "correlation"
    simulator = FINETUNED

    def __init__(self, by_fold: dict[int, Scorer]):
        self.by_fold = by_fold

    @classmethod
    def of(cls, first: CorrelationScorer, config: Config, folds: dict[int, FoldCheckpoint]) -> CrossFitScorer:
        """From the scorer built on fold 0's simulator, the other folds' on theirs."""
        by_fold = {0: first}
        for fold, checkpoint in folds.items():
            if fold != 0:
                by_fold[fold] = CorrelationScorer(build_simulator(config, checkpoint.path, FINETUNED),
                                                  first.top, first.random_count)
        return cls(by_fold)

    def score(self, feature: FeatureExemplars, descriptions, split: Split):
        return self.by_fold[fold_of(feature.feature, len(self.by_fold))].score(feature, descriptions, split)

    def score_many(self, items, split: Split):
        """:meth:`score` of every (feature, descriptions): each fold's features together."""
        out = [None] * len(items)
        by_fold: dict[int, list[int]] = {}
        for i, (feature, _) in enumerate(items):
            by_fold.setdefault(fold_of(feature.feature, len(self.by_fold)), []).append(i)
        for fold, chosen in by_fold.items():
            for i, scores in zip(chosen, self.by_fold[fold].score_many([items[i] for i in chosen], split)):
                out[i] = scores
        return out


def with_provenance(frame: pl.DataFrame, scoring: Scoring) -> pl.DataFrame:
    """``frame`` (rows with layer, polarity, neuron, simulator) with each row's
    ``simulator_version`` and ``simulator_saw_feature``."""
    versions, saw = [], []
    kinds = frame["kind"] if "kind" in frame.columns else pl.repeat("neuron", frame.height, eager=True)
    rows = zip(kinds, *(frame[c] for c in ("layer", "polarity", "neuron", "simulator")))
    for kind, layer, polarity, neuron, simulator in rows:
        version, seen = scoring.provenance(FeatureId(layer, neuron, Polarity(polarity), kind), simulator)
        versions.append(version)
        saw.append(seen)
    return frame.with_columns(pl.Series("simulator_version", versions, pl.String),
                              pl.Series("simulator_saw_feature", saw, pl.Boolean))


def leaked_rows(frame: pl.DataFrame) -> int:
    """Rows scored by a simulator that trained on their feature (simulator_saw_feature true;
    a table without the column counts every row: nothing says it is clean)."""
    if "simulator_saw_feature" not in frame.columns:
        return frame.height
    return int(frame["simulator_saw_feature"].fill_null(False).sum())
