"""`alges ingest video`: probe-only manifests of video folders, the sidecar, named errors; pixel caps at ingest."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from alges_dist.cli import main
from alges_dist.config import load_config
from alges_dist.data.frames import DEFAULT_MAX_PIXELS, FrameDecodeError, load_image, load_mask
from alges_dist.data.manifest import read_manifest
from alges_dist.data.sources import ingest_folder, parse_class_map
from alges_dist.data.video import VideoError, parse_video_uri
from alges_dist.data.video_source import find_videos, ingest_video, sidecar_path
from video_fixtures import encode_audio_only, encode_stamped, read_stamp, truncate, write_png_bomb

VFR_PTS_MS = [i * 40 for i in range(50)] + [2000 + i * 20 for i in range(100)]  # 2 s at 25 fps, 2 s at 50


def _alges(*args):
    return subprocess.run([sys.executable, "-m", "alges_dist.cli", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    """Four stamped clips: 4 s, 6 s and 5 s at 25 fps (GOP 250, 25, 250) and a 4 s VFR clip."""
    root = tmp_path_factory.mktemp("videos")
    encode_stamped(root / "case2.mp4", 150, gop=25)
    encode_stamped(root / "case10.mp4", 125)
    encode_stamped(root / "case1.mp4", 100)
    (root / "sub").mkdir()
    encode_stamped(root / "sub" / "vfr3.mkv", 150, pts_ms=VFR_PTS_MS)
    (root / "notes.txt").write_text("not a video")
    return root


def test_rows_address_the_frame_on_screen_at_each_sampled_second(video_dir, tmp_path):
    out = tmp_path / "pool.parquet"
    table = ingest_video(video_dir, out, fps=1, fractions=(0.5, 0.25, 0.25))
    manifest = read_manifest(out).table
    assert manifest.equals(table)
    rows = table.to_pylist()
    videos = list(dict.fromkeys(r["video_id"] for r in rows))
    assert videos == ["case1", "case2", "case10", "vfr3"]  # natural order, stems, subfolders searched
    assert [r["frame_id"] for r in rows[:4]] == ["case1_000000", "case1_000025", "case1_000050", "case1_000075"]
    per_video = {v: [r for r in rows if r["video_id"] == v] for v in videos}
    assert {v: len(r) for v, r in per_video.items()} == {"case1": 4, "case2": 6, "case10": 5, "vfr3": 5}
    # splits are whole videos in natural order
    assert {v: {r["split"] for r in rs} for v, rs in per_video.items()} == \
        {"case1": {"pool"}, "case2": {"pool"}, "case10": {"val"}, "vfr3": {"test"}}
    for r in rows:
        path, t = parse_video_uri(r["image_uri"])
        assert path == str((video_dir / ("sub" if r["video_id"] == "vfr3" else "") / path.split("/")[-1]).resolve())
        assert r["mask_uri"] is None and r["labeled_round"] is None
    # every row decodes to the frame it names (CFR: frame_index is exact)
    for r in rows[::2]:
        stamp = read_stamp(load_image(r["image_uri"]))
        if r["video_id"] != "vfr3":
            assert stamp == r["frame_index"] == 25 * int(parse_video_uri(r["image_uri"])[1])
    vfr_stamps = [read_stamp(load_image(r["image_uri"])) for r in per_video["vfr3"]]
    assert vfr_stamps == [0, 25, 50, 100, 149]  # 2 s at 25 fps, then 50 frames per second; 149 is the last


def test_sidecar_records_every_file(video_dir, tmp_path):
    out = tmp_path / "pool.parquet"
    ingest_video(video_dir, out, fps=2, fractions=(0.5, 0.25, 0.25))
    sidecar = pq.read_table(sidecar_path(out)).to_pylist()
    assert sidecar_path(out).name == "pool.videos.parquet"
    by_id = {r["video_id"]: r for r in sidecar}
    assert by_id["case2"]["duration_s"] == 6 and by_id["case2"]["avg_fps"] == 25 and by_id["case2"]["cfr"]
    assert (by_id["case2"]["width"], by_id["case2"]["height"], by_id["case2"]["codec"]) == (128, 96, "h264")
    assert by_id["case2"]["rows"] == 12 and by_id["case2"]["probe_error"] is None
    assert by_id["vfr3"]["cfr"] is None and by_id["vfr3"]["rows"] == 9  # mkv states no frame count: unknown
    assert by_id["case1"]["size_bytes"] == (video_dir / "case1.mp4").stat().st_size


def test_native_rate_gives_every_frame_with_exact_times(video_dir, tmp_path):
    table = ingest_video(str(video_dir / "sub" / "*.mkv"), tmp_path / "p.parquet", fps="native",
                         fractions=(1, 0, 0))
    times = [parse_video_uri(u)[1] for u in table["image_uri"].to_pylist()]
    assert times == [Fraction(t, 1000) for t in VFR_PTS_MS]
    assert table["frame_index"].to_pylist() == list(range(150))  # ordinals from the packet scan, exact for VFR
    uris = table["image_uri"].to_pylist()
    assert [read_stamp(load_image(uris[i])) for i in (0, 49, 50, 149)] == [0, 49, 50, 149]


def test_masks_attach_by_frame_id_and_are_checked(video_dir, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for frame_id in ("case1_000000", "case1_000050", "case10_000025"):
        value = 255 if frame_id.endswith("50") else 0
        Image.fromarray(np.full((96, 128), value, np.uint8)).save(masks / f"{frame_id}.png")
    Image.fromarray(np.zeros((96, 128), np.uint8)).save(masks / "case1_000001.png")  # not a sampled frame
    ingest_video(video_dir, tmp_path / "p.parquet", masks=masks, fractions=(0.5, 0.25, 0.25))
    table, encoding = read_manifest(tmp_path / "p.parquet")
    with_mask = {r["frame_id"]: r["mask_uri"] for r in table.to_pylist() if r["mask_uri"]}
    assert sorted(with_mask) == ["case10_000025", "case1_000000", "case1_000050"]
    assert load_mask(with_mask["case1_000050"], encoding).max() == 1  # default: > 127 is class 1

    Image.fromarray(np.zeros((48, 64), np.uint8)).save(masks / "case2_000025.png")
    with pytest.raises(FrameDecodeError, match=r"case2_000025\.png: mask is 64x48 but its video .*case2\.mp4 is 128x"):
        ingest_video(video_dir, tmp_path / "q.parquet", masks=masks)
    assert not (tmp_path / "q.parquet").exists()
    (masks / "case2_000025.png").unlink()
    Image.fromarray(np.full((96, 128), 7, np.uint8)).save(masks / "case2_000050.png")
    with pytest.raises(FrameDecodeError, match=r"case2_000050\.png: mask value 7"):
        ingest_video(video_dir, tmp_path / "q.parquet", masks=masks, encoding=parse_class_map("0:0,255:1"))
    empty = tmp_path / "other"
    empty.mkdir()
    Image.fromarray(np.zeros((96, 128), np.uint8)).save(empty / "frame_7.png")
    with pytest.raises(ValueError, match="no mask in .* is named after a sampled frame"):
        ingest_video(video_dir, tmp_path / "q.parquet", masks=empty)


def test_two_files_with_one_stem_are_named(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    encode_stamped(tmp_path / "a" / "or1.mp4", 10)
    encode_stamped(tmp_path / "b" / "or1.mkv", 10)
    with pytest.raises(ValueError, match=r"two videos share the id 'or1': .*a/or1\.mp4 and .*b/or1\.mkv"):
        find_videos(tmp_path)


def test_unusable_files_fail_by_name_or_are_recorded_with_skip_bad(video_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("case1.mp4", "case2.mp4", "case10.mp4"):
        (bad / name).write_bytes((video_dir / name).read_bytes())
    encode_audio_only(bad / "dictation.mp4")
    truncate(video_dir / "case2.mp4", bad / "cut.mp4", 0.5)  # no moov atom: cannot be opened
    (bad / "noise.mkv").write_bytes(np.random.default_rng(0).bytes(4000))
    out = tmp_path / "pool.parquet"
    with pytest.raises(VideoError, match=r"cut\.mp4: cannot be opened.*moov.*3 of 6 files unusable.*--skip-bad"):
        ingest_video(bad, out)
    assert not out.exists() and not sidecar_path(out).exists()

    table = ingest_video(bad, out, skip_bad=True)
    assert sorted(set(table["video_id"].to_pylist())) == ["case1", "case10", "case2"]
    errors = {r["video_id"]: r["probe_error"] for r in pq.read_table(sidecar_path(out)).to_pylist()}
    assert "has no video stream (streams: audio)" in errors["dictation"]
    assert "noise.mkv: cannot be opened" in errors["noise"] and "moov" in errors["cut"]
    assert errors["case1"] is None


def test_fps_above_the_video_rate_is_refused(video_dir, tmp_path):
    with pytest.raises(VideoError, match=r"case1\.mp4: --fps 30 is above the video's 25.000 fps"):
        ingest_video(video_dir / "case1.mp4", tmp_path / "p.parquet", fps=30, fractions=(1, 0, 0))


def test_cli_ingest_video_and_its_one_line_errors(video_dir, tmp_path, capsys):
    out = tmp_path / "pool.parquet"
    code = main(["ingest", "video", "--videos", str(video_dir), "--fps", "1", "--out", str(out), "--split", "video",
                 "--fractions", "0.5,0.25,0.25"])
    printed = capsys.readouterr().out
    assert code == 0 and "20 frames (pool 10, val 5, test 5)" in printed and "pool.videos.parquet" in printed
    assert main(["ingest", "video", "--videos", str(tmp_path / "nothing_here"), "--out", str(tmp_path / "x")]) == 2
    assert "no video files" in capsys.readouterr().err


# ---------------------------------------------------------------------------- pixel caps (issue 10, item 10)


def test_config_and_decoder_share_the_default_pixel_cap():
    assert load_config().data.max_pixels == DEFAULT_MAX_PIXELS == 40_000_000


def test_decompression_bomb_at_folder_ingest_fails_naming_the_file(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / f"f{i}.png")
    write_png_bomb(images / "f3.png", 20000, 20000)  # 400 MP: ~50 KB on disk
    out = tmp_path / "pool.parquet"
    res = _alges("ingest", "folder", "--images", images, "--out", out, "--fractions", "1,0,0")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "f3.png" in res.stderr and "decompression bomb" in res.stderr and not out.exists()


def test_100_megapixel_frames_are_refused_and_the_cap_is_configurable(tmp_path):
    bomb = write_png_bomb(tmp_path / "big.png", 10000, 10000)
    with pytest.raises(FrameDecodeError, match=r"big\.png: 10000x10000 = 100\.0 megapixels, more than the cap of 40"):
        load_image(str(bomb))
    (tmp_path / "frames").mkdir()
    small = tmp_path / "frames" / "small.png"
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(small)
    assert load_image(str(small), max_pixels=1200).shape == (30, 40, 3)
    with pytest.raises(FrameDecodeError, match="40x30 = 0.0 megapixels"):
        load_image(str(small), max_pixels=1199)
    with pytest.raises(FrameDecodeError, match="small.png"):
        ingest_folder(tmp_path / "frames", None, tmp_path / "p.parquet", fractions=(1, 0, 0), max_pixels=1199)


def test_video_above_the_pixel_cap_fails_ingest_naming_it(video_dir, tmp_path):
    with pytest.raises(VideoError, match=r"case1\.mp4: 128x96 = 0\.0 megapixels per frame"):
        ingest_video(video_dir / "case1.mp4", tmp_path / "p.parquet", fractions=(1, 0, 0), max_pixels=1000)


# ---------------------------------------------------------------------------- a real clip


@pytest.mark.shared_data
@pytest.mark.parametrize(("fps", "indices"), [("native", list(range(20))), ("2", [0, 5, 10, 15])])
def test_endovis_clip_ingests_at_native_rate_and_2_fps(shared_data, tmp_path, fps, indices):
    clip = shared_data / "endovis2017_clip" / "short_source.mp4"
    table = ingest_video(clip, tmp_path / "p.parquet", fps=fps, fractions=(1, 0, 0))
    assert table["frame_index"].to_pylist() == indices
    assert table["frame_id"].to_pylist()[:2] == [f"short_source_{i:06d}" for i in indices[:2]]
    assert load_image(table["image_uri"][1].as_py()).shape == (1080, 1920, 3)
    sidecar = pq.read_table(sidecar_path(tmp_path / "p.parquet")).to_pylist()[0]
    assert (sidecar["codec"], sidecar["avg_fps"], sidecar["duration_s"], sidecar["cfr"]) == ("mpeg4", 10, 2, True)
