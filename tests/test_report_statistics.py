"""The report's paired statistics on hand-made run folders whose answers are known (no Ray)."""

from __future__ import annotations

import csv
import html
import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from alges_dist.config import Config
from alges_dist.data.demo import DEMO_CLASS_NAMES, DEMO_ENCODING
from alges_dist.data.manifest import MASK_ENCODING_KEY
from alges_dist.report import round_table, write_report
from alges_dist.report.figures import plot_learning_curves
from alges_dist.report.comparisons import (
    aulc_table,
    frames_to_target_table,
    headline,
    per_class_aulc_table,
    round_differences,
)
from alges_dist.run_folder import RunLayout, read_results

FRAMES = [10, 20, 30, 40, 50]


def _random_curve(seed: int) -> np.ndarray:
    """Random's Dice at 10, 20, ..., 60 labeled frames for one seed: increasing, seed-dependent."""
    return np.array([0.20, 0.35, 0.45, 0.52, 0.60, 0.66]) + 0.01 * seed


def _rows(seeds=(0, 1, 2), shift_left=10):
    """random, alges-img = random's curve shifted left by ``shift_left`` frames, entropy = shifted right."""
    rows = []
    for seed in seeds:
        y = _random_curve(seed)
        for r, x in enumerate(FRAMES):
            shifted_left = np.interp(x + shift_left, FRAMES + [60], y)
            shifted_right = np.interp(x - 10, FRAMES, y[:5]) if x > 10 else y[0]
            for strategy, dice in (("random", y[r]), ("alges-img", shifted_left), ("entropy", shifted_right)):
                rows.append({"strategy": strategy, "seed": seed, "round": r, "n_labeled": x, "dice": float(dice),
                             "miou": float(dice) - 0.1, "mdice": float(dice)})
    return rows


def _exhaustive_p(d):
    observed = abs(np.mean(d))
    means = [abs(np.mean(np.array(s) * d)) for s in itertools.product((1, -1), repeat=len(d))]
    return np.mean([m >= observed - 1e-12 for m in means])


def test_a_curve_shifted_left_by_10_frames_saves_10_frames_and_says_so():
    table = frames_to_target_table(_rows(), "dice", "random")
    by = {r["strategy"]: r for r in table}
    assert by["random"]["frames_mean"] == 50 and by["random"]["saved"] == 0 and by["random"]["p"] == 1
    alges = by["alges-img"]
    assert alges["target"] == "random's 50-frame Dice (paper)"
    assert alges["frames_mean"] == pytest.approx(40) and alges["baseline_frames_mean"] == 50
    assert (alges["frames_ci95_low"], alges["frames_ci95_high"]) == pytest.approx((40, 40))
    assert alges["saved"] == pytest.approx(0.2) and alges["p"] == 0.25 and alges["smallest_p"] == 0.25
    entropy = by["entropy"]  # shifted right: ends below random's last Dice in every seed
    assert entropy["n_not_reached"] == 3 and np.isnan(entropy["frames_mean"]) and np.isnan(entropy["saved"])
    sentences = headline(table, "random")
    assert sentences == [
        "alges-img reached random's 50-frame Dice (paper) with 40 frames (95% CI 40-40): 20% fewer annotations "
        "than random, which first reached it with 50 frames (saved 95% CI 20% to 20%; paired sign-flip p = 0.25 "
        "over 3 seeds, the smallest 3 seeds can give).",
        "entropy did not reach random's 50-frame Dice (paper) within 50 frames in 3 of 3 seeds.",
    ]


