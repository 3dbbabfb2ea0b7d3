"""One neuron as people look at it: its statistics, exemplars, candidate descriptions with
every score, the selected description and its shuffled control, for each collected polarity.

:func:`load_neurons` reads only the rows of the neurons asked for (the neuron filter is pushed
into every Parquet scan), so looking at one neuron of a 14,336-neuron layer reads a few row
groups, not the layer. :func:`score_table` lays the scores out once for the terminal
(:func:`neuron_text`) and the HTML page (:mod:`neuron_assets.report.html`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import polars as pl

from neuron_assets.store import Store
from neuron_assets.types import Sample, FeatureExemplars, Polarity, Split

CANDIDATE, SHUFFLED_CONTROL = "candidate", "shuffled_control"  # description_scores.role


class NeuronNotFound(LookupError):
    """A layer, neuron or polarity that the store has not collected; the message names what it has."""


@dataclass(frozen=True)
class Candidate:
    number: int  # candidate number; -1 for the shuffled control
    description: str | None
    scores: dict[tuple[str, str | None, str], float]  # (scorer, simulator, split) -> score
    failure: str | None = None
    selected: bool = False
    source_neuron: int | None = None  # the control: the neuron whose description it is


@dataclass(frozen=True)
class PolarityView:
    """A neuron in one polarity: what the pipeline read and wrote about it."""

    feature: FeatureExemplars
    stats: dict  # the neuron_stats row (max, mean, std, frac_active, q50 ..., n_tokens, scale, ...)
    selected: dict | None  # the neuron_descriptions row, None before selection ran
    candidates: tuple[Candidate, ...]
    control: Candidate | None
    scorers: tuple[tuple[str, str | None], ...]  # (scorer, simulator) in a stable order
    output_tokens: tuple[str, ...] = ()  # the logit lens's promoted tokens, strongest first

    @property
    def polarity(self) -> Polarity:
        return self.feature.feature.polarity

    @property
    def scale(self) -> float:
        """The feature's one activation scale (neuron_stats.scale, the train max)."""
        value = self.stats.get("scale", self.feature.stats.scale)
        return float(value) if value is not None and math.isfinite(value) else 0.0


@dataclass(frozen=True)
class NeuronView:
    layer: int
    neuron: int  # the feature's index within its kind
    polarities: dict[Polarity, PolarityView] = field(default_factory=dict)  # in display order
    validity: dict[str, str] = field(default_factory=dict)  # selecting scorer -> its held-out validity sentence

    @property
    def kind(self) -> str:
        """The feature's kind: neuron, or sae for an SAE latent."""
        return next((p.feature.feature.kind for p in self.polarities.values()), "neuron")


def load_neuron(store: Store, layer: int, neuron: int, polarity: Polarity | str = Polarity.POS,
                kind: str = "neuron", other_polarity: bool = True) -> NeuronView:
    """One neuron (or another feature ``kind``, e.g. an SAE latent), ``polarity`` first and the
    other polarity beside it when it was collected (and ``other_polarity``); :class:`NeuronNotFound`
    names the collected layers, polarities or neurons."""
    polarity = Polarity(polarity)
    collected = _collected_partitions(store)
    layers = sorted({l for l, _ in collected})
    if not layers:
        raise NeuronNotFound(f"no neuron_stats under {store.data_dir}; run `neuron-assets run` first")
    if layer not in layers:
        raise NeuronNotFound(f"layer {layer} was not collected; collected layers: {_ranges(layers)} "
                             "(set features.layers to collect others)")
    polarities = [p for p in (polarity, *Polarity) if (layer, p.value) in collected]
    polarities = list(dict.fromkeys(polarities))
    if polarity not in polarities:
        raise NeuronNotFound(f"polarity {polarity.value} of layer {layer} was not collected; collected: "
                             f"{', '.join(p.value for p in polarities)} (set features.polarities to collect it)")
    views = load_neurons(store, layer, [neuron], polarities if other_polarity else [polarity], kind)
    if neuron not in views:
        neurons = _collected_neurons(store, layer, polarity, kind)
        setting = "features.neurons" if kind == "neuron" else f"{kind}.latents"
        raise NeuronNotFound(f"{kind} {neuron} of layer {layer} ({polarity.value}) was not collected; the "
                             f"{len(neurons)} collected {'neurons' if kind == 'neuron' else kind + ' latents'} of "
                             f"that layer are {_ranges(neurons)} "
                             f"(set {setting} to collect others)")
    return with_validity(store, views[neuron])


