"""The stages as plain functions: read config and upstream tables, compute, write.

Dagster assets and the CLI call these; tests call them directly. Each returns a small
summary (rows and paths per partition) that the caller turns into metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from neuron_assets.config import Config
from neuron_assets.corpus import build_sequences
from neuron_assets.exemplars import checkpoint_name, collect_exemplars, select_neurons
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


def make_exemplars(
    config: Config,
    partitions: list[tuple[int, Polarity]],
    run_id: str,
    subject: SubjectModel | None = None,
    progress: bool = True,
    on_batch=None,
) -> list[Written]:
    """Exemplars and neuron stats of the requested (layer, polarity) partitions, computed in
    one forward pass over the corpus that stops after the deepest requested layer."""
    store = Store(config.root)
    sequences = store.read("sequences")
    subject = subject or load_subject(config.subject)
    layers = sorted({layer for layer, _ in partitions})
    polarities = sorted({Polarity(p) for _, p in partitions}, key=lambda p: p.value != "pos")
    selected = select_neurons(config.features.model_copy(update={"layers": layers}), subject.num_layers,
                              subject.neurons_per_layer)
    store.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    batch_size, seed = config.subject.batch_size, config.corpus.seed
    checkpoint = store.checkpoint_dir / checkpoint_name(subject.name, sequences, selected, polarities, config.exemplars,
                                                        batch_size, seed)
    tables = collect_exemplars(
        subject, sequences, selected, polarities, config.exemplars, batch_size=batch_size, seed=seed,
        checkpoint=checkpoint, progress=progress, on_batch=on_batch,
    )
    written = []
    for layer, polarity in sorted(partitions, key=lambda p: (p[0], Polarity(p[1]).value)):
        exemplars, stats = tables[(layer, Polarity(polarity))]
        for table, frame in (("exemplars", exemplars), ("neuron_stats", stats)):
            frame = with_lineage(frame, config.subject.model, config.hash, run_id)
            path = store.write(table, frame, layer, Polarity(polarity).value)
            written.append(Written(table, path, frame.height, layer, Polarity(polarity).value))
    return written
