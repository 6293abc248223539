"""What a run folder says, for people: which strategy saves the most annotation.

``write_report(RUN)`` reads only the run folder (results.csv, queries.parquet, the
runs' manifests and models) and writes ``RUN/report/``:

    learning_curves.png   test metric vs labeled frames, mean +- std over seeds
    rounds.csv / .md      per (strategy, round): labeled frames, mean and std per metric
    aulc.csv / .md        area under each seed's learning curve, mean +- std per strategy
    per_video.csv / .md   how many frames each strategy picked from each video
    last_batch_*.png      the last query batch with the model's predicted masks
    report.html           all of the above in one file that opens offline

The area under the learning curve (AULC) is the trapezoid area of the metric over
the labeled-frame axis divided by that axis' span: the metric averaged over the
budget, in the metric's units. All runs are compared over the rounds every run has
completed, so a run that is further along does not get a larger area.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alges_dist.data.atomic import atomic_path, atomic_write_text
from alges_dist.handoff import contact_sheet, predict_masks
from alges_dist.near_picks import near_pick_column
from alges_dist.run_folder import RunLayout, read_results

log = logging.getLogger(__name__)

METRICS = ("dice", "miou")
METRIC_LABELS = {"dice": "Dice (paper)", "miou": "mIoU"}


# ---- tables ------------------------------------------------------------------------------------------
def common_rounds(rows: Sequence[dict[str, Any]]) -> int:
    """The last round that every (strategy, seed) run has completed (-1: none)."""
    last: dict[tuple[str, int], int] = defaultdict(lambda: -1)
    for r in rows:
        last[r["strategy"], r["seed"]] = max(last[r["strategy"], r["seed"]], r["round"])
    return min(last.values(), default=-1)


def round_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (strategy, round): labeled frames and each metric's mean and std over seeds."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["strategy"], r["round"]].append(r)
    out = []
    for (strategy, rnd), members in sorted(groups.items(), key=lambda kv: (_order(rows, kv[0][0]), kv[0][1])):
        row: dict[str, Any] = {"strategy": strategy, "round": rnd,
                               "n_labeled": int(np.mean([m["n_labeled"] for m in members])),
                               "n_seeds": len(members)}
        for metric in METRICS:
            values = np.array([m[metric] for m in members], dtype=np.float64)
            row[f"{metric}_mean"] = float(values.mean())
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out.append(row)
    return out


def aulc(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Trapezoid area under (xs, ys) over the span of xs (a mean metric); one point: that point."""
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if len(xs) == 1:
        return float(ys[0])
    area = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))
    return area / float(xs[-1] - xs[0])


