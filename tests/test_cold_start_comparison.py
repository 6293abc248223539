"""Cold starts compared (issue 25): loop.initial_strategies runs every strategy after every cold
start as arms RULE+STRATEGY, paired by seed (same initial weights and selection seeds, only the
first batch differs), with the simulated oracle's correction effort measured on every round.
"""

from __future__ import annotations

import csv
import json

import pyarrow.parquet as pq
import pytest

from alges_dist.arms import ARM_SEPARATOR, arm_name, split_arm
from alges_dist.cli import main
from alges_dist.config import STRATEGY_NAMES, load_config
from alges_dist.data.manifest import read_manifest
from alges_dist.errors import InputError
from alges_dist.report.comparisons import check_baselines
from alges_dist.run_folder import RunLayout


def test_arms_multiply_cold_starts_by_strategies_and_names_split_back():
    cfg = load_config(None, ["loop.strategies=[random, alges-img-kcenter]", "loop.initial_strategies=[random, kcenter]"])
    assert cfg.loop.arms == ["random+random", "random+alges-img-kcenter", "kcenter+random", "kcenter+alges-img-kcenter"]
    assert all(split_arm(arm_name(i, s)) == (i, s) for i in ("random", "kcenter") for s in STRATEGY_NAMES)
    assert not any(ARM_SEPARATOR in s or ":" in s for s in STRATEGY_NAMES)  # arm names are safe keys, one split
    assert load_config(None, ["loop.strategies=[random, coreset]"]).loop.arms == ["random", "coreset"]  # as always
    assert split_arm("coreset") == (None, "coreset")


def test_arms_keep_round_0_apart_per_cold_start_and_share_the_initial_weights(tmp_path):
    layout = RunLayout(tmp_path)
    assert layout.model_dir("kcenter+random", 3, 0) == layout.model_dir("kcenter+alges-img", 3, 0) == \
        tmp_path / "initial" / "kcenter" / "seed_3" / "round_00"
    assert layout.model_dir("random+random", 3, 0) == tmp_path / "initial" / "random" / "seed_3" / "round_00"
    assert layout.model_dir("random", 3, 0) == tmp_path / "initial" / "seed_3" / "round_00"  # the layout of one cold start
    assert layout.initial_manifest_of("kcenter+random") == tmp_path / "initial" / "kcenter" / "manifest.parquet"
    assert layout.initial_manifest_of("random") == layout.initial_manifest_path
    assert layout.model_dir("kcenter+random", 3, 2) == tmp_path / "kcenter+random" / "seed_3" / "round_02"


@pytest.mark.parametrize("overrides, match", [
    (["loop.initial_strategies=[]"], "loop.initial_strategies is empty"),
    (["loop.initial_strategies=[random, random]"], r"\['random'\] appear more than once"),
    (["loop.initial_strategies=[random, kcenter]", "loop.initial_strategy=spread"],
     "loop.initial_strategy .spread. and loop.initial_strategies"),
    (["loop.initial_strategies=[random, kcenter]", "loop.oracle=human"], "with the simulated oracle, not loop.oracle: human"),
    (["loop.initial_strategies=[random, fancy]"], "initial_strategies"),
])
def test_bad_cold_start_settings_name_the_key(overrides, match):
    with pytest.raises(InputError, match=match):
        load_config(None, overrides)


def test_a_pool_with_labels_refuses_a_cold_start_comparison():
    cfg = load_config(None, ["loop.initial_strategies=[random, kcenter]"])
    with pytest.raises(InputError, match="has 8 frames labeled already"):
        cfg.check_pool(100, cfg.data.n_classes, "pool.parquet", n_labeled=8)


def test_the_default_baseline_of_a_cold_start_comparison_is_random_after_random():
    rows = [{"strategy": s} for s in ("kcenter+random", "random+random", "random+alges-img")]
    assert check_baselines(rows, []) == ["random+random"]
    assert check_baselines(rows, ["random+alges-img"]) == ["random+random", "random+alges-img"]
    with pytest.raises(InputError, match="baseline 'coreset' is not a strategy of this run"):
        check_baselines(rows, ["coreset"])  # an arm's round strategy alone names no arm


