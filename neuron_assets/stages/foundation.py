"""The foundation stages: the corpus, and the exemplar pass (exemplars, neuron_stats and the
logit-lens output_tokens of the requested partitions, from one forward pass per group)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import polars as pl

from neuron_assets.config import Config
from neuron_assets.corpus import plan_corpus
from neuron_assets.exemplars import (
    SAE_KIND,
    SEQUENCE_COLUMNS,
    ExemplarPlan,
    SaeLatents,
    checkpoint_name,
    collect_exemplars,
    feature_axis,
    plan_exemplar_pass,
    select_neurons,
)
from neuron_assets.features.unigram import UnigramCandidate, confirm_unigrams, unigram_candidates, with_confirmation
from neuron_assets.stages.tables import SEQUENCES_TABLE, Written
from neuron_assets.store import MissingTableError, Store, with_lineage
from neuron_assets.subject import SubjectModel, load_subject, load_tokenizer
from neuron_assets.types import Polarity
from neuron_assets.validate import validate_config


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
            exemplars = exemplars.filter(pl.col("kind") != SAE_KIND)
            stats = stats.filter(pl.col("kind") != SAE_KIND)
        write_table("exemplars", exemplars, layer, polarity)
        # Stats wait for the unigram confirmation, which probes every layer's candidates at once;
        # of the exemplars only the candidates' top tokens are kept.
        pending_stats[(layer, polarity)] = stats
        if confirming:
            candidates.extend(unigram_candidates(exemplars, stats, sequences, layer, polarity, config.exemplars))

    measured = {} if measured is None else measured
    collect_exemplars(
        subject, sequences, selected, polarities, config.exemplars, batch_size=batch_size, seed=seed,
        checkpoint=checkpoint, progress=progress, on_batch=on_batch, plan=plan, on_tables=write, measured=measured,
        saes=saes,
    )
    log(measured["prefix_cache"])
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
