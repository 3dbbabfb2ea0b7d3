"""Figures for the Dagster UI and reports: PNG bytes from matplotlib's Agg backend, and
small text-free figures drawn with numpy (:func:`activation_histogram`,
:func:`score_histogram_png`, :func:`curve_png`) where a report draws hundreds of them.

Every function returns the PNG as bytes; :func:`markdown_image` embeds it in a markdown
metadata value (a data URI), which the Dagster UI renders inline.
"""

from __future__ import annotations

import base64
import io
import itertools
from collections.abc import Mapping, Sequence

import numpy as np

from neuron_assets.score.select import BestOfKCurve


def _figure(width: float = 6.0, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(width, height), dpi=72)


def _png(plt, figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def score_histograms(by_layer: Mapping[int, Sequence[float]], controls: Mapping[int, Sequence[float]] | None = None,
                     title: str = "best description score per layer") -> bytes:
    """One small histogram per layer; the shuffled controls' scores in grey behind."""
    layers = sorted(by_layer)
    plt, figure = _figure(min(3.0 * max(1, len(layers)), 15.0), 2.8)
    for i, layer in enumerate(layers or [0]):
        axis = figure.add_subplot(1, max(1, len(layers)), i + 1)
        _draw_histogram(axis, by_layer.get(layer, []), (controls or {}).get(layer) or [], f"layer {layer}", legend=i == 0)
    figure.suptitle(title, fontsize=10)
    return _png(plt, figure)


def best_of_k_figure(curve: BestOfKCurve, title: str = "mean best-of-k score") -> bytes:
    plt, figure = _figure(4.8, 3.4)
    _draw_best_of_k(figure.add_subplot(1, 1, 1), curve, title)
    return _png(plt, figure)


def _draw_histogram(axis, scores: Sequence[float], controls: Sequence[float], title: str, legend: bool) -> None:
    bins = np.linspace(-1, 1, 21)
    if len(controls):
        axis.hist(controls, bins=bins, color="0.75", label="shuffled control")
    if len(scores):
        axis.hist(scores, bins=bins, color="tab:blue", alpha=0.8, label="best description")
    axis.set_title(title, fontsize=9)
    axis.tick_params(labelsize=7)
    if legend and (len(scores) or len(controls)):
        axis.legend(fontsize=7)


def _draw_best_of_k(axis, curve: BestOfKCurve, title: str) -> None:
    axis.plot(curve.k, curve.mean_best, "o-", label="mean best of k")
    if curve.fit_a is not None:
        grid = np.linspace(1, max(curve.k), 50)
        axis.plot(grid, [curve.fitted(k) for k in grid], "--", label=f"{curve.fit_a:.3f} k^{curve.fit_b:.3f}")
    axis.set_xlabel("k (candidates)")
    axis.set_ylabel("score")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)


def val_test_scatter(val: Sequence[float], test: Sequence[float], control_val: Sequence[float] = (),
                     control_test: Sequence[float] = (),
                     title: str = "val vs test score of the selected description") -> bytes:
    """One point per feature; the shuffled controls (val, test) in grey."""
    plt, figure = _figure(4.4, 4.0)
    axis = figure.add_subplot(1, 1, 1)
    axis.plot([-1, 1], [-1, 1], color="0.8", lw=1)
    if len(control_test):
        axis.scatter(control_val, control_test, s=10, color="0.6", label="shuffled control")
    axis.scatter(val, test, s=12, color="tab:blue", label="selected description")
    axis.set_xlabel("val score")
    axis.set_ylabel("test score")
    axis.set_xlim(-1, 1)
    axis.set_ylim(-1, 1)
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=7)
    return _png(plt, figure)


