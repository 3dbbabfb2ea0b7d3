"""Training the fine-tuned simulator in Transluce's two stages.

- **Cross-fitting** (:func:`fold_of`): every feature belongs to one of ``folds`` folds by a
  stable hash of its id. The simulator of fold f trains (both stages) only on features of
  the other folds and scores only the features of fold f, so no reported score comes from a
  simulator that saw its feature, and every feature is still scored (Transluce trains its
  simulator on a separate neuron sample instead).
- **Data** (:func:`plan_training_data`): per fold, the features with candidate descriptions
  are shuffled (seeded) and split, disjointly, into a held-out set (of the fold's own
  features, never trained on), a stage-1 sample and a stage-2 sample (of the other folds). Each feature contributes a few train-split exemplars (top ones first,
  then activation-quantile and random ones, so the simulator also learns where the feature
  is quiet) with their activations discretized to 0..10 against the feature's max.
  Stage-1 and held-out rows carry one random candidate description; stage-2 rows carry
  all candidates.
- **Stage 1**: train on (random candidate, exemplar, classes).
- **Stage 2**: the stage-1 simulator re-ranks each stage-2 feature's candidates by their
  correlation on a few of its *val* exemplars (rows of role ``stage2_rerank``; not the train
  exemplars it then trains on); training continues on (best candidate, train exemplar).
- **Held-out correlation**: the mean over held-out features of the correlation between
  simulated and true activations, beside the same with a description of another held-out
  feature (the shuffled control): a simulator that reads descriptions beats its control.

Large backbones (Llama-3.1-8B in bfloat16): the optimizer runs on fp32 master copies of the
trainable weights (:class:`neuron_assets.finetune.MasterWeights`), so lr 1e-5 updates are not
rounded away; ``method: lora`` trains peft adapters (merged into each saved stage) instead of every
weight; ``gradient_checkpointing`` and ``grad_accum_steps`` trade compute for memory; the
schedule is transformers' linear warm-up and decay. Several GPUs: this loop is one process
on one device; to shard a full fine-tune, wrap ``fit``'s model and optimizer with
``accelerate`` (``Accelerator(mixed_precision="bf16")`` with FSDP or DeepSpeed ZeRO-3 from
``accelerate config``, launched by ``accelerate launch``); LoRA at 8B fits one 80 GB GPU
and needs none of that. No multi-GPU launcher ships: it is not tested here.

The loss is cross-entropy over the 11 classes at the input tokens only. Training states
are saved every few steps and a rerun resumes from the last one; the finished checkpoint
is renamed into place in one step, and a finished version is never trained again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import polars as pl
import torch

from neuron_assets.config import FinetunedSimulatorConfig, SimulatorTrainingConfig
from neuron_assets.finetune import TrainingSettings, train_steps
from neuron_assets.numeric import derangement, token_correlation
from neuron_assets.simulate.alignment import NOT_READ
from neuron_assets.simulate.base import NUM_CLASSES, discretize, simulate_many
from neuron_assets.simulate.finetuned import FinetunedSimulator, freeze_token_embeddings
from neuron_assets.simulate.folds import fold_of
from neuron_assets.store import atomic_path, set_aside
from neuron_assets.types import ActivationRecord, FeatureExemplars, FeatureId, Polarity, Split

STAGE1, STAGE2, HELDOUT, RERANK = "stage1", "stage2", "heldout", "stage2_rerank"
TRAINED_ROLES = (STAGE1, STAGE2)
IGNORED = -100
METADATA_FILE = "metadata.json"

Log = Callable[[str], object]


# -- the data ----------------------------------------------------------------------------------


def plan_training_data(
    features: Sequence[FeatureExemplars],
    candidates: Mapping[FeatureId, Sequence[str | None]],
    config: SimulatorTrainingConfig,
    roles: Mapping[int, Mapping[FeatureId, str]] | None = None,
) -> pl.DataFrame:
    """One row per (fold, feature, exemplar) of every fold's held-out, stage-1 and stage-2
    samples (column ``fold``: the fold whose simulator the row is for), plus each stage-2
    feature's val exemplars to re-rank on (role ``stage2_rerank``).

    ``roles`` (fold -> feature -> role, from :func:`training_roles`) lets a caller pick the
    features before loading their exemplars; without it they are picked here among the given
    features."""
    usable = {
        f.feature: f for f in features
        if any(candidates.get(f.feature, ())) and f.top(Split.TRAIN) and f.stats.max > 0
    }
    if roles is None:
        roles = training_roles(list(usable), config)
    frames = [_plan_fold(fold, usable, candidates, config, fold_roles) for fold, fold_roles in sorted(roles.items())]
    return pl.concat(frames) if frames else pl.DataFrame(schema=TRAINING_DATA_SCHEMA)


def _plan_fold(fold: int, usable: Mapping[FeatureId, FeatureExemplars], candidates, config: SimulatorTrainingConfig,
               roles: Mapping[FeatureId, str]) -> pl.DataFrame:
    chosen = [(role, usable[feature]) for feature, role in roles.items() if feature in usable]
    rng = random.Random(f"{config.seed}:rows:{fold}")
    control_of = derangement(sorted(f.feature for role, f in chosen if role == HELDOUT), rng)
    chosen_description = {}
    for _, feature in chosen:
        options = [d for d in candidates[feature.feature] if d]
        chosen_description[feature.feature] = rng.choice(options)
    rows = []
    for role, feature in chosen:
        options = [d for d in candidates[feature.feature] if d]
        control = chosen_description[control_of[feature.feature]] if role == HELDOUT and control_of else None
        sets = [(role, training_exemplars(feature, config.exemplars_per_feature))]
        if role == STAGE2:
            sets.append((RERANK, training_exemplars(feature, config.rerank_exemplars, Split.VAL)))
        for row_role, exemplars in sets:
            for exemplar in exemplars:
                record = exemplar.record
                values = record.polarity_activations(feature.feature.polarity)
                labels = discretize(values, feature.stats.scale)
                labels[: record.prefix_len] = 0
                rows.append({
                    "fold": fold,
                    "role": row_role,
                    "layer": feature.feature.layer,
                    "polarity": feature.feature.polarity.value,
                    "neuron": feature.feature.index,
                    "description": None if role == STAGE2 else chosen_description[feature.feature],
                    "candidates": options,
                    "control_description": control,
                    "seq_id": record.seq_id,
                    "sample": exemplar.sample.value,
                    "tokens": list(record.tokens),
                    "token_ids": [int(t) for t in record.token_ids],
                    "prefix_len": record.prefix_len,
                    "activations": values.astype(np.float32).tolist(),
                    "labels": labels.astype(np.int8).tolist(),
                })
    return pl.DataFrame(rows, schema=TRAINING_DATA_SCHEMA)


def training_roles(usable: Sequence[FeatureId], config: SimulatorTrainingConfig) -> dict[int, dict[FeatureId, str]]:
    """Per fold, the usable features (those with a candidate, train top exemplars and a
    positive max) that are held out (of the fold's own features: they are scored by this
    fold's simulator and never trained on), stage-1 and stage-2 (of the other folds' features
    only): a seeded shuffle, cut to the configured sizes. Cheap: it needs only the feature
    ids, so the exemplars of just these are loaded."""
    out = {}
    for fold in range(config.folds):
        own = sorted(f for f in set(usable) if fold_of(f, config.folds) == fold)
        others = sorted(f for f in set(usable) if fold_of(f, config.folds) != fold)
        random.Random(f"{config.seed}:{fold}:heldout").shuffle(own)
        random.Random(f"{config.seed}:{fold}:train").shuffle(others)
        sizes = _sample_sizes(len(others), config)
        roles = {f: HELDOUT for f in own[: config.heldout_features]}
        roles.update(zip(others, [STAGE1] * sizes[STAGE1] + [STAGE2] * sizes[STAGE2]))
        out[fold] = roles
    return out


TRAINING_DATA_SCHEMA = {
    "fold": pl.Int64, "role": pl.String, "layer": pl.Int64, "polarity": pl.String, "neuron": pl.Int64, "description": pl.String,
    "candidates": pl.List(pl.String), "control_description": pl.String, "seq_id": pl.Int64,
    "sample": pl.String, "tokens": pl.List(pl.String), "token_ids": pl.List(pl.Int64),
    "prefix_len": pl.Int64, "activations": pl.List(pl.Float32), "labels": pl.List(pl.Int8),
}


def training_exemplars(feature: FeatureExemplars, n: int, split: Split = Split.TRAIN):
    """The split's top exemplars for half of n, then quantile and random ones in turn."""
    top = feature.top(split)
    quiet = [e for pair in _zip_longest(feature.quantile(split), feature.random(split)) for e in pair]
    n_top = math.ceil(n / 2)
    ordered = top[:n_top] + quiet + top[n_top:]
    chosen, seen = [], set()
    for exemplar in ordered:
        if exemplar.record.seq_id not in seen:
            seen.add(exemplar.record.seq_id)
            chosen.append(exemplar)
        if len(chosen) == n:
            break
    return chosen