def test_identical_curves_are_reported_as_a_tie():
    rows = [r for r in _rows(shift_left=0) if r["strategy"] != "entropy"]
    by = {r["strategy"]: r for r in frames_to_target_table(rows, "dice", "random")}
    assert by["alges-img"]["saved"] == 0 and by["alges-img"]["p"] == 1
    assert headline(list(by.values()), "random") == [
        "alges-img reached random's 50-frame Dice (paper) with 50 frames (95% CI 50-50): as many annotations as "
        "random, which first reached it with 50 frames (saved 95% CI 0% to 0%; paired sign-flip p = 1 over 3 seeds)."]
    area = {a["strategy"]: a for a in aulc_table(rows)}["alges-img"]
    assert area["vs_random"] == 0 and area["vs_random_ci95_low"] <= 0 <= area["vs_random_ci95_high"]
    assert area["vs_random_p"] == 1
    only_random = [r for r in rows if r["strategy"] == "random"]
    assert headline(frames_to_target_table(only_random, "dice", "random"), "random") == [
        "Only random in this run: no other strategy to compare with."]


def test_fraction_targets_interpolate_each_seeds_curve_against_its_own_reference():
    references = {0: 0.90, 1: 1.00, 2: 0.95}  # targets 0.45-0.5: above every first round
    table = frames_to_target_table(_rows(), "dice", "random", references, fractions=[0.5])
    rows = [r for r in table if r["target"] == "50% of the full-data Dice (paper)"]
    expected = {}
    for strategy in ("random", "alges-img", "entropy"):
        frames = []
        for seed, ref in references.items():
            pts = [(r["n_labeled"], r["dice"]) for r in _rows() if r["strategy"] == strategy and r["seed"] == seed]
            x, y = np.array(pts).T
            i = int(np.argmax(y >= 0.5 * ref))  # every curve crosses these targets after its first round
            frames.append(x[i - 1] + (0.5 * ref - y[i - 1]) * (x[i] - x[i - 1]) / (y[i] - y[i - 1]))
        expected[strategy] = np.array(frames)
    for r in rows:
        assert r["frames_mean"] == pytest.approx(expected[r["strategy"]].mean())
        assert r["saved"] == pytest.approx(1 - expected[r["strategy"]].mean() / expected["random"].mean())
    # a target no curve reaches within 50 frames
    high = frames_to_target_table(_rows(), "dice", "random", {0: 1.0, 1: 1.0, 2: 1.0}, fractions=[0.99])
    assert all(r["n_not_reached"] == 3 for r in high if r["target"].startswith("99%"))


def test_aulc_table_pairs_seeds_and_matches_an_independent_computation():
    rows = _rows()
    areas = {a["strategy"]: a for a in aulc_table(rows, "dice", baselines=["entropy"])}
    per_seed = {s: np.array([np.trapezoid([r["dice"] for r in rows if r["strategy"] == s and r["seed"] == seed],
                                          FRAMES) / 40 for seed in (0, 1, 2)]) for s in ("random", "alges-img", "entropy")}
    for s, a in areas.items():
        for b in ("random", "entropy"):
            d = per_seed[s] - per_seed[b]
            assert a[f"vs_{b}"] == pytest.approx(d.mean())
            assert a[f"vs_{b}_p"] == pytest.approx(_exhaustive_p(d))
            assert a[f"vs_{b}_ci95_low"] <= d.mean() + 1e-12 and d.mean() - 1e-12 <= a[f"vs_{b}_ci95_high"]
    assert areas["random"]["vs_random"] == 0 and areas["random"]["vs_random_p"] == 1
    assert (areas["random"]["vs_random_ci95_low"], areas["random"]["vs_random_ci95_high"]) == (0, 0)
    with pytest.raises(ValueError, match="baseline 'coreset' is not a strategy of this run"):
        aulc_table(rows, "dice", baselines=["coreset"])


def test_a_round_that_picked_nothing_is_reported_not_a_crash():
    # issue 23.5: a zero-pick round repeats n_labeled; aulc divided by zero, frames_to_target raised
    rows = [r for r in _rows() if r["round"] <= 1]
    for r in rows:
        if r["strategy"] == "alges-img" and r["seed"] == 0 and r["round"] == 1:
            r["n_labeled"] = 10  # round 1 added no frames
    areas = {a["strategy"]: a for a in aulc_table(rows)}
    y0 = [r["dice"] for r in rows if r["strategy"] == "alges-img" and r["seed"] == 0]
    others = [np.mean([r["dice"] for r in rows if r["strategy"] == "alges-img" and r["seed"] == s]) for s in (1, 2)]
    assert areas["alges-img"]["aulc_mean"] == pytest.approx(np.mean([np.mean(y0), *others]))
    table = frames_to_target_table(rows, "dice", "random")
    assert {r["strategy"] for r in table} >= {"alges-img"}


