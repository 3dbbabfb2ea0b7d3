"""What each stage's run shows about itself (row counts, paths, tables, plots), as plain dicts:
values are plain Python values, :class:`Markdown` for markdown (tables, images), a
``pathlib.Path`` (or a :class:`Location`, a remote store's URL) for files and folders,
:class:`Url` for links, lists and dicts for JSON. neuron_assets.defs shows them as a
materialization's metadata in the Dagster UI; nothing here imports Dagster.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from neuron_assets.config import Config
from neuron_assets.report.plots import (
    best_of_k_figure,
    explainer_curves_figure,
    latent_frequency_histogram,
    loss_curve_figure,
    markdown_image,
    sae_loss_figure,
    score_histograms,
    val_test_scatter,
)
from neuron_assets.report.render import highlight_markdown, markdown_table
from neuron_assets.score.select import CANDIDATE, SHUFFLED_CONTROL, best_of_k_curve, rows_of
from neuron_assets.stages.tables import DESCRIPTIONS_TABLE, SCORES_TABLE, SEQUENCES_TABLE, Written, read_all
from neuron_assets.store import Store, is_url
from neuron_assets.types import Partition, Split


class Markdown(str):
    """Markdown text: a table, an embedded image."""


class Url(str):
    """A link to open."""


class Location(str):
    """A file or folder of a remote store (a URL); local ones are pathlib.Path."""


def location(path: str | os.PathLike) -> Path | Location:
    return Location(str(path)) if is_url(path) else Path(path)


def skipped(config: Config, reason: str) -> dict:
    return {"skipped": reason, "config_hash": config.hash}


# -- corpus and exemplars -------------------------------------------------------------------


def split_sizes(store: Store) -> pl.DataFrame:
    """Sequences per split and source (columns split, source, len)."""
    return store.scan(SEQUENCES_TABLE).group_by("split", "source").len().sort("split", "source").collect()


def corpus_metadata(config: Config, store: Store, sizes: pl.DataFrame, up_to_date: bool) -> dict:
    return {
        **({"skipped": "up to date"} if up_to_date else {}),
        "rows": int(sizes["len"].sum()),
        "path": location(store.path(SEQUENCES_TABLE)),
        "config_hash": config.hash,
        "split_sizes": Markdown(markdown_table(sizes.columns, sizes.iter_rows())),
    }


def exemplars_metadata(config: Config, store: Store, run, partitions: list[Partition]) -> dict:
    """``run``: the exemplar stage's ExemplarRun (what it wrote, the plan it followed)."""
    return {
        "partitions": len(partitions),
        "rows": sum(w.rows for w in run.written if w.table == "exemplars"),
        "config_hash": config.hash,
        "written": written_table(run.written),
        "preview": exemplar_preview(store, Partition.of(partitions[0])),
        "root": location(store.table_dir("exemplars")),
        "passes": run.plan.passes,
        "plan": Markdown("```\n" + run.plan.describe() + "\n```"),
        "plan_json": run.plan.as_dict(),
    }


def exemplars_partition_metadata(store: Store, run, partitions: list[Partition]) -> dict[str, dict]:
    """Partition key -> its own rows and preview (a range run's observations)."""
    return {partition.key: {
        "rows": sum(w.rows for w in run.written
                    if w.table == "exemplars" and (w.layer, w.polarity) == (partition.layer, partition.polarity.value)),
        "preview": exemplar_preview(store, partition)} for partition in partitions}


def written_table(written: list[Written], with_table: bool = True) -> Markdown:
    """One row per file written: (table,) layer, polarity, rows, path."""
    header = ["table", "layer", "polarity", "rows", "path"]
    rows = [(w.table, w.layer, w.polarity, w.rows, f"`{w.path}`") for w in written]
    if not with_table:
        header, rows = header[1:], [row[1:] for row in rows]
    return Markdown(markdown_table(header, rows))