def activation_histogram(quantiles: Mapping[float, float], max_value: float, mean: float | None = None,
                         color: tuple[int, int, int] = (230, 110, 0), size: tuple[int, int] = (360, 110)) -> bytes:
    """The distribution of a feature's train activations (sign * activation) from its
    statistics alone (:func:`quantile_bins`): one bar per range between consecutive
    quantiles, its area the share of tokens in it (height: log density), over a linear
    activation axis from q50 to the max; the mean, when in range, a grey line. Drawn with
    numpy, without text (a page says the ranges beside it): a neuron page draws two, and a
    report hundreds, where a matplotlib figure costs about 0.1 s each."""
    edges, shares = quantile_bins(quantiles, max_value)
    width, height = size
    pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    pixels[-1, :] = 120  # the axis
    if shares:
        lo, hi = edges[0], edges[-1]
        to_x = lambda v: round((v - lo) / (hi - lo) * (width - 1))
        density = np.log10(np.asarray(shares) / np.diff(edges))
        floor = density.min() - 0.5  # the lowest bar still shows
        tops = (density - floor) / max(density.max() - floor, 1e-9) * (height - 4)
        for left, right, top in zip(edges[:-1], edges[1:], tops):
            x0, x1 = to_x(left), max(to_x(right), to_x(left) + 1)
            pixels[height - 1 - max(int(top), 1):height - 1, x0:x1] = color
            pixels[height - 1 - max(int(top), 1):height - 1, x0] = 255  # a gap between bars
        if mean is not None and lo <= mean <= hi:
            pixels[:, to_x(mean)] = 110
    return png_from_pixels(pixels)


