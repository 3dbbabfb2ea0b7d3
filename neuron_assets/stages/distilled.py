"""The distilled explainer: its training stage and its evaluation against its base model."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from neuron_assets.config import Config
from neuron_assets.score.crossfit import Scoring, with_provenance
from neuron_assets.stages.tables import (
    DESCRIPTIONS_TABLE,
    SEQUENCES_TABLE,
    Log,
    exemplars_of_features,
    quiet,
    read_all,
)
from neuron_assets.store import Store, with_lineage
from neuron_assets.subject import load_tokenizer
from neuron_assets.types import FeatureId, Split

DISTILLED_TABLE = "explainer_distilled"
DISTILL_EVAL_TABLE = "distilled_explainer_eval"
DISTILL_EVAL_SCORES_TABLE = "distilled_explainer_eval_scores"


@dataclass(frozen=True)
class DistilledWritten:
    explainer: object  # neuron_assets.distill.DistilledExplainer
    table_path: Path
    train_features: int
    heldout_features: int


def make_explainer_distilled(config: Config, run_id: str, log: Log = quiet, on_step=None) -> DistilledWritten:
    """Fine-tune distill.base_model on the explainer prompt (no few-shot example) -> each
    training feature's selected description (neuron_descriptions), on features disjoint from
    the held-out ones; one row per trained checkpoint in table ``explainer_distilled``."""
    from neuron_assets.distill import (
        DistillError,
        best_descriptions,
        build_examples,
        distill_explain_config,
        distill_explainer,
        load_base_tokenizer,
        split_features,
    )
    from neuron_assets.excerpts import TokenDisplay
    from neuron_assets.llm.tokens import ChatTokenCounter

    store = Store(config.store_root)
    settings = config.distill
    targets = best_descriptions(read_all(store, DESCRIPTIONS_TABLE))
    if not targets:
        store.read(DESCRIPTIONS_TABLE)  # none written: raises the error that says what to materialize
        raise DistillError("neuron_descriptions has no selected description to distil; describe features first")
    split = split_features(list(targets), settings.heldout_fraction, settings.seed)
    train = list(split.train)
    if settings.max_train_features is not None and len(train) > settings.max_train_features:
        import random

        train = sorted(random.Random(f"distill:{settings.seed}:train").sample(train, settings.max_train_features),
                       key=lambda f: (f.layer, f.polarity.value, f.kind, f.index))
    if len(train) < settings.min_train_features:
        raise DistillError(
            f"distillation needs at least {settings.min_train_features} training features (distill.min_train_features) "
            f"with a selected description outside the held-out set; this store has {len(train)} of {len(targets)} "
            f"described features ({len(split.heldout)} held out at distill.heldout_fraction {settings.heldout_fraction}): "
            "describe more features (features.neurons), or lower distill.min_train_features or distill.heldout_fraction")
    if not split.heldout:
        raise DistillError(f"no held-out feature: distill.heldout_fraction {settings.heldout_fraction} of "
                           f"{len(targets)} features picked none; raise it so the evaluation has features to score")
    features = exemplars_of_features(store, train)
    tokenizer = load_base_tokenizer(settings)
    explain = distill_explain_config(config)
    examples = build_examples(features, targets, explain, settings.prompts_per_feature, ChatTokenCounter(tokenizer),
                              TokenDisplay.for_tokenizer(load_tokenizer(config.subject)), settings.seed)
    trained = distill_explainer(examples, settings, store.checkpoint_dir / "explainer_distilled", split.heldout,
                                explain.prompt_format.value, log=log, on_step=on_step)
    row = {k: v for k, v in trained.metadata().items() if k not in ("loss_curve", "extra")}
    row.update(train_features=list(trained.train_features), heldout_features=list(trained.heldout_features),
               first_loss=trained.loss_curve[0], last_loss=trained.loss_curve[-1],
               created_at=datetime.now(timezone.utc).replace(tzinfo=None))
    frame = with_lineage(pl.DataFrame([row]), config.subject.model, config.hash, run_id)
    path = store.write(DISTILLED_TABLE, frame)
    return DistilledWritten(trained, path, len(trained.train_features), len(split.heldout))


EVAL_PLOT = "eval_best_of_k.png"  # written into the distilled checkpoint's folder by its evaluation


@dataclass(frozen=True)
class DistillEvalWritten:
    curves: list  # neuron_assets.distill.ExplainerCurve, base first
    table_path: Path
    scores_path: Path
    checkpoint: Path
    scorer: str
    features: int
    seconds: float


def make_distilled_evaluation(config: Config, run_id: str, log: Log = quiet, scoring: Scoring | None = None,
                              on_candidates=None) -> DistillEvalWritten:
    """Base vs distilled explainer on the latest checkpoint's held-out features: eval_k
    candidates each, scored by the run's selecting scorer on val and test; the mean test
    score of the val-best among k per k (table ``distilled_explainer_eval``) and every
    candidate's scores (``distilled_explainer_eval_scores``)."""
    from neuron_assets import runtime
    from neuron_assets.distill import (
        BASE,
        DISTILLED,
        DistillError,
        curve_frame,
        distill_explain_config,
        evaluate_explainers,
        read_distilled,
    )
    from neuron_assets.explain import corpus_from_sequences, make_explainer
    from neuron_assets.simulate.folds import feature_key

    started = time.perf_counter()
    store = Store(config.store_root)
    latest = store.read(DISTILLED_TABLE).sort("created_at").tail(1).row(0, named=True)
    checkpoint = Path(latest["path"])
    if not (checkpoint / "distill.json").is_file():
        raise DistillError(f"the distilled explainer {checkpoint} is gone; re-materialize explainer_distilled")
    trained = read_distilled(checkpoint)
    described = {feature_key(f): f for f in _described_features(store)}
    heldout = [described[key] for key in _in_hash_order(trained.heldout_features, config.distill.seed, described)]
    if config.distill.eval_features is not None:
        heldout = heldout[: config.distill.eval_features]
    if not heldout:
        raise DistillError("the distilled explainer's held-out features are no longer described in this store: "
                           "re-materialize neuron_descriptions and explainer_distilled")
    features = [f for f in exemplars_of_features(store, heldout) if f.top(Split.TRAIN)]
    if not features:
        raise DistillError("no held-out feature has train top exemplars to prompt with")
    scoring = scoring or Scoring.build(config, store)
    backend = config.distill.eval_backend
    explain = distill_explain_config(config, backend=backend)
    builders = {
        BASE: lambda: make_explainer(explain.model_copy(update={"model": config.distill.base_model})),
        DISTILLED: lambda: make_explainer(explain.model_copy(update={"model": str(checkpoint)})),
    }

    def release_explainers() -> None:  # the scorers' models stay; each explainer's model goes
        for key in runtime.loaded():
            if key.startswith(f'["{backend}"'):
                runtime.release(key)

    curves, scores = evaluate_explainers(
        features, builders, explain, scoring.selector, corpus_from_sequences(store.read(SEQUENCES_TABLE)),
        load_tokenizer(config.subject), log, on_candidates, release_explainers)
    scores = with_lineage(with_provenance(scores, scoring), config.subject.model, config.hash, run_id)
    frame = with_lineage(curve_frame(curves).with_columns(pl.lit(trained.version).alias("distilled_version"),
                                                          pl.lit(scoring.selector.name).alias("scorer"),
                                                          pl.lit(scoring.selector.simulator).alias("simulator")),
                         config.subject.model, config.hash, run_id)
    table = store.write(DISTILL_EVAL_TABLE, frame)
    scores_path = store.write(DISTILL_EVAL_SCORES_TABLE, scores)
    return DistillEvalWritten(curves, table, scores_path, checkpoint,
                              f"{scoring.selector.name} ({scoring.selector.simulator})", len(features),
                              time.perf_counter() - started)


def _described_features(store: Store) -> list[FeatureId]:
    from neuron_assets.distill import best_descriptions

    return list(best_descriptions(read_all(store, DESCRIPTIONS_TABLE)))


def _in_hash_order(keys, seed: int, described: dict) -> list[str]:
    from neuron_assets.distill import heldout_rank

    return sorted((k for k in keys if k in described), key=lambda k: (heldout_rank(described[k], seed), k))
