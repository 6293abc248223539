"""Report math and figures on hand-made results (no Ray): AULC, per-round table, overlays."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from alges_dist.contact_sheet import PALETTE, contact_sheet, overlay_mask
from alges_dist.report import aulc, aulc_table, common_rounds, markdown_table, plot_learning_curves, round_table
from alges_dist.run_folder import read_results


def _write_results(path, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["strategy", "seed", "round", "n_labeled", "dice", "miou", "mdice"])
        writer.writeheader()
        writer.writerows(rows)
    return read_results(path)


def _rows(rng, strategies=("random", "alges-img"), seeds=(0, 1, 2), rounds=4):
    return [{"strategy": s, "seed": seed, "round": r, "n_labeled": 10 + 10 * r, "dice": rng.uniform(),
             "miou": rng.uniform(), "mdice": rng.uniform()}
            for s in strategies for seed in seeds for r in range(rounds)]


def test_aulc_is_the_trapezoid_area_over_the_span():
    xs, ys = [10, 20, 40], [0.2, 0.5, 0.6]
    assert aulc(xs, ys) == pytest.approx(np.trapezoid(ys, xs) / 30)
    assert aulc([10], [0.3]) == 0.3
    assert aulc([10, 20], [0.4, 0.4]) == pytest.approx(0.4)  # a flat curve: its value


def test_tables_match_numpy_and_compare_runs_over_common_rounds(tmp_path):
    rng = np.random.default_rng(0)
    raw = _rows(rng)
    raw = [r for r in raw if not (r["strategy"] == "alges-img" and r["seed"] == 2 and r["round"] == 3)]
    rows = _write_results(tmp_path / "results.csv", raw)
    assert common_rounds(rows) == 2  # one run is a round behind
    table = round_table(rows)
    for t in table:
        dice = np.array([r["dice"] for r in raw if r["strategy"] == t["strategy"] and r["round"] == t["round"]])
        assert t["n_seeds"] == len(dice)
        assert t["dice_mean"] == pytest.approx(dice.mean()) and t["dice_std"] == pytest.approx(dice.std(ddof=1))
    areas = {a["strategy"]: a for a in aulc_table(rows)}
    for s in ("random", "alges-img"):
        per_seed = []
        for seed in (0, 1, 2):
            pts = sorted((r["n_labeled"], r["dice"]) for r in raw
                         if r["strategy"] == s and r["seed"] == seed and r["round"] <= 2)
            x, y = np.array(pts).T
            per_seed.append(np.trapezoid(y, x) / (x[-1] - x[0]))
        assert areas[s]["aulc_mean"] == pytest.approx(np.mean(per_seed))
        assert areas[s]["aulc_std"] == pytest.approx(np.std(per_seed, ddof=1))
        assert areas[s]["rounds"] == "0-2"
    assert areas["random"]["vs_random"] == 0
    assert areas["alges-img"]["vs_random"] == pytest.approx(areas["alges-img"]["aulc_mean"] - areas["random"]["aulc_mean"])
    md = markdown_table(table).splitlines()
    assert md[0].startswith("| strategy | round | n_labeled") and len(md) == 2 + len(table)


def test_learning_curves_plot_the_table(tmp_path):
    rows = _write_results(tmp_path / "results.csv", _rows(np.random.default_rng(1)))
    table = round_table(rows)
    plotted = plot_learning_curves(table, tmp_path / "curves.png")
    assert Image.open(tmp_path / "curves.png").size[0] > 0
    for s in ("random", "alges-img"):
        expected = [[t["n_labeled"], t["miou_mean"]] for t in table if t["strategy"] == s]
        np.testing.assert_allclose(plotted["miou"][s], expected)


def test_overlay_paints_classes_and_leaves_background(tmp_path):
    image = np.full((4, 4, 3), 100, np.uint8)
    mask = np.zeros((4, 4), np.int64)
    mask[:2] = 1
    out = overlay_mask(image, mask, alpha=0.5)
    np.testing.assert_array_equal(out[2:], image[2:])
    np.testing.assert_array_equal(out[0, 0], np.round(0.5 * 100 + 0.5 * PALETTE[1]).astype(np.uint8))
    Image.fromarray(np.full((20, 30, 3), 50, np.uint8)).save(tmp_path / "a.png")
    sheet = contact_sheet([str(tmp_path / "a.png")], ["a"], tmp_path / "sheet.png", thumb_px=8, columns=2,
                          masks=[np.ones((8, 8), np.int64)])
    pixels = np.asarray(Image.open(sheet))
    assert pixels.shape == (8 + 14, 16, 3)
    assert not np.array_equal(pixels[0, 0], [50, 50, 50])  # the class colour is blended in


def test_the_report_package_imports_neither_the_loop_nor_the_hand_off():
    """The report reads the run folder only (DESIGN: report/ reads only the run folder)."""
    import subprocess
    import sys

    code = ("import sys, alges_dist.report; "
            "print(sorted(m for m in sys.modules if m in ('alges_dist.handoff', 'alges_dist.loop', 'alges_dist.people')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
