"""The static HTML report of a store: an index, one page per layer x polarity (score
histograms, the best-of-k curve, a sortable table of its features) and feature pages.

    build_report(Store(root))  ->  <root>/report/index.html

The report is built in a temporary folder beside its place and renamed into it, so a reader
never sees half a report. Every page stands alone (see :mod:`neuron_assets.report.html`).
Features are a layer's neurons and, where an SAE was described, its latents (kind ``sae``,
pos only): the tables list both with their kind, the index has a row per layer x polarity x
kind, and the histograms and best-of-k curves pool a partition's features. Feature pages are
written for the best ``neuron_pages`` features of each kind of each layer x polarity by test
score (every feature of the demo); the tables link those.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl

from neuron_assets.report.html import SORT_SCRIPT, escape, image, neuron_page, page, table
from neuron_assets.store import Store
from neuron_assets.types import Polarity

REPORT_DIR = "report"
INDEX = "index.html"
NEURON_PAGES = 200
"""Feature pages per layer x polarity and kind (the best by test score): each page renders two
figures and reads its feature's exemplars, so a 14,336-neuron layer gets its best pages, not all."""
NEURON_KIND = "neuron"
KIND_LABELS = {NEURON_KIND: "neuron", "sae": "SAE latent"}


@dataclass(frozen=True)
class ReportWritten:
    index: Path
    partition_pages: int
    neuron_pages: int
    seconds: float


def report_index(store: Store) -> Path:
    return store.local_dir / REPORT_DIR / INDEX


