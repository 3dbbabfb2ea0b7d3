"""Every stage as a plain function: read config and upstream tables, compute, write through
the store, return a small summary (rows and paths per partition) that the caller turns into
metadata. Dagster assets (neuron_assets.defs) and the CLI call these; tests call them directly.

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

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import polars as pl

from neuron_assets.config import Config
from neuron_assets.corpus import plan_corpus
from neuron_assets.exemplars import (
    NEURON_KIND,
    SAE_KIND,
    SEQUENCE_COLUMNS,
    SaeLatents,
    ExemplarPlan,
    checkpoint_name,
    collect_exemplars,
    feature_axis,
    load_feature_exemplars,
    plan_exemplar_pass,
    with_feature_kind,
    select_neurons,
)
from neuron_assets.features.unigram import UnigramCandidate, confirm_unigrams, unigram_candidates, with_confirmation
from neuron_assets.progress import Progress
from neuron_assets.score import JUDGE_SCORERS, Scorer, judged_candidates
from neuron_assets.score.crossfit import Scoring, with_provenance
from neuron_assets.score.select import (
    FEATURES_PER_ROUND,
    rows_of,
    score_all,
    score_candidates,
    select_best,
    selected_by_feature,
    shuffled_controls,
)
from neuron_assets.simulate import FINETUNED, needs_checkpoint
from neuron_assets.simulate.checkpoints import append_checkpoint_rows, simulate_hash
from neuron_assets.store import MissingTableError, Store, atomic_path, with_lineage
from neuron_assets.subject import SubjectModel, load_subject, load_tokenizer
from neuron_assets.types import ExemplarKind, FeatureExemplars, FeatureId, Polarity, Split
from neuron_assets.validate import validate_config

SEQUENCES_TABLE = "sequences"
CANDIDATES_TABLE = "candidate_descriptions"
TRAINING_TABLE = "simulator_training_data"
SCORES_TABLE = "description_scores"
DESCRIPTIONS_TABLE = "neuron_descriptions"

Log = Callable[[str], object]


def _quiet(_: str) -> None:
    return None


# -- corpus and exemplars ------------------------------------------------------------------


@dataclass(frozen=True)
class Written:
    table: str
    path: Path
    rows: int
    layer: int | None = None
    polarity: str | None = None


def make_corpus(config: Config, run_id: str) -> Written:
    validate_config(config)  # every check that needs no tokenizing, before any
    tokenizer = load_tokenizer(config.subject)
    corpus = plan_corpus(config.corpus, tokenizer)
    lineage = {"model": config.subject.model, "config_hash": config.hash, "run_id": run_id}
    path = Store(config.store_root).write_batches(SEQUENCES_TABLE, corpus.schema(lineage), corpus.batches(lineage=lineage))
    return Written(SEQUENCES_TABLE, path, corpus.rows)


@dataclass(frozen=True)
class ExemplarRun:
    """What make_exemplars wrote, and the memory plan it followed."""

    written: list[Written]
    plan: ExemplarPlan


def make_exemplars(
    config: Config,
    partitions: list[tuple[int, Polarity]],
    run_id: str,
    subject: SubjectModel | None = None,
    progress: bool = True,
    on_batch=None,
    log=print,
    measured: dict | None = None,
) -> ExemplarRun:
    """Exemplars and neuron stats of the requested (layer, polarity) partitions, from one
    forward pass over the corpus per group of the plan (one, unless the state exceeds the
    device budget), each stopping after its deepest layer. Each layer's exemplars are written
    as soon as its last pass is done; the neuron_stats tables once one short pass over
    scrambled-context probes has confirmed the unigram candidates of every layer
    (:mod:`neuron_assets.features.unigram`). ``log`` receives the plan before reading starts;
    ``measured`` (a dict) receives the state sizes the run reached."""
    store = Store(config.store_root)
    if not store.exists(SEQUENCES_TABLE):
        store.read(SEQUENCES_TABLE)  # raises the error that says how to make the table
    sequences = store.read(SEQUENCES_TABLE, columns=SEQUENCE_COLUMNS)  # token ids only, no strings
    subject = subject or load_subject(config.subject)
    layers = sorted({layer for layer, _ in partitions})
    polarities = sorted({Polarity(p) for _, p in partitions}, key=lambda p: p.value != "pos")
    selected = select_neurons(config.features.model_copy(update={"layers": layers}), subject.num_layers,
                              subject.neurons_per_layer)
    saes = sae_latents(config, store, layers, subject) if Polarity.POS in polarities else {}
    store.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    batch_size, seed = config.subject.batch_size, config.corpus.seed
    seq_len = int(sequences["n_tokens"].max())
    axis = feature_axis(selected, saes, subject.neurons_per_layer)
    plan = plan_exemplar_pass(axis, polarities, config.exemplars, seq_len, batch_size, subject.device, subject.dtype)
    log(plan.describe())
    checkpoint = store.checkpoint_dir / checkpoint_name(subject.name, sequences, selected, polarities, config.exemplars,
                                                        batch_size, seed, saes, subject.neurons_per_layer)
    wanted = {(layer, Polarity(polarity)) for layer, polarity in partitions}
    written = []
    pending_stats: dict[tuple[int, Polarity], pl.DataFrame] = {}
    candidates: list[UnigramCandidate] = []
    confirming = config.exemplars.unigram_contexts > 0

    def write_table(table: str, frame: pl.DataFrame, layer: int, polarity: Polarity) -> None:
        frame = with_lineage(frame, config.subject.model, config.hash, run_id)
        path = store.write(table, frame, layer, polarity.value)
        written.append(Written(table, path, frame.height, layer, polarity.value))

    def write(layer: int, polarity: Polarity, exemplars: pl.DataFrame, stats: pl.DataFrame) -> None:
        if (layer, polarity) not in wanted:
            return
        if polarity is not Polarity.POS:  # SAE latents are never negative: no neg description
            exemplars = exemplars.filter(pl.col("feature_kind") != SAE_KIND)
            stats = stats.filter(pl.col("kind") != SAE_KIND)
        write_table("exemplars", exemplars, layer, polarity)
        # Stats wait for the unigram confirmation, which probes every layer's candidates at once;
        # of the exemplars only the candidates' top tokens are kept.
        pending_stats[(layer, polarity)] = stats
        if confirming:
            candidates.extend(unigram_candidates(exemplars, stats, sequences, layer, polarity, config.exemplars))

    collect_exemplars(
        subject, sequences, selected, polarities, config.exemplars, batch_size=batch_size, seed=seed,
        checkpoint=checkpoint, progress=progress, on_batch=on_batch, plan=plan, on_tables=write, measured=measured,
        saes=saes,
    )
    confirmed = None
    if confirming:
        started = time.perf_counter()
        confirmed = confirm_unigrams(subject, sequences, candidates, saes, config.exemplars, batch_size, seed)
        if candidates:
            log(f"unigram candidates confirmed in scrambled context: {int(confirmed['unigram_confirmed'].sum())} "
                f"of {len(candidates)} ({time.perf_counter() - started:.1f} s)")
    for (layer, polarity), stats in sorted(pending_stats.items(), key=lambda item: (item[0][0], item[0][1].value)):
        mine = None if confirmed is None else confirmed.filter((pl.col("layer") == layer) &
                                                               (pl.col("polarity") == polarity.value))
        write_table("neuron_stats", with_confirmation(stats, mine), layer, polarity)
    written += _write_output_tokens(config, store, subject, selected, wanted, run_id, saes)
    written.sort(key=lambda w: (w.layer, w.polarity, w.table))
    return ExemplarRun(written, plan)


def sae_latents(config: Config, store: Store, layers: list[int], subject: SubjectModel) -> dict[int, SaeLatents]:
    """layer -> the SAE latents the exemplar pass reads there (sae.latents of each sae.layers
    layer among ``layers``), from the SAE the sae_checkpoint stage wrote."""
    if config.sae.latents is None:
        return {}
    import random

    from neuron_assets.features.sae import SAE_INFO, load_sae
    from neuron_assets.features.sae_stage import sae_folder
    from neuron_assets.runtime import choose_device

    chosen = {}
    for layer in sorted(set(config.sae.layers) & set(layers)):
        folder = sae_folder(store, layer)
        if not (folder / SAE_INFO).exists():
            raise MissingTableError(f"no SAE for layer {layer} under {folder}; materialize sae_checkpoint first "
                                    "(neuron-assets run does, before exemplars)")
        sae = load_sae(folder).to(choose_device(config.sae.device)).eval()
        if sae.d_in != subject.neurons_per_layer(layer):
            raise ValueError(f"the SAE under {folder} reads {sae.d_in} dimensions but layer {layer}'s site has "
                             f"{subject.neurons_per_layer(layer)}; re-materialize sae_checkpoint for this model")
        latents = config.sae.latents
        if latents == "all":
            indices = list(range(sae.d_latent))
        elif isinstance(latents, list):
            bad = [j for j in latents if not 0 <= j < sae.d_latent]
            if bad:
                raise ValueError(f"sae.latents: latent {bad[0]} is out of range; layer {layer}'s SAE has {sae.d_latent}")
            indices = sorted(set(latents))
        else:
            draw = random.Random(f"sae:{latents.seed}:{layer}")  # not the draw of the layer's neurons
            indices = sorted(draw.sample(range(sae.d_latent), min(latents.sample, sae.d_latent)))
        identity = (folder / SAE_INFO).read_text() + str((folder / SAE_INFO).stat().st_mtime_ns)
        chosen[layer] = SaeLatents(sae, indices, identity)
    return chosen


def _write_output_tokens(config: Config, store: Store, subject: SubjectModel, selected: dict[int, list[int]],
                         wanted: set[tuple[int, Polarity]], run_id: str,
                         saes: dict[int, SaeLatents] | None = None) -> list[Written]:
    """The logit-lens ``output_tokens`` table of each wanted partition (none for a subject
    without an unembedding, or with exemplars.output_tokens 0)."""
    import torch

    from neuron_assets.features.logit_lens import OUTPUT_TOKENS_TABLE, subject_output_tokens
    from neuron_assets.subject import resolve_model_path

    layers = {layer: torch.tensor(selected[layer], dtype=torch.long) for layer in sorted({l for l, _ in wanted})}
    polarities = sorted({p for _, p in wanted}, key=lambda p: p.value != "pos")
    latents = {layer: (s.sae, torch.tensor(s.latents, dtype=torch.long)) for layer, s in (saes or {}).items()
               if layer in layers}
    frames = subject_output_tokens(subject, layers, polarities, config.exemplars.output_tokens,
                                   resolve_model_path(config.subject.model), latents)
    written = []
    for (layer, polarity), frame in sorted(frames.items(), key=lambda item: (item[0][0], item[0][1].value)):
        if (layer, polarity) in wanted:
            frame = with_lineage(frame, config.subject.model, config.hash, run_id)
            path = store.write(OUTPUT_TOKENS_TABLE, frame, layer, polarity.value)
            written.append(Written(OUTPUT_TOKENS_TABLE, path, frame.height, layer, polarity.value))
    return written


# -- candidate descriptions -----------------------------------------------------------------


@dataclass(frozen=True)
class CandidatesWritten:
    written: list[Written]  # one per partition, in the requested order
    frame: pl.DataFrame  # every partition's rows
    missing: list[tuple[int, str, int]]  # (layer, polarity, neuron) with fewer than k candidates
    backend: str  # "<backend> (<model>)"


def make_candidate_descriptions(config: Config, partitions: list[tuple[int, Polarity]], run_id: str,
                                explainer=None, progress: Progress | None = None, log: Log = _quiet) -> CandidatesWritten:
    """k candidate descriptions per feature of each partition, written as each partition is
    done. ``explainer``: a built explainer to reuse (one is made from config.explain otherwise)."""
    from neuron_assets.explain import corpus_from_sequences, explain_features, incomplete_features, make_explainer

    store = Store(config.store_root)
    explainer = explainer or make_explainer(config.explain)
    tokenizer = load_tokenizer(config.subject)
    corpus = corpus_from_sequences(store.read(SEQUENCES_TABLE), seed=config.explain.seed)
    progress = progress or Progress([])
    frames, missing, written = [], [], []
    for layer, polarity in partitions:
        polarity = Polarity(polarity)
        parts = []
        for kind, of_kind in features_by_kind(load_feature_exemplars(store, layer, polarity)):
            features = _explained(of_kind, store, layer, polarity, config.explain.flagged_features, log, kind)
            if config.explain.output_tokens:
                features = _with_output_tokens(features, store, layer, polarity, kind, log)
            label = f"explain {layer}|{polarity.value}" + ("" if kind == NEURON_KIND else f" {kind}")
            with progress.task(label, len(features) * config.explain.k, "candidate") as task:
                part = explain_features(features, config.explain, tokenizer_for_display=tokenizer, progress=False,
                                        explainer=explainer, corpus=corpus, on_candidates=task.advance)
            parts.append(with_kind(part, kind))
            missing += [(layer, polarity.value, n) for n in
                        incomplete_features(part, [f.feature.index for f in features], config.explain.k)]
        frame = pl.concat(parts, how="diagonal_relaxed") if len(parts) > 1 else parts[0]
        frame = with_lineage(frame, config.subject.model, config.hash, run_id)
        path = store.write(CANDIDATES_TABLE, frame, layer, polarity.value)
        written.append(Written(CANDIDATES_TABLE, path, frame.height, layer, polarity.value))
        frames.append(frame)
        log(f"layer {layer} {polarity.value}: {frame.height} candidates for "
            f"{frame.select('kind', 'neuron').n_unique()} features")
    everything = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
    return CandidatesWritten(written, everything, missing, f"{explainer.backend} ({explainer.model})")


def features_by_kind(features: list[FeatureExemplars]) -> list[tuple[str, list[FeatureExemplars]]]:
    """(kind, its features), neurons first: each stage runs its per-partition work once per
    kind, so a description, a score and a shuffled control stay within a kind. A partition
    with no feature at all still gives one (empty) neuron group."""
    kinds: dict[str, list[FeatureExemplars]] = {NEURON_KIND: []}
    for feature in features:
        kinds.setdefault(feature.feature.kind, []).append(feature)
    return [(kind, of_kind) for kind, of_kind in kinds.items() if of_kind or kind == NEURON_KIND]


def with_kind(frame: pl.DataFrame, kind: str) -> pl.DataFrame:
    """A per-feature table's rows of one kind, with the ``kind`` column beside polarity."""
    frame = frame.with_columns(pl.lit(kind).alias("kind"))
    order = [c for c in frame.columns if c != "kind"]
    order.insert(order.index("polarity") + 1 if "polarity" in order else 0, "kind")
    return frame.select(order)


