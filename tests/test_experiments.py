"""Experiments through the CLI: strategies x seeds x rounds, the report, the paper protocol."""

from __future__ import annotations

import csv
import html
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from alges_dist.cli import main
from alges_dist.config import load_config
from alges_dist.data.manifest import filter_manifest, read_manifest
from alges_dist.loop import Experiment
from alges_dist.report import plot_learning_curves, round_table
from alges_dist.run_folder import read_results
from cholecseg8k_fixture import make_cholecseg8k

REPO = Path(__file__).resolve().parents[1]
FAST = ["data.image_size=[64, 64]", "train.epochs=1", "train.batch_size=4", "loop.initial_labeled=4",
        "loop.budget=3", "loop.n_rounds=2", "scoring.batch_size=8"]
REPORT_FILES = ["learning_curves.png", "rounds.csv", "rounds.md", "aulc.csv", "aulc.md", "per_video.csv",
                "per_video.md", "report.html", "headline.md", "round_differences.csv", "frames_to_target.csv",
                "frames_to_target.md", "per_class_rounds.csv", "per_class_aulc.csv", "per_class_aulc.md",
                "per_class_curves.png"]


def _sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _initial_set(manifest: Path) -> set[str]:
    table = filter_manifest(read_manifest(manifest).table, split="pool", labeled=True)
    return {f for f, r in zip(table["frame_id"].to_pylist(), table["labeled_round"].to_pylist()) if r == 0}