def _zip_longest(a, b):
    for i in range(max(len(a), len(b))):
        yield tuple(x[i] for x in (a, b) if i < len(x))


def _sample_sizes(n: int, config: SimulatorTrainingConfig) -> dict[str, int]:
    """Stage-1 and stage-2 sizes among n training features: as configured, or cut in
    proportion when fewer are usable (stage 1 gets at least one)."""
    wanted = {STAGE1: config.stage1_features, STAGE2: config.stage2_features}
    total = sum(wanted.values())
    if n >= total:
        return wanted
    sizes = {role: int(n * count / total) for role, count in wanted.items()}
    sizes[STAGE1] += n - sum(sizes.values())
    return sizes


def seen_features(frame: pl.DataFrame) -> dict[int, frozenset[str]]:
    """Per fold, the features (:func:`feature_key`) its simulator trains on (stage 1 and 2)."""
    trained = frame.filter(pl.col("role").is_in(TRAINED_ROLES)).select("fold", "layer", "neuron", "polarity").unique()
    out: dict[int, set[str]] = {fold: set() for fold in frame["fold"].unique().to_list()} if frame.height else {}
    for row in trained.iter_rows(named=True):
        out[row["fold"]].add(f"{row['layer']}/{row['neuron']}/{row['polarity']}")
    return {fold: frozenset(keys) for fold, keys in out.items()}