@pytest.mark.ray
@pytest.mark.slow
def test_cold_starts_compared_on_the_demo_pool_paired_by_seed_with_effort_and_forecast(ray_local, demo_manifest,
                                                                                     tmp_path):
    out = tmp_path / "run"
    sets = ["data.image_size=[32, 32]", "train.epochs=1", "train.batch_size=4", "loop.initial_labeled=4",
            "loop.budget=3", "loop.n_rounds=3", "scoring.batch_size=8", "loop.strategies=[random]",
            "loop.initial_strategies=[random, kcenter]", "loop.seeds=[0]"]
    assert main(["run", "--pool", str(demo_manifest), "--out", str(out), "--no-dashboard",
                 *[a for s in sets for a in ("--set", s)]]) == 0
    layout = RunLayout(out)
    # one first batch per cold start, different picks, same pool and size; one set of initial weights per seed
    firsts = {i: set(pq.read_table(layout.initial_dir(i) / "selection.parquet")["frame_id"].to_pylist())
              for i in ("random", "kcenter")}
    assert len(firsts["random"]) == len(firsts["kcenter"]) == 4 and firsts["random"] != firsts["kcenter"]
    assert json.loads((layout.initial_dir("kcenter") / "record.json").read_text())["strategy"] == "kcenter"
    assert layout.init_weights_path(0).is_file() and not (layout.initial_dir("random") / "seed_0" / "init.pt").exists()
    for i in ("random", "kcenter"):
        table, _ = read_manifest(layout.manifest_path(f"{i}+random", 0))
        labeled = dict(zip(table["frame_id"].to_pylist(), table["labeled_round"].to_pylist()))
        assert {f for f, r in labeled.items() if r == 0} == firsts[i]  # each arm starts from its cold start
    # the rounds' picks are paired: same selection seed per (seed, round) in both arms
    rec = {i: json.loads(layout.record_path(f"{i}+random", 0, 1).read_text()) for i in ("random", "kcenter")}
    assert rec["random"]["selection_seed"] == rec["kcenter"]["selection_seed"]
    # the simulated oracle measured each round's correction effort against the picking model's masks
    for r in range(3):
        with open(layout.round_dir("kcenter+random", 0, r) / "correction.csv", newline="") as fh:
            effort = list(csv.DictReader(fh))
        assert len(effort) == 3 and all(int(e["pixels_changed"]) <= int(e["n_pixels"]) for e in effort)
        summary = json.loads(layout.record_path("kcenter+random", 0, r).read_text())["correction"]
        assert summary["pixels_changed"] == sum(int(e["pixels_changed"]) for e in effort)
        assert summary["regions_changed"] == sum(int(e["regions_changed"]) for e in effort)
    with open(out / "results.csv", newline="") as fh:
        assert {r["strategy"] for r in csv.DictReader(fh)} == {"random+random", "kcenter+random"}
    report = layout.report_dir
    with open(report / "effort.csv", newline="") as fh:
        effort_rows = list(csv.DictReader(fh))
    assert {(r["strategy"], int(r["round"])) for r in effort_rows} == {
        (a, r) for a in ("random+random", "kcenter+random") for r in range(4)}
    with open(report / "forecast.csv", newline="") as fh:
        forecast = {r["strategy"]: r for r in csv.DictReader(fh)}
    assert set(forecast) == {"random+random", "kcenter+random"}
    for row in forecast.values():  # one seed, 4 rounds: a fit or a stated refusal, never a silent blank
        assert row["note"] or float(row["dice_next_round"]) > 0
    page = (report / "report.html").read_text()
    assert "Annotation effort" in page and "Forecast: when to stop" in page and "random+random" in page
    assert (report / "effort_curves.png").stat().st_size > 0 and (report / "effort_to_target.csv").exists()