def exemplar_preview(store: Store, partition: Partition) -> Markdown:
    """The first neuron's three strongest train exemplars, activating tokens in bold."""
    from neuron_assets.exemplars import load_feature_exemplars

    layer, polarity = partition
    first = store.read("neuron_stats", layer, polarity.value, columns=["neuron"])["neuron"].min()
    features = load_feature_exemplars(store, layer, polarity, neurons=[first])
    if not features:
        return Markdown("no features")
    feature = features[0]
    lines = [f"partition {partition.key}: **{feature.feature}** (max {feature.stats.max:.3f})", ""]
    for exemplar in feature.top(Split.TRAIN)[:3]:
        lines.append(f"- {exemplar.extreme:.3f}: " + highlight_markdown(exemplar.record, feature.feature.polarity))
    return Markdown("\n".join(lines))


# -- candidate descriptions -----------------------------------------------------------------


def candidates_metadata(config: Config, store: Store, made, reasons: dict[str, int]) -> dict:
    """``made``: the explain stage's CandidatesWritten; ``reasons``: failure reason -> count."""
    from neuron_assets.explain import summarize_candidates
    from neuron_assets.stages.tables import CANDIDATES_TABLE

    summary = summarize_candidates(made.frame, config.explain)
    metadata = {
        "failures_by_reason": reasons,
        "rows": summary.rows,
        "features": summary.features,
        "described": summary.described,
        "failed": summary.failed,
        "prompt_tokens": summary.prompt_tokens,
        "completion_tokens": summary.completion_tokens,
        "mean_latency_s": round(summary.mean_latency_s, 4),
        "backend": made.backend,
        "config_hash": config.hash,
        "examples": Markdown(summary.examples_markdown),
        "failures": Markdown(summary.failures_markdown),
        "written": written_table(made.written, with_table=False),
        "root": location(store.table_dir(CANDIDATES_TABLE)),
    }
    if summary.cost_usd is not None:
        metadata["cost_usd"] = round(summary.cost_usd, 4)
    return metadata


# -- the simulator ---------------------------------------------------------------------------


def training_data_metadata(config: Config, written) -> dict:
    """``written``: the stage's TrainingDataWritten."""
    return {"rows": written.rows, "features_by_role": written.features, "partitions": written.partitions,
            "path": location(written.path), "config_hash": config.hash}


def checkpoint_metadata(config: Config, written) -> dict:
    """``written``: the simulator_checkpoint stage's CheckpointWritten (trained)."""
    return {
        "version": written.version,
        "folds": written.folds,
        "path": Path(written.paths[0]).parent.parent,
        "heldout_correlation": round(written.heldout_correlation, 4),
        "heldout_shuffled_control": round(written.heldout_shuffled_correlation, 4),
        "stage1_heldout_correlation": round(written.stage1_heldout_correlation, 4),
        "steps": written.steps,
        "train_seconds": round(written.seconds, 1),
        "resumed": written.resumed,
        "loss_curve": Markdown(markdown_image(loss_curve_figure(written.loss_curve), "loss curve")),
        "config_hash": config.hash,
    }


# -- scores and selected descriptions -------------------------------------------------------


def scores_metadata(config: Config, store: Store, frame: pl.DataFrame, scoring, written: list) -> dict:
    """``frame``: the description_scores rows written; ``scoring``: the run's
    neuron_assets.score.crossfit.Scoring; ``written``: ScoresWritten per partition."""
    selector = scoring.selector
    chosen = rows_of(frame, selector.name, selector.simulator).filter(pl.col("split") == "val")
    candidates = chosen.filter(pl.col("role") == CANDIDATE)
    controls = chosen.filter(pl.col("role") == SHUFFLED_CONTROL)
    by_layer = {k[0]: g["score"].to_list() for k, g in candidates.group_by("layer")}
    control_by_layer = {k[0]: g["score"].to_list() for k, g in controls.group_by("layer")}
    curve = best_of_k_curve(frame, selector.name, selector.simulator)
    label = _label(selector)
    metadata = {
        "rows": frame.height,
        "partitions": len(written),
        "scorers": ", ".join(_label(s) for s in scoring.scorers),
        "selects": label,
        "selector_validity": selector_validity(store, selector.name, selector.simulator),
        "simulator_checkpoint": scoring.simulator_version or "none",
        "means": means_table(frame, scoring),
        "flagged_constant_predictions": int(candidates["flags"].list.len().gt(0).sum()) if candidates.height else 0,
        "per_layer_histogram": Markdown(markdown_image(
            score_histograms(by_layer, control_by_layer, f"candidates, {label} (val), per layer"), "histogram")),
        "best_of_k": Markdown(markdown_image(best_of_k_figure(curve, f"mean test score of the val-best of k, {label}"), "best of k")
                              + f"\n\nfit: mean_best(k) = {curve.fit_a} * k^{curve.fit_b}"),
        "root": location(store.table_dir(SCORES_TABLE)),
        "seconds": round(sum(w.seconds for w in written), 1),
        "config_hash": config.hash,
    }
    for name, reason in scoring.skipped.items():
        metadata[f"skipped {name}"] = reason
    return metadata


