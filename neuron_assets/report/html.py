"""Self-contained HTML: a neuron's page, and the pieces the report's pages share.

Every page stands alone: inline CSS, figures as PNG data: URIs, a few lines of inline script
to sort tables; nothing is fetched from the network. Token heat-maps put each token in a
span whose background intensity is its activation on the feature's one activation scale
(neuron_stats ``scale``, the train max), the value in its tooltip; the chat header (the
prefix that no statistic counts) is greyed. Every token and description is HTML-escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from neuron_assets.report.neuron import NeuronView, PolarityView, exemplars_of, score_table, stats_line
from neuron_assets.types import ActivationRecord, Sample, Polarity, Split

# Heat-map colours per polarity (r, g, b): the background's alpha is activation / scale.
COLORS = {Polarity.POS: (230, 110, 0), Polarity.NEG: (20, 100, 230)}
TOKEN_CLASS = "t"  # every heat-map token span has this class, and nothing else does

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;color:#222}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.15em;margin:1.2em 0 .3em}h3{font-size:1em;margin:1em 0 .3em}
a{color:#1558b0}table{border-collapse:collapse;margin:.4em 0}th,td{border-bottom:1px solid #ddd;padding:2px 8px;
text-align:left;vertical-align:top}th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer}table.sortable th:after{content:" \\2195";color:#aaa}
.cols{display:grid;gap:2em;grid-template-columns:repeat(var(--cols),minmax(0,1fr))}
.desc{font-size:1.1em;background:#fafaf0;border-left:4px solid #c90;padding:.3em .6em}
.ex{font:12.5px/1.7 ui-monospace,SFMono-Regular,Menlo,monospace;white-space:pre-wrap;word-break:break-word;
border-bottom:1px solid #eee;padding:2px 0}.ex .meta{color:#888;margin-right:.6em}
.t{border-radius:2px}.t.c{color:#aaa}.muted{color:#777}img{max-width:100%}
"""