def test_two_seeds_give_no_interval_and_missing_seeds_are_left_out_of_the_pairs():
    rows = [r for r in _rows() if r["seed"] < 2]
    a = {r["strategy"]: r for r in aulc_table(rows)}["alges-img"]
    assert a["vs_random_n_pairs"] == 2 and np.isnan(a["vs_random_ci95_low"]) and np.isnan(a["vs_random_ci95_high"])
    sentence = headline(frames_to_target_table(rows, "dice", "random"), "random")[0]
    assert "with 40 frames (no interval with 2 seeds): 20% fewer annotations" in sentence
    # alges-img lacks seed 2: the pairs are the seeds both have
    rows = [r for r in _rows() if not (r["strategy"] == "alges-img" and r["seed"] == 2)]
    a = {r["strategy"]: r for r in aulc_table(rows)}["alges-img"]
    assert a["vs_random_n_pairs"] == 2 and a["n_seeds"] == 2


def test_rounds_where_six_seeds_agree_are_significant_and_starred_on_the_curves(tmp_path):
    rows = _rows(seeds=range(6))
    diffs = round_differences(rows, "dice", "random")
    alges = {d["round"]: d for d in diffs if d["strategy"] == "alges-img"}
    assert alges[0]["diff"] > 0 and alges[0]["diff_p"] == pytest.approx(2 / 64)  # 6 seeds, one sign: the floor
    assert all(d["significant"] for d in alges.values())
    entropy = {d["round"]: d for d in diffs if d["strategy"] == "entropy"}
    assert entropy[0]["diff"] == 0 and entropy[0]["diff_p"] == 1 and not entropy[0]["significant"]
    # three seeds can never be significant: the exact test's floor is 0.25
    assert not any(d["significant"] for d in round_differences(_rows(), "dice", "random"))
    table = round_table(rows)
    marks = {(d["strategy"], d["round"]) for d in diffs if d["significant"]}
    plotted = plot_learning_curves(table, tmp_path / "curves.png", ["dice"], significant={"dice": marks},
                                   reference={"dice": (0.8, 240)}, baseline="random")
    expected = [[t["n_labeled"], t["dice_mean"]] for t in table if t["strategy"] == "alges-img"]
    np.testing.assert_allclose(plotted["dice"]["alges-img significant"], expected)
    np.testing.assert_allclose(plotted["dice"]["entropy significant"],
                               [e for e, t in zip([[t["n_labeled"], t["dice_mean"]] for t in table if t["strategy"] == "entropy"],
                                                  range(5)) if entropy[t]["significant"]])
    np.testing.assert_allclose(plotted["dice"]["full data"], [[240, 0.8]])


def _record(strategy, seed, r, n_labeled, dice_per_class):
    dice = float(np.mean(dice_per_class))
    return {"strategy": strategy, "seed": seed, "round": r, "n_labeled": n_labeled, "dice": dice, "miou": dice - 0.1,
            "mdice": dice, "n_frames": 4, "dice_per_class": dice_per_class,
            "dataset_dice_per_class": [None if k == 3 else d for k, d in enumerate(dice_per_class)]}


