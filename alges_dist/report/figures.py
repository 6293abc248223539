"""The report's figures: learning curves (with significance markers and the full-data line)
and per-class small multiples. Each returns the points it drew, read back from the figure,
so tests check the picture against the tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alges_dist.data.atomic import atomic_path
from alges_dist.report.comparisons import METRIC_LABELS, METRICS, SIGNIFICANCE_LEVEL

FULL_DATA = "full data"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path) -> None:
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=Path(out).suffix.lstrip(".") or "png", dpi=110)  # png, svg, pdf


def _curve(ax: Any, rows: Sequence[dict[str, Any]], column: str, label: str) -> Any:
    """One strategy's mean line with a +-1 std band; returns the line."""
    xs = np.array([r["n_labeled"] for r in rows], dtype=np.float64)
    mean = np.array([r[f"{column}_mean"] for r in rows])
    std = np.array([r[f"{column}_std"] for r in rows])
    (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=label)
    ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
    return line


def plot_learning_curves(table: Sequence[dict[str, Any]], out_png: Path, metrics: Sequence[str] = METRICS, *,
                         significant: dict[str, set[tuple[str, int]]] | None = None,
                         reference: dict[str, tuple[float, int]] | None = None,
                         baseline: str | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Metric vs labeled frames, one line per strategy with a +-1 std band over seeds.

    significant: ``{metric: {(strategy, round)}}`` drawn as a star on the mean point (the
    paired difference to ``baseline`` at that round has p < 0.05); reference:
    ``{metric: (mean full-data value, frames)}`` drawn as a dashed horizontal line.
    Returns the plotted points, ``{metric: {strategy: (n, 2)}}``, with the stars under
    ``"STRATEGY significant"`` and the line under ``"full data"``.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    plotted: dict[str, dict[str, np.ndarray]] = {}
    strategies = list(dict.fromkeys(r["strategy"] for r in table))
    for ax, metric in zip(axes[0], metrics):
        plotted[metric] = {}
        marks = (significant or {}).get(metric, set())
        for strategy in strategies:
            rows = [r for r in table if r["strategy"] == strategy]
            line = _curve(ax, rows, metric, strategy)
            plotted[metric][strategy] = line.get_xydata()
            stars = [(r["n_labeled"], r[f"{metric}_mean"]) for r in rows if (strategy, r["round"]) in marks]
            if stars:
                (star,) = ax.plot(*np.array(stars).T, linestyle="none", marker="*", markersize=12,
                                  color=line.get_color(), markeredgecolor="black")
                plotted[metric][f"{strategy} significant"] = star.get_xydata()
        if reference and metric in reference:
            value, frames = reference[metric]
            ax.axhline(value, color="black", linestyle="--", linewidth=1, label=f"{FULL_DATA} ({frames} frames)")
            plotted[metric][FULL_DATA] = np.array([[frames, value]])
        ax.set_xlabel("labeled frames")
        ax.set_ylabel(f"test {METRIC_LABELS.get(metric, metric)}")
        ax.grid(alpha=0.3)
    n_seeds = max((r["n_seeds"] for r in table), default=0)
    axes[0][0].legend(fontsize=8)
    title = f"mean ± std over {n_seeds} seed{'s' if n_seeds != 1 else ''}"
    if baseline and 2 / 2**n_seeds >= SIGNIFICANCE_LEVEL:  # the exact test's smallest p with n seeds
        title += f"; no ★ possible: {n_seeds} seeds cannot give p < {SIGNIFICANCE_LEVEL} vs {baseline}"
    elif baseline:
        title += f"; ★ paired difference to {baseline} at that round has p < {SIGNIFICANCE_LEVEL} (sign-flip test)"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, out_png)
    plt.close(fig)
    return plotted


def plot_per_class_curves(table: Sequence[dict[str, Any]], out_png: Path, *,
                          reference: dict[int, float] | None = None, columns: int = 4) -> dict[str, dict[str, np.ndarray]]:
    """Small multiples: one panel per class, its Dice vs labeled frames per strategy (mean +- std
    over seeds, ``comparisons.per_class_round_table``), the full-data Dice of the class
    dashed. Returns ``{class_name: {strategy: (n, 2)}}`` as drawn."""
    plt = _pyplot()
    classes = list(dict.fromkeys((r["class_id"], r["class_name"]) for r in table))
    strategies = list(dict.fromkeys(r["strategy"] for r in table))
    n_cols = max(1, min(columns, len(classes)))
    n_rows = -(-len(classes) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.6 * n_cols, 2.9 * n_rows), squeeze=False)
    plotted: dict[str, dict[str, np.ndarray]] = {}
    for ax, (class_id, name) in zip(axes.flat, classes):
        plotted[name] = {}
        for strategy in strategies:
            rows = [r for r in table if r["class_id"] == class_id and r["strategy"] == strategy]
            if rows:
                plotted[name][strategy] = _curve(ax, rows, "dice", strategy).get_xydata()
        if reference and class_id in reference:
            ax.axhline(reference[class_id], color="black", linestyle="--", linewidth=1, label=FULL_DATA)
            plotted[name][FULL_DATA] = np.array([[np.nan, reference[class_id]]])
        ax.set_title(f"{class_id}: {name}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(classes):]:
        ax.set_visible(False)
    fig.supxlabel("labeled frames", fontsize=9)
    fig.supylabel("test Dice (paper) of the class", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out_png)
    plt.close(fig)
    return plotted


def plot_effort_curves(table: Sequence[dict[str, Any]], out_png: Path, metric: str = "dice", *,
                       reference: float | None = None) -> dict[str, np.ndarray]:
    """The effort curve: test metric vs cumulative corrected pixels, one line per strategy
    (means over seeds, ``effort.effort_table``; rounds without a measured effort left out),
    the full-data value dashed. Returns ``{strategy: (n, 2)}`` as drawn."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    plotted: dict[str, np.ndarray] = {}
    for strategy in dict.fromkeys(r["strategy"] for r in table):
        pts = [(r["corrected_px_cum_mean"], r[f"{metric}_mean"]) for r in table if r["strategy"] == strategy
               and np.isfinite(r["corrected_px_cum_mean"]) and np.isfinite(r[f"{metric}_mean"])]
        if pts:
            (line,) = ax.plot(*np.array(pts).T, marker="o", markersize=3, label=strategy)
            plotted[strategy] = line.get_xydata()
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", linewidth=1, label=FULL_DATA)
        plotted[FULL_DATA] = np.array([[np.nan, reference]])
    ax.set_xlabel("corrected pixels, cumulative (the picking models' masks vs the labels)")
    ax.set_ylabel(f"test {METRIC_LABELS.get(metric, metric)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    n_seeds = max((r["n_seeds"] for r in table), default=0)
    fig.suptitle(f"mean over {n_seeds} seed{'s' if n_seeds != 1 else ''}; the initial set is not counted", fontsize=9)
    fig.tight_layout()
    _save(fig, out_png)
    plt.close(fig)
    return plotted