@dataclass(frozen=True, eq=False)
class TrainingExample:
    description: str
    record: ActivationRecord  # activations already in the polarity's orientation
    labels: np.ndarray  # classes 0..10 per token


@dataclass(frozen=True)
class FeatureRows:
    """One feature's rows of the training data."""

    feature: FeatureId
    description: str | None
    candidates: tuple[str, ...]
    control_description: str | None
    examples: tuple[TrainingExample, ...]


def features_of(frame: pl.DataFrame, role: str) -> list[FeatureRows]:
    out: dict[tuple, list[dict]] = {}
    for row in frame.filter(pl.col("role") == role).iter_rows(named=True):
        out.setdefault((row["layer"], row["polarity"], row["neuron"]), []).append(row)
    grouped = []
    for (layer, polarity, neuron), rows in out.items():
        first = rows[0]
        examples = tuple(
            TrainingExample(
                row["description"] or "",
                ActivationRecord(row["seq_id"], tuple(row["tokens"]), tuple(row["token_ids"]),
                                 np.asarray(row["activations"], dtype=np.float32), row["prefix_len"]),
                np.asarray(row["labels"], dtype=np.int64),
            )
            for row in rows
        )
        grouped.append(FeatureRows(FeatureId(layer, neuron, Polarity(polarity)), first["description"], tuple(first["candidates"]),
                                   first["control_description"], examples))
    return grouped


# -- training -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldoutCorrelation:
    described: float  # mean over held-out features, with their own description
    shuffled: float  # the same with another held-out feature's description
    features: int


@dataclass(frozen=True)
class TrainedSimulator:
    version: str
    path: Path  # the checkpoint to simulate with (the last stage trained)
    stage1_path: Path
    loss_curve: dict[str, list[float]]
    heldout: dict[str, HeldoutCorrelation]  # after stage1, and after stage2 when it ran
    stage2_features: int
    stage2_changed: int  # stage-2 features whose best candidate was not their first
    steps: dict[str, int]
    seconds: float
    resumed: bool
    fold: int = 0  # the fold whose features this simulator scores
    folds: int = 1
    trained_features: tuple[str, ...] = ()  # feature_key of every stage-1 and stage-2 feature

    def metadata(self) -> dict:
        payload = asdict(self)
        payload["path"], payload["stage1_path"] = str(self.path), str(self.stage1_path)
        return payload