FLAGS = ("is_positional", "is_unigram")  # neuron_stats' feature filters


def _explained(features: list[FeatureExemplars], store: Store, layer: int, polarity: Polarity, choice: str,
               log: Log, kind: str = NEURON_KIND) -> list[FeatureExemplars]:
    """The features explain.flagged_features keeps: all, those not flagged, or only those flagged."""
    if choice == "all":
        return features
    stats = with_feature_kind(store.read("neuron_stats", layer, polarity.value))
    stats = stats.filter(pl.col("kind") == kind)
    present = [flag for flag in FLAGS if flag in stats.columns]
    if not present:
        raise ValueError(f"explain.flagged_features is '{choice}' but neuron_stats of layer {layer} {polarity.value} "
                         "has no feature flags (written before the filters existed); re-materialize exemplars")
    flagged = set(stats.filter(pl.any_horizontal(*present))["neuron"].to_list())
    kept = [f for f in features if (f.feature.index in flagged) == (choice == "only")]
    log(f"layer {layer} {polarity.value}: explaining {len(kept)} of {len(features)} {kind} features "
        f"({len(flagged)} flagged {'/'.join(present)}; explain.flagged_features: {choice})")
    return kept


def _with_output_tokens(features: list[FeatureExemplars], store: Store, layer: int, polarity: Polarity, kind: str,
                        log: Log) -> list[FeatureExemplars]:
    """Each feature with its logit-lens tokens (explain.output_tokens), strongest first."""
    from neuron_assets.features.logit_lens import OUTPUT_TOKENS_TABLE

    if not store.exists(OUTPUT_TOKENS_TABLE, layer, polarity.value):
        log(f"layer {layer} {polarity.value}: explain.output_tokens is on but there is no {OUTPUT_TOKENS_TABLE} "
            "table (a subject without an unembedding, or exemplars.output_tokens: 0); the prompts go without")
        return features
    frame = store.read(OUTPUT_TOKENS_TABLE, layer, polarity.value)
    if "kind" in frame.columns:
        frame = frame.filter(pl.col("kind") == kind)
    frame = frame.sort("neuron", "rank")
    promoted = {neuron: tuple(group["token"].to_list())
                for (neuron,), group in frame.group_by("neuron", maintain_order=True)}
    return [replace(f, output_tokens=promoted.get(f.feature.index, ())) for f in features]


