"""The calibration report: per-layer statistics (CSV, Markdown, with the redundancy diagnostics and their
verdict), heatmaps, the run report and diagnostics.json written next to the matrices; also the line plot
the calibration benchmark draws. Figures use matplotlib's Agg
backend and come back as PNG bytes."""

from __future__ import annotations

import io
import json
import math
from typing import Any, Mapping

import torch

from sere_dist.calibration.diagnostics import DIAGNOSTICS_JSON, diagnostics_json, diagnostics_markdown
from sere_dist.core.similarity import offdiag_stats

STATS_CSV = "stats.csv"
STATS_MD = "stats.md"
HEATMAP_PNG = "heatmaps.png"
REPORT_JSON = "calibration.json"


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


def stats_rows(matrices: dict[int, torch.Tensor]) -> list[dict[str, float]]:
    """Per-layer off-diagonal statistics: [{layer, mean, std, min, max}]."""
    return [{"layer": i, **offdiag_stats(m)} for i, m in sorted(matrices.items())]


def stats_table(matrices: dict[int, torch.Tensor], fmt: str = "md") -> str:
    rows = stats_rows(matrices)
    if fmt == "csv":
        return "layer,mean,std,min,max\n" + "".join(
            f"{r['layer']},{r['mean']:.6f},{r['std']:.6f},{r['min']:.6f},{r['max']:.6f}\n" for r in rows)
    lines = ["| layer | mean | std | min | max |", "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['layer']} | {r['mean']:.4f} | {r['std']:.4f} | {r['min']:.4f} | {r['max']:.4f} |" for r in rows]
    return "\n".join(lines) + "\n"


def report_files(art, report: dict[str, Any], diagnostics: Mapping[str, Any]) -> dict[str, bytes]:
    """The files written next to the matrices: stats table (CSV; Markdown followed by the diagnostics
    table and verdict), heatmap grid, run report, diagnostics (`calibration.diagnostics.diagnostics`)."""
    title = (f"{art.fingerprint['architecture']}: {art.metric} similarity, {art.tokens} tokens "
             "(off-diagonal stats in stats.md)")
    return {STATS_CSV: stats_table(art.matrices, "csv").encode(),
            STATS_MD: (stats_table(art.matrices, "md") + diagnostics_markdown(diagnostics)).encode(),
            HEATMAP_PNG: similarity_heatmaps(art.matrices, title=title),
            REPORT_JSON: (json.dumps(report, indent=2) + "\n").encode(),
            DIAGNOSTICS_JSON: diagnostics_json(diagnostics)}


def summary_line(res) -> str:
    r = res.report
    return (f"calibrated {r['layers']} MoE layers x {r['experts']} experts on {r['tokens']} tokens in "
            f"{r['wall_s']:.1f} s ({r['tokens_per_s']:.0f} tokens/s; {r['num_workers']} workers per stage on "
            f"{len(r['nodes'])} node(s); worker peak RSS {r['worker_peak_rss_mb']:.0f} MiB) -> {res.out}")
