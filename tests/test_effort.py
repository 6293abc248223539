"""Annotation effort (issue 25): corrected pixels and the click proxy (connected regions of them)
per picked frame, summed per round, and the paired statistics in corrected pixels.

Masks with a known number of wrong pixels and regions; a picking model that predicts the
truth costs nothing; hand-made effort curves with a known shift give a known saving.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pytest

from alges_dist.annotation.regions import CorrectionEffort, changed_regions, correction_effort
from alges_dist.data.frames import load_mask
from alges_dist.data.manifest import read_manifest
from alges_dist.handoff import correction_summary, write_correction
from alges_dist.report.comparisons import frames_to_target_table, headline
from alges_dist.report.effort import EFFORT_X, effort_table, measured_rows, round_corrections, with_effort
from alges_dist.run_folder import RunLayout


def _truth_and_prediction():
    """A 12x12 truth and a prediction wrong on a 3x3 block, a 2x2 block, one pixel touching the
    2x2 only diagonally (8-neighbourhood: the same region) and one isolated pixel: 3 regions, 15 pixels."""
    truth = np.zeros((12, 12), np.uint8)
    truth[6:12, 6:12] = 1
    predicted = truth.copy()
    predicted[0:3, 0:3] = 1  # 9 px, region 1
    predicted[6:8, 6:8] = 0  # 4 px, region 2
    predicted[8, 8] = 0  # diagonal to (7, 7): still region 2
    predicted[0, 11] = 1  # isolated: region 3
    return truth, predicted


def test_known_wrong_pixels_and_regions_are_counted():
    truth, predicted = _truth_and_prediction()
    effort = correction_effort("f", truth, predicted)
    assert (effort.n_pixels, effort.pixels_changed, effort.regions_changed) == (144, 15, 3)
    assert effort.fraction_changed == pytest.approx(15 / 144)


def test_regions_use_the_8_neighbourhood_and_match_a_flood_fill():
    rng = np.random.default_rng(0)
    changed = rng.random((30, 40)) < 0.2

    def flood_fill_count(m):  # reference: iterative flood fill over the 8 neighbours
        seen, n = np.zeros_like(m), 0
        for y, x in zip(*np.nonzero(m)):
            if seen[y, x]:
                continue
            n += 1
            stack = [(y, x)]
            seen[y, x] = True
            while stack:
                cy, cx = stack.pop()
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < m.shape[0] and 0 <= nx < m.shape[1] and m[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            stack.append((ny, nx))
        return n

    assert changed_regions(changed) == flood_fill_count(changed)


def test_ignored_truth_pixels_count_for_nobody_and_the_truth_costs_nothing():
    truth, predicted = _truth_and_prediction()
    truth_with_ignore = truth.copy()
    truth_with_ignore[0:3, 0:3] = 255  # the 3x3 block the prediction got wrong is "don't care"
    effort = correction_effort("f", truth_with_ignore, predicted, ignore_index=255)
    assert (effort.n_pixels, effort.pixels_changed, effort.regions_changed) == (144 - 9, 6, 2)
    perfect = correction_effort("f", truth, truth.copy(), ignore_index=255)
    assert (perfect.pixels_changed, perfect.regions_changed) == (0, 0)


@pytest.mark.parametrize("model", ["truth", "background"])
def test_simulated_oracle_effort_of_a_model_predicting_the_truth_is_zero(demo_manifest, tmp_path, monkeypatch, model):
    """simulated_correction compares the picking model's masks with the pool's: a model that predicts
    the truth costs 0; one that predicts background everywhere costs every foreground pixel."""
    from alges_dist import predictions
    from alges_dist.config import Config
    from alges_dist.simulated_oracle import simulated_correction

    table, encoding = read_manifest(demo_manifest)
    pool = table.filter(pc.equal(table["split"], "pool"))
    picks = pool["frame_id"].to_pylist()[:4]
    mask_of = dict(zip(pool["frame_id"].to_pylist(), pool["mask_uri"].to_pylist()))
    image_to_frame = dict(zip(pool["image_uri"].to_pylist(), pool["frame_id"].to_pylist()))
    truth = {f: load_mask(mask_of[f], encoding) for f in picks}

    def predicted(model_path, cfg, uris, size):
        assert size is None  # the frame's own size, as an annotation tool shows it
        masks = [truth[image_to_frame[u]] for u in uris]
        return [m.copy() if model == "truth" else np.zeros_like(m) for m in masks]

    monkeypatch.setattr(predictions, "predict_masks", predicted)
    effort = simulated_correction(Config().model_dump(mode="json"), str(demo_manifest), "unused.pt", picks)
    assert [e["frame_id"] for e in effort] == picks
    for e in effort:
        t = truth[e["frame_id"]]
        cared = t != encoding.ignore_index
        expected = 0 if model == "truth" else int(np.count_nonzero((t != 0) & cared))
        assert e["pixels_changed"] == expected and e["n_pixels"] == int(cared.sum())
        assert (e["regions_changed"] == 0) == (expected == 0)


def test_correction_csv_round_trips_and_sums_regions_per_round(tmp_path):
    write_correction(tmp_path, [CorrectionEffort("a", 100, 10, None, 2), CorrectionEffort("b", 100, 30, 4.0, 5)])
    summary = correction_summary(tmp_path)
    assert summary["pixels_changed"] == 40 and summary["regions_changed"] == 7 and summary["n_frames"] == 2
    assert summary["annotation_seconds"] == 4.0 and summary["n_frames_timed"] == 1


def _rows_with_effort(seeds=(0, 1, 2, 3), pixels_per_round=1000.0, factor=0.5):
    """random and alges-img with the same Dice per round; alges-img's picks cost ``factor`` x
    random's corrected pixels, so it reaches any Dice with ``factor`` x the pixels."""
    rows, corrections = [], {}
    for seed in seeds:
        for r in range(5):
            dice = 0.4 + 0.08 * r + 0.01 * seed
            for strategy, scale in (("random", 1.0), ("alges-img", factor)):
                rows.append({"strategy": strategy, "seed": seed, "round": r, "n_labeled": 10 + 10 * r, "dice": dice,
                             "miou": dice - 0.1, "mdice": dice})
                if r < 4:  # the last round picks nothing
                    px = scale * pixels_per_round * (1 + 0.1 * seed)
                    corrections[strategy, seed, r] = {"pixels_changed": px, "regions_changed": int(10 * scale)}
    return rows, corrections