def with_validity(store: Store, view: NeuronView) -> NeuronView:
    """The view with the held-out validity of each scorer that selected one of its descriptions."""
    from neuron_assets.score.validity import scorer_key, stored_validity, validity_sentence

    keys = {scorer_key(p.selected["scorer"], p.selected.get("simulator"))
            for p in view.polarities.values() if p.selected is not None}
    return replace(view, validity={key: validity_sentence(key, stored_validity(store, key)) for key in sorted(keys)})


def load_neurons(store: Store, layer: int, neurons: Sequence[int], polarities: Sequence[Polarity],
                 kind: str = "neuron") -> dict[int, NeuronView]:
    """The views of ``neurons`` (features of ``kind``) of one layer, in each of ``polarities``
    that has them; only their rows are read. Neurons that were not collected are left out."""
    from neuron_assets.exemplars import load_feature_exemplars  # torch: imported only when a neuron is read

    views: dict[int, NeuronView] = {}
    for polarity in polarities:
        polarity = Polarity(polarity)
        if not store.exists("neuron_stats", layer, polarity.value):
            continue
        features = load_feature_exemplars(store, layer, polarity, neurons=list(neurons), kind=kind)
        stats = _rows(store, "neuron_stats", layer, polarity, neurons, kind)
        selected = _rows(store, "neuron_descriptions", layer, polarity, neurons, kind)
        scores = _frame(store, "description_scores", layer, polarity, neurons, kind)
        failures = _failures(store, layer, polarity, neurons, kind)
        lens = _frame(store, "output_tokens", layer, polarity, neurons, kind)
        for feature in features:
            index = feature.feature.index
            view = views.setdefault(index, NeuronView(layer, index))
            chosen = selected.get(index)
            candidates, control, scorers = _candidates(scores, index, chosen, failures.get(index, {}))
            promoted = tuple(lens.filter(pl.col("neuron") == index).sort("rank")["token"].to_list()) if lens.height else ()
            view.polarities[polarity] = PolarityView(feature, stats.get(index, {}), chosen, candidates, control, scorers,
                                                     promoted)
    return views


def score_table(view: PolarityView) -> tuple[list[str], list[list]]:
    """Header and rows: one row per candidate (selected first, marked ``*``) and one for the
    shuffled control, a val and a test column per scorer and simulator (None where a score was
    not computed; a column without any score is left out: only the selecting scorer scores
    every candidate on test, the judges only the best)."""
    header = ["", "candidate"]
    for scorer, simulator in view.scorers:
        label = scorer + (f" ({simulator})" if simulator else "")
        header += [f"{label} val", f"{label} test"]
    header.append("description")
    rows = []
    for candidate in sorted(view.candidates, key=lambda c: (not c.selected, c.number)):
        rows.append(_score_row(view, candidate, "*" if candidate.selected else "", f"#{candidate.number}"))
    if view.control is not None:
        rows.append(_score_row(view, view.control, "", f"control (neuron {view.control.source_neuron})"))
    kept = [i for i in range(len(header)) if i < 2 or i == len(header) - 1 or any(r[i] is not None for r in rows)]
    return [header[i] for i in kept], [[r[i] for i in kept] for r in rows]