def build_report(store: Store, neuron_pages: int = NEURON_PAGES) -> ReportWritten:
    """Write the report of everything the store has collected, replacing the previous one."""
    started = time.perf_counter()
    partitions = sorted(store.partitions("neuron_stats"), key=lambda p: (p[0], p[1] != "pos"))
    if not partitions:
        raise LookupError(f"no neuron_stats under {store.data_dir}; run `neuron-assets run` first")
    target = store.local_dir / REPORT_DIR
    for leftover in [*store.local_dir.glob(f".{REPORT_DIR}-*.tmp"), *store.local_dir.glob(f".{REPORT_DIR}-old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)  # of a build that was killed (builds hold the writer lock)
    building = store.local_dir / f".{REPORT_DIR}-{uuid.uuid4().hex[:8]}.tmp"
    (building / "neurons").mkdir(parents=True)
    try:
        summaries = [_partition_summary(store, layer, polarity) for layer, polarity in partitions]
        paged = _neurons_with_pages(summaries, neuron_pages)
        pages = {(s.layer, kind, n) for s in summaries for kind, n in paged[(s.layer, s.polarity)]}
        for summary in summaries:
            _write(building / summary.filename, _partition_page(summary, pages))
        written = _write_neuron_pages(store, building, summaries, pages)
        _write(building / INDEX, _index_page(summaries, _validity_lines(store, summaries)))
        _swap_into_place(building, target)
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
    return ReportWritten(target / INDEX, len(summaries), written, time.perf_counter() - started)


def neuron_filename(layer: int, neuron: int, kind: str = NEURON_KIND) -> str:
    """A feature's page: a neuron's ``neurons/L<layer>-N<index>.html``, an SAE latent's
    ``neurons/L<layer>-SAE<index>.html`` (one folder, so every page links back the same way)."""
    return f"neurons/L{layer}-{'N' if kind == NEURON_KIND else kind.upper()}{neuron}.html"


def kind_label(kind: str) -> str:
    return KIND_LABELS.get(kind, kind)


def partition_filename(layer: int, polarity: str) -> str:
    return f"layer-{layer}-{polarity}.html"


# -- one layer x polarity -----------------------------------------------------------------


@dataclass
class _Summary:
    layer: int
    polarity: str
    neurons: pl.DataFrame  # one row per collected feature (kind, neuron = index): stats joined with its selected description
    scores: pl.DataFrame  # description_scores of the partition (empty before scoring)
    lineage: dict

    @property
    def filename(self) -> str:
        return partition_filename(self.layer, self.polarity)

    @property
    def selector(self) -> tuple[str, str | None] | None:
        if "scorer" not in self.neurons.columns or self.neurons["scorer"].drop_nulls().len() == 0:
            return None
        row = self.neurons.filter(pl.col("scorer").is_not_null()).row(0, named=True)
        return row["scorer"], row.get("simulator")

    def mean(self, column: str) -> float | None:
        if column not in self.neurons.columns or self.neurons[column].drop_nulls().len() == 0:
            return None
        return float(self.neurons[column].drop_nulls().mean())

    @property
    def kinds(self) -> list[str]:
        """The feature kinds of the partition, neurons first."""
        return sorted(set(self.neurons["kind"].to_list()), key=lambda k: (k != NEURON_KIND, k))

    def of_kind(self, kind: str) -> _Summary:
        return _Summary(self.layer, self.polarity, self.neurons.filter(pl.col("kind") == kind),
                        self.scores.filter(pl.col("kind") == kind) if "kind" in self.scores.columns else self.scores,
                        self.lineage)


_DESCRIPTION_COLUMNS = ("kind", "neuron", "candidate", "description", "scorer", "simulator", "val_score", "test_score",
                        "control_val_score", "control_test_score", "n_candidates")


def _partition_summary(store: Store, layer: int, polarity: str) -> _Summary:
    stats = store.read("neuron_stats", layer, polarity)
    lineage = {k: stats[k][0] for k in ("model", "config_hash", "run_id") if k in stats.columns and stats.height}
    neurons = stats.select("kind", "neuron", "max", "frac_active")
    if store.exists("neuron_descriptions", layer, polarity):
        described = store.read("neuron_descriptions", layer, polarity)
        described = described.select([c for c in _DESCRIPTION_COLUMNS if c in described.columns])
        neurons = neurons.join(described.with_columns(pl.col("neuron").cast(neurons["neuron"].dtype)),
                               on=["kind", "neuron"], how="left")
    scores = (store.read("description_scores", layer, polarity)
              if store.exists("description_scores", layer, polarity) else pl.DataFrame())
    neurons = neurons.sort(pl.col("kind") != NEURON_KIND, "kind", "neuron")
    return _Summary(layer, polarity, neurons, scores, lineage)


def _neurons_with_pages(summaries: list[_Summary], limit: int) -> dict[tuple[int, str], list[tuple[str, int]]]:
    """(layer, polarity) -> the (kind, index) of the features that get a page: the best
    ``limit`` of each kind by test score."""
    chosen = {}
    for summary in summaries:
        frame = summary.neurons
        if "test_score" in frame.columns:
            frame = frame.sort("test_score", descending=True, nulls_last=True)
        chosen[(summary.layer, summary.polarity)] = [
            (kind, n) for kind in summary.kinds
            for n in frame.filter(pl.col("kind") == kind)["neuron"].head(limit).to_list()]
    return chosen


def _partition_page(summary: _Summary, pages: set[tuple[int, str, int]]) -> str:
    from neuron_assets.report.plots import curve_png, score_histogram_png

    title = f"layer {summary.layer} {summary.polarity}"
    frame = summary.neurons
    parts = [f"<h1>{escape(title)}</h1>", f'<p><a href="{INDEX}">report index</a></p>']
    if "test_score" in frame.columns:
        tests = frame["test_score"].drop_nulls().to_list()
        controls = frame["control_test_score"].drop_nulls().to_list() if "control_test_score" in frame.columns else []
        parts.append("<h2>test scores of the selected descriptions</h2>"
                     + image(score_histogram_png(tests, controls), "score histogram")
                     + '<p class="muted">x: score from -1 to 1 in bins of 0.1 (dark line: 0); blue: the selected '
                     "descriptions, grey: their shuffled controls; the tallest bar is "
                     f"{_tallest(tests, controls)} {_noun(summary.kinds)}.</p>")
    curve = _best_of_k(summary)
    if curve is not None:
        fit = (f"; fit mean_best(k) = {curve.fit_a:.3f} k^{curve.fit_b:.3f} (orange)" if curve.fit_a is not None else "")
        parts.append(f"<h2>best of k: {escape(_label(summary.selector))}</h2>" + image(curve_png(curve), "best of k")
                     + f'<p class="muted">the mean test score of the candidate val selects among k (blue){fit}</p>'
                     + table(["k", "mean test score", _noun(summary.kinds)],
                             [list(r) for r in zip(curve.k, curve.mean_best, curve.features)]))
    header = ["feature", "kind", "description", "val", "test", "control val", "control test", "max", "active"]
    rows = []
    for row in frame.iter_rows(named=True):
        kind, neuron = row["kind"], row["neuron"]
        link = (f'<a href="{neuron_filename(summary.layer, neuron, kind)}">{neuron}</a>'
                if (summary.layer, kind, neuron) in pages else str(neuron))
        rows.append([link, kind_label(kind), row.get("description"), row.get("val_score"), row.get("test_score"),
                     row.get("control_val_score"), row.get("control_test_score"), row["max"], row["frac_active"]])
    counts = " + ".join(f"{frame.filter(pl.col('kind') == kind).height} {_noun([kind])}" for kind in summary.kinds)
    heading = "neurons" if summary.kinds in ([], [NEURON_KIND]) else "neurons and " + ", ".join(
        _noun([kind]) for kind in summary.kinds if kind != NEURON_KIND)
    parts.append(f"<h2>{heading} ({counts or 0}; click a column to sort)</h2>"
                 + table(header, rows, sortable=True, raw=(0,)))
    return page(title, "".join(parts), SORT_SCRIPT)


def _noun(kinds: list[str]) -> str:
    """What a count of features of these kinds is called: neurons, SAE latents, or features."""
    if len(kinds) == 1:
        return kind_label(kinds[0]) + "s"
    return "neurons" if not kinds else "features"


def _best_of_k(summary: _Summary):
    selector = summary.selector
    if selector is None or summary.scores.height == 0:
        return None
    from neuron_assets.score.select import best_of_k_curve

    curve = best_of_k_curve(summary.scores, *selector)
    return curve if curve.k else None


def _tallest(scores, controls) -> int:
    edges = np.linspace(-1, 1, 21)
    return max([int(np.histogram(np.clip(v, -1, 1), bins=edges)[0].max()) for v in (scores, controls) if len(v)] or [0])


def _label(selector) -> str:
    if selector is None:
        return ""
    scorer, simulator = selector
    return scorer + (f" ({simulator})" if simulator else "")


# -- neuron pages ---------------------------------------------------------------------------


def _write_neuron_pages(store: Store, folder: Path, summaries: list[_Summary], pages: set[tuple[int, str, int]]) -> int:
    from neuron_assets.report.neuron import load_neurons

    written = 0
    for layer, kind in sorted({(layer, kind) for layer, kind, _ in pages}, key=lambda lk: (lk[0], lk[1] != NEURON_KIND)):
        polarities = [Polarity(s.polarity) for s in summaries if s.layer == layer]
        neurons = sorted(n for l, k, n in pages if l == layer and k == kind)
        views = load_neurons(store, layer, neurons, polarities, kind)
        for neuron in neurons:
            view = views.get(neuron)
            if view is None:
                continue
            links = {p: "../" + partition_filename(layer, p.value) for p in view.polarities}
            _write(folder / neuron_filename(layer, neuron, kind),
                   neuron_page(view, back="../" + INDEX, polarity_pages=links))
            written += 1
    return written


# -- the index ------------------------------------------------------------------------------


def _validity_lines(store: Store, summaries: list[_Summary]) -> list[str]:
    """The held-out validity of every scorer that selected a description in the report."""
    from neuron_assets.score.validity import scorer_key, stored_validity, validity_sentence

    keys = set()
    for s in summaries:
        if {"scorer", "simulator"} <= set(s.neurons.columns):
            keys |= {scorer_key(scorer, simulator) for scorer, simulator in
                     s.neurons.select("scorer", "simulator").drop_nulls("scorer").unique().rows()}
    return [validity_sentence(key, stored_validity(store, key)) for key in sorted(keys)]


def _index_page(summaries: list[_Summary], validity: list[str] = ()) -> str:
    from neuron_assets.report.plots import best_of_k_figure, score_histograms

    lineage = next((s.lineage for s in summaries if s.lineage), {})
    built = datetime.now(UTC).isoformat(timespec="seconds")
    parts = ["<h1>neuron descriptions</h1>",
             "<p>" + " · ".join(f"{escape(k)} <code>{escape(str(v))}</code>" for k, v in lineage.items())
             + f" · built {built}</p>"]
    parts += [f"<p><b>Scores are worth what their scorer is worth:</b> {escape(line)}.</p>" for line in validity]
    by_layer: dict[int, list[float]] = {}
    control_by_layer: dict[int, list[float]] = {}
    for s in summaries:
        if "test_score" in s.neurons.columns:
            by_layer.setdefault(s.layer, []).extend(s.neurons["test_score"].drop_nulls().to_list())
        if "control_test_score" in s.neurons.columns:
            control_by_layer.setdefault(s.layer, []).extend(s.neurons["control_test_score"].drop_nulls().to_list())
    if any(by_layer.values()):
        parts.append(image(score_histograms(by_layer, control_by_layer, "selected description, test score, per layer"),
                           "score histograms"))
    curve = _pooled_curve([_best_of_k(s) for s in summaries])
    if curve is not None:
        parts.append(image(best_of_k_figure(curve, "mean test score of the val-best of k, all layers"), "best of k"))
    # a row per layer x polarity x kind: a layer's neurons and SAE latents side by side
    header = ["layer x polarity", "kind", "features", "described", "mean val", "mean test", "mean control test",
              "selected by"]
    rows = []
    for whole in summaries:
        for kind in whole.kinds:
            s = whole.of_kind(kind)
            described = int(s.neurons["description"].drop_nulls().len()) if "description" in s.neurons.columns else 0
            rows.append([f'<a href="{s.filename}">layer {s.layer} {s.polarity}</a>', kind_label(kind), s.neurons.height,
                         described, s.mean("val_score"), s.mean("test_score"), s.mean("control_test_score"),
                         _label(s.selector) or None])
    parts.append("<h2>layers</h2>" + table(header, rows, sortable=True, raw=(0,)))
    parts.append('<p class="muted">The val score selected each description; the test score is the unbiased one, '
                 "and the shuffled control (another feature's description, scored the same way) is the chance "
                 "level to compare it with. SAE latents are described in the pos polarity only.</p>")
    return page("neuron descriptions", "".join(parts), SORT_SCRIPT)


def _pooled_curve(curves):
    """Per-partition best-of-k curves pooled over features (each mean weighted by its count)."""
    from neuron_assets.score.select import BestOfKCurve

    curves = [c for c in curves if c is not None]
    if not curves:
        return None
    ks = sorted({k for c in curves for k in c.k})
    means, counts = [], []
    for k in ks:
        pairs = [(m, n) for c in curves for kk, m, n in zip(c.k, c.mean_best, c.features) if kk == k]
        total = sum(n for _, n in pairs)
        means.append(sum(m * n for m, n in pairs) / total if total else float("nan"))
        counts.append(total)
    fit_a = fit_b = None
    if len(ks) >= 2 and all(m > 0 for m in means):
        fit_b, log_a = np.polyfit(np.log(ks), np.log(means), 1)
        fit_a, fit_b = float(np.exp(log_a)), float(fit_b)
    return BestOfKCurve(tuple(ks), tuple(means), tuple(counts), fit_a, fit_b)


# -- files ----------------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _swap_into_place(building: Path, target: Path) -> None:
    """Rename the finished folder onto ``target``: the old report is moved aside first (a
    folder cannot be replaced by one rename), then removed."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}-old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    try:
        os.replace(building, target)
    except OSError:
        if old is not None:
            os.replace(old, target)  # the previous report stays readable
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