def test_effort_to_target_of_a_known_shift_gives_a_known_saving():
    rows, corrections = _rows_with_effort()
    measured = measured_rows(with_effort(rows, corrections))
    table = frames_to_target_table(measured, "dice", "random", x=EFFORT_X, unit="pixels")
    by = {r["strategy"]: r for r in table}
    assert by["alges-img"]["saved"] == pytest.approx(0.5)
    assert by["alges-img"]["saved_ci95_low"] == pytest.approx(0.5) and by["alges-img"]["saved_ci95_high"] == pytest.approx(0.5)
    assert by["alges-img"]["pixels_mean"] == pytest.approx(0.5 * by["random"]["pixels_mean"])
    assert by["alges-img"]["p"] == pytest.approx(2 / 2**4)  # every seed saves: the exact test's floor with 4 seeds
    assert "frames_mean" not in by["alges-img"] and by["alges-img"]["target"] == "random's final Dice (paper)"
    (sentence,) = headline(table, "random", unit="pixels")
    assert sentence.startswith("alges-img reached random's final Dice (paper) with ")
    assert "50% fewer corrected pixels than random" in sentence and "saved 95% CI 50% to 50%" in sentence


def test_effort_table_sums_rounds_before_each_point_and_a_gap_ends_the_curve():
    rows, corrections = _rows_with_effort(seeds=(0, 1))
    table = {(r["strategy"], r["round"]): r for r in effort_table(with_effort(rows, corrections))}
    assert table["random", 0]["corrected_px_cum_mean"] == 0  # the initial set is not counted
    assert table["random", 2]["corrected_px_cum_mean"] == pytest.approx(2 * 1000 * 1.05)  # rounds 0 and 1, seeds 1.0, 1.1
    assert table["alges-img", 1]["corrected_px_mean"] == pytest.approx(500 * 1.05)
    assert table["alges-img", 1]["corrected_px_std"] == pytest.approx(np.std([500, 550], ddof=1))
    assert table["random", 3]["regions_mean"] == 10 and np.isnan(table["random", 4]["corrected_px_mean"])
    del corrections["random", 0, 1]  # round 1 of seed 0 not measured: its points from round 2 on have no effort
    rows_effort = with_effort(rows, corrections)
    gone = [(r["round"]) for r in rows_effort if r["strategy"] == "random" and r["seed"] == 0 and r[EFFORT_X] is None]
    assert gone == [2, 3, 4]
    assert len(measured_rows(rows_effort)) == len(rows) - 3


def test_round_corrections_read_the_records_of_a_run_folder(tmp_path):
    layout = RunLayout(tmp_path)
    rows = [{"strategy": "kcenter+random", "seed": 0, "round": r} for r in range(2)]
    for r, correction in ((0, {"pixels_changed": 7, "regions_changed": 2}), (1, None)):
        path = layout.record_path("kcenter+random", 0, r)
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"correction": correction} if correction else {}))
    assert round_corrections(tmp_path, rows) == {("kcenter+random", 0, 0): {"pixels_changed": 7, "regions_changed": 2}}