def selector_validity(store: Store, scorer: str, simulator: str | None) -> str:
    """The selecting scorer's held-out validity, as a sentence (stored by scorer_validity)."""
    from neuron_assets.score.validity import scorer_key, stored_validity, validity_sentence

    key = scorer_key(scorer, simulator)
    return validity_sentence(key, stored_validity(store, key))


def means_table(frame: pl.DataFrame, scoring) -> Markdown:
    """Each scorer's mean val score of the candidates and of the shuffled controls."""
    table = []
    for scorer in scoring.scorers:
        rows = rows_of(frame, scorer.name, scorer.simulator).filter(pl.col("split") == "val")
        table.append((_label(scorer), _mean(rows.filter(pl.col("role") == CANDIDATE)["score"]),
                      _mean(rows.filter(pl.col("role") == SHUFFLED_CONTROL)["score"])))
    return Markdown(markdown_table(["scorer", "candidates (val)", "shuffled control (val)"], table))


def descriptions_metadata(config: Config, store: Store, frame: pl.DataFrame, written: list) -> dict:
    """``frame``: the neuron_descriptions rows written; the histogram covers every partition."""
    everything = read_all(store, DESCRIPTIONS_TABLE)
    by_layer = {k[0]: g["test_score"].to_list() for k, g in everything.group_by("layer")} if everything.height else {}
    control_by_layer = ({k[0]: g["control_test_score"].drop_nulls().to_list() for k, g in everything.group_by("layer")}
                        if everything.height else {})
    with_control = frame.filter(pl.col("control_test_score").is_not_null() & pl.col("control_val_score").is_not_null())
    return {
        "rows": frame.height,
        "selector_validity": "; ".join(selector_validity(store, scorer, simulator) for scorer, simulator in
                                       frame.select("scorer", "simulator").unique().sort("scorer", "simulator").rows()),
        "partitions": len(written),
        "mean_val_score": _mean(frame["val_score"]),
        "mean_test_score": _mean(frame["test_score"]),
        "val_minus_test": round(_mean(frame["val_score"]) - _mean(frame["test_score"]), 4),
        "mean_control_test_score": _mean(frame["control_test_score"]),
        "above_control_on_test": round(float((with_control["test_score"] > with_control["control_test_score"]).mean()), 4)
        if with_control.height else None,
        "val_vs_test": Markdown(markdown_image(val_test_scatter(
            frame["val_score"].to_list(), frame["test_score"].to_list(), with_control["control_val_score"].to_list(),
            with_control["control_test_score"].to_list()),
            "val vs test")),
        "per_layer_histogram_all_partitions": Markdown(markdown_image(
            score_histograms(by_layer, control_by_layer, "selected description, test score, per layer"), "histogram")),
        "root": location(store.table_dir(DESCRIPTIONS_TABLE)),
        "config_hash": config.hash,
        **explorer_links(frame),
    }


