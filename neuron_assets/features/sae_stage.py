"""The sae_checkpoint stage as a plain function: train (or load) one layer's SAE, measure it,
write it under the store's checkpoint dir.

    <root>/checkpoints/sae/layer=<L>/sae.safetensors, sae.json     the SAE (this project's format)
    <root>/checkpoints/sae/layer=<L>/state.safetensors, state.json the resumable training state

Training reads the train split; the metrics and the reconstruction score are measured on the
first ``sae.eval_sequences`` sequences of the val split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from neuron_assets.config import Config
from neuron_assets.features.sae import (
    ReconstructionScore,
    SaeError,
    SaeMetrics,
    SparseAutoencoder,
    TrainSettings,
    evaluate_sae,
    load_sae,
    reconstruction_score,
    save_sae,
    train_sae,
)
from neuron_assets.features.prefix_cache import PrefixCache
from neuron_assets.features.site_activations import (
    CorpusSiteStream,
    autocast,
    site_activations,
    split_table,
    token_batches,
)
from neuron_assets.runtime import choose_device
from neuron_assets.store import Store
from neuron_assets.subject import SubjectModel

SEQUENCE_COLUMNS = ["seq_id", "split", "token_ids", "prefix_len", "n_tokens"]  # token ids only, no strings


@dataclass(frozen=True)
class SaeResult:
    layer: int
    folder: Path
    sae: SparseAutoencoder
    metrics: SaeMetrics
    reconstruction: ReconstructionScore | None  # None for a subject that is not a causal LM
    source: str  # "trained" or "loaded from <path> (<format>)"
    losses: tuple[float, ...] = ()
    dead_fraction_train: float | None = None
    resampled: int = 0
    resumed_from: int = 0


def make_saes(config: Config, log: Callable[[str], None] = print,
              on_step: Callable[[int, int], None] | None = None, progress=None) -> list[SaeResult]:
    """The sae_checkpoint stage: every layer of sae.layers in turn, each resuming its own
    checkpoint; ``on_step(layer, done)`` follows training, and ``progress`` (a
    neuron_assets.progress.Progress) gets one task per layer's evaluation. The subject is
    loaded once (with its LM head when causal, for the reconstruction score) and dropped after."""
    from neuron_assets import runtime
    from neuron_assets.features.site_activations import load_site_subject

    key = runtime.cache_key("site_subject", config.subject.model_dump(mode="json"))
    try:
        subject, causal = runtime.shared(key, lambda: load_site_subject(config.subject))
        results = []
        for layer in sorted(set(config.sae.layers)):
            step = None if on_step is None else (lambda done, layer=layer: on_step(layer, done))
            results.append(make_sae(config, layer, subject, causal, log=log, on_step=step, progress=progress))
            log(f"sae layer {layer}: {results[-1].source}, FVU {results[-1].metrics.fvu:.3f}, "
                f"L0 {results[-1].metrics.l0:.1f}, dead {results[-1].metrics.dead_fraction:.1%}")
        return results
    finally:
        runtime.release(key)  # the next GPU stage gets the memory back


def sae_files(store: Store, layer: int) -> list[Path]:
    """The files a finished layer's SAE leaves (what its completion marker records)."""
    from neuron_assets.features.sae import SAE_INFO, SAE_WEIGHTS

    folder = sae_folder(store, layer)
    return [folder / SAE_WEIGHTS, folder / SAE_INFO]


def sae_folder(store: Store, layer: int) -> Path:
    return store.checkpoint_dir / "sae" / f"layer={layer}"


def settings_of(config: Config) -> TrainSettings:
    s = config.sae
    return TrainSettings(kind=s.kind, expansion=s.expansion, k=s.k, l1_coefficient=s.l1_coefficient, steps=s.steps,
                         learning_rate=s.learning_rate, checkpoint_every=s.checkpoint_every,
                         resample_dead_after=s.resample_dead_after, seed=s.seed)


def make_sae(config: Config, layer: int, subject: SubjectModel, causal: bool, log: Callable[[str], None] = print,
             on_step: Callable[[int], None] | None = None, stop_after: int | None = None, progress=None) -> SaeResult:
    """Train layer's SAE on the train split (resuming its checkpoint), or load the one under
    ``sae.path``; measure it on the val split; write it in this project's format."""
    store = Store(config.store_root)
    if not store.exists("sequences"):
        store.read("sequences")  # raises the error that says how to make the table
    sequences = store.read("sequences", columns=SEQUENCE_COLUMNS)
    subject.check_layers([layer])
    device = choose_device(config.sae.device)
    folder = sae_folder(store, layer)
    batch = config.subject.batch_size
    width = subject.neurons_per_layer(layer)
    extra: dict = {"layer": layer, "model": config.subject.model}
    if config.sae.path:
        sae = load_sae(config.sae.path, config.sae.format, layer).to(device)
        if sae.d_in != width:
            raise SaeError(f"the SAE under {config.sae.path} for layer {layer} reads {sae.d_in} dimensions but the site "
                           f"of {config.subject.model} layer {layer} has {width}; point sae.path at SAEs of this model's "
                           "MLP neuron site")
        source, trained = f"loaded from {config.sae.path} ({config.sae.format})", None
    else:
        settings = settings_of(config)
        stream = CorpusSiteStream(subject, split_table(sequences, "train", subject.tokenizer), layer,
                                  config.sae.batch_tokens, config.sae.block_sequences, config.sae.seed, device, batch,
                                  config.exemplars.prefix_cache)
        trained = train_sae(stream, settings, checkpoint=folder, device=device, log=log, stop_after=stop_after,
                            on_step=on_step)
        sae, source = trained.sae, "trained"
        extra.update(settings=settings.hash, steps=settings.steps, batch_tokens=config.sae.batch_tokens)
    val = split_table(sequences.filter(pl.col("split") == "val").sort("seq_id").head(config.sae.eval_sequences),
                      "val", subject.tokenizer)
    from neuron_assets.progress import Progress

    passes = -(-len(val) // batch) * (2 if causal else 1)  # the metrics' pass, then the reconstruction score's
    with (progress or Progress([])).task(f"sae layer {layer} evaluation", passes, "batch") as task:
        metrics = evaluate_sae(sae, counted(site_activations(subject, val, layer, batch, device=device,
                                                             prefix=PrefixCache(subject, config.exemplars.prefix_cache)), task))
        score = None
        if causal:
            with autocast(subject):
                batches = ((b.ids, b.mask, b.counted) for b in token_batches(val, batch))
                score = reconstruction_score(subject.model, subject.sites[layer], sae, counted(batches, task))
    extra.update(source=source, metrics=metrics.as_dict(),
                 reconstruction=None if score is None else {**score.__dict__, "score": score.score})
    if stop_after is None or trained is None or len(trained.losses) >= config.sae.steps:
        save_sae(sae, folder, extra)
    return SaeResult(layer, folder, sae, metrics, score, source,
                     losses=tuple(trained.losses) if trained else (),
                     dead_fraction_train=trained.dead_fraction if trained else None,
                     resampled=trained.resampled if trained else 0,
                     resumed_from=trained.resumed_from if trained else 0)


def counted(items, task):
    """``items``, advancing ``task`` by one as each is taken."""
    for item in items:
        yield item
        task.advance(1)