# -- reading upstream tables ---------------------------------------------------------------


def read_candidates(store: Store, layer: int, polarity: Polarity) -> dict[FeatureId, list[str | None]]:
    """Feature -> its candidates' descriptions by candidate number (None where one failed)."""
    frame = with_feature_kind(store.read(CANDIDATES_TABLE, layer, polarity.value)).select(
        "kind", "neuron", "candidate", "description")
    out: dict[FeatureId, list[str | None]] = {}
    for row in frame.sort("kind", "neuron", "candidate").iter_rows(named=True):
        slots = out.setdefault(FeatureId(layer, row["neuron"], polarity, row["kind"]), [])
        slots += [None] * (row["candidate"] + 1 - len(slots))
        slots[row["candidate"]] = row["description"]
    return out


def candidate_partitions(store: Store, config: Config) -> list[tuple[int, Polarity]]:
    """The (layer, polarity) partitions with candidate descriptions, within the config's polarities."""
    wanted = set(config.features.polarities)
    return [(layer, Polarity(p)) for layer, p in store.partitions(CANDIDATES_TABLE) if p in wanted]


# -- simulator training data and checkpoint ------------------------------------------------


@dataclass(frozen=True)
class TrainingDataWritten:
    path: Path
    rows: int
    features: dict[str, int]  # role -> features
    partitions: int