def explorer_links(frame: pl.DataFrame) -> dict:
    """Links into the explorer (`neuron-assets serve`; base URL $NEURON_ASSETS_EXPLORER_URL, else
    http://127.0.0.1:8000): the layer page of the rows' partition (the layers overview when they
    span several) and the page of their best feature by test score."""
    from neuron_assets.serve.links import explorer_url, feature_url, layer_url

    if frame.height == 0:
        return {}
    kinds = frame["kind"] if "kind" in frame.columns else pl.Series(["neuron"] * frame.height)
    partitions = frame.select("layer", "polarity").unique()
    one_kind = kinds.n_unique() == 1
    links = {"explorer": Url(layer_url(int(partitions["layer"][0]), str(partitions["polarity"][0]), str(kinds[0]))
                             if partitions.height == 1 and one_kind else explorer_url() + "/layers")}
    ranked = frame.with_columns(kinds.alias("kind")).filter(pl.col("test_score").is_not_null()).sort(
        "test_score", descending=True)
    if ranked.height:
        best = ranked.row(0, named=True)
        links["explorer_best_feature"] = Url(feature_url(int(best["layer"]), str(best["polarity"]), int(best["neuron"]),
                                                         str(best["kind"] or "neuron")))
    return links


def descriptions_partition_metadata(frame: pl.DataFrame, written: list) -> dict[str, dict]:
    """Partition key -> the values of its own neuron_descriptions rows (a range run's observations)."""
    values = {}
    for w in written:
        part = frame.filter((pl.col("layer") == w.layer) & (pl.col("polarity") == w.polarity))
        with_control = part.filter(pl.col("control_test_score").is_not_null())
        values[Partition.of((w.layer, w.polarity)).key] = {
            "rows": part.height,
            "mean_val_score": _mean(part["val_score"]),
            "mean_test_score": _mean(part["test_score"]),
            "above_control_on_test": round(float((with_control["test_score"] > with_control["control_test_score"]).mean()), 4)
            if with_control.height else None,
            **explorer_links(part),
        }
    return values


def _label(scorer) -> str:
    return scorer.name + (f" ({scorer.simulator})" if scorer.simulator else "")


def _mean(series: pl.Series) -> float:
    values = series.drop_nulls()
    return round(float(values.mean()), 4) if values.len() else 0.0


# -- search, validity, the report -----------------------------------------------------------


def embeddings_metadata(config: Config, store: Store, written: list, index) -> dict:
    """``written``: EmbeddingsWritten per partition; ``index``: the search index built (IndexBuilt)."""
    from neuron_assets.search import EMBEDDINGS_TABLE

    return {"rows": sum(w.rows for w in written), "embedded": sum(w.embedded for w in written),
            "reused": sum(w.reused for w in written), "partitions": len(written),
            "index_rows": index.rows, "index_shards": index.shards, "index_shards_built": index.built,
            "index_seconds": round(index.seconds, 2), "model": config.search.embedding_model,
            "index": Path(index.path), "root": location(store.table_dir(EMBEDDINGS_TABLE)),
            "config_hash": config.hash}


def validity_metadata(config: Config, report, rows: int, path) -> dict:
    """``report``: neuron_assets.score.validity.ValidityReport, written as ``rows`` rows to ``path``."""
    from neuron_assets.score.validity import report_table

    header, table = report_table(report)
    return {"validity": Markdown(markdown_table(header, table)), "rows": rows,
            "skipped": dict(report.skipped) or "none", "path": location(path), "config_hash": config.hash}


def report_links(index: Path) -> dict:
    """The static report's index.html, as a path and as a link to open."""
    return {"index": Path(index), "open": Url(Path(index).resolve().as_uri())}


def report_metadata(config: Config, written) -> dict:
    """``written``: neuron_assets.report.site.ReportWritten."""
    return {**report_links(written.index), "partition_pages": written.partition_pages,
            "neuron_pages": written.neuron_pages, "seconds": round(written.seconds, 1), "config_hash": config.hash}


# -- SAEs and the distilled explainer --------------------------------------------------------


def saes_metadata(results: list, config: Config) -> dict:
    """One SAE's metadata, or each layer's prefixed with ``layer L``."""
    if len(results) == 1:
        return sae_metadata(results[0], config)
    return {f"layer {r.layer} {key}": value for r in results for key, value in sae_metadata(r, config).items()}