def stats_line(view: PolarityView) -> str:
    stats = view.feature.stats
    quantiles = ", ".join(f"q{q * 100:g} {v:.3g}" for q, v in sorted(stats.quantiles.items()) if v is not None)
    line = (f"max {stats.max:.4g} (the activation scale), mean {stats.mean:.3g}, std {stats.std:.3g}, "
            f"active on {stats.frac_active:.1%} of {view.stats.get('n_tokens', '?')} train tokens; {quantiles}")
    flags = [flag[3:] for flag in ("is_positional", "is_unigram") if view.stats.get(flag)]
    if flags:
        distinct = view.stats.get("unigram_tokens")
        survival = view.stats.get("unigram_survival")
        line += (f"; flagged {' and '.join(flags)} (positional MI {view.stats.get('positional_mi', 0):.3f} bits, "
                 + (f"{distinct} distinct firing tokens" if distinct is not None
                    else "too few firing tokens to count distinct ones")
                 + (f", {survival:.0%} of its activation survives in scrambled context)" if survival is not None else ")"))
    if view.output_tokens:
        line += "; promotes (logit lens): " + " ".join(repr(t) for t in view.output_tokens)
    return line


def exemplars_of(view: PolarityView, split: Split, sample: Sample, n: int | None = None):
    chosen = view.feature.select(Split(split), Sample(sample))
    return chosen if n is None else chosen[:n]


def neuron_text(view: NeuronView, polarity: Polarity, split: Split, sample: Sample, n: int, color: bool) -> str:
    """What `neuron-assets show` prints: statistics, descriptions and every score, exemplars."""
    from neuron_assets.report.render import highlight_terminal

    shown = view.polarities[Polarity(polarity)]
    lines = [f"{shown.feature.feature}: {stats_line(shown)}"]
    if shown.selected is not None:
        row = shown.selected
        lines.append(f"description: {row['description']}")
        lines.append(f"  selected by {row['scorer']}" + (f" ({row['simulator']})" if row.get("simulator") else "")
                     + f" on val among {row.get('n_candidates', '?')} candidates: val {_fmt(row['val_score'])}, "
                     f"test {_fmt(row['test_score'])}; shuffled control val {_fmt(row.get('control_val_score'))}, "
                     f"test {_fmt(row.get('control_test_score'))}")
        from neuron_assets.score.validity import scorer_key

        sentence = view.validity.get(scorer_key(row["scorer"], row.get("simulator")))
        if sentence:
            lines.append(f"  validity: {sentence}")
    else:
        lines.append("description: none selected yet (materialize neuron_descriptions)")
    header, rows = score_table(shown)
    if rows:
        lines += ["", "scores of every candidate (* selected) and the shuffled control (a scorer without a test "
                  "column scored val only):", *_aligned(header, rows)]
    others = [p.value for p in view.polarities if p is not Polarity(polarity)]
    exemplars = exemplars_of(shown, split, sample, n)
    lines.append(f"\n{sample.value} {split.value} exemplars (tokens at >= half the strongest exemplar's activation "
                 + ("in bold" if color else "in {{ }}") + "):")
    reference = max((e.extreme for e in exemplars), default=0.0)
    for exemplar in exemplars:
        lines.append(f"{exemplar.rank:>3} {exemplar.extreme:>8.3f}  "
                     f"{highlight_terminal(exemplar.record, shown.polarity, color, reference)}")
    if others:
        lines.append(f"\n(also collected: polarity {', '.join(others)}; --polarity to show it, --html for both side by side)")
    return "\n".join(lines)


# -- helpers ------------------------------------------------------------------------------


def _score_row(view: PolarityView, candidate: Candidate, mark: str, name: str) -> list:
    row = [mark, name]
    for scorer, simulator in view.scorers:
        row += [candidate.scores.get((scorer, simulator, "val")), candidate.scores.get((scorer, simulator, "test"))]
    row.append(candidate.description if candidate.description is not None else f"(failed: {candidate.failure})")
    return row


