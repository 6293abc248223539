"""Human-readable outputs of a run: the per-round metric table and learning curves."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from alges_dist.data.atomic import atomic_path


def _read_rows(results_csv: Path) -> list[dict[str, str]]:
    with open(results_csv, newline="") as fh:
        return list(csv.DictReader(fh))


def format_results(results_csv: Path) -> str:
    """results.csv as an aligned text table, one line per (strategy, seed, round)."""
    rows = _read_rows(results_csv)
    if not rows:
        return f"{results_csv}: no completed rounds yet"
    header = ["strategy", "seed", "round", "n_labeled", "dice", "miou"]
    cells = [header] + [
        [r["strategy"], r["seed"], r["round"], r["n_labeled"], f"{float(r['dice']):.4f}", f"{float(r['miou']):.4f}"]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def plot_learning_curves(results_csv: Path, out_png: Path, metric: str = "dice") -> Path:
    """Test ``metric`` against labeled frames, one line per strategy (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in _read_rows(results_csv):
        curves[r["strategy"]][int(r["n_labeled"])].append(float(r[metric]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy, points in sorted(curves.items()):
        xs = sorted(points)
        ax.plot(xs, [sum(points[x]) / len(points[x]) for x in xs], marker="o", label=strategy)
    ax.set_xlabel("labeled frames")
    ax.set_ylabel(f"test {metric}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out_png


def contact_sheet(image_uris: list[str], labels: list[str], out_png: Path, *, thumb_px: int = 160,
                  columns: int = 8) -> Path:
    """A grid of thumbnails with their frame ids, for people reviewing a query batch."""
    from PIL import Image, ImageDraw

    from alges_dist.data.frames import load_image

    rows = max(1, -(-len(image_uris) // columns))
    caption = 14
    sheet = Image.new("RGB", (columns * thumb_px, rows * (thumb_px + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (uri, label) in enumerate(zip(image_uris, labels)):
        thumb = Image.fromarray(load_image(uri, (thumb_px, thumb_px)))
        x, y = (i % columns) * thumb_px, (i // columns) * (thumb_px + caption)
        sheet.paste(thumb, (x, y))
        draw.text((x + 2, y + thumb_px + 1), f"{i}: {label}"[:26], fill="black")
    with atomic_path(out_png) as tmp:
        sheet.save(tmp, format="PNG")
    return out_png