def training_version(frame: pl.DataFrame, model: FinetunedSimulatorConfig, training: SimulatorTrainingConfig,
                     added_tokens: Sequence[str]) -> str:
    """A short hash of everything a trained simulator depends on."""
    digest = hashlib.sha256()
    digest.update(frame.select(sorted(frame.columns)).write_json().encode())
    shaping = model.model_dump(mode="json", include={"backbone", "head", "alignment", "backbone_layers", "max_length"})
    digest.update(json.dumps([shaping, training.model_dump(mode="json"), sorted(added_tokens)], sort_keys=True).encode())
    return digest.hexdigest()[:12]


def train_simulator(
    frame: pl.DataFrame,
    model_config: FinetunedSimulatorConfig,
    training: SimulatorTrainingConfig,
    out_root: Path,
    added_tokens: Sequence[str] = (),
    log: Log = print,
    on_step: Callable[[str, int, int, float], object] | None = None,
) -> TrainedSimulator:
    """Both stages of one fold's simulator (``frame``: the rows of one fold); the checkpoint
    lands in ``out_root/<version>/`` (stage1/ and final/). ``on_step(stage, step, total,
    loss)`` is called after every optimizer step (progress)."""
    started = time.perf_counter()
    folds_in_frame = frame["fold"].unique().to_list() if "fold" in frame.columns and frame.height else [0]
    if len(folds_in_frame) != 1:
        raise ValueError(f"train_simulator trains one fold's simulator; the rows hold folds {sorted(folds_in_frame)}: "
                         "use train_crossfit, or filter the rows to one fold")
    fold = int(folds_in_frame[0])
    trained_keys = tuple(sorted(seen_features(frame).get(fold, ()))) if "fold" in frame.columns else ()
    version = training_version(frame, model_config, training, added_tokens)
    final_dir = Path(out_root) / version
    if (final_dir / METADATA_FILE).is_file():
        log(f"simulator {version} is already trained: {final_dir}")
        return _read_trained(final_dir)
    work = Path(out_root) / f".{version}.partial"
    work.mkdir(parents=True, exist_ok=True)
    resumed = any(work.iterdir())
    heldout_rows = features_of(frame, HELDOUT)
    stage1_rows = features_of(frame, STAGE1)
    stage2_rows = features_of(frame, STAGE2)
    rerank_rows = {f.feature: f for f in features_of(frame, RERANK)}
    if not stage1_rows:
        raise ValueError("the simulator training data has no stage-1 rows: no feature has a candidate description "
                         "and train exemplars; materialize candidate_descriptions and exemplars first")
    stage1_settings = TrainingSettings(
        training.stage1_epochs, training.batch_size, training.learning_rate, training.weight_decay,
        training.warmup_share, training.seed, training.save_every_steps, training.grad_accum_steps,
        training.gradient_checkpointing)
    fit_args = dict(active_weight=training.active_class_weight, log=log)
    stage1_dir = work / "stage1"
    losses: dict[str, list[float]] = {}
    heldout: dict[str, HeldoutCorrelation] = {}
    stage1_marker = work / "stage1.json"  # written (atomically) only once stage1/ is complete
    stage1 = load_stage1(stage1_dir, stage1_marker, model_config, log)
    if stage1 is not None:
        simulator, summary = stage1
        losses[STAGE1], heldout[STAGE1] = summary["loss"], HeldoutCorrelation(**summary["heldout"])
        log(f"stage 1 already trained in {stage1_dir}")
    else:
        simulator = FinetunedSimulator.from_backbone(
            model_config.backbone, model_config.head, model_config.alignment, model_config.max_length,
            model_config.backbone_layers, added_tokens, model_config.device, model_config.dtype, model_config.batch_size,
            training.seed, model_config.allow_download,
        )
        if training.freeze_embeddings and not freeze_token_embeddings(simulator.model):
            log("token embeddings are tied to the head's output rows; training them too")
        _start_adapters(simulator, training, log)
        examples = [e for f in stage1_rows for e in f.examples]
        log(f"stage 1: {len(examples)} pairs from {len(stage1_rows)} features")
        losses[STAGE1] = fit(simulator, examples, stage1_settings, resume=work / ".resume-stage1.pt",
                             on_step=_for_stage(on_step, STAGE1), **fit_args)
        simulator.merge_adapters()
        heldout[STAGE1] = heldout_correlation(simulator, heldout_rows)
        log(f"stage 1 held-out correlation {heldout[STAGE1].described:.3f} (shuffled {heldout[STAGE1].shuffled:.3f})")
        _save_atomically(simulator, stage1_dir, {"stage": 1, "heldout": asdict(heldout[STAGE1])})
        _write_json_atomically(stage1_marker, {"loss": losses[STAGE1], "heldout": asdict(heldout[STAGE1])})
    if training.freeze_embeddings and not freeze_token_embeddings(simulator.model):
        log("token embeddings are tied to the head's output rows; training them too")
    changed = 0
    final_from = stage1_dir
    if stage2_rows:
        # Re-rank on each feature's val exemplars; its train ones where it has no val ones.
        best = rerank_candidates(simulator, [rerank_rows.get(f.feature, f) for f in stage2_rows], training.rerank_exemplars)
        changed = sum(1 for f in stage2_rows if f.candidates and best[f.feature] != f.candidates[0])
        examples = [TrainingExample(best[f.feature], e.record, e.labels) for f in stage2_rows for e in f.examples]
        log(f"stage 2: {len(examples)} pairs from {len(stage2_rows)} features ({changed} re-ranked away from candidate 0)")
        stage2_settings = replace(stage1_settings, epochs=training.stage2_epochs, seed=training.seed + 1,
                                  learning_rate=training.stage2_learning_rate or training.learning_rate / 3)
        _start_adapters(simulator, training, log)
        losses[STAGE2] = fit(simulator, examples, stage2_settings, resume=work / ".resume-stage2.pt",
                             on_step=_for_stage(on_step, STAGE2), **fit_args)
        simulator.merge_adapters()
        heldout[STAGE2] = heldout_correlation(simulator, heldout_rows)
        log(f"stage 2 held-out correlation {heldout[STAGE2].described:.3f} (shuffled {heldout[STAGE2].shuffled:.3f})")
        final_from = None
    final_dir_in_work = work / "final"
    if final_from is None:
        _save_atomically(simulator, final_dir_in_work, {"stage": 2, "heldout": asdict(heldout[STAGE2])})
    else:
        shutil.copytree(final_from, final_dir_in_work, dirs_exist_ok=True)
    result = TrainedSimulator(
        version=version, path=final_dir / "final", stage1_path=final_dir / "stage1", loss_curve=losses,
        heldout=heldout, stage2_features=len(stage2_rows), stage2_changed=changed,
        steps={stage: len(curve) for stage, curve in losses.items()}, seconds=time.perf_counter() - started,
        resumed=resumed, fold=fold, folds=training.folds, trained_features=trained_keys,
    )
    for leftover in work.glob(".resume-*.pt"):
        leftover.unlink()
    _write_json_atomically(work / METADATA_FILE, result.metadata())
    if final_dir.exists():  # a concurrent run finished first; its result stands
        shutil.rmtree(work, ignore_errors=True)
        return _read_trained(final_dir)
    os.replace(work, final_dir)
    return result


