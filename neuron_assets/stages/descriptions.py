"""The explain stage: k candidate descriptions per feature of each partition."""

from __future__ import annotations

from dataclasses import dataclass, replace

import polars as pl

from neuron_assets.config import Config
from neuron_assets.exemplars import (
    NEURON_KIND,
    load_feature_exemplars,
)
from neuron_assets.progress import Progress
from neuron_assets.stages.tables import (
    CANDIDATES_TABLE,
    SEQUENCES_TABLE,
    Log,
    Written,
    features_by_kind,
    quiet,
    with_kind,
)
from neuron_assets.store import Store, with_lineage
from neuron_assets.subject import load_tokenizer
from neuron_assets.types import FeatureExemplars, Polarity


@dataclass(frozen=True)
class CandidatesWritten:
    written: list[Written]  # one per partition, in the requested order
    frame: pl.DataFrame  # every partition's rows
    missing: list[tuple[int, str, int]]  # (layer, polarity, neuron) with fewer than k candidates
    backend: str  # "<backend> (<model>)"


def make_candidate_descriptions(config: Config, partitions: list[tuple[int, Polarity]], run_id: str,
                                explainer=None, progress: Progress | None = None, log: Log = quiet) -> CandidatesWritten:
    """k candidate descriptions per feature of each partition, written as each partition is
    done. ``explainer``: a built explainer to reuse (one is made from config.explain otherwise).

    An LLM explainer's answers are kept in the store's answer cache (``<root>/llm_cache``):
    a partition computed again (a run killed after writing it, before marking it done)
    reads them from there instead of paying for them again."""
    from neuron_assets.explain import corpus_from_sequences, explain_features, incomplete_features, make_explainer

    store = Store(config.store_root)
    explainer = with_answer_cache(explainer or make_explainer(config.explain), config)
    tokenizer = load_tokenizer(config.subject)
    corpus = corpus_from_sequences(store.read(SEQUENCES_TABLE), seed=config.explain.seed)
    progress = progress or Progress([])
    frames, missing, written = [], [], []
    for layer, polarity in partitions:
        polarity = Polarity(polarity)
        parts = []
        for kind, of_kind in features_by_kind(load_feature_exemplars(store, layer, polarity)):
            features = _explained(of_kind, store, layer, polarity, config.explain.flagged_features, log, kind)
            features = reaching_polarity(features, layer, polarity, kind, log)
            if config.explain.output_tokens:
                features = with_output_tokens(features, store, layer, polarity, kind, log)
            label = f"explain {layer}|{polarity.value}" + ("" if kind == NEURON_KIND else f" {kind}")
            asked_before = _cache_counts(explainer)
            with progress.task(label, len(features) * config.explain.k, "candidate") as task:
                part = explain_features(features, config.explain, tokenizer_for_display=tokenizer, progress=False,
                                        explainer=explainer, corpus=corpus, on_candidates=task.advance)
            _log_cache_hits(explainer, asked_before, f"layer {layer} {polarity.value}", log)
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


def with_answer_cache(explainer, config: Config):
    """An LLM explainer with its answers kept in the store's answer cache
    (``<root>/llm_cache/answers.sqlite``); any other explainer, or any explainer when
    explain.answer_cache is off, as it is."""
    if not hasattr(explainer, "with_answer_cache") or not config.explain.answer_cache:
        return explainer
    from neuron_assets.llm import AnswerCache

    return explainer.with_answer_cache(AnswerCache.under(config.root))


def _cache_counts(explainer) -> tuple[int, int]:
    llm = getattr(explainer, "llm", None)
    return getattr(llm, "hits", 0), getattr(llm, "misses", 0)


def _log_cache_hits(explainer, before: tuple[int, int], where: str, log: Log) -> None:
    hits, misses = (now - then for now, then in zip(_cache_counts(explainer), before))
    if hits:
        log(f"{where}: {hits} of {hits + misses} explainer answers came from the answer cache "
            f"({explainer.llm.cache.path}; 0 tokens paid for them)")


FLAGS = ("is_positional", "is_unigram")  # neuron_stats' feature filters


def reaching_polarity(features: list[FeatureExemplars], layer: int, polarity: Polarity, kind: str,
                      log: Log) -> list[FeatureExemplars]:
    """The features that reach this polarity at all (train max above 0). One that never does (a
    neuron that is never negative) has no activation of that sign to describe: it is left out
    and said so, not explained and counted k times as failed."""
    kept = [f for f in features if f.stats.max > 0]
    if len(kept) < len(features):
        log(f"layer {layer} {polarity.value}: {len(features) - len(kept)} {kind} features never reach this polarity "
            "(their train max is not above 0): no activation of that sign to describe, skipped")
    return kept


def _explained(features: list[FeatureExemplars], store: Store, layer: int, polarity: Polarity, choice: str,
               log: Log, kind: str = NEURON_KIND) -> list[FeatureExemplars]:
    """The features explain.flagged_features keeps: all, those not flagged, or only those flagged."""
    if choice == "all":
        return features
    stats = store.read("neuron_stats", layer, polarity.value)
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


def with_output_tokens(features: list[FeatureExemplars], store: Store, layer: int, polarity: Polarity, kind: str,
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
