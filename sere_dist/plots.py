"""Figures (matplotlib, Agg backend): PNG bytes in, nothing drawn on screen."""

from __future__ import annotations

import io
import math
from typing import Mapping

import torch


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def similarity_heatmaps(matrices: Mapping[int, torch.Tensor], title: str = "", max_cols: int = 4) -> bytes:
    """One heatmap per MoE layer in a grid, shared colour scale [0, 1].  {layer: [E, E]} -> PNG bytes."""
    plt = _pyplot()
    layers = sorted(matrices)
    cols = min(max_cols, max(1, len(layers)))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 0.8, 3.0 * rows + 0.6), squeeze=False)
    im = None
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    for ax, layer in zip(axes.flat, layers):
        im = ax.imshow(matrices[layer].float().cpu().numpy(), vmin=0.0, vmax=1.0, cmap="viridis",
                       interpolation="nearest")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("expert", fontsize=8)
        ax.tick_params(labelsize=7)
    if im is not None:
        fig.colorbar(im, ax=list(axes.flat), shrink=0.8, label="similarity")
    if title:
        fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def line_plot(xs: list, series: Mapping[str, list], xlabel: str, ylabel: str, title: str = "",
              logy: bool = False) -> bytes:
    """Several named y-series over the same x values -> PNG bytes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
