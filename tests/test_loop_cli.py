"""The round through the `alges` CLI: full runs, resume after a crash, outputs people read."""

from __future__ import annotations

import csv
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from alges_dist.cli import ROUND_COMMANDS, main
from alges_dist.data.manifest import read_manifest
from alges_dist.loop import Experiment
from alges_dist.selection import STRATEGIES
from alges_dist.config import STRATEGY_NAMES

FAST = ["data.image_size=[64, 64]", "train.epochs=1", "train.batch_size=4", "loop.initial_labeled=4",
        "loop.budget=3", "loop.n_rounds=2", "scoring.batch_size=8"]


def _args(cmd, pool, out, *extra):
    sets = [a for s in [*FAST, *extra] for a in ("--set", s)]
    return [cmd, "--pool", str(pool), "--out", str(out), "--no-dashboard", *sets]


def _results(out):
    with open(out / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_strategy_registry_matches_config_names():
    assert set(STRATEGIES) == set(STRATEGY_NAMES)


def test_help_explains_every_command():
    res = subprocess.run([sys.executable, "-m", "alges_dist.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for cmd in [*ROUND_COMMANDS, "ingest"]:
        assert cmd in res.stdout
    for cmd in [*ROUND_COMMANDS, "ingest folder", "ingest cholecseg8k"]:
        res = subprocess.run([sys.executable, "-m", "alges_dist.cli", *cmd.split(), "--help"],
                             capture_output=True, text=True)
        assert res.returncode == 0 and "--out" in res.stdout, cmd


@pytest.mark.ray
@pytest.mark.slow
def test_run_interrupted_after_selection_resumes_without_reselecting(ray_local, demo_manifest, tmp_path,
                                                                       monkeypatch):
    out = tmp_path / "run"
    args = _args("run", demo_manifest, out, "loop.strategies=[coreset]", "loop.n_rounds=1")
    calls = []

    def crash(self, strategy, seed, r):
        calls.append(r)
        raise KeyboardInterrupt("simulated crash between select and label")

    with monkeypatch.context() as m:
        m.setattr(Experiment, "label", crash)
        assert main(args) == 130  # stops where it was, with one line saying how to resume
    selection = out / "coreset" / "seed_0" / "round_00" / "selection.parquet"
    first = pq.read_table(selection)
    stamp = selection.stat().st_mtime_ns
    scores = out / "initial" / "seed_0" / "round_00" / "scores"  # round 0's scores: shared by strategies
    scores_stamp = scores.stat().st_mtime_ns
    assert main(args) == 0
    assert selection.stat().st_mtime_ns == stamp  # not selected again
    assert scores.stat().st_mtime_ns == scores_stamp
    table, _ = read_manifest(out / "coreset" / "seed_0" / "manifest.parquet")
    labeled_1 = sorted(f for f, r in zip(table["frame_id"].to_pylist(), table["labeled_round"].to_pylist())
                       if r == 1)
    assert labeled_1 == sorted(first["frame_id"].to_pylist())
    assert [r["round"] for r in _results(out)] == ["0", "1"]


@pytest.mark.ray
@pytest.mark.slow
def test_stage_commands_stop_after_their_stage(ray_local, demo_manifest, tmp_path):
    out = tmp_path / "run"
    base = ("loop.strategies=[random, margin]", "loop.n_rounds=1")
    round0 = out / "margin" / "seed_0" / "round_00"
    assert main(_args("train", demo_manifest, out, *base)) == 0
    assert (out / "initial" / "seed_0" / "round_00" / "model.pt").exists() and not round0.exists()
    # round 0's model is margin's too: `train` stops there, not after evaluating, scoring, picking
    assert not (out / "random" / "seed_0" / "round_00").exists()
    assert not list(out.rglob("eval.json")) and not list(out.rglob("scores"))
    assert main(_args("score", demo_manifest, out, *base)) == 0
    assert (out / "initial" / "seed_0" / "round_00" / "scores").is_dir()
    assert not (round0 / "selection.parquet").exists()
    assert main(_args("select", demo_manifest, out, *base)) == 0
    picked = pq.read_table(round0 / "selection.parquet")
    assert picked.num_rows == 3
    margins = picked["value"].to_pylist()  # margin ranks smallest first
    assert margins == sorted(margins) and all(0 <= m <= 1 for m in margins)
    assert main(_args("round", demo_manifest, out, *base)) == 0
    assert sorted((r["strategy"], r["round"]) for r in _results(out)) == [("margin", "0"), ("random", "0")]


def test_bad_config_fails_before_any_work(demo_manifest, tmp_path, capsys):
    code = main(_args("run", demo_manifest, tmp_path / "run", "loop.budget=500"))
    assert code == 2
    assert "loop.budget=500" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_human_oracle_hands_off_then_imports_masks(ray_local, demo_manifest, tmp_path, capsys):
    out = tmp_path / "run"
    args = _args("run", demo_manifest, out, "loop.strategies=[random]", "loop.n_rounds=1", "loop.oracle=human")
    table, encoding = read_manifest(demo_manifest)
    mask_of = dict(zip(table["frame_id"].to_pylist(), table["mask_uri"].to_pylist()))
    assert main(args) == 3  # nothing is labeled: the first batch waits for people
    first = [r["frame_id"] for r in csv.DictReader(open(out / "initial" / "to_annotate.csv"))]
    (tmp_path / "first").mkdir()
    for f in first:
        (tmp_path / "first" / f"{f}.png").write_bytes(open(mask_of[f], "rb").read())
    assert main(["label", "--out", str(out), "--masks", str(tmp_path / "first")]) == 0
    assert main(args) == 3  # waiting for people
    handoff = out / "random" / "seed_0" / "round_00"
    assert "alges label" in capsys.readouterr().out
    picks = pq.read_table(handoff / "selection.parquet")["frame_id"].to_pylist()
    listed = list(csv.DictReader(open(handoff / "to_annotate.csv")))
    assert [r["frame_id"] for r in listed] == picks and (handoff / "to_annotate.png").stat().st_size > 0
    # people return masks: here the pool's own, copied under the frame ids
    masks = tmp_path / "returned"
    masks.mkdir()
    for f in picks[:-1]:
        (masks / f"{f}.png").write_bytes(open(mask_of[f], "rb").read())
    assert main(["label", "--out", str(out), "--masks", str(masks), "--strategy", "random"]) == 2
    assert picks[-1] in capsys.readouterr().err  # names the frame without a mask; nothing written
    (masks / f"{picks[-1]}.png").write_bytes(open(mask_of[picks[-1]], "rb").read())
    assert main(["label", "--out", str(out), "--masks", str(masks), "--strategy", "random"]) == 0
    labeled, _ = read_manifest(out / "random" / "seed_0" / "manifest.parquet")
    got = {f: (r, m) for f, r, m in zip(labeled["frame_id"].to_pylist(), labeled["labeled_round"].to_pylist(),
                                        labeled["mask_uri"].to_pylist())}
    # imported masks are copies inside the run folder: later edits to the annotators' folder change nothing
    assert all(got[f][0] == 1 and got[f][1].startswith(str(handoff / "labels")) for f in picks)
    assert all(open(got[f][1], "rb").read() == open(masks / f"{f}.png", "rb").read() for f in picks)
    assert main(args) == 0
    assert [r["round"] for r in _results(out)] == ["0", "1"]