def make_simulator_training_data(config: Config, run_id: str, log: Log = _quiet) -> TrainingDataWritten:
    """The simulator's training rows. The features are picked first from cheap columns
    (candidates, ``neuron_stats``' max, which neurons have train top exemplars), seeded;
    then only the picked features' exemplars are loaded (a few hundred, at any model size)."""
    from neuron_assets.simulate.training import TRAINING_DATA_SCHEMA, plan_training_data, training_roles

    store = Store(config.store_root)
    candidates: dict[FeatureId, list[str | None]] = {}
    usable: list[FeatureId] = []
    partitions = candidate_partitions(store, config)
    for layer, polarity in partitions:
        described = read_candidates(store, layer, polarity)
        candidates.update(described)
        usable += _usable_features(store, layer, polarity, described)
    roles = training_roles(usable, config.simulate.training)
    picked = {feature for fold_roles in roles.values() for feature in fold_roles}
    candidates = {feature: candidates[feature] for feature in picked}
    features: list[FeatureExemplars] = []
    for layer, polarity in partitions:
        wanted = {f.index for f in picked if f.layer == layer and f.polarity == polarity}
        if wanted:
            features += load_feature_exemplars(store, layer, polarity, sorted(wanted), kind=NEURON_KIND)
    frame = plan_training_data(features, candidates, config.simulate.training, roles) if features else \
        pl.DataFrame(schema=TRAINING_DATA_SCHEMA)
    frame = with_lineage(frame, config.subject.model, config.hash, run_id)
    path = store.write(TRAINING_TABLE, frame)
    counts = frame.group_by("fold", "role").agg(pl.struct("layer", "polarity", "neuron").n_unique().alias("n"))
    by_role = {f"fold {row['fold']} {row['role']}": row["n"] for row in counts.sort("fold", "role").iter_rows(named=True)}
    log(f"simulator training data: {frame.height} rows from {len(partitions)} partitions, features {by_role}")
    return TrainingDataWritten(path, frame.height, by_role, len(partitions))


