"""Ray Data scoring job == in-process score_batch, every frame exactly once, errors recorded."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from alges_dist.config import load_config
from alges_dist.data.frames import load_image, normalize_images
from alges_dist.data.manifest import filter_manifest, read_manifest, write_manifest
from alges_dist.distributed.scoring_job import embedding_matrix, read_scores, score_pool
from alges_dist.distributed.training import initial_weights
from alges_dist.models import build_model
from alges_dist.scoring import score_batch

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _cfg(**over):
    base = {"data.image_size": "[64, 64]", "scoring.num_actors": 2, "scoring.batch_size": 5,
            "scoring.projection_dim": 32, "scoring.feature_grid": 2}
    return load_config(None, [f"{k}={v}" for k, v in {**base, **over}.items()])


@pytest.fixture
def checkpoint(tmp_path):
    return initial_weights(_cfg(), tmp_path / "model.pt", seed=0)


def _in_process(cfg, checkpoint, uris):
    model = build_model(cfg.model.arch, cfg.model.encoder, cfg.data.n_classes)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    images = normalize_images(np.stack([load_image(u, tuple(cfg.data.image_size)) for u in uris]))
    out = score_batch(model, images, feature_grid=cfg.scoring.feature_grid,
                      projection_dim=cfg.scoring.projection_dim, projection_seed=cfg.scoring.projection_seed)
    return {k: v.numpy() for k, v in out.items()}


def _check_equals_in_process(cfg, checkpoint, manifest, scores_dir):
    table, _ = read_manifest(manifest)
    pool = filter_manifest(table, split="pool")
    scores = read_scores(scores_dir)
    ids = scores["frame_id"].to_pylist()
    assert sorted(ids) == sorted(pool["frame_id"].to_pylist())  # every pool frame exactly once
    order = {f: i for i, f in enumerate(ids)}
    uri_of = dict(zip(pool["frame_id"].to_pylist(), pool["image_uri"].to_pylist()))
    sample = sorted(ids)[:7]
    ref = _in_process(cfg, checkpoint, [uri_of[f] for f in sample])
    rows = scores.take([order[f] for f in sample])
    for name, expected in ref.items():
        got = embedding_matrix(rows, name)
        np.testing.assert_allclose(got, expected.reshape(len(sample), -1), rtol=1e-4, atol=1e-6, err_msg=name)


def test_ray_data_scores_equal_in_process_score_batch(ray_local, demo_manifest, checkpoint, tmp_path):
    cfg = _cfg()
    result = score_pool(cfg, demo_manifest, checkpoint, tmp_path, use_gpu=False)
    assert result.n_errors == 0 and result.n_scored == 24
    _check_equals_in_process(cfg, checkpoint, demo_manifest, result.scores_dir)
    schema = pq.read_schema(next(result.scores_dir.glob("*.parquet")))
    assert schema.field("alges_img_proj").type.list_size == 32  # fixed-size lists


def test_killed_actor_still_scores_every_frame_once(ray_local, demo_manifest, checkpoint, tmp_path):
    cfg = _cfg()
    marker = tmp_path / "actor-killed"
    result = score_pool(cfg, demo_manifest, checkpoint, tmp_path, use_gpu=False,
                        fault_injection={"marker": str(marker)})
    assert marker.exists()  # an actor died mid-job
    assert result.timings["stream_s"] > 0 and set(result.timings) >= {"plan_s", "imports_s", "model_load_s"}
    _check_equals_in_process(cfg, checkpoint, demo_manifest, result.scores_dir)


def test_corrupt_frame_is_recorded_and_skipped(ray_local, demo_manifest, checkpoint, tmp_path):
    table, encoding = read_manifest(demo_manifest)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    pool_ids = filter_manifest(table, split="pool")["frame_id"].to_pylist()
    bad_id = pool_ids[3]
    uris = [str(broken) if f == bad_id else u
            for f, u in zip(table["frame_id"].to_pylist(), table["image_uri"].to_pylist())]
    manifest = tmp_path / "manifest.parquet"
    write_manifest(table.set_column(table.schema.get_field_index("image_uri"), "image_uri",
                                    __import__("pyarrow").array(uris)), manifest, encoding)
    result = score_pool(_cfg(**{"scoring.max_error_rate": 0.1}), manifest, checkpoint, tmp_path / "ok",
                        use_gpu=False)
    assert (result.n_scored, result.n_errors) == (23, 1)
    errors = pq.read_table(tmp_path / "ok" / "errors.parquet")
    assert errors["frame_id"].to_pylist() == [bad_id] and "broken.png" in errors["error"][0].as_py()
    scores = read_scores(result.scores_dir)
    good = scores.filter(pc.is_null(scores["error"]))
    assert bad_id not in good["frame_id"].to_pylist()
    with pytest.raises(RuntimeError, match="max_error_rate"):
        score_pool(_cfg(**{"scoring.max_error_rate": 0.0}), manifest, checkpoint, tmp_path / "strict",
                   use_gpu=False)