def sae_metadata(result, config: Config) -> dict:
    """``result``: one layer's neuron_assets.features.sae_stage result."""
    from neuron_assets.features.sae import log_frequency_histogram

    metrics = result.metrics
    metadata: dict = {
        "source": result.source,
        "path": Path(result.folder),
        "latents": result.sae.d_latent,
        "d_in": result.sae.d_in,
        "eval_tokens": metrics.tokens,
        "mse": metrics.mse,
        "fvu": metrics.fvu,
        "l0": metrics.l0,
        "dead_fraction": metrics.dead_fraction,
        "config_hash": config.hash,
    }
    if result.reconstruction is not None:
        score = result.reconstruction
        metadata.update(reconstruction_score=score.score, clean_loss=score.clean_loss, spliced_loss=score.spliced_loss,
                        zero_ablation_loss=score.zero_ablation_loss)
    if result.dead_fraction_train is not None:
        metadata.update(dead_fraction_train=result.dead_fraction_train, resampled=result.resampled,
                        resumed_from_step=result.resumed_from)
    edges, counts, dead = log_frequency_histogram(metrics.frequencies)
    metadata["latent_frequency"] = Markdown(markdown_image(latent_frequency_histogram(edges, counts, dead),
                                                           "log10 latent frequency"))
    metadata["latent_frequency_table"] = Markdown(markdown_table(
        ["log10 frequency from", "to", "latents"],
        [(f"{edges[i]:.2f}", f"{edges[i + 1]:.2f}", counts[i]) for i in range(len(counts))] + [("never", "", dead)]))
    if result.losses:
        metadata["loss_curve"] = Markdown(markdown_image(sae_loss_figure(result.losses), "loss"))
    return metadata


def distilled_metadata(written, config: Config) -> dict:
    """``written``: neuron_assets.stages.DistilledWritten."""
    trained = written.explainer
    return {
        "version": trained.version,
        "path": Path(trained.path),
        "base_model": trained.base_model,
        "method": trained.method,
        "dtype": trained.dtype,
        "train_features": written.train_features,
        "heldout_features": written.heldout_features,
        "examples": trained.examples,
        "answer_tokens_per_epoch": trained.answer_tokens,
        "epochs": trained.epochs,
        "steps": trained.steps,
        "first_loss": round(trained.loss_curve[0], 4),
        "last_loss": round(trained.loss_curve[-1], 4),
        "train_seconds": round(trained.seconds, 1),
        "resumed": trained.resumed,
        "loss_curve": Markdown(markdown_image(
            loss_curve_figure({"distillation": trained.loss_curve}, "distilled explainer training loss"), "loss curve")),
        "config_hash": config.hash,
    }


def evaluation_metadata(written, config: Config) -> dict:
    """``written``: neuron_assets.stages.DistillEvalWritten."""
    rows = [(c.explainer, k, f"{t:.4f}", f"{v:.4f}", n) for c in written.curves
            for k, t, v, n in zip(c.k, c.mean_best_test, c.mean_best_val, c.features)]
    metadata = {
        "checkpoint": Path(written.checkpoint),
        "scorer": written.scorer,
        "heldout_features": written.features,
        "seconds": round(written.seconds, 1),
        "best_of_k": Markdown(markdown_image(explainer_curves_figure(written.curves), "mean best-of-k score")),
        "table": Markdown(markdown_table(
            ["explainer", "k", "mean best test", "mean best val (biased)", "features"], rows)),
        "path": location(written.table_path),
        "config_hash": config.hash,
    }
    for curve in written.curves:
        metadata[f"{curve.explainer}_failed_candidates"] = f"{curve.failed_candidates} of {curve.candidates}"
    return metadata


def write_evaluation_plot(written) -> None:
    """The best-of-k picture of a distilled explainer's evaluation (stages.DistillEvalWritten),
    written beside the checkpoint it judges (``EVAL_PLOT``), where `neuron-assets distill` shows it."""
    from neuron_assets.report.plots import explainer_curves_figure
    from neuron_assets.stages import EVAL_PLOT
    from neuron_assets.store import atomic_path

    with atomic_path(written.checkpoint / EVAL_PLOT) as tmp:
        tmp.write_bytes(explainer_curves_figure(written.curves))