def _usable_features(store: Store, layer: int, polarity: Polarity,
                     described: dict[FeatureId, list[str | None]]) -> list[FeatureId]:
    """Neurons with a candidate, a positive max and train top exemplars (read without exemplars'
    rows). The simulator trains on neurons only: SAE latents are never in its training data."""
    with_candidate = {f.index for f, options in described.items() if any(options) and f.kind == NEURON_KIND}
    for table in ("neuron_stats", "exemplars"):
        if not store.exists(table, layer, polarity.value):
            store.read(table, layer, polarity.value)  # raises MissingTableError, which says what to materialize
    positive = set(with_feature_kind(store.scan("neuron_stats", layer, polarity.value))
                   .filter((pl.col("max") > 0) & (pl.col("kind") == NEURON_KIND)).select("neuron").collect()["neuron"].to_list())
    with_top = set(with_feature_kind(store.scan("exemplars", layer, polarity.value), "feature_kind")
                   .filter((pl.col("split") == Split.TRAIN.value) & (pl.col("kind") == ExemplarKind.TOP.value)
                           & (pl.col("feature_kind") == NEURON_KIND))
                   .select(pl.col("neuron").unique()).collect()["neuron"].to_list())
    return [FeatureId(layer, n, polarity) for n in sorted(with_candidate & positive & with_top)]


@dataclass(frozen=True)
class CheckpointWritten:
    trained: bool  # False when the configured simulator needs no training
    reason: str = ""
    version: str | None = None  # the fold versions joined by '+'
    paths: tuple[Path, ...] = ()  # one checkpoint per fold
    heldout_correlation: float | None = None  # mean over the folds' held-out features
    heldout_shuffled_correlation: float | None = None
    stage1_heldout_correlation: float | None = None
    loss_curve: dict[str, list[float]] = field(default_factory=dict)  # "<stage> fold <f>" -> losses
    steps: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    resumed: bool = False
    folds: int = 0


def make_simulator_checkpoint(config: Config, run_id: str, log: Log = _quiet, on_step=None) -> CheckpointWritten:
    """Train (or resume, or find already trained) one fine-tuned simulator per fold on the
    stored training data; record each in ``simulator_checkpoints``. ``on_step(stage, step,
    total, loss)`` follows every training step."""
    if not needs_checkpoint(config):
        reason = (f"simulate.finetuned.checkpoint is set ({config.simulate.finetuned.checkpoint})"
                  if config.simulate.finetuned.checkpoint else
                  f"no scored simulator is finetuned (simulate.backend {config.simulate.backend}, compare_with "
                  f"{config.simulate.compare_with})")
        return CheckpointWritten(False, reason + "; nothing to train")
    from neuron_assets.simulate.alignment import control_token_forms
    from neuron_assets.simulate.training import STAGE1, STAGE2, train_crossfit
    from neuron_assets.subject import load_tokenizer

    store = Store(config.store_root)
    frame = store.read(TRAINING_TABLE).drop("model", "config_hash", "run_id", strict=False)
    if "fold" not in frame.columns:
        raise ValueError("simulator_training_data was written before cross-fitting (no fold column); "
                         "re-materialize simulator_training_data")
    added = control_token_forms(_special_tokens(load_tokenizer(config.subject)))
    trained = train_crossfit(frame, config.simulate.finetuned, config.simulate.training,
                             store.checkpoint_dir / "simulator", added, log=log, on_step=on_step)
    rows, last, first = [], [], []
    for fold in trained:
        heldout = fold.heldout.get(STAGE2) or fold.heldout[STAGE1]
        last.append(heldout)
        first.append(fold.heldout[STAGE1])
        rows.append({
            "version": fold.version, "path": str(fold.path), "fold": fold.fold, "folds": fold.folds,
            "trained_features": list(fold.trained_features), "backbone": config.simulate.finetuned.backbone,
            "head": config.simulate.finetuned.head, "alignment": config.simulate.finetuned.alignment,
            "stage1_steps": fold.steps.get(STAGE1, 0), "stage2_steps": fold.steps.get(STAGE2, 0),
            "final_loss": (fold.loss_curve.get(STAGE2) or fold.loss_curve[STAGE1])[-1],
            "heldout_correlation": heldout.described, "heldout_shuffled_correlation": heldout.shuffled,
            "heldout_features": heldout.features, "stage2_changed": fold.stage2_changed,
            "train_seconds": fold.seconds, "created_at": datetime.now(timezone.utc).replace(tzinfo=None),
            "simulate_hash": simulate_hash(config),
        })
    append_checkpoint_rows(store, with_lineage(pl.DataFrame(rows), config.subject.model, config.hash, run_id))
    return CheckpointWritten(
        True, "", "+".join(f.version for f in trained), tuple(f.path for f in trained),
        _weighted_mean([(h.described, h.features) for h in last]), _weighted_mean([(h.shuffled, h.features) for h in last]),
        _weighted_mean([(h.described, h.features) for h in first]),
        {f"{stage} fold {f.fold}": curve for f in trained for stage, curve in f.loss_curve.items()},
        {f"{stage} fold {f.fold}": n for f in trained for stage, n in f.steps.items()},
        sum(f.seconds for f in trained), any(f.resumed for f in trained), len(trained),
    )


