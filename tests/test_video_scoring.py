"""Scoring video pools: chunk plans, chunk decode == per-frame decode, the Ray Data job == in-process."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from alges_dist.config import load_config
from alges_dist.data.frames import load_image, normalize_images
from alges_dist.data.manifest import MaskEncoding, make_manifest, write_manifest
from alges_dist.data.video import iter_frames, parse_video_uri, video_uri
from alges_dist.distributed.decode_stage import decode_video_chunks, video_chunks
from alges_dist.distributed.scoring_job import embedding_matrix, read_scores, score_pool
from alges_dist.distributed.training import initial_weights
from alges_dist.models import load_model
from alges_dist.scoring import score_batch
from video_fixtures import encode_stamped, overwrite_middle, truncate, write_png_bomb

ENCODING = MaskEncoding(mode="threshold", threshold=127, class_names=["background", "foreground"])


def test_chunks_group_rows_by_video_in_time_order():
    uris = [f"/v/b.mp4#t={t}" for t in ("10", "2", "9.5")] + [f"/v/a#1.mp4#t={t}" for t in range(7)]
    ids = [f"b{i}" for i in range(3)] + [f"a{i}" for i in range(7)]
    chunks = video_chunks(ids, uris, chunk_frames=3).to_pylist()
    assert [c["path"] for c in chunks] == ["/v/a#1.mp4"] * 3 + ["/v/b.mp4"]
    assert [c["frame_ids"] for c in chunks] == [["a0", "a1", "a2"], ["a3", "a4", "a5"], ["a6"], ["b1", "b2", "b0"]]
    assert chunks[3]["times"] == ["2", "9.5", "10"]  # numeric order, not text order


def test_chunk_plan_of_many_rows_covers_every_row_once():
    rng = np.random.default_rng(0)
    videos = rng.integers(0, 40, 20_000)
    seconds = rng.permutation(20_000)
    uris = [f"/archive/v{v}.mp4#t={s}" for v, s in zip(videos, seconds)]
    chunks = video_chunks([str(i) for i in range(20_000)], uris, chunk_frames=100)
    ids = [int(f) for c in chunks["frame_ids"].to_pylist() for f in c]
    assert sorted(ids) == list(range(20_000))
    for chunk in chunks.to_pylist():
        assert 1 <= len(chunk["frame_ids"]) <= 100
        assert {uris[int(f)].split("#")[0] for f in chunk["frame_ids"]} == {chunk["path"]}
        assert [float(t) for t in chunk["times"]] == sorted(float(t) for t in chunk["times"])
    assert chunks.num_rows == sum(-(-int((videos == v).sum()) // 100) for v in range(40))


def test_malformed_time_in_a_manifest_names_the_row():
    with pytest.raises(ValueError, match=r"row 1 \(frame_id 'y'\): image_uri '/v.mp4#t=1,5'"):
        video_chunks(["x", "y"], ["/v.mp4#t=1", "/v.mp4#t=1,5"])


def test_chunk_stage_equals_load_image_per_frame(tmp_path):
    clip = encode_stamped(tmp_path / "c.mp4", 100, gop=250)
    times = ["0", "0.5", "1.04", "2", "3.96", "3.99"]
    batch = {"path": np.array([str(clip)], dtype=object), "frame_ids": np.array([np.array(times)], dtype=object),
             "times": np.array([np.array(times)], dtype=object)}
    out = decode_video_chunks(batch, size=(40, 56))
    assert list(out["frame_id"]) == times and all(e == "" for e in out["error"])
    for t, image in zip(times, out["image"]):
        np.testing.assert_array_equal(image, load_image(f"{clip}#t={t}", (40, 56)))


# ---------------------------------------------------------------------------- the Ray Data job


def _cfg(**over):
    base = {"data.image_size": "[64, 64]", "data.n_classes": 2, "scoring.num_actors": 1, "scoring.batch_size": 5,
            "scoring.projection_dim": 32, "scoring.feature_grid": 2, "scoring.max_error_rate": 1.0}
    return load_config(None, [f"{k}={v}" for k, v in {**base, **over}.items()])


def _in_process(cfg, checkpoint, uris):
    model = load_model(cfg.model.arch, cfg.model.encoder, cfg.data.n_classes, checkpoint)
    images = normalize_images(np.stack([load_image(u, tuple(cfg.data.image_size)) for u in uris]))
    with torch.inference_mode():
        out = score_batch(model.eval(), images, feature_grid=cfg.scoring.feature_grid,
                          projection_dim=cfg.scoring.projection_dim, projection_seed=cfg.scoring.projection_seed)
    return {k: v.numpy() for k, v in out.items()}


@pytest.fixture(scope="module")
def mixed_pool(tmp_path_factory):
    """Image and video rows in one pool: good clips (CFR GOP 250, VFR), PNG frames, a bomb PNG,
    a truncated clip and a clip with garbage in the middle."""
    root = tmp_path_factory.mktemp("mixed")
    good = encode_stamped(root / "good.mp4", 125)
    vfr_ms = [i * 40 for i in range(50)] + [2000 + i * 20 for i in range(100)]
    vfr = encode_stamped(root / "vfr.mp4", 150, pts_ms=vfr_ms)
    fast = encode_stamped(root / "fast.mp4", 250, gop=25, container_options={"movflags": "+faststart"})
    cut = truncate(fast, root / "cut.mp4", 0.5)
    rot = overwrite_middle(encode_stamped(root / "clean.mp4", 250), root / "rot.mp4", n_bytes=8192)
    rows = [(f"good_{k}", video_uri(good.resolve(), Fraction(k, 2))) for k in range(10)]
    rows += [(f"vfr_{k}", video_uri(vfr.resolve(), Fraction(k, 2))) for k in range(8)]
    rows += [(f"cut_{k}", video_uri(cut.resolve(), Fraction(k))) for k in range(10)]
    rows += [(f"rot_{k}", video_uri(rot.resolve(), Fraction(k))) for k in range(10)]
    for i in range(3):
        Image.fromarray(np.full((48, 64, 3), 60 * i, np.uint8)).save(root / f"img{i}.png")
        rows.append((f"img{i}", str((root / f"img{i}.png").resolve())))
    rows.append(("bomb", str(write_png_bomb(root / "bomb.png", 20000, 20000).resolve())))
    table = make_manifest(frame_ids=[f for f, _ in rows], video_ids=[f.split("_")[0] for f, _ in rows],
                          frame_indices=list(range(len(rows))), image_uris=[u for _, u in rows],
                          mask_uris=[None] * len(rows), splits=["pool"] * len(rows))
    write_manifest(table, root / "pool.parquet", ENCODING)
    return root / "pool.parquet", dict(rows)


@pytest.mark.ray
@pytest.mark.slow
def test_job_on_a_mixed_pool_equals_in_process_and_records_bad_frames(ray_local, mixed_pool, tmp_path):
    manifest, uri_of = mixed_pool
    cfg = _cfg()
    checkpoint = initial_weights(cfg, tmp_path / "model.pt", seed=0)
    result = score_pool(cfg, manifest, checkpoint, tmp_path, use_gpu=False)
    scores = read_scores(result.scores_dir)
    assert sorted(scores["frame_id"].to_pylist()) == sorted(uri_of)  # every row exactly once
    errors = dict(zip(*[scores.filter(pc.is_valid(scores["error"]))[c].to_pylist() for c in ("frame_id", "error")]))
    # reference: which video rows the decoder cannot give, asked frame by frame
    expected = {"bomb"}
    for name in ("cut", "rot"):
        path, _ = parse_video_uri(uri_of[f"{name}_0"])
        expected |= {f"{name}_{i}" for i, _, e in iter_frames(path, [Fraction(k) for k in range(10)]) if e}
    assert set(errors) == expected and {"cut_9", "rot_9"} <= expected and "cut_0" not in expected
    assert "bomb.png" in errors["bomb"] and "truncated?" in errors["cut_9"] and "rot.mp4#t=9" in errors["rot_9"]
    assert (result.n_errors, result.n_scored) == (len(expected), len(uri_of) - len(expected))
    assert pq.read_table(tmp_path / "errors.parquet").num_rows == len(expected)

    good = sorted(f for f in uri_of if f not in expected)
    order = {f: i for i, f in enumerate(scores["frame_id"].to_pylist())}
    rows = scores.take([order[f] for f in good])
    reference = _in_process(cfg, checkpoint, [uri_of[f] for f in good])
    for name, values in reference.items():
        np.testing.assert_allclose(embedding_matrix(rows, name), values.reshape(len(good), -1), rtol=1e-4, atol=1e-6,
                                   err_msg=name)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.shared_data
def test_endovis_clip_scores_like_its_frames(ray_local, shared_data, tmp_path):
    from alges_dist.data.video_source import ingest_video

    clip = shared_data / "endovis2017_clip" / "short_source.mp4"
    table = ingest_video(clip, tmp_path / "pool.parquet", fps=2, fractions=(1, 0, 0))
    cfg = _cfg()
    checkpoint = initial_weights(cfg, tmp_path / "model.pt", seed=0)
    result = score_pool(cfg, tmp_path / "pool.parquet", checkpoint, tmp_path, use_gpu=False)
    assert (result.n_scored, result.n_errors) == (4, 0)
    scores = read_scores(result.scores_dir)
    order = {f: i for i, f in enumerate(scores["frame_id"].to_pylist())}
    ids = table["frame_id"].to_pylist()
    reference = _in_process(cfg, checkpoint, table["image_uri"].to_pylist())
    got = embedding_matrix(scores.take([order[f] for f in ids]), "alges_img_proj")
    np.testing.assert_allclose(got, reference["alges_img_proj"].reshape(4, -1), rtol=1e-4, atol=1e-6)
