"""The stage graph, declared once: each stage's inputs, whether it is partitioned by layer x
polarity, and the config sections that make it stale. `neuron-assets run`, the resume markers and
the Dagster definitions (neuron_assets.defs) are all built from it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from neuron_assets.config import Config
from neuron_assets.types import Partition, Polarity


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # the config sections the stage reads
    upstream: tuple[str, ...]
    partitioned: bool


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("corpus", ("subject", "corpus"), (), False),
    Stage("sae_checkpoint", ("subject", "corpus", "sae"), ("corpus",), False),
    Stage("exemplars", ("subject", "corpus", "features", "exemplars", "sae"), ("corpus", "sae_checkpoint"), True),
    Stage("candidate_descriptions", ("subject", "explain"), ("exemplars", "corpus"), True),
    Stage("simulator_training_data", ("simulate",), ("exemplars", "candidate_descriptions"), False),
    Stage("simulator_checkpoint", ("subject", "simulate"), ("simulator_training_data",), False),
    Stage("description_scores", ("explain", "simulate", "score"),
          ("candidate_descriptions", "exemplars", "simulator_checkpoint"), True),
    Stage("neuron_descriptions", ("explain", "simulate", "score"),
          ("description_scores", "exemplars", "simulator_checkpoint"), True),
    Stage("description_embeddings", ("subject", "search"),
          ("neuron_descriptions", "candidate_descriptions"), True),
    Stage("description_clusters", ("subject", "search", "clusters", "explain"), ("description_embeddings",), False),
    Stage("description_effects", ("subject", "search", "effects"),
          ("neuron_descriptions", "exemplars", "sae_checkpoint"), True),
    Stage("scorer_validity", ("subject", "corpus", "simulate", "score"), ("corpus", "simulator_checkpoint"), False),
    Stage("neuron_report", (), ("exemplars", "candidate_descriptions", "description_scores", "neuron_descriptions"), False),
    Stage("explainer_distilled", ("subject", "explain", "distill"), ("neuron_descriptions", "exemplars"), False),
    Stage("distilled_explainer_eval", ("subject", "explain", "simulate", "score", "distill"),
          ("explainer_distilled", "exemplars", "simulator_checkpoint"), False),
)}
ON_DEMAND = ("explainer_distilled", "distilled_explainer_eval")  # in a run only when selected, or with distill.in_run


def stage_active(name: str, config: Config) -> bool:
    """Whether a config has the stage at all: sae_checkpoint only when it names SAE layers."""
    return name != "sae_checkpoint" or bool(config.sae.layers)


def in_plain_run(name: str, config: Config) -> bool:
    """Whether `neuron-assets run` without --select materializes the stage: the distilled
    explainer's stages only with distill.in_run (they take minutes on CPU), the description clusters
    with clusters.in_run (on by default), the description effects with effects.in_run (off by default)."""
    if name == "description_clusters":
        return config.clusters.in_run
    if name == "description_effects":
        return config.effects.in_run
    return name not in ON_DEMAND or config.distill.in_run


def partitions_of(config: Config) -> list[Partition]:
    """Every layer x polarity partition of the config's per-feature stages, layer by layer
    (``features.layers: all`` reads the model's layer count from its config, not its weights)."""
    from neuron_assets.subject import count_layers

    layers = range(count_layers(config.subject)) if config.features.layers == "all" else sorted(config.features.layers)
    return [Partition(layer, Polarity(polarity)) for layer in layers for polarity in config.features.polarities]


def stage_version(config: Config, name: str) -> str:
    """The hash of what makes stage ``name`` stale: the config sections it reads (for the corpus
    also the size and modification time of the user's source files). Its resume marker records
    it, and it is the stage's Dagster data version."""
    digest = config.sections_hash(*STAGES[name].sections)
    if name == "corpus":
        digest += "-" + _sources_listing(config)
    return digest


def _sources_listing(config: Config) -> str:
    """Size and modification time of every file the corpus reads, hashed: an edited source
    makes the corpus stale even though the config did not change."""
    digest = hashlib.sha256()
    for source in config.corpus.sources:
        if source.kind == "builtin":
            continue
        root = Path(source.path).expanduser()
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for file in files:
            try:
                stat = file.stat()
            except FileNotFoundError:
                continue  # the corpus stage names a missing source
            digest.update(f"{file}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]
