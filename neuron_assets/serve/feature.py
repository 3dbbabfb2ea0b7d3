"""A feature as the explorer's JSON: what its page shows, from :func:`neuron_assets.report.neuron.load_neuron`.

    feature_json(view, polarity)  ->  {"feature", "description", "candidates", "stats", "histogram",
                                       "exemplars", "output_tokens", ...}

The exemplars carry their heat-map HTML, made by the static report's
:func:`neuron_assets.report.html.heatmap` (every token HTML-escaped, shaded by activation on
the feature's one activation scale), beside the raw tokens and activations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import polars as pl

from neuron_assets.report.html import COLORS, heatmap
from neuron_assets.report.neuron import Candidate, NeuronView, PolarityView, stats_line
from neuron_assets.report.plots import quantile_bins
from neuron_assets.serve.links import feature_path
from neuron_assets.types import Polarity, Sample, Split

SAMPLES = (Sample.TOP, Sample.QUANTILE, Sample.RANDOM, Sample.QUIET)
SELECTED_COLUMNS = ("candidate", "description", "scorer", "simulator", "val_score", "test_score", "val_flags",
                    "test_flags", "control_description", "control_source_neuron", "control_val_score",
                    "control_test_score", "n_candidates", "explainer_backend", "explainer_model",
                    "simulator_version", "test_simulator_version", "simulator_saw_feature", "model", "config_hash",
                    "run_id")
STATS_COLUMNS = ("max", "mean", "std", "frac_active", "n_tokens", "scale", "positional_mi", "is_positional",
                 "unigram_tokens", "unigram_survival", "is_unigram")


def feature_json(view: NeuronView, polarity: Polarity, other_polarities: Sequence[Polarity] | None = None) -> dict:
    """One feature in one polarity, with links to its other collected polarities (default: those
    the view holds)."""
    if other_polarities is None:
        other_polarities = [p for p in view.polarities if p is not Polarity(polarity)]
    shown = view.polarities[Polarity(polarity)]
    kind = view.kind
    return {
        "feature": {"layer": view.layer, "polarity": shown.polarity.value, "kind": kind, "index": view.neuron,
                    "label": str(shown.feature.feature), "page": feature_path(view.layer, shown.polarity.value,
                                                                              view.neuron, kind)},
        "other_polarities": [{"polarity": p.value, "page": feature_path(view.layer, p.value, view.neuron, kind)}
                             for p in other_polarities],
        "description": _selected(shown),
        "validity": dict(view.validity),
        "scorers": [{"scorer": scorer, "simulator": simulator} for scorer, simulator in shown.scorers],
        "candidates": [_candidate(c) for c in sorted(shown.candidates, key=lambda c: (not c.selected, c.number))],
        "control": _candidate(shown.control) if shown.control is not None else None,
        "stats": _stats(shown),
        "histogram": _histogram(shown),
        "output_tokens": list(shown.output_tokens),
        "color": list(COLORS[shown.polarity]),
        "exemplars": {split.value: {sample.value: _exemplars(shown, split, sample) for sample in SAMPLES}
                      for split in Split},
    }


def _selected(view: PolarityView) -> dict | None:
    if view.selected is None:
        return None
    return {key: plain(view.selected.get(key)) for key in SELECTED_COLUMNS if key in view.selected}


def _candidate(candidate: Candidate) -> dict:
    return {"number": candidate.number, "description": candidate.description, "failure": candidate.failure,
            "selected": candidate.selected, "source_neuron": candidate.source_neuron,
            "scores": [{"scorer": scorer, "simulator": simulator, "split": split, "score": plain(score)}
                       for (scorer, simulator, split), score in sorted(candidate.scores.items(),
                                                                       key=lambda item: tuple(map(str, item[0])))]}


def _stats(view: PolarityView) -> dict:
    stats = view.feature.stats
    values = {key: plain(view.stats.get(key)) for key in STATS_COLUMNS if key in view.stats}
    values.update(max=plain(stats.max), mean=plain(stats.mean), std=plain(stats.std),
                  frac_active=plain(stats.frac_active), scale=plain(view.scale),
                  quantiles={f"q{q * 100:g}": plain(v) for q, v in sorted(stats.quantiles.items())},
                  summary=stats_line(view))
    return values


def _histogram(view: PolarityView) -> dict:
    """The activation histogram of the train tokens from the stored quantiles: bin edges, the
    share of tokens in each bin, and the mean (as the static report draws it)."""
    stats = view.feature.stats
    edges, shares = quantile_bins(stats.quantiles, stats.max)
    known = [q for q, v in stats.quantiles.items() if v is not None]
    return {"edges": [plain(e) for e in edges], "shares": [plain(s) for s in shares], "mean": plain(stats.mean),
            "below_first_edge": min(known) if known and shares else None}


def _exemplars(view: PolarityView, split: Split, sample: Sample) -> list[dict]:
    rows = []
    for exemplar in view.feature.select(split, sample):
        record = exemplar.record
        rows.append({"rank": exemplar.rank, "bin": exemplar.bin, "extreme": plain(exemplar.extreme),
                     "seq_id": record.seq_id, "prefix_len": record.prefix_len, "tokens": list(record.tokens),
                     "activations": [round(float(a), 5) for a in record.polarity_activations(view.polarity)],
                     "html": heatmap(record, view.polarity, view.scale)})
    return rows


def plain(value):
    """A JSON value: NaN and infinities as null, numpy scalars and Polars series as Python's."""
    if isinstance(value, pl.Series):
        value = value.to_list()
    elif hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item() if getattr(value, "size", 1) == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
