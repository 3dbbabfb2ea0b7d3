"""The stages as plain functions: read config and upstream tables, compute, write.

Dagster assets and the CLI call these; tests call them directly. Each returns a small
summary (rows and paths per partition) that the caller turns into metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from neuron_assets.config import Config
from neuron_assets.corpus import build_sequences
from neuron_assets.exemplars import (
    SEQUENCE_COLUMNS,
    ExemplarPlan,
    checkpoint_name,
    collect_exemplars,
    plan_exemplar_pass,
    select_neurons,
)
from neuron_assets.store import Store, with_lineage
from neuron_assets.subject import SubjectModel, load_subject, load_tokenizer
from neuron_assets.types import Polarity
from neuron_assets.validate import validate_config


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
    frame = with_lineage(build_sequences(config.corpus, tokenizer), config.subject.model, config.hash, run_id)
    return Written("sequences", Store(config.root).write("sequences", frame), frame.height)


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
    device budget), each stopping after its deepest layer. Each layer's tables are written
    as soon as its last pass is done. ``log`` receives the plan before reading starts;
    ``measured`` (a dict) receives the state sizes the run reached."""
    store = Store(config.root)
    if not store.exists("sequences"):
        store.read("sequences")  # raises the error that says how to make the table
    sequences = pl.read_parquet(store.path("sequences"), columns=SEQUENCE_COLUMNS)  # token ids only, no strings
    subject = subject or load_subject(config.subject)
    layers = sorted({layer for layer, _ in partitions})
    polarities = sorted({Polarity(p) for _, p in partitions}, key=lambda p: p.value != "pos")
    selected = select_neurons(config.features.model_copy(update={"layers": layers}), subject.num_layers,
                              subject.neurons_per_layer)
    store.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    batch_size, seed = config.subject.batch_size, config.corpus.seed
    seq_len = int(sequences["n_tokens"].max())
    plan = plan_exemplar_pass(selected, polarities, config.exemplars, seq_len, batch_size, subject.device, subject.dtype)
    log(plan.describe())
    checkpoint = store.checkpoint_dir / checkpoint_name(subject.name, sequences, selected, polarities, config.exemplars,
                                                        batch_size, seed)
    wanted = {(layer, Polarity(polarity)) for layer, polarity in partitions}
    written = []

    def write(layer: int, polarity: Polarity, exemplars: pl.DataFrame, stats: pl.DataFrame) -> None:
        if (layer, polarity) not in wanted:
            return
        for table, frame in (("exemplars", exemplars), ("neuron_stats", stats)):
            frame = with_lineage(frame, config.subject.model, config.hash, run_id)
            path = store.write(table, frame, layer, polarity.value)
            written.append(Written(table, path, frame.height, layer, polarity.value))

    collect_exemplars(
        subject, sequences, selected, polarities, config.exemplars, batch_size=batch_size, seed=seed,
        checkpoint=checkpoint, progress=progress, on_batch=on_batch, plan=plan, on_tables=write, measured=measured,
    )
    written.sort(key=lambda w: (w.layer, w.polarity, w.table))
    return ExemplarRun(written, plan)