@pytest.mark.ray
@pytest.mark.slow
def test_two_strategies_three_seeds_two_rounds_the_full_data_reference_and_the_report(
        ray_local, demo_manifest, tmp_path, capsys):
    out = tmp_path / "run"
    strategies, seeds = ("random", "alges-img-kcenter"), (0, 1, 2)
    args = ["run", "--pool", str(demo_manifest), "--out", str(out), "--no-dashboard",
            *_sets(*FAST, "loop.strategies=[random, alges-img-kcenter]", "loop.seeds=[0, 1, 2]",
                   "loop.full_data_reference=true")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "report.html" in printed and "alges-img-kcenter" in printed

    results = _csv(out / "results.csv")
    assert sorted((r["strategy"], int(r["seed"]), int(r["round"])) for r in results) == sorted(
        (s, seed, r) for s in strategies for seed in seeds for r in range(3))
    assert {int(r["n_labeled"]) for r in results if r["round"] == "2"} == {4 + 2 * 3}
    # one initial labeled set for the whole experiment; round 0 (same labels, same weights) shared
    initial = _initial_set(out / "initial" / "manifest.parquet")
    assert len(initial) == 4
    for s in strategies:
        for seed in seeds:
            assert _initial_set(out / s / f"seed_{seed}" / "manifest.parquet") == initial
    for seed in seeds:
        assert len({r["dice"] for r in results if r["round"] == "0" and r["seed"] == str(seed)}) == 1
    # every pick is labeled in the next round and never re-picked
    queries = pq.read_table(out / "queries.parquet").to_pylist()
    assert len(queries) == len(strategies) * len(seeds) * 2 * 3
    for s in strategies:
        for seed in seeds:
            table, _ = read_manifest(out / s / f"seed_{seed}" / "manifest.parquet")
            rounds = dict(zip(table["frame_id"].to_pylist(), table["labeled_round"].to_pylist()))
            mine = [q for q in queries if q["strategy"] == s and q["seed"] == seed]
            assert all(rounds[q["frame_id"]] == q["round"] + 1 for q in mine)
            assert not initial & {q["frame_id"] for q in mine}

    report = out / "report"
    for name in REPORT_FILES + [f"last_batch_{s}.png" for s in strategies]:
        assert (report / name).stat().st_size > 0, name
    # the per-round table is the mean and std over seeds of results.csv (checked with numpy here)
    table = _csv(report / "rounds.csv")
    assert len(table) == len(strategies) * 3
    for row in table:
        dice = np.array([float(r["dice"]) for r in results
                         if r["strategy"] == row["strategy"] and r["round"] == row["round"]])
        assert len(dice) == 3 and int(row["n_seeds"]) == 3
        np.testing.assert_allclose(float(row["dice_mean"]), dice.mean(), rtol=1e-9)
        np.testing.assert_allclose(float(row["dice_std"]), dice.std(ddof=1), rtol=1e-9, atol=1e-12)
    # the curves drawn are the table's points
    plotted = plot_learning_curves(round_table(read_results(out / "results.csv")), tmp_path / "curves.png")
    for metric in ("dice", "miou"):
        for s in strategies:
            rows = [r for r in table if r["strategy"] == s]
            expected = [[float(r["n_labeled"]), float(r[f"{metric}_mean"])] for r in rows]
            np.testing.assert_allclose(plotted[metric][s], expected, rtol=1e-9)
    # AULC: trapezoid area over labeled frames / span, per seed, then mean over seeds
    aulc = {r["strategy"]: r for r in _csv(report / "aulc.csv")}
    for s in strategies:
        per_seed = []
        for seed in seeds:
            pts = sorted((int(r["n_labeled"]), float(r["dice"])) for r in results
                         if r["strategy"] == s and r["seed"] == str(seed))
            x, y = np.array(pts).T
            per_seed.append(np.trapezoid(y, x) / (x[-1] - x[0]))
        np.testing.assert_allclose(float(aulc[s]["aulc_mean"]), np.mean(per_seed), rtol=1e-9)
    videos = _csv(report / "per_video.csv")
    assert sum(int(r["n_selected"]) for r in videos) == len(queries)
    page = html.unescape((report / "report.html").read_text())
    # images inline (opens offline): learning curves, per-class curves, the effort curve, a last batch per strategy
    assert page.count("data:image/png;base64,") == 3 + len(strategies)
    # the simulated oracle measured each round's picks: effort per (strategy, round), summed over the picks' rows
    effort = {(r["strategy"], int(r["round"])): r for r in _csv(report / "effort.csv")}
    assert set(effort) == {(s, r) for s in strategies for r in range(3)}
    for s in strategies:
        per_seed = [sum(int(e["pixels_changed"]) for e in _csv(out / s / f"seed_{seed}" / "round_01" / "correction.csv"))
                    for seed in seeds]
        np.testing.assert_allclose(float(effort[s, 1]["corrected_px_mean"]), np.mean(per_seed), rtol=1e-9)
    assert {r["strategy"] for r in _csv(report / "forecast.csv")} == set(strategies)  # 3 rounds: refused, said why
    _check_statistics(out, page, results, seeds)
    assert "http://" not in page and "https://" not in page

    # the report renders from the finished run folder alone
    copy = tmp_path / "copied_run"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "report")
    assert main(["report", str(copy)]) == 0
    assert (copy / "report" / "rounds.csv").read_text() == (report / "rounds.csv").read_text()
    assert (copy / "report" / "report.html").stat().st_size > 0
    log = (copy / "run.log").read_text()  # the history of the commands run on the folder
    assert "alges run" in log and "alges report" in log