def _aligned(header: list[str], rows: list[list]) -> list[str]:
    cells = [header] + [[_fmt(v) if isinstance(v, float) or v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in cells]


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _scan(store: Store, table: str, layer: int, polarity: Polarity, neurons: Sequence[int],
          kind: str = "neuron") -> pl.LazyFrame | None:
    if not store.exists(table, layer, polarity.value):
        return None
    return store.scan(table, layer, polarity.value).filter(
        pl.col("neuron").is_in([int(n) for n in neurons]) & (pl.col("kind") == kind))


def _frame(store: Store, table: str, layer: int, polarity: Polarity, neurons: Sequence[int],
           kind: str = "neuron") -> pl.DataFrame:
    scan = _scan(store, table, layer, polarity, neurons, kind)
    return scan.collect() if scan is not None else pl.DataFrame()


def _rows(store: Store, table: str, layer: int, polarity: Polarity, neurons: Sequence[int],
          kind: str = "neuron") -> dict[int, dict]:
    frame = _frame(store, table, layer, polarity, neurons, kind)
    return {row["neuron"]: row for row in frame.iter_rows(named=True)} if frame.height else {}


def _failures(store: Store, layer: int, polarity: Polarity, neurons: Sequence[int],
              kind: str = "neuron") -> dict[int, dict[int, tuple]]:
    """neuron -> candidate -> (description, failure), from candidate_descriptions."""
    scan = _scan(store, "candidate_descriptions", layer, polarity, neurons, kind)
    if scan is None:
        return {}
    out: dict[int, dict[int, tuple]] = {}
    for row in scan.select("neuron", "candidate", "description", "failure").collect().iter_rows(named=True):
        out.setdefault(row["neuron"], {})[row["candidate"]] = (row["description"], row["failure"])
    return out


def _candidates(scores: pl.DataFrame, neuron: int, selected: dict | None, explained: dict[int, tuple]):
    """(candidates, control, scorers) of one neuron from its description_scores rows; candidates
    that failed to be written (no scores) come from candidate_descriptions."""
    rows = scores.filter(pl.col("neuron") == neuron) if scores.height else scores
    by_candidate: dict[int, dict] = {}
    scorers: dict[tuple[str, str | None], None] = {}
    texts: dict[int, tuple[str | None, int | None, str]] = {}
    for row in rows.iter_rows(named=True) if rows.height else ():
        key = (row["scorer"], row["simulator"])
        scorers[key] = None
        by_candidate.setdefault(row["candidate"], {})[(*key, row["split"])] = row["score"]
        texts[row["candidate"]] = (row["description"], row["source_neuron"], row["role"])
    chosen = selected["candidate"] if selected is not None else None
    candidates, control = [], None
    for number in sorted(set(by_candidate) | set(explained)):
        description, source, role = texts.get(number, (explained.get(number, (None, None))[0], None, CANDIDATE))
        if role == SHUFFLED_CONTROL:
            control = Candidate(number, description, by_candidate[number], source_neuron=source)
            continue
        failure = explained.get(number, (None, None))[1]
        candidates.append(Candidate(number, description, by_candidate.get(number, {}), failure, number == chosen))
    if selected is not None and selected.get("scorer") is not None:  # the selecting scorer first
        first = (selected["scorer"], selected.get("simulator"))
        scorers = {first: None, **scorers}
    return tuple(candidates), control, tuple(scorers)


def _collected_partitions(store: Store) -> set[tuple[int, str]]:
    return set(store.partitions("neuron_stats"))


def _collected_neurons(store: Store, layer: int, polarity: Polarity, kind: str = "neuron") -> list[int]:
    scan = _scan(store, "neuron_stats", layer, polarity, [], kind)
    if scan is None:
        return []
    frame = store.scan("neuron_stats", layer, polarity.value)
    return sorted(frame.filter(pl.col("kind") == kind).select("neuron").collect()["neuron"].to_list())


def _ranges(values: Sequence[int], shown: int = 20) -> str:
    """'0-2, 6, 12' for sorted whole numbers; long lists cut after ``shown`` runs."""
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:shown])
    return text + (f", ... ({len(runs) - shown} more runs)" if len(runs) > shown else "") if runs else "none"