def aulc_table(rows: Sequence[dict[str, Any]], metric: str = "dice") -> list[dict[str, Any]]:
    """Per strategy: AULC of each seed's curve over the common rounds, mean and std over seeds."""
    last = common_rounds(rows)
    curves: dict[tuple[str, int], list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        if r["round"] <= last:
            curves[r["strategy"], r["seed"]].append((r["n_labeled"], r[metric]))
    per_strategy: dict[str, list[float]] = defaultdict(list)
    for (strategy, _), points in curves.items():
        points.sort()
        per_strategy[strategy].append(aulc([p[0] for p in points], [p[1] for p in points]))
    out = []
    for strategy in sorted(per_strategy, key=lambda s: _order(rows, s)):
        values = np.array(per_strategy[strategy])
        out.append({"strategy": strategy, "metric": metric, "aulc_mean": float(values.mean()),
                    "aulc_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                    "n_seeds": len(values), "rounds": f"0-{last}"})
    baseline = next((r["aulc_mean"] for r in out if r["strategy"] == "random"), None)
    for r in out:
        r["vs_random"] = r["aulc_mean"] - baseline if baseline is not None else float("nan")
    return out


def _order(rows: Sequence[dict[str, Any]], strategy: str) -> int:
    """Strategies in the order they first appear (the config's order)."""
    seen = list(dict.fromkeys(r["strategy"] for r in rows))
    return seen.index(strategy)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
    return path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def format_results(results_csv: Path) -> str:
    """The per-round table (mean +- std over seeds) as Markdown, for the terminal."""
    rows = read_results(results_csv)
    if not rows:
        return f"{results_csv}: no completed rounds yet"
    return markdown_table([
        {"strategy": r["strategy"], "round": r["round"], "labeled": r["n_labeled"], "seeds": r["n_seeds"],
         "dice": f"{r['dice_mean']:.4f} ± {r['dice_std']:.4f}", "miou": f"{r['miou_mean']:.4f} ± {r['miou_std']:.4f}"}
        for r in round_table(rows)
    ])


# ---- figures -----------------------------------------------------------------------------------------
def plot_learning_curves(table: Sequence[dict[str, Any]], out_png: Path,
                         metrics: Sequence[str] = METRICS) -> dict[str, dict[str, np.ndarray]]:
    """Metric vs labeled frames, one line per strategy with a +-1 std band over seeds.

    Returns the plotted points read back from the figure, ``{metric: {strategy: (n, 2)}}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    plotted: dict[str, dict[str, np.ndarray]] = {}
    strategies = list(dict.fromkeys(r["strategy"] for r in table))
    for ax, metric in zip(axes[0], metrics):
        plotted[metric] = {}
        for strategy in strategies:
            rows = [r for r in table if r["strategy"] == strategy]
            xs = np.array([r["n_labeled"] for r in rows], dtype=np.float64)
            mean = np.array([r[f"{metric}_mean"] for r in rows])
            std = np.array([r[f"{metric}_std"] for r in rows])
            (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=strategy)
            ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
            plotted[metric][strategy] = line.get_xydata()
        ax.set_xlabel("labeled frames")
        ax.set_ylabel(f"test {METRIC_LABELS.get(metric, metric)}")
        ax.grid(alpha=0.3)
    n_seeds = max((r["n_seeds"] for r in table), default=0)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"mean ± std over {n_seeds} seed{'s' if n_seeds != 1 else ''}", fontsize=9)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format=Path(out_png).suffix.lstrip(".") or "png", dpi=110)  # png, svg, pdf
    plt.close(fig)
    return plotted


# ---- the report --------------------------------------------------------------------------------------
def per_video_counts(run: Path, queries: Any, strategies: Sequence[str], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Frames picked per (strategy, video), summed over seeds and rounds."""
    import pyarrow.compute as pc

    from alges_dist.data.manifest import read_manifest

    layout = RunLayout(run)
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for strategy in strategies:
        picked = queries.filter(pc.equal(queries["strategy"], strategy))
        if picked.num_rows == 0:
            continue
        video = {}
        for seed in seeds:
            path = layout.manifest_path(strategy, seed)
            if path.exists():
                table = read_manifest(path).table
                video.update(zip(table["frame_id"].to_pylist(), table["video_id"].to_pylist()))
        for frame_id in picked["frame_id"].to_pylist():
            counts[strategy, video.get(frame_id, "?")] += 1
    return [{"strategy": s, "video_id": v, "n_selected": n} for (s, v), n in sorted(counts.items())]


def last_batches(run: Path, cfg: Any, queries: Any, out_dir: Path) -> list[tuple[str, Path]]:
    """Per strategy (first seed): the last query batch, overlaid with the masks predicted by
    the model that picked it."""
    import pyarrow.compute as pc

    from alges_dist.data.manifest import read_manifest

    layout = RunLayout(run)
    seed = cfg.loop.seeds[0]
    sheets = []
    for strategy in cfg.loop.strategies:
        mine = queries.filter(pc.and_(pc.equal(queries["strategy"], strategy), pc.equal(queries["seed"], seed)))
        if mine.num_rows == 0:
            continue
        last = max(mine["round"].to_pylist())
        batch = mine.filter(pc.equal(mine["round"], last)).sort_by("pick_rank")
        picks = batch["frame_id"].to_pylist()
        table = read_manifest(layout.manifest_path(strategy, seed)).table
        uri = dict(zip(table["frame_id"].to_pylist(), table["image_uri"].to_pylist()))
        model_path = layout.model_dir(strategy, seed, last) / "model.pt"
        thumb = 128
        masks = predict_masks(model_path, cfg, [uri[f] for f in picks], (thumb, thumb)) if model_path.exists() else None
        out = contact_sheet([uri[f] for f in picks], picks, out_dir / f"last_batch_{strategy}.png", thumb_px=thumb,
                            masks=masks)
        sheets.append((f"{strategy}, seed {seed}, round {last} ({len(picks)} frames"
                       f"{', predicted masks' if masks is not None else ''})", out))
    return sheets


def _img_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}" style="max-width:100%">'


def _html_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "<p>(no rows)</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(run: Path, metric: str = "dice") -> Path:
    """Build ``RUN/report/`` from the run folder alone; returns the report.html path."""
    import pyarrow.parquet as pq

    from alges_dist.config import load_config

    run = Path(run)
    for needed in ("config.yaml", "results.csv"):
        if not (run / needed).is_file():
            raise FileNotFoundError(f"{run} is not a run folder: {needed} is missing (run `alges run` first)")
    cfg = load_config(run / "config.yaml")
    rows = read_results(run / "results.csv")
    if not rows:
        raise ValueError(f"{run / 'results.csv'} has no completed rounds yet")
    out = run / "report"
    out.mkdir(exist_ok=True)
    table = round_table(rows)
    near_pick_column(table, run, cfg)  # picks near another pick or label of their video (issue 11)
    write_csv(table, out / "rounds.csv")
    atomic_write_text(out / "rounds.md", markdown_table(table) + "\n")
    areas = aulc_table(rows, metric)
    write_csv(areas, out / "aulc.csv")
    atomic_write_text(out / "aulc.md", markdown_table(areas) + "\n")
    plot_learning_curves(table, out / "learning_curves.png")
    queries = pq.read_table(run / "queries.parquet") if (run / "queries.parquet").exists() else None
    videos = per_video_counts(run, queries, cfg.loop.strategies, cfg.loop.seeds) if queries is not None else []
    write_csv(videos, out / "per_video.csv")
    atomic_write_text(out / "per_video.md", markdown_table(videos) + "\n")
    sheets = last_batches(run, cfg, queries, out) if queries is not None else []

    settings = {
        "pool": cfg.data.pool, "model": f"{cfg.model.arch}-{cfg.model.encoder}",
        "image size": "x".join(map(str, cfg.data.image_size)), "epochs": cfg.train.epochs,
        "initial labeled": cfg.loop.initial_labeled, "budget per round": cfg.loop.budget,
        "rounds": cfg.loop.n_rounds, "seeds": ", ".join(map(str, cfg.loop.seeds)),
    }
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>alges report</title><style>"
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "th{background:#f2f2f2}</style></head><body>",
        f"<h1>Active-learning report: {html.escape(run.name)}</h1>",
        _html_table([{"setting": k, "value": v} for k, v in settings.items()]),
        f"<h2>Learning curves</h2>{_img_tag(out / 'learning_curves.png')}",
        f"<h2>Area under the learning curve ({html.escape(METRIC_LABELS.get(metric, metric))})</h2>"
        "<p>Trapezoid area over labeled frames divided by their span (the metric averaged over the budget), "
        "mean and std over seeds; vs_random is the difference to random sampling's mean.</p>"
        + _html_table(areas),
        "<h2>Per round (mean and std over seeds)</h2>" + _html_table(table),
        "<h2>Frames picked per video (all seeds and rounds)</h2>" + _html_table(videos),
    ]
    if sheets:
        parts.append("<h2>Last query batch</h2>")
        parts += [f"<h3>{html.escape(title)}</h3>{_img_tag(path)}" for title, path in sheets]
    parts.append("</body></html>")
    atomic_write_text(out / "report.html", "\n".join(parts))
    log.info("report: %s", out / "report.html")
    return out / "report.html"
