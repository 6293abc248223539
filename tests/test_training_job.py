"""Ray Train job: DDP on 2 gloo workers, per-epoch validation Dice, resume after a killed worker."""

from __future__ import annotations

import pytest
import torch

from alges_dist.config import load_config
from alges_dist.data.manifest import mark_labeled, read_manifest, write_manifest, filter_manifest
from alges_dist.distributed.training import initial_weights, train_model

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def labeled_manifest(demo_manifest, tmp_path):
    table, encoding = read_manifest(demo_manifest)
    ids = filter_manifest(table, split="pool")["frame_id"].to_pylist()[:6]
    path = tmp_path / "manifest.parquet"
    write_manifest(mark_labeled(table, ids, 0), path, encoding)
    return path


def _cfg(**over):
    sets = [f"{k}={v}" for k, v in {"data.image_size": "[64, 64]", "train.batch_size": 3,
                                   "train.num_workers": 2, "train.epochs": 2, **over}.items()]
    return load_config(None, sets)


def _state_distance(a: dict, b: dict) -> float:
    return sum(float((a[k].float() - b[k].float()).abs().sum()) for k in a if a[k].is_floating_point())


def test_ddp_training_reports_val_dice_and_checkpoints(ray_local, labeled_manifest, tmp_path):
    cfg = _cfg(**{"train.val_every": 1})
    init = initial_weights(cfg, tmp_path / "init.pt", seed=0)
    result = train_model(cfg, labeled_manifest, init_weights=init, out_dir=tmp_path / "r0", use_gpu=False)
    assert [h["epoch"] for h in result.history] == [0, 1]
    for h in result.history:  # validated every epoch (val_every: 1)
        assert 0.0 <= h["val_dice"] <= 1.0 and 0.0 <= h["val_miou"] <= 1.0
        assert h["train_loss"] > 0 and h["resumed_from_epoch"] == 0
    trained = torch.load(result.model_path, weights_only=True)
    assert _state_distance(trained, torch.load(init, weights_only=True)) > 0  # the weights moved
    assert (tmp_path / "r0" / "train.json").exists()
    assert not (tmp_path / "r0" / "ray_train").exists()  # Ray's copies cleaned up


def test_initial_weights_are_seeded_and_written_once(tmp_path):
    cfg = _cfg()
    a = torch.load(initial_weights(cfg, tmp_path / "a.pt", seed=3), weights_only=True)
    b = torch.load(initial_weights(cfg, tmp_path / "b.pt", seed=3), weights_only=True)
    c = torch.load(initial_weights(cfg, tmp_path / "c.pt", seed=4), weights_only=True)
    assert _state_distance(a, b) == 0 and _state_distance(a, c) > 0
    before = (tmp_path / "a.pt").stat().st_mtime_ns
    initial_weights(cfg, tmp_path / "a.pt", seed=99)
    assert (tmp_path / "a.pt").stat().st_mtime_ns == before


def test_killed_worker_resumes_from_last_checkpoint(ray_local, labeled_manifest, tmp_path):
    cfg = _cfg(**{"train.epochs": 3, "train.max_failures": 1})
    init = initial_weights(cfg, tmp_path / "init.pt", seed=0)
    marker = tmp_path / "killed-once"
    result = train_model(cfg, labeled_manifest, init_weights=init, out_dir=tmp_path / "r0", use_gpu=False,
                         fault_injection={"kill_at_epoch": 2, "marker": str(marker)})
    assert marker.exists()  # the worker really died once
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    # The group restarted from a saved checkpoint, not from scratch. Which one depends on
    # whether the controller had registered epoch 1's report before the process died.
    resumed = result.history[-1]["resumed_from_epoch"]
    assert resumed in (1, 2)
    assert [h["resumed_from_epoch"] for h in result.history[:resumed]] == [0] * resumed