def _start_adapters(simulator: FinetunedSimulator, training: SimulatorTrainingConfig, log: Log) -> None:
    """With method lora, fresh adapters on the simulator's current weights (merged after the stage)."""
    if training.method == "lora":
        trainable, total = simulator.add_lora(training.lora_rank, training.lora_alpha, training.lora_dropout,
                                              training.lora_target_modules)
        log(f"LoRA rank {training.lora_rank}: {trainable:,} of {total:,} weights train ({trainable / total:.2%})")


def train_crossfit(
    frame: pl.DataFrame,
    model_config: FinetunedSimulatorConfig,
    training: SimulatorTrainingConfig,
    out_root: Path,
    added_tokens: Sequence[str] = (),
    log: Log = print,
    on_step: Callable[[str, int, int, float], object] | None = None,
) -> list[TrainedSimulator]:
    """One simulator per fold, each on its fold's rows (:func:`train_simulator`); a fold
    whose rows have no stage-1 feature is an error that names it."""
    trained = []
    for fold in range(training.folds):
        rows = frame.filter(pl.col("fold") == fold)
        if rows.filter(pl.col("role") == STAGE1).height == 0:
            raise ValueError(f"fold {fold} of {training.folds} has no stage-1 rows: too few features with candidate "
                             "descriptions and train exemplars outside it; describe more features or lower "
                             "simulate.training.folds (at least 2)")
        log(f"fold {fold + 1}/{training.folds}: the simulator of fold {fold} trains on other folds' features")
        fold_step = None if on_step is None else (lambda s, i, n, l, f=fold: on_step(f"{s} fold {f}", i, n, l))
        trained.append(train_simulator(rows, model_config, training, out_root, added_tokens, log=log, on_step=fold_step))
    return trained


