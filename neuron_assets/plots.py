"""Figures for the Dagster UI and reports: PNG bytes from matplotlib's Agg backend.

Every function returns the PNG as bytes; :func:`markdown_image` embeds it in a markdown
metadata value (a data URI), which the Dagster UI renders inline.
"""

from __future__ import annotations

import base64
import io
from typing import Mapping, Sequence

import numpy as np

from neuron_assets.select import BestOfKCurve


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
    bins = np.linspace(-1, 1, 21)
    for i, layer in enumerate(layers or [0]):
        axis = figure.add_subplot(1, max(1, len(layers)), i + 1)
        if controls and controls.get(layer):
            axis.hist(controls[layer], bins=bins, color="0.75", label="shuffled control")
        if layers:
            axis.hist(by_layer[layer], bins=bins, color="tab:blue", alpha=0.8, label="best description")
        axis.set_title(f"layer {layer}", fontsize=9)
        axis.tick_params(labelsize=7)
        if i == 0:
            axis.legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    return _png(plt, figure)


def best_of_k_figure(curve: BestOfKCurve, title: str = "mean best-of-k score") -> bytes:
    plt, figure = _figure(4.8, 3.4)
    axis = figure.add_subplot(1, 1, 1)
    axis.plot(curve.k, curve.mean_best, "o-", label="mean best of k")
    if curve.fit_a is not None:
        grid = np.linspace(1, max(curve.k), 50)
        axis.plot(grid, [curve.fitted(k) for k in grid], "--", label=f"{curve.fit_a:.3f} k^{curve.fit_b:.3f}")
    axis.set_xlabel("k (candidates)")
    axis.set_ylabel("score")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    return _png(plt, figure)


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


def markdown_image(png: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


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
