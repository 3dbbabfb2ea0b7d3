"""Checkpoints of the exemplar pass: the signature of what a run collects, and the folder of
progress it saves, resumes from, and drops when done.

A checkpoint is a folder that grows with the work done:
  plan.json                      the run's signature and feature groups
  group-G.done.parquet files     a finished group's tables, written once
  group-G.split-S.pt             a finished split of the group in progress, written once
  group-G.progress.pt            the split being read, rewritten every checkpoint_every batches
Each file is written atomically; a later file never rewrites an earlier one's content.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch

from neuron_assets.config import ExemplarsConfig
from neuron_assets.exemplars.batches import READ_ORDER
from neuron_assets.exemplars.plan import ExemplarPlan
from neuron_assets.exemplars.state import PassState
from neuron_assets.features.selection import SaeLatents, feature_axis
from neuron_assets.store import atomic_path, set_aside
from neuron_assets.types import Polarity, Split


def run_signature(model, sequences, neurons, polarities, config, batch_size, seed, saes=None) -> str:
    """What makes a run's results: the device budget is left out, since it shapes only how the
    work is grouped (a resumed run keeps its checkpoint's grouping), and so is the prefix cache,
    which changes how the header is computed, not the tables."""
    digest = hashlib.sha256()
    settings = config.model_dump(exclude={"device_memory_gb", "checkpoint_every", "prefix_cache"})
    digest.update(repr((model, sorted((k, tuple(v)) for k, v in neurons.items()), [p.value for p in polarities],
                        settings, batch_size, seed, sequences.height)).encode())
    digest.update(READ_ORDER.encode())  # a checkpoint read in another order cannot be resumed in this one
    if saes:  # a run that reads no SAE keeps the signature it always had
        digest.update(repr(sorted((layer, s.identity) for layer, s in saes.items())).encode())
    digest.update(str(sequences.select("seq_id", "token_ids").hash_rows().sum()).encode())
    return digest.hexdigest()


def checkpoint_name(model: str, sequences: pl.DataFrame, neurons: dict[int, list[int]], polarities: list[Polarity],
                    config: ExemplarsConfig, batch_size: int, seed: int, saes: dict[int, SaeLatents] | None = None,
                    width_of=None) -> str:
    """A folder name unique to what a run collects, so runs over other layers never share it
    (``width_of``, layer -> neuron count, is needed with ``saes``)."""
    axis = feature_axis(neurons, saes, width_of) if saes else neurons
    return f"exemplars-{run_signature(model, sequences, axis, polarities, config, batch_size, seed, saes)[:16]}"


@dataclass
class Resume:
    groups: list[dict[int, list[int]]]
    finished: set[int]  # groups whose tables are saved
    group: int | None  # the group in progress
    finished_splits: list[str]
    progress: dict | None  # the split in progress, when it is ahead of the finished splits
    batches_done: int


def load_checkpoint(checkpoint: Path, signature: str) -> Resume | None:
    """What a matching checkpoint folder holds, or None to start the pass afresh: another
    run's checkpoint is set aside as ``<name>.ignored``, and one that cannot be read (a torn
    or foreign file) is set aside as ``<name>.damaged``, renamed and not deleted, with a
    warning that names it."""
    if checkpoint.exists() and not checkpoint.is_dir():
        return _set_aside_damaged(checkpoint, "not a checkpoint folder")
    try:
        return _read_checkpoint(checkpoint, signature)
    except Exception as err:  # json and torch.load raise many types for a damaged file
        return _set_aside_damaged(checkpoint, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")


def _set_aside_damaged(checkpoint: Path, problem: str) -> None:
    aside = set_aside(checkpoint)
    warnings.warn(f"checkpoint {checkpoint} is damaged ({problem}); set it aside as {aside.name} and starting the "
                  "activation pass from the beginning", stacklevel=4)
    return None


def _read_checkpoint(checkpoint: Path, signature: str) -> Resume | None:
    manifest = checkpoint / "plan.json"
    if not manifest.exists():
        return None
    saved = json.loads(manifest.read_text())
    if saved.get("signature") != signature:
        warnings.warn(f"ignoring checkpoint {checkpoint}: it was made by a different run", stacklevel=3)
        aside = checkpoint.with_name(checkpoint.name + ".ignored")
        shutil.rmtree(aside, ignore_errors=True)
        checkpoint.rename(aside)
        return None
    groups = [{int(layer): neurons for layer, neurons in group.items()} for group in saved["groups"]]
    finished = {g for g in range(len(groups)) if (checkpoint / f"group-{g}.done").exists()}
    group = next((g for g in range(len(groups)) if g not in finished), None)
    finished_splits, progress, done = [], None, 0
    if group is not None:
        for split in Split:
            path = checkpoint / _split_file(group, split.value)
            if path.exists():
                finished_splits.append(split.value)
                done = max(done, torch.load(path, map_location="cpu", weights_only=False)["batches_done"])
        path = checkpoint / f"group-{group}.progress.pt"
        if path.exists():
            candidate = torch.load(path, map_location="cpu", weights_only=False)
            if candidate["batches_done"] > done and candidate["split"] not in finished_splits:
                progress, done = candidate, candidate["batches_done"]
    return Resume(groups, finished, group, finished_splits, progress, done)


def start_checkpoint(checkpoint: Path, signature: str, plan: ExemplarPlan) -> None:
    checkpoint.mkdir(parents=True, exist_ok=True)
    groups = [{str(layer): neurons for layer, neurons in g.items()} for g in plan.group_neurons()]
    with atomic_path(checkpoint / "plan.json") as tmp:
        tmp.write_text(json.dumps({"signature": signature, "groups": groups}))


def _split_file(group: int, split: str) -> str:
    return f"group-{group}.split-{split}.pt"


def restore_group(state: PassState, checkpoint: Path, resume: Resume, device) -> int:
    """Load the checkpointed group's finished splits (on the host) and the split in progress
    (on ``device``) into ``state``; returns the number of batches done."""
    for split in resume.finished_splits:
        saved = torch.load(checkpoint / _split_file(resume.group, split), map_location="cpu", weights_only=False)
        state.restore_split(split, saved["state"], saved["stats"], "cpu")
    if resume.progress is not None:
        state.restore_split(resume.progress["split"], resume.progress["state"], resume.progress["stats"], device)
    return resume.batches_done


# Each save calls ``observe(folder, file)`` once its file is written and before it replaces
# the one it supersedes: the moment the checkpoint is at its largest (collect's _Measured).


def save_split(checkpoint: Path, signature: str, group: int, done: int, split: str, state: PassState,
               observe) -> None:
    """A finished split's state, written once; the split's progress file goes."""
    stats = state.stats.state() if split == Split.TRAIN.value else None
    with atomic_path(checkpoint / _split_file(group, split)) as tmp:
        torch.save({"signature": signature, "batches_done": done, "state": state.splits[split].state(), "stats": stats}, tmp)
        observe(checkpoint, tmp)
    (checkpoint / f"group-{group}.progress.pt").unlink(missing_ok=True)


def save_progress(checkpoint: Path, signature: str, group: int, done: int, split: str, state: PassState,
                  observe) -> None:
    """The split being read, in place of its last progress file."""
    stats = state.stats.state() if split == Split.TRAIN.value else None
    with atomic_path(checkpoint / f"group-{group}.progress.pt") as tmp:
        torch.save({"signature": signature, "batches_done": done, "split": split,
                    "state": state.splits[split].state(), "stats": stats}, tmp)
        observe(checkpoint, tmp)


def save_group_table(checkpoint: Path, group: int, key: tuple[int, Polarity], pair, observe) -> None:
    layer, polarity = key
    for name, frame in zip(("exemplars", "stats"), pair):
        with atomic_path(checkpoint / f"group-{group}.{layer}.{polarity.value}.{name}.parquet") as tmp:
            frame.write_parquet(tmp)
            observe(checkpoint, tmp)


def finish_group(checkpoint: Path, signature: str, group: int) -> None:
    with atomic_path(checkpoint / f"group-{group}.done") as tmp:
        tmp.write_text(signature)
    for path in checkpoint.glob(f"group-{group}.*.pt"):
        path.unlink()


def read_group_tables(checkpoint: Path, group: int) -> dict:
    tables = {}
    for path in sorted(checkpoint.glob(f"group-{group}.*.exemplars.parquet")):
        _, layer, polarity, _, _ = path.name.split(".")
        stats = path.with_name(path.name.replace(".exemplars.", ".stats."))
        tables[(int(layer), Polarity(polarity))] = (pl.read_parquet(path), pl.read_parquet(stats))
    return tables