def _weighted_mean(pairs: list[tuple[float, int]]) -> float:
    total = sum(n for _, n in pairs)
    return float(sum(v * n for v, n in pairs) / total) if total else 0.0


def _special_tokens(tokenizer) -> list[str]:
    from neuron_assets.explain.excerpts import special_tokens

    return sorted({text for text in special_tokens(tokenizer).values() if text})


@dataclass(frozen=True)
class ScoresWritten:
    layer: int
    polarity: str
    path: Path
    rows: int
    features: int
    unscored: list[int]  # features with exemplars but no scored candidate
    seconds: float


def make_description_scores(config: Config, layer: int, polarity: Polarity, run_id: str,
                            scoring: Scoring | None = None, log: Log = _quiet, on_features=None) -> ScoresWritten:
    """Every candidate x scorer on val; ``on_features(n)`` as n more features are scored."""
    started = time.perf_counter()
    store = Store(config.store_root)
    polarity = Polarity(polarity)
    scoring = scoring or Scoring.build(config, store)
    all_candidates = read_candidates(store, layer, polarity)
    parts, unscored, scored_features = [], [], 0
    for kind, features in features_by_kind(load_feature_exemplars(store, layer, polarity)):
        candidates = {f: c for f, c in all_candidates.items() if f.kind == kind}
        part = _score_kind(config, scoring, features, candidates, on_features)
        parts.append(with_kind(part, kind))
        scored = set(part["neuron"].unique().to_list()) if part.height else set()
        scored_features += len(scored)
        # features the explain stage left out (explain.flagged_features) have no candidate rows
        unscored += sorted(f.feature.index for f in features if f.feature in candidates and f.feature.index not in scored)
    frame = pl.concat(parts, how="diagonal_relaxed") if len(parts) > 1 else parts[0]
    frame = with_lineage(with_provenance(frame, scoring), config.subject.model, config.hash, run_id)
    path = store.write(SCORES_TABLE, frame, layer, polarity.value)
    log(f"layer {layer} {polarity.value}: {frame.height} scores for {scored_features} features "
        f"({len(unscored)} without candidates)")
    return ScoresWritten(layer, polarity.value, path, frame.height, scored_features, unscored,
                         time.perf_counter() - started)


def _score_kind(config: Config, scoring: Scoring, features: list[FeatureExemplars],
                candidates: dict[FeatureId, list[str | None]], on_features) -> pl.DataFrame:
    """The description_scores rows of one kind's features of a partition."""
    # Judges (detection, fuzzing) see only the selector's best score.judge_candidates per feature.
    judges = [s for s in scoring.scorers if s.name in JUDGE_SCORERS and s is not scoring.selector]
    frame = score_candidates(features, candidates, [s for s in scoring.scorers if s not in judges], Split.VAL,
                             progress=on_features)
    if judges:
        judged = judged_candidates(frame, candidates, scoring.selector, config.score.judge_candidates)
        frame = pl.concat([frame, score_candidates(features, judged, judges, Split.VAL)])
    # The control is another feature's *selected* description (by val), of the same kind,
    # scored like the candidates; every candidate is also scored on test by the selector for
    # best_of_k_curve.
    selector = scoring.selector
    selected = selected_by_feature(select_best(frame, selector.name, selector.simulator), features)
    controls = shuffled_controls(features, selected, config.score.control_seed) if config.score.shuffled_control else {}
    return pl.concat([frame, score_candidates(features, {}, scoring.scorers, Split.VAL, controls),
                      score_candidates(features, candidates, [selector], Split.TEST, controls)])


DESCRIPTIONS_SCHEMA = {
    "layer": pl.Int64, "polarity": pl.String, "kind": pl.String, "neuron": pl.Int64, "candidate": pl.Int64, "description": pl.String,
    "scorer": pl.String, "simulator": pl.String, "val_score": pl.Float64, "test_score": pl.Float64,
    "val_flags": pl.List(pl.String), "test_flags": pl.List(pl.String), "control_description": pl.String,
    "control_source_neuron": pl.Int64, "control_val_score": pl.Float64, "control_test_score": pl.Float64,
    "n_candidates": pl.Int64, "explainer_backend": pl.String, "explainer_model": pl.String,
    "simulator_version": pl.String, "test_simulator_version": pl.String, "simulator_saw_feature": pl.Boolean,
}


