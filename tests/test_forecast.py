"""The forecast (issue 25): an inverse power law per seed, extrapolated to a target Dice.

Curves drawn from a known law with noise recover its frames-to-target within 20% and the band
covers the truth; a flat curve, too few rounds or a target above the asymptote are refused
with the reason; end to end through write_report and `alges report --target-dice`.
"""

from __future__ import annotations

import csv
import html
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from alges_dist.config import Config
from alges_dist.data.demo import DEMO_ENCODING
from alges_dist.data.manifest import MASK_ENCODING_KEY
from alges_dist.report.forecast import (
    ForecastRefused,
    fit_inverse_power_law,
    forecast_curves,
    forecast_table,
    inverse_power_law,
)
from alges_dist.run_folder import RunLayout

LAW = (0.85, 1.2, 0.6)  # a, b, c
FRAMES = np.arange(10.0, 70.0, 10.0)  # 6 rounds: 10..60 labeled frames


def _truth_frames(target, a=LAW[0], b=LAW[1], c=LAW[2]):
    return (b / (a - target)) ** (1 / c)


def _noisy_curves(seed, n_seeds=5, noise=0.004, law=LAW):
    rng = np.random.default_rng(seed)
    return {s: (FRAMES, inverse_power_law(FRAMES, *law) + rng.normal(0, noise, len(FRAMES))) for s in range(n_seeds)}


def test_exact_law_is_recovered():
    fit = fit_inverse_power_law(FRAMES, inverse_power_law(FRAMES, *LAW))
    np.testing.assert_allclose((fit.a, fit.b, fit.c), LAW, rtol=1e-4)
    assert fit.r2 == pytest.approx(1.0) and fit.frames_for(0.8) == pytest.approx(_truth_frames(0.8), rel=1e-3)


@pytest.mark.parametrize("noise_seed", range(4))
def test_noisy_curves_recover_frames_to_target_within_20_percent_and_the_band_covers_it(noise_seed):
    target = 0.78  # reached at ~114 frames: extrapolated well beyond the 60 measured
    truth = _truth_frames(target)
    f = forecast_curves(_noisy_curves(noise_seed), target, budget=10)
    assert f.refused == "" and f.n_fit == 5
    assert abs(f.frames - truth) / truth < 0.2
    assert f.frames_low <= truth <= f.frames_high
    next_truth = inverse_power_law(70.0, *LAW)
    assert f.dice_next_low <= next_truth <= f.dice_next_high and f.dice_next == pytest.approx(next_truth, abs=0.01)


def test_a_flat_curve_is_refused_with_the_reason():
    flat = {s: (FRAMES, np.full(len(FRAMES), 0.5)) for s in range(3)}
    f = forecast_curves(flat, 0.6, budget=10)
    assert np.isnan(f.frames) and np.isnan(f.dice_next)
    assert "flat curve" in f.refused and "3 of 3 seeds refused" in f.refused
    with pytest.raises(ForecastRefused, match="flat curve"):
        fit_inverse_power_law(FRAMES, np.full(len(FRAMES), 0.5))


def test_a_target_above_the_fitted_asymptote_is_refused_but_the_next_round_is_forecast():
    f = forecast_curves(_noisy_curves(0), 0.9, budget=10)
    assert np.isnan(f.frames) and np.isnan(f.frames_low)
    assert "lies at or above the fitted asymptote" in f.refused and f.asymptote == pytest.approx(0.85, abs=0.03)
    assert np.isfinite(f.dice_next)


def test_too_few_rounds_and_a_poor_fit_are_refused():
    with pytest.raises(ForecastRefused, match="3 measured rounds; a fit of 3 parameters needs 4"):
        fit_inverse_power_law(FRAMES[:3], inverse_power_law(FRAMES[:3], *LAW))
    zigzag = np.array([0.5, 0.7, 0.5, 0.7, 0.5, 0.7])
    with pytest.raises(ForecastRefused, match="poor fit"):
        fit_inverse_power_law(FRAMES, zigzag)


def test_a_minority_of_bad_seeds_is_left_out_and_said():
    curves = _noisy_curves(1, n_seeds=4)
    curves[3] = (FRAMES, np.full(len(FRAMES), 0.5))
    f = forecast_curves(curves, 0.78, budget=10)
    assert f.n_fit == 3 and "1 of 4 seeds left out: flat curve" in f.refused and np.isfinite(f.frames)


def _forecast_run(tmp_path) -> RunLayout:
    """A run folder whose random curves follow LAW (4 seeds, 6 rounds) and alges-img's are flat."""
    run = RunLayout(tmp_path / "run")
    run.initial_manifest_path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"frame_id": pa.array([], pa.string())}).replace_schema_metadata(
        {MASK_ENCODING_KEY: DEMO_ENCODING.to_json().encode()}), run.initial_manifest_path)
    cfg = Config.model_validate({"loop": {"strategies": ["random", "alges-img"], "seeds": [0, 1, 2, 3],
                                          "n_rounds": 5, "budget": 10, "initial_labeled": 10}})
    run.config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    curves = _noisy_curves(2, n_seeds=4)
    for seed, (xs, ys) in curves.items():
        for r, (n, dice) in enumerate(zip(xs, ys)):
            for strategy, value in (("random", float(dice)), ("alges-img", 0.5)):
                path = run.record_path(strategy, seed, r)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"strategy": strategy, "seed": seed, "round": r, "n_labeled": int(n),
                                            "dice": value, "miou": value - 0.1, "mdice": value}))
    run.write_outputs(["random", "alges-img"], [0, 1, 2, 3], 5)
    return run


def test_report_writes_forecast_csv_and_section_and_takes_target_dice(tmp_path, capsys):
    from alges_dist.cli import main

    run = _forecast_run(tmp_path)
    assert main(["report", str(run.out), "--target-dice", "0.78"]) == 0
    with open(run.report_dir / "forecast.csv", newline="") as fh:
        rows = {r["strategy"]: r for r in csv.DictReader(fh)}
    assert list(next(iter(rows.values())))[:6] == ["strategy", "target_dice", "frames_forecast", "frames_low",
                                                   "frames_high", "dice_next_round"]
    random = rows["random"]
    assert float(random["target_dice"]) == 0.78 and random["note"] == ""
    assert abs(float(random["frames_forecast"]) - _truth_frames(0.78)) / _truth_frames(0.78) < 0.2
    assert float(random["frames_low"]) <= _truth_frames(0.78) <= float(random["frames_high"])
    assert rows["alges-img"]["frames_forecast"] == "nan" and "flat curve" in rows["alges-img"]["note"]
    page = html.unescape((run.report_dir / "report.html").read_text())
    assert "Forecast: when to stop (an extrapolation)" in page and "A forecast, not a measurement" in page
    assert "frames to reach the target (--target-dice)" in page
    # no --target-dice and no full-data reference: the next round only, and why no frames
    table = forecast_table([{"strategy": "random", "seed": s, "round": r, "n_labeled": int(n), "dice": float(d)}
                            for s, (xs, ys) in _noisy_curves(3, n_seeds=3).items()
                            for r, (n, d) in enumerate(zip(xs, ys))], None, 10)
    assert np.isnan(table[0]["frames_forecast"]) and np.isfinite(table[0]["dice_next_round"])
    assert "no target Dice: pass --target-dice" in table[0]["note"]


def test_report_refuses_a_target_dice_outside_0_1(tmp_path, capsys):
    from alges_dist.cli import main

    with pytest.raises(SystemExit):
        main(["report", str(tmp_path), "--target-dice", "1.5"])
    assert "a Dice lies in (0, 1], got '1.5'" in capsys.readouterr().err
