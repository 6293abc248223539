"""Fault injection (issue 10): the driver stopped after every stage (in process: an interrupt
raised as each stage ends), a write that fails half-way (an injected ENOSPC), a driver
SIGKILLed mid-fit (a real process), a failed scoring stage. After each, rerunning the same command
finishes with exactly the outputs of an uninterrupted run: same picks, same labels, same
metrics, nothing lost or duplicated. (A scoring actor killed mid-job: tests/test_scoring_job.py;
Ctrl-C and SIGTERM during training and scoring: tests/test_runtime.py.)
"""

from __future__ import annotations

import errno
import json
import signal
import time

import pyarrow.parquet as pq
import pytest
import torch

from alges_dist.cli import main
from alges_dist.config import load_config
from alges_dist.console import Console
from alges_dist.data.manifest import read_manifest
from cli_runs import FAST, REFERENCE_STRATEGY, Watched, reference_args, sets, wait_for_line

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STRATEGY = REFERENCE_STRATEGY
run_args = reference_args  # every run here is the shared reference run's command (conftest.reference_run)


def outcome(out):
    """What a finished run produced: picks per round, labels, per-round metrics."""
    queries = pq.read_table(out / "queries.parquet").sort_by([("round", "ascending"), ("pick_rank", "ascending")])
    table, _ = read_manifest(out / STRATEGY / "seed_0" / "manifest.parquet")
    labels = {f: r for f, r in zip(table["frame_id"].to_pylist(), table["labeled_round"].to_pylist()) if r is not None}
    results = (out / "results.csv").read_text()
    return queries.select(["round", "pick_rank", "frame_id"]).to_pylist(), labels, results


@pytest.fixture(scope="module")
def uninterrupted(reference_run):
    return outcome(reference_run[1])


def test_killed_between_every_pair_of_stages_the_rerun_finishes_as_if_never_killed(
        uninterrupted, ray_local, demo_manifest, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original = Console.stage

    def die_after_one_stage(self, event, stage, *where):
        original(self, event, stage, *where)
        if event == "done":
            raise KeyboardInterrupt(f"killed after {stage}")

    monkeypatch.setattr(Console, "stage", die_after_one_stage)
    kills = 0
    while (code := main(run_args(demo_manifest, out))) == 130:
        kills += 1
        assert kills < 20
    assert code == 0
    assert kills == 9  # first batch: select, label; round 0: train, evaluate, score, select, label; round 1: train,
    # evaluate
    assert outcome(out) == uninterrupted
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".scores-*"))


def test_a_write_that_fails_mid_way_loses_nothing_and_the_rerun_finishes_the_same(
        uninterrupted, ray_local, demo_manifest, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_write = pq.write_table

    def disk_full_half_way(table, where, **kwargs):
        real_write(table.slice(0, table.num_rows // 2), where, **kwargs)  # some bytes land, then ENOSPC
        raise OSError(errno.ENOSPC, "No space left on device", str(where))

    with monkeypatch.context() as m:
        m.setattr("alges_dist.loop.pq.write_table", disk_full_half_way)  # selection.parquet
        assert main(run_args(demo_manifest, out)) == 2
    assert "No space left on device" in capsys.readouterr().err
    round0 = out / STRATEGY / "seed_0" / "round_00"
    assert not (round0 / "selection.parquet").exists() and not list(out.rglob("*.tmp"))
    assert main(run_args(demo_manifest, out)) == 0
    assert outcome(out) == uninterrupted


def test_a_failed_scoring_stage_is_not_done_on_resume(demo_manifest, tmp_path, monkeypatch, ray_local_module):
    from alges_dist.distributed import scoring_job

    out = tmp_path / "run"
    real_check = scoring_job.check_score_shards

    def one_error(scores_dir, manifest, errors_path):
        summary = real_check(scores_dir, manifest, errors_path)
        return {**summary, "n_errors": 1, "error_rate": 1 / summary["n_rows"], "first_error": "x.png: unreadable"}

    with monkeypatch.context() as m:
        m.setattr(scoring_job, "check_score_shards", one_error)
        args = run_args(demo_manifest, out, "scoring.max_error_rate=0")
        assert main(args) == 2
        assert main(args) == 2  # the same command again fails the same way: the failed stage never counted
    model_dir = out / "initial" / "seed_0" / "round_00"
    assert not (model_dir / "scores.json").exists() and not (model_dir / "scores").exists()


def test_a_driver_killed_mid_fit_resumes_from_its_last_checkpoint(demo_manifest, tmp_path, ray_local_module):
    from alges_dist.distributed.training import initial_weights, train_model

    extra = ["train.epochs=10", "train.checkpoint_every=1"]  # tiny epochs: ~0.4 s each, 6 left after the kill
    out = tmp_path / "run"
    watched = Watched(["train", "--pool", str(demo_manifest), "--out", str(out), *sets(*FAST, *extra)])
    progress = out / "initial" / "seed_0" / "round_00" / "progress.json"
    deadline = time.time() + 600
    while not (progress.exists() and json.loads(progress.read_text() or "{}").get("epoch", -1) >= 3):
        assert time.time() < deadline and watched.proc.poll() is None, "the fit never reached epoch 4"
        time.sleep(0.05)
    watched.signal(signal.SIGKILL)  # a crash mid-fit (epoch 3's checkpoint is on disk): no cleanup runs
    watched.wait(60)
    again = Watched(["train", "--pool", str(demo_manifest), "--out", str(out), *sets(*FAST, *extra)])
    code, _, stderr = again.wait(600)
    assert code == 0, stderr[-3000:]
    wait_for_line(out / "run.log", r"resuming from its checkpoint", 1)
    history = json.loads((progress.parent / "train.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(10)) and 3 <= history[-1]["resumed_from_epoch"] < 10

    cfg = load_config(out / "config.yaml")  # the same fit, never interrupted, here
    init = initial_weights(cfg, tmp_path / "init.pt", seed=cfg.train.seed)
    assert torch.equal(torch.load(init, weights_only=True)["encoder.conv1.weight"],
                       torch.load(out / "initial" / "seed_0" / "init.pt", weights_only=True)["encoder.conv1.weight"])
    reference = train_model(cfg, out / "initial" / "manifest.parquet", init_weights=init,
                            out_dir=tmp_path / "reference", use_gpu=False)
    resumed = torch.load(progress.parent / "model.pt", weights_only=True)
    expected = torch.load(reference.model_path, weights_only=True)
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