@dataclass(frozen=True)
class DescriptionsWritten:
    layer: int
    polarity: str
    path: Path
    rows: int
    frame: pl.DataFrame
    seconds: float


def make_neuron_descriptions(config: Config, layer: int, polarity: Polarity, run_id: str,
                             scoring: Scoring | None = None, log: Log = _quiet, on_features=None) -> DescriptionsWritten:
    """The best candidate by val (score.select_by), then it and its shuffled control on test;
    ``on_features(n)`` as n more features are scored on test."""
    started = time.perf_counter()
    store = Store(config.store_root)
    polarity = Polarity(polarity)
    all_scores = with_feature_kind(store.read(SCORES_TABLE, layer, polarity.value))
    scoring = scoring or Scoring.build(config, store)
    explainers = _explainers(store, layer, polarity)
    rows = []
    stale = 0
    for kind, of_kind in features_by_kind(load_feature_exemplars(store, layer, polarity)):
        scores = all_scores.filter(pl.col("kind") == kind)
        kind_rows, kind_stale = _describe_kind(kind, of_kind, scores, scoring, explainers.get(kind, {}), layer,
                                               polarity, on_features)
        rows += kind_rows
        stale += kind_stale
    if stale:
        log(f"layer {layer} {polarity.value}: {stale} features' val scores used another simulator version than "
            "their test scores; re-materialize description_scores to score both with one")
    frame = with_lineage(pl.DataFrame(rows, schema=DESCRIPTIONS_SCHEMA), config.subject.model, config.hash, run_id)
    path = store.write(DESCRIPTIONS_TABLE, frame, layer, polarity.value)
    log(f"layer {layer} {polarity.value}: {frame.height} neuron descriptions")
    return DescriptionsWritten(layer, polarity.value, path, frame.height, frame, time.perf_counter() - started)


def _describe_kind(kind: str, features: list[FeatureExemplars], scores: pl.DataFrame, scoring: Scoring,
                   explainers: dict, layer: int, polarity: Polarity, on_features) -> tuple[list[dict], int]:
    """One kind's neuron_descriptions rows of a partition, and how many mixed simulator versions.
    The best candidates and their controls are scored on test in rounds of FEATURES_PER_ROUND
    features through the scorer's ``score_many`` (the simulator batches their pairs together)."""
    scorer = scoring.selector
    best = select_best(scores, scorer.name, scorer.simulator)
    features = {f.feature.index: f for f in features}
    chosen = [(row, features[row["neuron"]]) for row in best.iter_rows(named=True) if row["neuron"] in features]
    tests = []
    for start in range(0, len(chosen), FEATURES_PER_ROUND):
        round_ = chosen[start : start + FEATURES_PER_ROUND]
        items = [(feature, [row["description"]] + ([row["control_description"]] if row["control_description"] else []))
                 for row, feature in round_]
        tests += score_all(scorer, items, Split.TEST)
        if on_features is not None:
            on_features(len(round_))
    val_provenance = _val_provenance(scores, scorer)
    rows = []
    stale = 0
    for (row, feature), test in zip(chosen, tests):
        val_version, val_saw = val_provenance.get(row["neuron"], (None, None))
        test_version, test_saw = scoring.provenance(feature.feature, scorer.simulator)
        stale += scorer.simulator == FINETUNED and val_version != test_version
        rows.append({
            "layer": layer, "polarity": polarity.value, "kind": kind, "neuron": row["neuron"], "candidate": row["candidate"],
            "description": row["description"], "scorer": scorer.name, "simulator": row["simulator"],
            "val_score": row["val_score"], "test_score": test[0].value, "val_flags": row["val_flags"],
            "test_flags": list(test[0].flags), "control_description": row["control_description"],
            "control_source_neuron": row["control_source_neuron"], "control_val_score": row["control_val_score"],
            "control_test_score": test[1].value if len(test) > 1 else None, "n_candidates": row["n_candidates"],
            **explainers.get((row["neuron"], row["candidate"]), {"explainer_backend": None, "explainer_model": None}),
            "simulator_version": val_version, "test_simulator_version": test_version,
            "simulator_saw_feature": None if val_saw is None or test_saw is None else bool(val_saw or test_saw),
        })
    return rows, stale


def _val_provenance(scores: pl.DataFrame, scorer: Scorer) -> dict[int, tuple[str | None, bool | None]]:
    """neuron -> (simulator version, saw feature) of the selecting scorer's val candidate rows;
    any candidate row that saw the feature marks the feature (its selection was tainted)."""
    if not {"simulator_version", "simulator_saw_feature"} <= set(scores.columns):
        return {}
    rows = rows_of(scores, scorer.name, scorer.simulator).filter(pl.col("split") == Split.VAL.value)
    grouped = rows.group_by("neuron").agg(pl.col("simulator_version").first(), pl.col("simulator_saw_feature").any(),
                                          pl.col("simulator_saw_feature").null_count().alias("unknown"))
    return {n: (v, None if unknown else saw) for n, v, saw, unknown in grouped.iter_rows()}