# Click a header to sort its table by that column (numbers as numbers; again: descending).
SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function(th){th.addEventListener("click",function(){
var t=th.closest("table"),b=t.tBodies[0],i=Array.prototype.indexOf.call(th.parentNode.children,th),
d=th.dataset.dir==="a"?"d":"a";th.dataset.dir=d;var r=Array.prototype.slice.call(b.rows);
r.sort(function(x,y){var p=x.cells[i].dataset.v||x.cells[i].textContent,q=y.cells[i].dataset.v||y.cells[i].textContent,
u=parseFloat(p),v=parseFloat(q),c=(isNaN(u)||isNaN(v))?p.localeCompare(q):u-v;return d==="a"?c:-c;});
r.forEach(function(x){b.appendChild(x);});});});
"""


def neuron_page(view: NeuronView, split: Split = Split.TRAIN, top_n: int = 10, back: str | None = None,
                polarity_pages: dict[Polarity, str] | None = None) -> str:
    """A feature's page (a neuron's, an SAE latent's): per collected polarity, side by side, the
    selected description, every candidate with its scores and the shuffled control,
    statistics, the activation histogram, and the top and quantile exemplars of ``split`` as
    token heat-maps."""
    title = f"{'neuron' if view.kind == 'neuron' else view.kind.upper() + ' latent'} L{view.layer}/{view.neuron}"
    links = []
    if back:
        links.append(f'<a href="{escape(back)}">report index</a>')
    for polarity, href in (polarity_pages or {}).items():
        links.append(f'<a href="{escape(href)}">layer {view.layer} {polarity.value}</a>')
    columns = [_polarity_column(p, split, top_n) for p in view.polarities.values()]
    body = (f"<h1>{escape(title)}</h1>" + (f"<p>{' · '.join(links)}</p>" if links else "")
            + f'<div class="cols" style="--cols:{max(1, len(columns))}">' + "".join(columns) + "</div>")
    return page(title, body)


def page(title: str, body: str, script: str = "") -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>{body}"
            + (f"<script>{script}</script>" if script else "") + "</body></html>\n")


def heatmap(record: ActivationRecord, polarity: Polarity, scale: float) -> str:
    """The tokens of one sequence, each a span shaded by activation / scale, value in its tooltip."""
    values = record.polarity_activations(polarity)
    r, g, b = COLORS[polarity]
    parts = []
    for position, (token, value) in enumerate(zip(record.tokens, values)):
        text = escape(token.replace("\n", "⏎\n"))
        if position < record.prefix_len:
            parts.append(f'<span class="{TOKEN_CLASS} c" title="chat header: not counted">{text}</span>')
            continue
        value = float(value)
        share = min(max(value / scale, 0.0), 1.0) if scale > 0 and math.isfinite(value) else 0.0
        style = f' style="background:rgba({r},{g},{b},{share:.2f})"' if share >= 0.005 else ""
        tip = f"{value:.4g} = {share:.0%} of scale {scale:.4g}"
        parts.append(f'<span class="{TOKEN_CLASS}"{style} title="{tip}">{text}</span>')
    return "".join(parts)


def table(header: Sequence[str], rows: Sequence[Sequence], sortable: bool = False, raw: Sequence[int] = ()) -> str:
    """An HTML table; numbers right-aligned with 3 decimals (sorted by their value), None as '-';
    the cells of the columns in ``raw`` are HTML already (links), the rest is escaped."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    lines = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            if i in raw:
                cells.append(f"<td>{value}</td>")
            elif isinstance(value, float):
                shown = "-" if math.isnan(value) else f"{value:.3f}"
                cells.append(f'<td class="n" data-v="{value!r}">{shown}</td>')
            elif isinstance(value, int) and not isinstance(value, bool):
                cells.append(f'<td class="n">{value}</td>')
            else:
                cells.append("<td>-</td>" if value is None else f"<td>{escape(str(value))}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    kind = ' class="sortable"' if sortable else ""
    return f"<table{kind}><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def image(png: bytes, alt: str) -> str:
    from neuron_assets.report.plots import data_uri

    return f'<img alt="{escape(alt)}" src="{data_uri(png)}">'


def escape(text: str) -> str:
    return html.escape(text, quote=True)


# -- helpers ------------------------------------------------------------------------------


def _polarity_column(view: PolarityView, split: Split, top_n: int) -> str:
    from neuron_assets.report.plots import activation_histogram

    polarity = view.polarity
    parts = [(f"<div><h2>{polarity.value}: {'most positive' if polarity is Polarity.POS else 'most negative'} "
             "activations</h2>")]
    if view.selected is not None:
        row = view.selected
        by = row["scorer"] + (f" ({row['simulator']})" if row.get("simulator") else "")
        parts.append(f'<p class="desc">{escape(row["description"] or "")}</p>'
                     f'<p>selected by {escape(by)} on val among {row.get("n_candidates", "?")} candidates: '
                     f"val {_num(row['val_score'])}, test {_num(row['test_score'])}; shuffled control val "
                     f"{_num(row.get('control_val_score'))}, test {_num(row.get('control_test_score'))}</p>")
    else:
        parts.append('<p class="muted">no description selected yet (materialize neuron_descriptions)</p>')
    header, rows = score_table(view)
    if rows:
        parts.append("<h3>candidates and the shuffled control</h3>" + table(header, rows, sortable=True))
    stats = view.feature.stats
    parts.append(f"<h3>statistics (train)</h3><p>{escape(stats_line(view))}</p>")
    parts.append("<h3>activation histogram (train)</h3>" + image(
        activation_histogram(stats.quantiles, stats.max, stats.mean, COLORS[polarity]),
        f"activation histogram, {polarity.value}") + _histogram_caption(view))
    top = exemplars_of(view, split, Sample.TOP, top_n)
    parts.append(f"<h3>top {split.value} exemplars</h3>" + _exemplars(top, view, "rank"))
    quantile = exemplars_of(view, split, Sample.QUANTILE)
    if quantile:
        parts.append(f"<h3>{split.value} exemplars by activation decile (lowest first)</h3>" + _exemplars(quantile, view, "bin"))
    parts.append("</div>")
    return "".join(parts)


def _exemplars(exemplars, view: PolarityView, label: str) -> str:
    if not exemplars:
        return '<p class="muted">none</p>'
    lines = []
    for exemplar in exemplars:
        number = exemplar.rank if label == "rank" else exemplar.bin
        meta = f'<span class="meta">{label} {number} · max {exemplar.extreme:.3g}</span>'
        lines.append(f'<div class="ex">{meta}{heatmap(exemplar.record, view.polarity, view.scale)}</div>')
    return "".join(lines)


def _histogram_caption(view: PolarityView) -> str:
    from neuron_assets.report.plots import quantile_bins

    stats = view.feature.stats
    edges, shares = quantile_bins(stats.quantiles, stats.max)
    if not shares:
        return '<p class="muted">no token sample in the statistics</p>'
    lowest = min(q for q, v in stats.quantiles.items() if v is not None)
    ranges = ", ".join(f"{a:.3g} to {b:.3g}: {share:.1%}" for a, b, share in zip(edges, edges[1:], shares))
    return (f'<p class="muted">x: activation from {edges[0]:.3g} to the max {edges[-1]:.3g} (linear); bar area: '
            f"share of train tokens, height on a log scale; grey line: the mean {stats.mean:.3g}. {lowest:.0%} of "
            f"tokens lie below {edges[0]:.3g}. Shares: {escape(ranges)}.</p>")


def _num(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
