"""The generated (synthetic) demo pool: deterministic, video-like, exact masks, atomic; stored as H.264 videos."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from alges_dist.data import demo
from alges_dist.data.demo import DEMO_CLASS_NAMES, DEMO_ENCODING, demo_pool, synthetic_video
from alges_dist.data.frames import load_image, load_mask
from alges_dist.data.manifest import read_manifest
from alges_dist.data.video import parse_video_uri
from alges_dist.data.video_source import sidecar_path


@pytest.fixture(scope="module")
def default_pool(tmp_path_factory):
    """The default demo pool (6 videos x 50 frames, 128 px), generated once for the module."""
    cache = tmp_path_factory.mktemp("cache")
    return cache, demo_pool(cache)


def test_default_pool_is_six_videos_split_by_video(default_pool):
    cache, path = default_pool
    assert path.name == "manifest.parquet" and path.parent.parent == cache
    assert path.parent.name.startswith("demo-")
    table, encoding = read_manifest(path)
    assert encoding == DEMO_ENCODING and encoding.class_names == DEMO_CLASS_NAMES
    assert table.num_rows == 300
    rows = table.to_pylist()
    split_of = {r["video_id"]: r["split"] for r in rows}
    assert split_of == {f"synth{v:02d}": s for v, s in enumerate(["pool"] * 4 + ["val", "test"])}
    assert [r["frame_id"] for r in rows[:2]] == ["synth00_000000", "synth00_000001"]
    assert all(r["labeled_round"] is None for r in rows)
    # the archive layout: rows address frames of H.264 videos, one per second
    assert [parse_video_uri(r["image_uri"]) for r in rows[:2]] == [(str(path.parent / "videos" / "synth00.mp4"), t)
                                                                   for t in (0, 1)]
    assert sidecar_path(path).is_file()
    image = load_image(rows[0]["image_uri"])
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8


def test_second_call_reuses_the_cached_pool(default_pool):
    cache, path = default_pool
    stamp = path.stat().st_mtime_ns
    assert demo_pool(cache) == path
    assert path.stat().st_mtime_ns == stamp
    assert len(list(cache.iterdir())) == 1


def test_stored_masks_are_exactly_the_generated_label_maps(default_pool):
    _, path = default_pool
    table, encoding = read_manifest(path)
    video = synthetic_video(np.random.default_rng([0, 4]), n_frames=50, size=128)  # synth04: val
    rows = [r for r in table.to_pylist() if r["video_id"] == "synth04"]
    for t in (0, 17, 49):
        np.testing.assert_array_equal(load_mask(rows[t]["mask_uri"], encoding), video.masks[t])
        # H.264 is lossy: the decoded frame is the rendered one up to coding noise, not another frame
        error = np.abs(load_image(rows[t]["image_uri"]).astype(int) - video.images[t]).mean()
        neighbour = np.abs(load_image(rows[t]["image_uri"]).astype(int) - video.images[t - 1 if t else 1]).mean()
        assert error < 4 and error < neighbour, (error, neighbour)


def test_frames_source_keeps_the_png_folder_path_with_the_same_rows(tmp_path):
    frames = demo_pool(tmp_path, n_videos=3, frames_per_video=4, size=48, source="frames")
    videos = demo_pool(tmp_path, n_videos=3, frames_per_video=4, size=48)
    (table, encoding), (vtable, _) = read_manifest(frames), read_manifest(videos)
    for column in ("frame_id", "video_id", "frame_index", "split", "labeled_round"):
        assert table[column].equals(vtable[column]), column
    rendered = synthetic_video(np.random.default_rng([0, 1]), n_frames=4, size=48)
    rows = [r for r in table.to_pylist() if r["video_id"] == "synth01"]
    for t, row in enumerate(rows):  # PNG frames are the rendered pixels exactly
        np.testing.assert_array_equal(load_image(row["image_uri"]), rendered.images[t])
        np.testing.assert_array_equal(load_mask(row["mask_uri"], encoding), rendered.masks[t])


def test_every_class_appears_in_every_split(default_pool):
    _, path = default_pool
    table, encoding = read_manifest(path)
    for split in ("pool", "val", "test"):
        masks = np.stack([load_mask(r["mask_uri"], encoding) for r in table.to_pylist() if r["split"] == split][::5])
        fractions = np.bincount(masks.ravel(), minlength=6) / masks.size
        assert (fractions[:5] > 0.01).all(), f"{split}: class fractions {fractions.round(3)}"
        assert fractions[5:].sum() == 0  # ids stay within the 5 classes


def test_pixels_agree_with_their_mask_class(seed):
    """Exact masks: each class is painted in its own colour family (not just any label map)."""
    video = synthetic_video(np.random.default_rng([seed, 0]), n_frames=6, size=96)
    images = video.images.reshape(-1, 3).astype(float)
    masks = video.masks.ravel()
    mean = {k: images[masks == k].mean(axis=0) for k in range(5)}
    r, g, b = mean[1]
    assert r > 1.8 * g and r > 1.8 * b, f"liver should be red: {mean[1]}"  # liver
    r, g, b = mean[2]
    assert r > 1.5 * b and g > 1.3 * b, f"fat should be yellow: {mean[2]}"  # fat
    r, g, b = mean[3]
    assert g > r and g > b, f"gallbladder should be green: {mean[3]}"  # gallbladder
    spread = mean[4].max() - mean[4].min()
    assert spread < 20 and mean[4].mean() > 80, f"instrument should be light grey: {mean[4]}"
    assert mean[0].mean() < mean[1].mean(), "the cavity background should be darkest"


def test_same_seed_same_pixels_different_seed_different_pixels(seed):
    first = synthetic_video(np.random.default_rng([seed, 2]), n_frames=5, size=64)
    again = synthetic_video(np.random.default_rng([seed, 2]), n_frames=5, size=64)
    other = synthetic_video(np.random.default_rng([seed + 10, 2]), n_frames=5, size=64)
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.masks, again.masks)
    assert np.abs(first.images.astype(int) - other.images).mean() > 10
    assert (first.masks != other.masks).mean() > 0.2


def test_pools_with_same_parameters_have_identical_files(tmp_path):
    a = demo_pool(tmp_path / "a", seed=3, n_videos=3, frames_per_video=4, size=48)
    b = demo_pool(tmp_path / "b", seed=3, n_videos=3, frames_per_video=4, size=48)
    c = demo_pool(tmp_path / "c", seed=4, n_videos=3, frames_per_video=4, size=48)
    assert a.parent.name == b.parent.name != c.parent.name  # folder name hashes the parameters
    names = sorted(p.relative_to(a.parent) for p in a.parent.rglob("*") if p.suffix in (".png", ".mp4"))
    assert len(names) == 3 * 4 + 3  # masks and videos
    for name in names:
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes()
    assert any((a.parent / n).read_bytes() != (c.parent / n).read_bytes() for n in names)
    uris = read_manifest(a).table.column("image_uri").to_pylist()
    assert all(u.startswith(str(a.parent.resolve())) for u in uris)  # final folder, not the temp one


def test_consecutive_frames_are_near_duplicates_distant_frames_are_not(seed):
    video = synthetic_video(np.random.default_rng([seed, 1]), n_frames=40, size=128)
    images = video.images.astype(np.float32)
    step = np.abs(images[1:] - images[:-1]).mean(axis=(1, 2, 3))  # (39,)
    far = np.abs(images[20:] - images[:-20]).mean(axis=(1, 2, 3))  # (20,)
    assert step.mean() < 0.35 * far.mean(), (step.mean(), far.mean())
    assert step.max() < 15, step.max()
    assert not np.array_equal(images[0], images[1])  # moving, with sensor noise
    mask_change = (video.masks[1:] != video.masks[:-1]).mean(axis=(1, 2))
    assert mask_change.mean() < 0.1


def test_instrument_moves_smoothly_and_is_always_visible(seed):
    video = synthetic_video(np.random.default_rng([seed, 3]), n_frames=30, size=96)
    tool = video.masks == 4
    assert tool.any(axis=(1, 2)).all()
    centroids = np.array([np.argwhere(m).mean(axis=0) for m in tool])
    jumps = np.linalg.norm(np.diff(centroids, axis=0), axis=1)
    assert jumps.max() < 10, jumps.max()


def test_crash_during_generation_leaves_no_pool_folder(tmp_path, monkeypatch):
    real = demo.synthetic_video
    calls = []

    def crash_on_third_video(rng, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed mid-generation")
        return real(rng, **kwargs)

    monkeypatch.setattr(demo, "synthetic_video", crash_on_third_video)
    with pytest.raises(RuntimeError, match="killed"):
        demo_pool(tmp_path, n_videos=4, frames_per_video=2, size=32)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(demo, "synthetic_video", real)
    path = demo_pool(tmp_path, n_videos=4, frames_per_video=2, size=32)
    assert read_manifest(path).table.num_rows == 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"n_videos": 2}, "n_videos must be an integer >= 3"), ({"size": 16}, "size must be an integer >= 32"),
     ({"size": 33}, "size must be even"), ({"source": "gif"}, "source must be 'video' or 'frames'")],
)
def test_demo_pool_rejects_parameters_it_cannot_honour(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        demo_pool(tmp_path, **kwargs)


def test_png_masks_hold_class_ids(default_pool):
    _, path = default_pool
    mask_uri = read_manifest(path).table.column("mask_uri")[0].as_py()
    raw = np.asarray(Image.open(mask_uri))
    assert raw.dtype == np.uint8 and raw.ndim == 2 and set(np.unique(raw)) <= set(range(5))