def _explainers(store: Store, layer: int, polarity: Polarity) -> dict[str, dict[tuple[int, int], dict]]:
    """kind -> (neuron, candidate) -> the backend and model that wrote the candidate."""
    try:
        frame = with_feature_kind(store.read(CANDIDATES_TABLE, layer, polarity.value))
    except MissingTableError:
        return {}
    columns = [c for c in ("backend", "explainer_model") if c in frame.columns]
    out: dict[str, dict] = {}
    for row in frame.select("kind", "neuron", "candidate", *columns).iter_rows(named=True):
        out.setdefault(row["kind"], {})[(row["neuron"], row["candidate"])] = {
            "explainer_backend": row.get("backend"), "explainer_model": row.get("explainer_model")}
    return out


def read_all(store: Store, table: str) -> pl.DataFrame:
    """Every partition of a per-layer table, concatenated (empty when none is written)."""
    frames = [store.read(table, layer, polarity) for layer, polarity in store.partitions(table)]
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()


# -- the distilled explainer ---------------------------------------------------------------

DISTILLED_TABLE = "explainer_distilled"
DISTILL_EVAL_TABLE = "distilled_explainer_eval"
DISTILL_EVAL_SCORES_TABLE = "distilled_explainer_eval_scores"


@dataclass(frozen=True)
class DistilledWritten:
    explainer: object  # neuron_assets.explain.distill.DistilledExplainer
    table_path: Path
    train_features: int
    heldout_features: int


def make_explainer_distilled(config: Config, run_id: str, log: Log = _quiet, on_step=None) -> DistilledWritten:
    """Fine-tune distill.base_model on the explainer prompt (no few-shot example) -> each
    training feature's selected description (neuron_descriptions), on features disjoint from
    the held-out ones; one row per trained checkpoint in table ``explainer_distilled``."""
    from neuron_assets.explain.distill import (
        DistillError,
        best_descriptions,
        build_examples,
        distill_explain_config,
        distill_explainer,
        load_base_tokenizer,
        split_features,
    )
    from neuron_assets.explain.excerpts import TokenDisplay
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
    features = _exemplars_of(store, train)
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


def _exemplars_of(store: Store, features: list[FeatureId]) -> list[FeatureExemplars]:
    """The exemplars of just these features, read partition by partition and kind by kind."""
    out: list[FeatureExemplars] = []
    groups: dict[tuple[int, Polarity, str], list[int]] = {}
    for feature in features:
        groups.setdefault((feature.layer, feature.polarity, feature.kind), []).append(feature.index)
    for (layer, polarity, kind), indices in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1].value, item[0][2])):
        out += load_feature_exemplars(store, layer, polarity, sorted(indices), kind=kind)
    return out


EVAL_PLOT = "eval_best_of_k.png"  # written into the distilled checkpoint's folder by its evaluation


@dataclass(frozen=True)
class DistillEvalWritten:
    curves: list  # neuron_assets.explain.distill.ExplainerCurve, base first
    table_path: Path
    scores_path: Path
    checkpoint: Path
    scorer: str
    features: int
    seconds: float


def make_distilled_evaluation(config: Config, run_id: str, log: Log = _quiet, scoring: Scoring | None = None,
                              on_candidates=None) -> DistillEvalWritten:
    """Base vs distilled explainer on the latest checkpoint's held-out features: eval_k
    candidates each, scored by the run's selecting scorer on val and test; the mean test
    score of the val-best among k per k (table ``distilled_explainer_eval``) and every
    candidate's scores (``distilled_explainer_eval_scores``)."""
    from neuron_assets import runtime
    from neuron_assets.explain import corpus_from_sequences, make_explainer
    from neuron_assets.explain.distill import BASE, DISTILLED, DistillError, curve_frame, distill_explain_config, \
        evaluate_explainers, read_distilled
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
    features = [f for f in _exemplars_of(store, heldout) if f.top(Split.TRAIN)]
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
    from neuron_assets.report.plots import explainer_curves_figure

    with atomic_path(checkpoint / EVAL_PLOT) as tmp:  # the picture beside the checkpoint it judges
        tmp.write_bytes(explainer_curves_figure(curves))
    return DistillEvalWritten(curves, table, scores_path, checkpoint,
                              f"{scoring.selector.name} ({scoring.selector.simulator})", len(features),
                              time.perf_counter() - started)


def _described_features(store: Store) -> list[FeatureId]:
    from neuron_assets.explain.distill import best_descriptions

    return list(best_descriptions(read_all(store, DESCRIPTIONS_TABLE)))


def _in_hash_order(keys, seed: int, described: dict) -> list[str]:
    from neuron_assets.explain.distill import heldout_rank

    return sorted((k for k in keys if k in described), key=lambda k: (heldout_rank(described[k], seed), k))