def test_report_of_a_folder_without_results_fails_clearly(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "config.yaml is missing" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_paper_protocol_shrunken_runs_end_to_end_on_the_cholecseg8k_fixture(ray_local, tmp_path):
    """configs/paper_cholecseg8k.yaml through the same commands as on the real dataset,
    with sizes shrunk to a fixture of the exact CholecSeg8k layout."""
    config = REPO / "configs" / "paper_cholecseg8k.yaml"
    root = tmp_path / "CholecSeg8k"
    make_cholecseg8k(root, {"video01": [80, 160], "video12": [400], "video27": [240], "video17": [320]},
                     frames_per_clip=3)
    pool = tmp_path / "cholecseg8k.parquet"
    assert main(["ingest", "cholecseg8k", "--root", str(root), "--out", str(pool), "--config", str(config)]) == 0
    table, encoding = read_manifest(pool)
    assert encoding.n_classes == 13
    splits = dict(zip(table["video_id"].to_pylist(), table["split"].to_pylist()))
    assert splits == {"video01": "pool", "video12": "pool", "video27": "val", "video17": "test"}
    out = tmp_path / "paper"
    shrink = ["data.image_size=[64, 64]", "train.epochs=1", "train.batch_size=4", "train.checkpoint_every=1",
              "loop.initial_labeled=2", "loop.budget=2", "loop.n_rounds=1", "loop.seeds=[0]",
              "loop.strategies=[alges-img, alges-sem]", "scoring.batch_size=4"]
    assert main(["run", "--config", str(config), "--pool", str(pool), "--out", str(out), "--no-dashboard",
                 *_sets(*shrink)]) == 0
    results = _csv(out / "results.csv")
    assert [(r["strategy"], r["round"], r["n_labeled"]) for r in results] == [
        ("alges-img", "0", "2"), ("alges-img", "1", "4"), ("alges-sem", "0", "2"), ("alges-sem", "1", "4")]
    recorded = (out / "config.yaml").read_text()  # the paper's settings that were not shrunk
    assert "normalize: none" in recorded and "lr: 5.0e-05" in recorded
    assert (out / "report" / "report.html").exists()


def _check_statistics(out: Path, page: str, results: list[dict[str, str]], seeds: tuple[int, ...]) -> None:
    """The full-data reference, Dice per class and the paired statistics of a finished demo run."""
    pool, encoding = read_manifest(out / "initial" / "manifest.parquet")
    n_masked = filter_manifest(pool, split="pool").num_rows  # every demo pool frame has a mask
    reference = _csv(out / "reference.csv")
    assert [(int(r["seed"]), int(r["n_labeled"])) for r in reference] == [(s, n_masked) for s in seeds]
    for seed in seeds:  # trained from the seed's own initial weights, on every masked pool frame
        record = json.loads((out / "reference" / f"seed_{seed}" / "record.json").read_text())
        assert record["dice"] == pytest.approx(np.mean(record["dice_per_class"]))  # dice_classes: all
    done = (out / "reference" / "seed_0" / "record.json").stat().st_mtime_ns
    cfg = load_config(out / "config.yaml")
    Experiment(cfg, out, Path(cfg.data.pool)).reference(0)  # resumable: a finished reference is not redone
    assert (out / "reference" / "seed_0" / "record.json").stat().st_mtime_ns == done
    per_class = _csv(out / "results_per_class.csv")
    assert len(per_class) == len(results) * encoding.n_classes
    assert {r["class_name"] for r in per_class} == set(encoding.class_names)
    for r in results:  # the classes' paper Dice averages to the round's Dice
        mine = [float(c["dice"]) for c in per_class
                if (c["strategy"], c["seed"], c["round"]) == (r["strategy"], r["seed"], r["round"])]
        assert np.mean(mine) == pytest.approx(float(r["dice"]))
    headline = (out / "report" / "headline.md").read_text().strip()
    assert headline.startswith("alges-img-kcenter ") and "random's 10-frame Dice (paper)" in headline
    assert all(sentence in page for sentence in headline.split("\n\n"))  # one paragraph each, frames then effort
    assert "random's final Dice (paper)" in headline and "corrected pixels" in headline
    aulc = {r["strategy"]: r for r in _csv(out / "report" / "aulc.csv")}
    assert float(aulc["random"]["vs_random_p"]) == 1 and int(aulc["alges-img-kcenter"]["vs_random_n_pairs"]) == 3
    assert float(aulc["alges-img-kcenter"]["vs_random_p"]) >= 0.25  # 3 seeds: the exact test's floor
    for needle in ("Frames to target", "90% of the full-data Dice (paper)", "Per class", "Full-data reference: 3 seeds",
                   "With 3 seeds the exact test cannot give p below 0.25", "Paired difference to random at each round"):
        assert needle in page, needle