def _for_stage(on_step, stage: str):
    return None if on_step is None else lambda step, total, loss: on_step(stage, step, total, loss)


def _read_trained(directory: Path) -> TrainedSimulator:
    payload = json.loads((directory / METADATA_FILE).read_text())
    payload["path"], payload["stage1_path"] = directory / "final", directory / "stage1"
    payload["heldout"] = {k: HeldoutCorrelation(**v) for k, v in payload["heldout"].items()}
    payload["trained_features"] = tuple(payload.get("trained_features", ()))
    return TrainedSimulator(**payload)


def _write_json_atomically(target: Path, payload: dict) -> None:
    with atomic_path(target) as temp:
        Path(temp).write_text(json.dumps(payload, indent=2, sort_keys=True))


def _save_atomically(simulator: FinetunedSimulator, target: Path, extra: dict) -> None:
    temp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(temp, ignore_errors=True)
    simulator.save(temp, extra)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(temp, target)


def fit(
    simulator: FinetunedSimulator,
    examples: Sequence[TrainingExample],
    settings: TrainingSettings,
    resume: Path | None = None,
    active_weight: float = 1.0,
    log: Log = print,
    on_step: Callable[[int, int, float], object] | None = None,
) -> list[float]:
    """Cross-entropy training over the 11 classes at the input tokens; returns the loss per
    optimizer step (the mean over its ``grad_accum_steps`` micro-batches of ``batch_size``).
    Trainable weights held in bfloat16/float16 train through fp32 master copies
    (:class:`neuron_assets.finetune.MasterWeights`). The schedule is transformers' linear warm-up
    and decay. With ``resume``, the state is saved every ``save_every`` steps and picked up again.
    ``on_step(step, total, loss)`` follows every step (loss: the mean of the last ten)."""
    encoded = [simulator.encoder.encode(e.description, e.record) for e in examples]
    targets = [_targets(pair, example.labels) for pair, example in zip(encoded, examples)]
    class_weights = torch.full((NUM_CLASSES,), float(active_weight))
    class_weights[0] = 1.0

    def micro_batch_loss(chosen: np.ndarray) -> torch.Tensor:
        input_ids, attention_mask = simulator.collate([encoded[i] for i in chosen])
        labels = torch.full(input_ids.shape, IGNORED, dtype=torch.long)
        for row, i in enumerate(chosen):
            labels[row, : len(targets[i])] = torch.from_numpy(targets[i])
        logits = simulator.class_logits(input_ids, attention_mask)
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 labels.to(logits.device).reshape(-1), ignore_index=IGNORED,
                                                 weight=class_weights.to(logits.device))

    return train_steps(simulator.model, len(examples), micro_batch_loss, settings, resume, log, on_step,
                       simulator.device)


def load_stage1(stage1_dir: Path, marker: Path, model_config: FinetunedSimulatorConfig, log: Log):
    """(simulator, summary) of a finished stage 1, or None to train it: a stage 1 that cannot
    be read is set aside (its folder and marker renamed, not deleted) and named."""
    if not (marker.is_file() and (stage1_dir / "simulator.json").is_file()):
        return None
    try:
        summary = json.loads(marker.read_text())
        HeldoutCorrelation(**summary["heldout"]), summary["loss"]
        simulator = FinetunedSimulator.load(stage1_dir, model_config.device, model_config.dtype, model_config.batch_size)
    except Exception as err:  # a torn safetensors file, a truncated marker, ...
        moved = [set_aside(marker).name, set_aside(stage1_dir).name]
        log(f"warning: the trained stage 1 in {stage1_dir} is damaged ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); set it aside as {', '.join(moved)}, training stage 1 again")
        return None
    return simulator, summary


