"""PNG plots of evaluation results (matplotlib, Agg backend: no display needed).

* ``curves_<protocol>_<clip>.png``: per-frame metric curves, one panel per metric, one line per
  method (the model and the repeat-reference baseline).
* ``bars_<protocol>.png``: one panel per metric, a bar per method (mean of per-clip means; the
  whiskers are the spread of the per-clip means). Absent metrics get an empty panel that says why.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np

from .protocols import EvaluationResult
from .report import safe_name


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int) -> tuple[int, int]:
    cols = min(4, max(1, n))
    return int(math.ceil(n / cols)), cols


def _arrow(status) -> str:
    return "↑" if status.higher_is_better else "↓"


def plot_curves(result: EvaluationResult, folder: Path) -> list[Path]:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    names = []
    for clip in result.clips:
        if clip.clip not in names:
            names.append(clip.clip)
    metrics = [m for m in result.metrics if m.available]
    if not metrics:
        return paths
    for name in names:
        clips = [c for c in result.clips if c.clip == name]
        rows, cols = _grid(len(metrics))
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
        for ax, status in zip(axes.flat, metrics):
            for clip in clips:
                values = np.asarray(clip.per_frame.get(status.name, []), np.float64)
                if len(values):
                    ax.plot(np.arange(len(values)), values, marker="." if len(values) < 40 else None,
                            label=clip.method, linestyle="--" if clip.method != "x-nemo" else "-")
            ax.set_title(f"{status.name} {_arrow(status)}", fontsize=9)
            ax.set_xlabel("frame", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(metrics):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"{result.protocol}-reenactment: {name}", fontsize=10)
        fig.tight_layout()
        path = folder / f"curves_{result.protocol}_{safe_name(name)}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_bars(result: EvaluationResult, folder: Path) -> Path:
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    methods = result.methods()
    rows, cols = _grid(len(result.metrics))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, status in zip(axes.flat, result.metrics):
        ax.set_title(f"{status.name} {_arrow(status)}", fontsize=9)
        if not status.available:
            ax.text(0.5, 0.5, "\n".join(textwrap.wrap("absent: " + status.absent, 34)), ha="center", va="center",
                    fontsize=7, transform=ax.transAxes, color="dimgray")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        means, spreads = [], []
        for method in methods:
            per_clip = np.array([c.mean(status.name) for c in result.clips if c.method == method], np.float64)
            per_clip = per_clip[np.isfinite(per_clip)]
            means.append(per_clip.mean() if len(per_clip) else np.nan)
            spreads.append(per_clip.std() if len(per_clip) > 1 else 0.0)
        x = np.arange(len(methods))
        ax.bar(x, np.nan_to_num(means), yerr=spreads, color=colors[: len(methods)], capsize=3)
        for xi, m in zip(x, means):
            label = f"{m:.3g}" if np.isfinite(m) else "n/a (no face)"
            ax.text(xi, m if np.isfinite(m) else 0.0, label, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels(methods, fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(result.metrics):]:
        ax.axis("off")
    fig.suptitle(f"{result.protocol}-reenactment (mean over clips)", fontsize=10)
    fig.tight_layout()
    path = folder / f"bars_{result.protocol}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
