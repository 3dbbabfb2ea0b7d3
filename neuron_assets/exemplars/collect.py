"""The exemplar pass: per feature and polarity, the sequences that show what the feature does.

A streaming pass over the corpus, all requested layers at once, keeps on the model's device:

- the top-k sequences per split by per-sequence max (pos) or min (neg) activation;
- a uniform reservoir of *activating* sequences per split, from which activation-quantile
  (decile) samples are drawn at the end, as delphi's quantile sampler does;
- a uniform sample of *quiet* sequences per split (the non-activating examples of
  detection and fuzzing);
- n random sequences per split, the same for every feature;
- running sums for mean / std / fraction active, and a uniform sample of train tokens,
  the same for every feature, for approximate quantiles.

Memory is O(features x (k x seq_len + token sample)), independent of corpus size. The pass
is planned before it reads (:func:`~neuron_assets.exemplars.plan.plan_exemplar_pass`): a
split's state is allocated on the device when its first batch arrives and moves to host
memory when it is done, so the device holds one split; when even that exceeds the device
budget (``exemplars.device_memory_gb``) the features are split into groups and the corpus is
read once per group, each pass stopping after the group's deepest layer. Per-batch work runs
over slices of the feature axis, and top-k merges only the features a batch can change. The
fixed prefix of each sequence and the padding never count; with ``exemplars.prefix_cache`` the
prefix shared by a batch's rows (the chat header) is run once and each batch runs only the
tokens after it (:mod:`neuron_assets.features.prefix_cache`). Long runs checkpoint (a folder
that grows with the work done) and resume.

A sequence *activates* a feature x polarity when its extreme exceeds the threshold
``activating_fraction * max(train max, 0)``; otherwise it is quiet. The pass reads train
first, so for val and test the train max is final and both samples are exact uniform samples
(there they keep the first sequences of a split read in a random order, so a full sample
admits nothing more; see :func:`~neuron_assets.exemplars.batches.batch_keys`). While train
is read the threshold uses the train max so far, which only grows: the reservoir admits
every sequence above the running threshold (a superset of the finally activating ones) and
drops, at the end, members at or below the final threshold, so the quantile samples stay
uniform over the finally activating sequences; the quiet sample admits only sequences at or
below the running threshold, so every train quiet sequence is quiet by the final threshold
too (a conservative sample: it can miss train sequences that were read before the max grew
past 1/fraction times their extreme).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import torch
from tqdm.auto import tqdm

from neuron_assets.config import ExemplarsConfig
from neuron_assets.exemplars.batches import Corpus, batch_keys, plan_batches, random_sequence_ids
from neuron_assets.exemplars.checkpoint import (
    finish_group,
    load_checkpoint,
    read_group_tables,
    restore_group,
    run_signature,
    save_group_table,
    save_progress,
    save_split,
    start_checkpoint,
)
from neuron_assets.exemplars.plan import ExemplarPlan, plan_exemplar_pass
from neuron_assets.exemplars.state import PassState
from neuron_assets.exemplars.tables import LayerAssembler, label_kinds, pass_tables
from neuron_assets.features.prefix_cache import PrefixCache
from neuron_assets.features.selection import SaeLatents, feature_axis
from neuron_assets.features.sites import site_reader
from neuron_assets.subject import SubjectModel
from neuron_assets.types import Polarity


class Interrupted(RuntimeError):
    """Raised by a progress callback to stop a run; the last checkpoint is kept."""


def collect_exemplars(
    subject: SubjectModel,
    sequences: pl.DataFrame,
    neurons: dict[int, list[int]],
    polarities: list[Polarity],
    config: ExemplarsConfig,
    batch_size: int,
    seed: int = 0,
    checkpoint: Path | None = None,
    progress: bool = True,
    on_batch=None,
    plan: ExemplarPlan | None = None,
    on_tables=None,
    measured: dict | None = None,
    saes: dict[int, SaeLatents] | None = None,
) -> dict[tuple[int, Polarity], tuple[pl.DataFrame, pl.DataFrame]]:
    """(layer, polarity) -> (exemplars table, neuron_stats table), from one pass over the corpus
    per group of the plan (one group, one pass, unless the state exceeds the device budget).

    ``saes[layer]``, when given, adds latents of an SAE over that layer's site to the layer's
    feature axis (:func:`feature_axis`): the same hook that reads the neurons encodes the
    site's input with the SAE, so top-k, samples and statistics treat a latent as a neuron.
    Rows carry the feature's kind (column ``kind``: neuron or sae) and its index within that
    kind; an exemplar row's ``sample`` says how it was drawn (top, random, quantile, quiet).

    ``sequences`` needs only seq_id, split, token_ids, prefix_len and n_tokens. ``plan`` is
    :func:`plan_exemplar_pass`'s (made here when None). ``checkpoint`` is a folder the run
    saves its progress to and resumes from when it is there and matches this run: every
    ``config.checkpoint_every`` batches the split being read, each finished split and each
    finished group once. ``on_batch(n_done)`` is called after each batch, counted over all
    passes (progress reporting; it may raise to stop the run). ``on_tables(layer, polarity,
    exemplars, stats)``, when given, receives each layer's tables as soon as its last group is
    done, and nothing is kept for the return value. ``measured``, when given, is filled with
    the state sizes the run reached (bytes), to hold against the plan, and under
    ``prefix_cache`` a line on what the prefix cache saved (or why it was off).
    """
    if sequences.height == 0:
        raise ValueError("the sequences table is empty; build the corpus first (the 'corpus' asset)")
    subject.check_layers(list(neurons))
    saes = saes or {}
    widths = {layer: subject.neurons_per_layer(layer) for layer in neurons}
    axis = feature_axis(neurons, saes, widths.__getitem__)
    corpus = Corpus(sequences, subject.tokenizer)
    batches = plan_batches(corpus.splits, batch_size, seed)
    random_ids = random_sequence_ids(sequences, config.random_per_split, seed)
    signature = run_signature(subject.name, sequences, axis, polarities, config, batch_size, seed, saes)
    if plan is None:
        plan = plan_exemplar_pass(axis, polarities, config, corpus.seq_len, batch_size, subject.device, subject.dtype)
    resume = load_checkpoint(checkpoint, signature) if checkpoint is not None else None
    if resume is not None and resume.groups != plan.group_neurons():
        plan = plan.regrouped(resume.groups)  # a resumed run keeps the grouping its checkpoint was made with
    if checkpoint is not None and resume is None:
        start_checkpoint(checkpoint, signature, plan)

    collected: dict = {}
    emit = on_tables or (lambda layer, polarity, ex, st: collected.__setitem__((layer, polarity), (ex, st)))
    layers = LayerAssembler(axis, lambda layer, polarity, ex, st: emit(layer, polarity,
                                                                          *label_kinds(ex, st, widths[layer])))
    report = _Measured(measured)
    prefix = PrefixCache(subject, config.prefix_cache)
    bar = tqdm(total=len(plan.groups) * len(batches), desc="activations", unit="batch", disable=not progress)
    for group_no, group in enumerate(plan.groups):
        if resume is not None and group_no in resume.finished:
            layers.add(read_group_tables(checkpoint, group_no))
            bar.update(len(batches))
            continue
        state = PassState(group.neurons, polarities, config, corpus.seq_len, random_ids, subject.device, subject.dtype)
        start = 0
        if resume is not None and resume.group == group_no:
            start = restore_group(state, checkpoint, resume, subject.device)
            bar.update(start)
        neuron_index = {  # None reads a whole layer without a copy
            layer: None if idx == list(range(widths[layer])) else torch.tensor(idx, dtype=torch.long)
            for layer, idx in group.neurons.items()
        }
        with_latents = {layer: idx for layer, idx in group.neurons.items() if layer in saes and idx[-1] >= widths[layer]}
        for batch_no in range(start, len(batches)):
            split, rows = batches[batch_no]
            batch = corpus.batch(rows)
            readers_for = None
            if with_latents:
                def readers_for(rows, start, counted=batch.counted):  # the rows run from token start on
                    return {layer: site_reader(idx, widths[layer], saes[layer], counted[rows, start:])
                            for layer, idx in with_latents.items()}
            per_layer = prefix.activations(batch.ids, batch.mask, batch.prefix_len, neuron_index, readers_for)
            state.update(split, per_layer, batch, batch_keys(seed, batch_no, len(rows), corpus.seq_len, split))
            del per_layer
            report.observe(state)
            bar.update(1)
            done = batch_no + 1
            if done == len(batches) or batches[done][0] != split:
                state.finish_split(split)  # a finished split's exemplars wait in host memory
                if checkpoint is not None:
                    save_split(checkpoint, signature, group_no, done, split, state, report.observe_checkpoint)
            elif checkpoint is not None and done % config.checkpoint_every == 0:
                save_progress(checkpoint, signature, group_no, done, split, state, report.observe_checkpoint)
            if on_batch is not None:
                on_batch(group_no * len(batches) + done)
        # A finished group's tables are kept for a resumed run, but for the last group's: the
        # checkpoint goes once they are built, and a run killed before rebuilds them from its splits.
        keep = checkpoint is not None and group_no < len(plan.groups) - 1
        for key, pair in pass_tables(state, corpus, config, seed):  # one layer x polarity at a time: host memory stays bounded
            report.observe_tables(key[0], pair)
            if keep:
                save_group_table(checkpoint, group_no, key, pair, report.observe_checkpoint)
            layers.add({key: pair})
        del state
        if keep:
            finish_group(checkpoint, signature, group_no)
    bar.close()
    report.finish(plan)
    if measured is not None:
        measured["prefix_cache"] = prefix.summary()
    if checkpoint is not None:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return collected


class _Measured:
    """The state and table sizes a run reached, for holding the plan to account."""

    def __init__(self, target: dict | None):
        self.target = target
        self.peak_device = self.peak_total = self.peak_checkpoint = self.checkpoint_written = 0
        self.layer_tables: dict[int, int] = {}  # layer -> bytes of its tables, every polarity

    def observe(self, state: PassState) -> None:
        if self.target is None:
            return
        tensors = state.tensors()
        self.peak_total = max(self.peak_total, sum(t.nbytes for t in tensors))
        self.peak_device = max(self.peak_device, sum(t.nbytes for t in tensors if t.device == torch.device(state.device)))

    def observe_tables(self, layer: int, pair: tuple[pl.DataFrame, pl.DataFrame]) -> None:
        """One (layer, polarity)'s exemplars and stats as built, in host memory."""
        if self.target is None:
            return
        self.layer_tables[layer] = self.layer_tables.get(layer, 0) + sum(frame.estimated_size() for frame in pair)

    def observe_checkpoint(self, folder: Path, written: Path) -> None:
        """A file just saved to the checkpoint ``folder``: bytes written, and the folder's size."""
        if self.target is None:
            return
        self.checkpoint_written += written.stat().st_size
        self.peak_checkpoint = max(self.peak_checkpoint, sum(path.stat().st_size for path in folder.iterdir()))

    def finish(self, plan: ExemplarPlan) -> None:
        if self.target is not None:
            self.target.update(peak_device_state_bytes=self.peak_device, peak_state_bytes=self.peak_total,
                               layer_table_bytes=dict(self.layer_tables), peak_checkpoint_bytes=self.peak_checkpoint,
                               checkpoint_written_bytes=self.checkpoint_written, passes=plan.passes)