def _targets(pair, labels: np.ndarray) -> np.ndarray:
    """Per input position: the class of the subject token read there (their max if several), else ignored."""
    targets = np.full(len(pair.input_ids), IGNORED, dtype=np.int64)
    for position, label in zip(pair.read_at, labels):
        if position != NOT_READ:
            targets[position] = max(targets[position], int(label))
    return targets


# -- evaluation and re-ranking ---------------------------------------------------------------


def heldout_correlation(simulator, features: Sequence[FeatureRows]) -> HeldoutCorrelation:
    """Mean correlation over features with their own description, and with their control's."""
    described, shuffled = [], []
    jobs = [([feature.description or ""] + ([feature.control_description] if feature.control_description else []),
             [e.record for e in feature.examples]) for feature in features]
    for (_, records), simulated in zip(jobs, simulate_many(simulator, jobs)):  # all features' pairs batched together
        truths = [r.activations[r.prefix_len :] for r in records]
        scores = [token_correlation([p[r.prefix_len :] for p, r in zip(s, records)], truths).value for s in simulated]
        described.append(scores[0])
        if len(scores) > 1:
            shuffled.append(scores[1])
    return HeldoutCorrelation(float(np.mean(described)) if described else 0.0,
                              float(np.mean(shuffled)) if shuffled else 0.0, len(described))


def rerank_candidates(simulator, features: Sequence[FeatureRows], exemplars: int) -> dict[FeatureId, str]:
    """Each feature's candidate with the highest correlation on its first ``exemplars`` exemplars."""
    best = {}
    jobs = [(list(feature.candidates), [e.record for e in feature.examples[:exemplars]]) for feature in features]
    for feature, (_, records), simulated in zip(features, jobs, simulate_many(simulator, jobs)):
        truths = [r.activations[r.prefix_len :] for r in records]
        scores = [token_correlation([p[r.prefix_len :] for p, r in zip(s, records)], truths).value for s in simulated]
        best[feature.feature] = feature.candidates[int(np.argmax(scores))]
    return best


# -- how much training a selecting simulator needs ---------------------------------------------

# The fewest (description, exemplar) training pairs per fold below which a simulator of a
# backbone's size is not trusted to select descriptions: Transluce trains its 8B simulator's
# stage 1 on about 96,000 pairs (4,200 exemplar sets of 25 sequences); a backbone of 100M+
# weights fits far fewer pairs than it has weights before it stops overfitting.
MINIMUM_PAIRS = ((1e9, 50_000), (1e8, 10_000), (0.0, 1_000))  # (backbone weights at least, pairs per fold)


def minimum_training_pairs(backbone_params: float) -> int:
    return next(pairs for size, pairs in MINIMUM_PAIRS if backbone_params >= size)


def backbone_parameters(model_config: FinetunedSimulatorConfig) -> int:
    """The simulator backbone's weight count, from its config.json alone (no weights read):
    12 h^2 per layer (attention and MLP) plus the token embeddings."""
    from transformers import AutoConfig

    from neuron_assets.subject import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(model_config.backbone))
    config = getattr(config, "text_config", None) or config
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
    layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))
    if model_config.backbone_layers is not None:
        layers = min(layers, model_config.backbone_layers)
    return 12 * layers * hidden**2 + int(getattr(config, "vocab_size", 0)) * hidden


def training_pairs(frame: pl.DataFrame) -> dict[int, dict[str, int]]:
    """fold -> stage -> (description, exemplar) pairs of the simulator training rows."""
    counts = frame.filter(pl.col("role").is_in([STAGE1, STAGE2])).group_by("fold", "role").len()
    out: dict[int, dict[str, int]] = {}
    for fold, role, n in counts.iter_rows():
        out.setdefault(int(fold), {})[role] = int(n)
    return out
