"""Sources (image folders, CholecSeg8k) and frame decoding: every bad input fails at ingest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from cholecseg8k_fixture import TABLE_GREY_TO_CLASS, make_cholecseg8k
from PIL import Image

from alges_dist.data.cholecseg8k import (
    CHOLECSEG8K_CLASS_NAMES,
    CHOLECSEG8K_DECIMAL_ENCODING,
    CHOLECSEG8K_ENCODING,
    CHOLECSEG8K_FRAMES_PER_VIDEO,
    CHOLECSEG8K_VIDEOS,
    PAPER_SPLIT,
    ingest_cholecseg8k,
    split_frame_counts,
)
from alges_dist.data.frames import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FrameDataset,
    FrameDecodeError,
    load_frame,
    load_image,
    load_mask,
    normalize_images,
)
from alges_dist.data.manifest import MaskEncoding, read_manifest
from alges_dist.data.sources import (
    BINARY_ENCODING,
    ingest_folder,
    natural_key,
    parse_class_map,
    split_by_ranges,
    split_by_videos,
)

FIXTURE_CLIPS = {"video01": [80, 160], "video09": [912], "video12": [15750]}
FIXTURE_SPLIT = {"pool": ["video01"], "val": ["video09"], "test": ["video12"]}


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def grey_folder(root: Path, n: int = 6, size: tuple[int, int] = (12, 16), seed: int = 0) -> dict[str, np.ndarray]:
    """images/ + masks/ with grey values {0, 10, 20, 30} and 255 (ignore); returns expected ids."""
    rng = np.random.default_rng(seed)
    expected = {}
    for i in range(1, n + 1):
        ids = rng.integers(0, 4, size, dtype=np.uint8)
        ids[0, :3] = 255
        save(root / "images" / f"f{i}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        save(root / "masks" / f"f{i}.png", np.where(ids == 255, 255, ids * 10).astype(np.uint8))
        expected[f"f{i}"] = ids
    return expected


# ---------------------------------------------------------------------------- ordering and splits


def test_natural_key_orders_numbers_by_value():
    names = ["10", "2", "1", "frame_10", "frame_9", "Frame_1b"]
    assert sorted(names, key=natural_key) == ["1", "2", "10", "Frame_1b", "frame_9", "frame_10"]


def test_split_by_ranges_gives_contiguous_blocks_with_rounded_sizes():
    assert split_by_ranges(300) == ["pool"] * 210 + ["val"] * 45 + ["test"] * 45
    splits = split_by_ranges(11, (0.5, 0.25, 0.25))
    assert splits == ["pool"] * 5 + ["val"] * 3 + ["test"] * 3  # 5.5/2.75/2.75: largest remainders
    assert split_by_ranges(4, (1.0, 0.0, 0.0)) == ["pool"] * 4
    with pytest.raises(ValueError, match=r"leave split\(s\) \['val', 'test'\] empty"):
        split_by_ranges(2, (0.9, 0.05, 0.05))
    with pytest.raises(ValueError, match="sum to 0.900000"):
        split_by_ranges(10, (0.7, 0.1, 0.1))


def test_split_by_videos_keeps_videos_whole_and_cuts_nearest_the_targets():
    counts = {"v1": 30, "v2": 30, "v10": 20, "v3": 10, "v4": 10}  # natural order v1 v2 v3 v4 v10
    assert split_by_videos(counts, (0.6, 0.2, 0.2)) == {
        "v1": "pool", "v2": "pool", "v3": "val", "v4": "val", "v10": "test",
    }  # fmt: skip
    assert set(split_by_videos({"a": 100, "b": 1, "c": 1}).values()) == {"pool", "val", "test"}
    with pytest.raises(ValueError, match="2 video"):
        split_by_videos({"a": 5, "b": 5})


# ---------------------------------------------------------------------------- real frames


@pytest.mark.shared_data
def test_ingest_cvc_clinicdb_folder_with_default_binary_encoding(shared_data, tmp_path):
    folder = shared_data / "cvc_clinicdb_dev"
    out = tmp_path / "cvc.parquet"
    table = ingest_folder(folder / "images", folder / "masks", out)

    assert table.num_rows == 300
    assert table.column("frame_id").to_pylist() == [str(i) for i in range(1, 301)]
    splits = table.column("split").to_pylist()
    assert splits == ["pool"] * 210 + ["val"] * 45 + ["test"] * 45
    assert set(table.column("video_id").to_pylist()) == {"cvc_clinicdb_dev"}
    assert table.column("labeled_round").null_count == 300
    loaded = read_manifest(out)
    assert loaded.encoding == BINARY_ENCODING
    assert loaded.table.to_pylist() == table.to_pylist()

    # Masks with anti-aliased grey edges decode to {0, 1} exactly as `raw > 127`.
    checked_grey = 0
    for row in loaded.table.slice(0, 60).to_pylist():
        raw = np.asarray(Image.open(row["mask_uri"]))[..., 0]
        ids = load_mask(row["mask_uri"], loaded.encoding)
        assert set(np.unique(ids)) <= {0, 1}
        np.testing.assert_array_equal(ids, (raw > 127).astype(np.uint8))
        checked_grey += bool(((raw > 0) & (raw < 255)).any())
    assert checked_grey > 0, "no mask with grey edge pixels among the first 60 frames"
    image = load_image(loaded.table.column("image_uri")[0].as_py())
    assert image.shape == (288, 384, 3) and image.dtype == np.uint8


# ---------------------------------------------------------------------------- class maps


def test_grey_map_folder_decodes_each_value_to_its_class(tmp_path):
    expected = grey_folder(tmp_path)
    encoding = parse_class_map("0:0,10:1,20:2,30:3,255:ignore", class_names=["bg", "liver", "fat", "tool"])
    table = ingest_folder(tmp_path / "images", tmp_path / "masks", tmp_path / "out.parquet", encoding=encoding)
    for row in table.to_pylist():
        np.testing.assert_array_equal(load_mask(row["mask_uri"], encoding), expected[row["frame_id"]])
    assert read_manifest(tmp_path / "out.parquet").encoding.class_names == ["bg", "liver", "fat", "tool"]


def test_colour_map_folder_decodes_each_colour_to_its_class(tmp_path):
    rng = np.random.default_rng(1)
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 128, 0]], np.uint8)
    expected = {}
    for i in range(3):
        ids = rng.integers(0, 3, (10, 14), dtype=np.uint8)
        save(tmp_path / "images" / f"{i}.jpg", rng.integers(0, 256, (10, 14, 3), dtype=np.uint8))
        save(tmp_path / "masks" / f"{i}.png", colours[ids])
        expected[str(i)] = ids
    encoding = parse_class_map("0,0,0:0;255,0,0:1;0,128,0:2")
    assert encoding.mode == "rgb" and encoding.class_names == ["class_0", "class_1", "class_2"]
    out = tmp_path / "out.parquet"
    table = ingest_folder(tmp_path / "images", tmp_path / "masks", out, encoding=encoding, fractions=(1, 0, 0))
    for row in table.to_pylist():
        np.testing.assert_array_equal(load_mask(row["mask_uri"], encoding), expected[row["frame_id"]])


def test_parse_class_map_reads_files_and_inline_forms(tmp_path):
    full = MaskEncoding(mode="lut", class_map={0: 0, 10: 1}, ignore_values=[255], class_names=["bg", "tool"])
    (tmp_path / "full.json").write_text(full.to_json())
    assert parse_class_map(tmp_path / "full.json") == full
    (tmp_path / "plain.yaml").write_text("0: 0\n10: 1\n20: 2\n255: ignore\n")
    plain = parse_class_map(str(tmp_path / "plain.yaml"), class_names=["bg", "a", "b"])
    assert plain.class_map == {"0": 0, "10": 1, "20": 2} and plain.ignore_values == ["255"]
    binary = MaskEncoding(mode="threshold", threshold=100, class_names=["background", "foreground"])
    assert parse_class_map(">100") == binary
    assert parse_class_map("0:0;255:1").class_map == {"0": 0, "255": 1}
    with pytest.raises(ValueError, match="entry 'x' is not 'value:class_id'"):
        parse_class_map("0:0;x")
    with pytest.raises(ValueError, match="mixes grey values and colours"):
        parse_class_map("0:0;255,0,0:1")
    with pytest.raises(ValueError, match=r"(?s)class map '0:0,9:3'.*outside the class ids 0..1"):
        parse_class_map("0:0,9:3", class_names=["a", "b"])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        parse_class_map(tmp_path / "missing.json")


def test_video_pattern_groups_frames_and_video_split_keeps_videos_whole(tmp_path):
    rng = np.random.default_rng(2)
    for seq, n in (("seq1", 6), ("seq2", 2), ("seq3", 2)):
        for i in range(n):
            save(tmp_path / "images" / f"{seq}_{i * 5}.png", rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    table = ingest_folder(
        tmp_path / "images", None, tmp_path / "out.parquet",
        split="video", fractions=(0.6, 0.2, 0.2), video_pattern=r"(?P<video>seq\d+)_(?P<index>\d+)",
    )  # fmt: skip
    rows = table.to_pylist()
    assert [r["frame_id"] for r in rows[:3]] == ["seq1_0", "seq1_5", "seq1_10"]
    assert [r["frame_index"] for r in rows[:3]] == [0, 5, 10]
    assert {r["video_id"]: r["split"] for r in rows} == {"seq1": "pool", "seq2": "val", "seq3": "test"}
    assert all(r["mask_uri"] is None for r in rows)
    with pytest.raises(ValueError, match="split='video' needs video_pattern"):
        ingest_folder(tmp_path / "images", None, tmp_path / "x.parquet", split="video")
    with pytest.raises(ValueError, match=r"stem 'seq1_0' does not match video_pattern"):
        ingest_folder(tmp_path / "images", None, tmp_path / "x.parquet", video_pattern=r"(?P<video>clip\d+)")


# ---------------------------------------------------------------------------- bad input at ingest


def _break_missing_mask(root: Path) -> str:
    (root / "masks" / "f3.png").unlink()
    return r"no mask in .*masks for image .*images/f3\.png"


def _break_mask_without_image(root: Path) -> str:
    save(root / "masks" / "f9.png", np.zeros((12, 16), np.uint8))
    return r"mask .*masks/f9\.png has no image"


def _break_value_outside_map(root: Path) -> str:
    mask = np.asarray(Image.open(root / "masks" / "f4.png")).copy()
    mask[5, 5] = 77
    save(root / "masks" / "f4.png", mask)
    return r"masks/f4\.png: mask value 77 is not in the class map"


def _break_size_mismatch(root: Path) -> str:
    save(root / "masks" / "f2.png", np.zeros((12, 15), np.uint8))
    return r"masks/f2\.png: mask is 15x12 but its image .*images/f2\.png is 16x12"


def _break_unreadable_image(root: Path) -> str:
    (root / "images" / "f5.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return r"images/f5\.png: unreadable image"


def _break_truncated_image(root: Path) -> str:
    data = (root / "images" / "f6.png").read_bytes()
    (root / "images" / "f6.png").write_bytes(data[: len(data) // 2])
    return r"images/f6\.png: unreadable image"


def _break_duplicate_id(root: Path) -> str:
    save(root / "images" / "f1.jpg", np.zeros((12, 16, 3), np.uint8))
    return r"duplicate frame id 'f1'"


def _break_colour_pixel_in_grey_mask(root: Path) -> str:
    mask = np.repeat(np.asarray(Image.open(root / "masks" / "f1.png"))[..., None], 3, axis=2)
    mask[2, 7] = (10, 20, 10)
    save(root / "masks" / "f1.png", mask)
    return r"masks/f1\.png: mask has colour pixels \(first at x=7, y=2: \(10, 20, 10\)\)"


@pytest.mark.parametrize(
    "breakage",
    [
        _break_missing_mask,
        _break_mask_without_image,
        _break_value_outside_map,
        _break_size_mismatch,
        _break_unreadable_image,
        _break_truncated_image,
        _break_duplicate_id,
        _break_colour_pixel_in_grey_mask,
    ],
    ids=lambda f: f.__name__.removeprefix("_break_"),
)
def test_bad_folder_input_names_the_file_and_keeps_the_old_manifest(tmp_path, breakage):
    grey_folder(tmp_path)
    encoding = parse_class_map("0:0,10:1,20:2,30:3,255:ignore")
    out = tmp_path / "pool.parquet"
    ingest_folder(tmp_path / "images", tmp_path / "masks", out, encoding=encoding)
    before = out.read_bytes()

    message = breakage(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ingest_folder(tmp_path / "images", tmp_path / "masks", out, encoding=encoding)
    assert out.read_bytes() == before
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ingest_folder(tmp_path / "images", tmp_path / "masks", tmp_path / "new.parquet", encoding=encoding)
    assert not (tmp_path / "new.parquet").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------- CholecSeg8k


def test_cholecseg8k_fixture_ingest_maps_every_grey_value_and_quirk(tmp_path):
    expected = make_cholecseg8k(tmp_path / "CholecSeg8k", FIXTURE_CLIPS)
    out = tmp_path / "cholec.parquet"
    table = ingest_cholecseg8k(tmp_path / "CholecSeg8k", out, split_videos=FIXTURE_SPLIT)

    rows = table.to_pylist()
    assert [r["frame_id"] for r in rows] == [
        "video01_000080", "video01_000081", "video01_000082",
        "video01_000160", "video01_000161", "video01_000162",
        "video09_000912", "video09_000913", "video09_000914",
        "video12_015750", "video12_015751", "video12_015752",
    ]  # fmt: skip
    assert [r["frame_index"] for r in rows[:4]] == [80, 81, 82, 160]
    assert {r["video_id"]: r["split"] for r in rows} == {"video01": "pool", "video09": "val", "video12": "test"}
    assert all(r["mask_uri"].endswith(f"frame_{r['frame_index']}_endo_watershed_mask.png") for r in rows)

    manifest = read_manifest(out)
    assert manifest.encoding.class_names == CHOLECSEG8K_CLASS_NAMES
    for row in manifest.table.to_pylist():
        ids = load_mask(row["mask_uri"], manifest.encoding)
        np.testing.assert_array_equal(ids, expected[row["frame_id"]])
    ids = load_mask(rows[0]["mask_uri"], manifest.encoding)
    assert set(np.unique(ids)) == set(range(13)) | {255}
    assert (ids[0] == 255).all() and (ids[:, -1] == 255).all()  # the white frame is ignored


def test_cholecseg8k_encoding_is_the_documented_class_table():
    assert CHOLECSEG8K_ENCODING.class_map == {str(g): c for g, c in TABLE_GREY_TO_CLASS.items()}
    assert CHOLECSEG8K_ENCODING.ignore_values == ["255", "0"]
    assert CHOLECSEG8K_ENCODING.class_map["80"] == 0 and CHOLECSEG8K_ENCODING.class_map["51"] == 11
    assert CHOLECSEG8K_DECIMAL_ENCODING.class_map["50"] == 0 and CHOLECSEG8K_DECIMAL_ENCODING.class_map["11"] == 1


def test_cholecseg8k_value_outside_table_names_file_and_value(tmp_path):
    root = tmp_path / "CholecSeg8k"
    make_cholecseg8k(root, {"video01": [80]}, frames_per_clip=2)
    bad = root / "video01" / "video01_00080" / "frame_81_endo_watershed_mask.png"
    mask = np.asarray(Image.open(bad)).copy()
    mask[10, 10] = 99
    save(bad, mask)
    with pytest.raises(FrameDecodeError, match=rf"{bad}: mask value 99 is not in the class map"):
        ingest_cholecseg8k(root, tmp_path / "out.parquet", split_videos={"pool": ["video01"]})
    assert not (tmp_path / "out.parquet").exists()


def test_cholecseg8k_decimal_spelling_is_rejected_with_a_hint(tmp_path):
    root = tmp_path / "CholecSeg8k"
    make_cholecseg8k(root, {"video01": [80]}, frames_per_clip=1)
    path = root / "video01" / "video01_00080" / "frame_80_endo_watershed_mask.png"
    decimal = {int(str(v), 16): v for v in (50, 11, 21, 13, 12, 31, 23, 24, 25, 32, 22, 33)}  # 0x50 -> 50, ...
    grey = np.asarray(Image.open(path))[..., 0]
    save(path, np.vectorize(lambda v: decimal.get(int(v), int(v)))(grey).astype(np.uint8))
    with pytest.raises(FrameDecodeError, match=r"fit the 'decimal' spelling"):
        ingest_cholecseg8k(root, tmp_path / "out.parquet", split_videos={"pool": ["video01"]})
    table = ingest_cholecseg8k(
        root, tmp_path / "out.parquet", split_videos={"pool": ["video01"]}, encoding=CHOLECSEG8K_DECIMAL_ENCODING
    )
    ids = load_mask(table.column("mask_uri")[0].as_py(), CHOLECSEG8K_DECIMAL_ENCODING)
    assert set(np.unique(ids)) == set(range(13)) | {255}


def test_cholecseg8k_bad_layouts_name_the_problem(tmp_path):
    root = tmp_path / "CholecSeg8k"
    make_cholecseg8k(root, {"video01": [80], "video09": [912]}, frames_per_clip=2)
    with pytest.raises(ValueError, match=r"videos \['video09'\] under .* are not in split_videos"):
        ingest_cholecseg8k(root, tmp_path / "out.parquet", split_videos={"pool": ["video01"]})
    with pytest.raises(ValueError, match=r"puts video01 in both 'pool' and 'val'"):
        ingest_cholecseg8k(root, tmp_path / "out.parquet", split_videos={"pool": ["video01"], "val": ["video01"]})
    with pytest.raises(ValueError, match="holds no videoNN folders"):
        ingest_cholecseg8k(root / "video01", tmp_path / "out.parquet")

    mask = root / "video09" / "video09_00912" / "frame_913_endo_watershed_mask.png"
    mask.unlink()
    with pytest.raises(FileNotFoundError, match=rf"missing watershed mask {mask}"):
        ingest_cholecseg8k(root, tmp_path / "out.parquet", split_videos=FIXTURE_SPLIT)

    make_cholecseg8k(tmp_path / "dup", {"video01": [80, 81]}, frames_per_clip=2)
    message = r"duplicate frame id video01_000081: .*_00080/frame_81_endo\.png and .*_00081/frame_81_endo\.png"
    with pytest.raises(ValueError, match=message):
        ingest_cholecseg8k(tmp_path / "dup", tmp_path / "out.parquet", split_videos={"pool": ["video01"]})

    make_cholecseg8k(tmp_path / "size", {"video01": [80]}, frames_per_clip=1)
    frame = tmp_path / "size" / "video01" / "video01_00080" / "frame_80_endo.png"
    save(frame, np.zeros((48, 85, 3), np.uint8))
    with pytest.raises(FrameDecodeError, match=r"mask is 86x48 but its image .*frame_80_endo\.png is 85x48"):
        ingest_cholecseg8k(tmp_path / "size", tmp_path / "out.parquet", split_videos={"pool": ["video01"]})
    assert not (tmp_path / "out.parquet").exists()


def test_paper_split_covers_all_videos_disjointly_and_matches_paper_pool_and_val():
    assigned = [v for videos in PAPER_SPLIT.values() for v in videos]
    assert sorted(assigned) == sorted(CHOLECSEG8K_VIDEOS) and len(assigned) == len(set(assigned)) == 17
    assert sum(CHOLECSEG8K_FRAMES_PER_VIDEO.values()) == 8080
    # 4640 pool and 1600 val as in the paper; its 1640 test frames are no multiple of 80.
    assert split_frame_counts(PAPER_SPLIT, CHOLECSEG8K_FRAMES_PER_VIDEO) == {"pool": 4640, "val": 1600, "test": 1840}
    assert {"video01", "video09", "video12"} <= set(PAPER_SPLIT["pool"])


def test_cholecseg8k_default_split_is_the_paper_split(tmp_path):
    make_cholecseg8k(tmp_path / "c", {"video01": [80], "video27": [0], "video17": [0]}, frames_per_clip=1)
    table = ingest_cholecseg8k(tmp_path / "c", tmp_path / "out.parquet")
    assert dict(zip(table.column("video_id").to_pylist(), table.column("split").to_pylist())) == {
        "video01": "pool", "video17": "test", "video27": "val",
    }  # fmt: skip


# ---------------------------------------------------------------------------- frame decoding


def test_load_image_and_mask_resize_bilinear_and_nearest(tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    ids = rng.integers(0, 4, (20, 30), dtype=np.uint8)
    image_path = save(tmp_path / "i.png", rgb)
    mask_path = save(tmp_path / "m.png", (ids * 10).astype(np.uint8))
    encoding = parse_class_map("0:0,10:1,20:2,30:3")

    np.testing.assert_array_equal(load_image(str(image_path)), rgb)
    resized = load_image(str(image_path), (10, 12))
    reference = np.asarray(Image.fromarray(rgb).resize((12, 10), Image.Resampling.BILINEAR))
    assert resized.shape == (10, 12, 3)
    np.testing.assert_array_equal(resized, reference)

    mask = load_mask(str(mask_path), encoding, (40, 60))
    np.testing.assert_array_equal(mask, np.repeat(np.repeat(ids, 2, axis=0), 2, axis=1))  # nearest, exact 2x
    small = load_mask(str(mask_path), encoding, (10, 15))
    assert set(np.unique(small)) <= {0, 1, 2, 3}  # never blended ids

    image, mask = load_frame(str(image_path), str(mask_path), encoding, (10, 12))
    np.testing.assert_array_equal(image, reference)
    assert mask.shape == (10, 12)
    np.testing.assert_array_equal(load_image(image_path.as_uri()), rgb)  # file:// through pyarrow.fs
    with pytest.raises(FileNotFoundError, match="nope.png: file not found"):
        load_image(str(tmp_path / "nope.png"))
    with pytest.raises(ValueError, match=r"size must be \(height, width\)"):
        load_image(str(image_path), (0, 5))


def test_normalize_images_applies_imagenet_mean_std_channels_first():
    pixels = np.stack([np.full((2, 3), v, np.uint8) for v in (0, 128, 255)], axis=-1)[None]  # (1, 2, 3, 3)
    out = normalize_images(pixels)
    assert out.shape == (1, 3, 2, 3) and out.dtype == torch.float32
    for c, v in enumerate((0, 128, 255)):
        expected = (v / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(out[0, c], torch.full((2, 3), expected))
    torch.testing.assert_close(normalize_images(torch.from_numpy(pixels)), out)
    with pytest.raises(ValueError, match="must be uint8"):
        normalize_images(pixels.astype(np.float32))
    with pytest.raises(ValueError, match=r"shape \(B, H, W, 3\)"):
        normalize_images(pixels[0])


def test_normalize_none_only_scales_to_unit_range_as_the_paper():
    pixels = np.stack([np.full((2, 3), v, np.uint8) for v in (0, 128, 255)], axis=-1)[None]
    out = normalize_images(pixels, "none")
    for c, v in enumerate((0, 128, 255)):
        torch.testing.assert_close(out[0, c], torch.full((2, 3), v / 255))
    with pytest.raises(ValueError, match="normalize mode must be 'imagenet' or 'none', got 'zscore'"):
        normalize_images(pixels, "zscore")


def test_frame_dataset_yields_normalized_image_and_int64_mask(tmp_path):
    expected = grey_folder(tmp_path, n=3)
    encoding = parse_class_map("0:0,10:1,20:2,30:3,255:ignore")
    out = tmp_path / "o.parquet"
    table = ingest_folder(tmp_path / "images", tmp_path / "masks", out, encoding=encoding, fractions=(1, 0, 0))
    dataset = FrameDataset(table, encoding, size=(12, 16))
    assert len(dataset) == 3
    image, mask = dataset[1]
    assert image.shape == (3, 12, 16) and image.dtype == torch.float32
    assert mask.dtype == torch.int64
    np.testing.assert_array_equal(mask.numpy(), expected[table.column("frame_id")[1].as_py()])
    raw = load_image(table.column("image_uri")[1].as_py())
    torch.testing.assert_close(image, normalize_images(raw[None])[0])

    unlabeled = ingest_folder(tmp_path / "images", None, tmp_path / "u.parquet", fractions=(1, 0, 0))
    with pytest.raises(ValueError, match=r"3 rows have mask_uri null \(first frame_id 'f1'\)"):
        FrameDataset(unlabeled, encoding)


def test_ingest_writes_absolute_uris_and_a_readable_manifest(tmp_path):
    grey_folder(tmp_path, n=3)
    out = tmp_path / "o.parquet"
    encoding = parse_class_map("0:0,10:1,20:2,30:3,255:ignore")
    ingest_folder(tmp_path / "images", tmp_path / "masks", out, encoding=encoding, fractions=(1, 0, 0))
    uris = pq.read_table(out).column("image_uri").to_pylist()
    assert all(Path(u).is_absolute() and Path(u).is_file() for u in uris)
    assert json.loads(pq.read_schema(out).metadata[b"alges.mask_encoding"])["mode"] == "lut"