def _hand_made_run(tmp_path) -> RunLayout:
    """A run folder of round and reference records (random, alges-img; 3 seeds; 5 demo classes)."""
    run = RunLayout(tmp_path / "run")
    run.initial_manifest_path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"frame_id": pa.array([], pa.string())}).replace_schema_metadata(
        {MASK_ENCODING_KEY: DEMO_ENCODING.to_json().encode()}), run.initial_manifest_path)
    cfg = Config.model_validate({"loop": {"strategies": ["random", "alges-img"], "seeds": [0, 1, 2], "n_rounds": 4}})
    run.config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    for row in _rows():
        if row["strategy"] == "entropy":
            continue
        per_class = [row["dice"] + 0.01 * k for k in range(5)]  # class k: the curve lifted by 0.01 k
        path = run.record_path(row["strategy"], row["seed"], row["round"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_record(row["strategy"], row["seed"], row["round"], row["n_labeled"], per_class)))
    for seed in (0, 1, 2):
        run.reference_dir(seed).mkdir(parents=True)
        ref = _record("reference", seed, 0, 240, [0.8, 0.85, 0.9, 0.95, 0.7])
        run.reference_record_path(seed).write_text(json.dumps({k: v for k, v in ref.items() if k not in ("strategy", "round")}))
    run.write_outputs(["random", "alges-img"], [0, 1, 2], 4)
    return run


def test_a_hand_made_run_folder_renders_every_table_and_figure(tmp_path):
    """write_outputs -> the CSVs -> write_report, on records whose per-class Dice is known."""
    run = _hand_made_run(tmp_path)
    per_class = read_results(run.results_per_class_path)
    assert len(per_class) == 2 * 3 * 5 * 5
    assert {(r["class_id"], r["class_name"]) for r in per_class} == set(enumerate(DEMO_CLASS_NAMES))
    assert {r["dataset_dice"] for r in per_class if r["class_id"] == 3} == {None}
    assert [(r["seed"], r["n_labeled"]) for r in read_results(run.reference_results_path)] == [(0, 240), (1, 240), (2, 240)]

    page = html.unescape(write_report(run.out, target_fractions=[0.5]).read_text())
    report = run.report_dir
    for name in ("headline.md", "aulc.csv", "aulc.md", "frames_to_target.csv", "frames_to_target.md",
                 "round_differences.csv", "per_class_rounds.csv", "per_class_aulc.csv", "per_class_aulc.md",
                 "per_class_curves.png", "learning_curves.png"):
        assert (report / name).stat().st_size > 0, name
    assert "alges-img reached random's 50-frame Dice (paper) with 40 frames (95% CI 40-40): 20% fewer" in page
    assert "50% of the full-data Dice (paper)" in page and "Full-data reference: 3 seeds, 240 labeled frames" in page
    assert page.count("data:image/png;base64,") == 2  # curves and per-class small multiples, inline
    assert "With 3 seeds the exact test cannot give p below 0.25" in page
    # per-class AULC: class k's curves are the overall ones lifted by 0.01 k, so its AULC is too
    overall = {a["strategy"]: a["aulc_mean"] for a in aulc_table(read_results(run.results_path))}
    for a in per_class_aulc_table(per_class):
        assert a["aulc_mean"] == pytest.approx(overall[a["strategy"]] - np.mean([0, 0.01, 0.02, 0.03, 0.04])
                                               + 0.01 * a["class_id"])
    with open(report / "per_class_aulc.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 5 * 2


def test_report_command_takes_baselines_and_fractions_and_names_an_unknown_baseline(tmp_path, capsys):
    from alges_dist.cli import main

    run = _hand_made_run(tmp_path)
    assert main(["report", str(run.out), "--baseline", "alges-img", "--target-fractions", "0.5,0.6"]) == 0
    printed = capsys.readouterr().out
    assert "alges-img reached random's 50-frame Dice (paper) with 40 frames" in printed
    frames = read_results(run.report_dir / "frames_to_target.csv")
    assert {(r["baseline"], r["target"]) for r in frames} == {
        (b, t) for b in ("random", "alges-img") for t in (
            f"{b}'s 50-frame Dice (paper)", "50% of the full-data Dice (paper)", "60% of the full-data Dice (paper)")}
    assert "vs_alges-img_p" in (run.report_dir / "aulc.csv").read_text()
    assert main(["report", str(run.out), "--baseline", "coreset"]) == 2
    assert "baseline 'coreset' is not a strategy of this run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", str(run.out), "--target-fractions", "90%"])