def score_histogram_png(scores: Sequence[float], controls: Sequence[float] = (), bins: int = 20,
                        size: tuple[int, int] = (360, 110)) -> bytes:
    """Scores in [-1, 1] as a histogram drawn with numpy (no text; the page says the scale):
    the shuffled controls' bars grey and full width, the scores' bars blue and narrower in
    front, a dark line at 0; the tallest bar fills the height."""
    width, height = size
    pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    edges = np.linspace(-1, 1, bins + 1)
    counts = [np.histogram(np.clip(np.asarray(v, dtype=float), -1, 1), bins=edges)[0] for v in (controls, scores)]
    tallest = max(1, max(int(c.max()) for c in counts))
    x = np.round((edges + 1) / 2 * (width - 1)).astype(int)
    for (count, color, inset) in ((counts[0], (190, 190, 190), 1), (counts[1], (31, 119, 180), 4)):
        for i, n in enumerate(count):
            if n:
                top = height - 1 - round(n / tallest * (height - 4))
                pixels[top:height - 1, x[i] + inset:max(x[i + 1] - inset, x[i] + inset + 1)] = color
    pixels[:, x[bins // 2]] = 60  # zero
    pixels[-1, :] = 120
    return png_from_pixels(pixels)


def curve_png(curve: BestOfKCurve, size: tuple[int, int] = (300, 110)) -> bytes:
    """A best-of-k curve drawn with numpy: the mean test score per k (blue, dots) and the
    power-law fit (orange), y from the lowest to the highest value, no text (the page gives
    the numbers beside it)."""
    width, height = size
    pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    pixels[-1, :] = 120
    pixels[:, 0] = 120
    if not curve.k:
        return png_from_pixels(pixels)
    grid = np.linspace(1, max(curve.k), 60)
    fitted = [curve.fitted(k) for k in grid] if curve.fit_a is not None else []
    values = [*curve.mean_best, *fitted]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    span_k = max(max(curve.k) - 1, 1)

    def at(k: float, value: float) -> tuple[float, float]:
        return 6 + (k - 1) / span_k * (width - 12), height - 6 - (value - lo) / span * (height - 12)

    if fitted:
        _polyline(pixels, [at(k, v) for k, v in zip(grid, fitted)], (255, 127, 14), dashed=True)
    points = [at(k, v) for k, v in zip(curve.k, curve.mean_best)]
    _polyline(pixels, points, (31, 119, 180))
    for px, py in points:
        pixels[max(int(py) - 2, 0):int(py) + 3, max(int(px) - 2, 0):int(px) + 3] = (31, 119, 180)
    return png_from_pixels(pixels)


def _polyline(pixels: np.ndarray, points, color, dashed: bool = False) -> None:
    """Straight segments between points, two pixels thick (a dashed line skips every other 4 px)."""
    height, width, _ = pixels.shape
    drawn = 0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for t in np.linspace(0, 1, steps + 1):
            drawn += 1
            if dashed and (drawn // 4) % 2:
                continue
            x, y = round(x0 + t * (x1 - x0)), round(y0 + t * (y1 - y0))
            pixels[min(max(y, 0), height - 2):min(max(y, 0), height - 2) + 2, min(max(x, 0), width - 1)] = color


def quantile_bins(quantiles: Mapping[float, float], max_value: float) -> tuple[list[float], list[float]]:
    """Edges and token shares of the ranges between consecutive quantile values (q50, q90,
    ..., then the max): between the q_i and q_j values lies a share q_j - q_i of the tokens.
    Tied values merge their shares. The half below the lowest quantile has no lower edge."""
    points = sorted((float(q), float(v)) for q, v in quantiles.items() if v is not None and np.isfinite(v))
    if not points or not np.isfinite(max_value):
        return [], []
    points.append((1.0, float(max_value)))
    edges, shares, level = [points[0][1]], [], points[0][0]
    for q, value in points[1:]:
        if value > edges[-1]:
            edges.append(value)
            shares.append(q - level)
            level = q
        elif shares:
            shares[-1] += q - level
            level = q
    return edges, shares


def png_from_pixels(pixels: np.ndarray) -> bytes:
    """An (height, width, 3) uint8 array as PNG bytes (8-bit RGB, no filter)."""
    import struct
    import zlib

    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in np.ascontiguousarray(pixels, dtype=np.uint8))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def markdown_image(png: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def data_uri(png: bytes) -> str:
    """The PNG as a data: URI, for pages that must stand alone (no file beside them)."""
    return f"data:image/png;base64,{base64.b64encode(png).decode()}"


def loss_curve_figure(curves: Mapping[str, Sequence[float]], title: str = "simulator training loss") -> bytes:
    """Loss per step, the stages one after the other."""
    plt, figure = _figure(4.8, 3.2)
    axis = figure.add_subplot(1, 1, 1)
    start = 0
    for stage, losses in curves.items():
        steps = np.arange(start, start + len(losses))
        axis.plot(steps, losses, lw=1, label=stage)
        start += len(losses)
    axis.set_xlabel("step")
    axis.set_ylabel("cross-entropy")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    return _png(plt, figure)


def latent_frequency_histogram(edges: Sequence[float], counts: Sequence[int], never: int,
                               title: str = "SAE latent frequency") -> bytes:
    """Latents per bin of log10(share of tokens a latent is on); the latents never on noted."""
    plt, figure = _figure(4.8, 3.2)
    axis = figure.add_subplot(1, 1, 1)
    if counts:
        axis.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="tab:blue")
    axis.set_xlabel("log10 frequency")
    axis.set_ylabel("latents")
    axis.set_title(f"{title} ({never} never on)", fontsize=10)
    return _png(plt, figure)


def sae_loss_figure(losses: Sequence[float], title: str = "SAE reconstruction loss") -> bytes:
    plt, figure = _figure(4.8, 3.2)
    axis = figure.add_subplot(1, 1, 1)
    axis.plot(np.arange(len(losses)), losses, lw=1)
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("squared error per token (scaled)")
    axis.set_title(title, fontsize=10)
    return _png(plt, figure)


def explainer_curves_figure(curves, title: str = "held-out features: mean best-of-k test score") -> bytes:
    """Mean best score vs k, one line per explainer (Transluce's Figure 5): ``curves`` are
    neuron_assets.distill.ExplainerCurve (explainer, model, k, mean_best_test)."""
    from pathlib import Path

    plt, figure = _figure(5.0, 3.4)
    axis = figure.add_subplot(1, 1, 1)
    for curve in curves:
        axis.plot(curve.k, curve.mean_best_test, "o-", label=f"{curve.explainer} ({Path(curve.model).name})")
    axis.set_xlabel("k (candidates, best by val)")
    axis.set_ylabel("mean test score")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    return _png(plt, figure)
