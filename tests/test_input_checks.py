"""Bad input refused by name, before any work, and nothing lost (issue 10, items 6, 7, 11-14)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from alges_dist.cli import main
from alges_dist.config import ConfigError, load_config
from alges_dist.data.manifest import MANIFEST_SCHEMA, Manifest, mark_labeled, read_manifest, validate_manifest
from alges_dist.data.sources import ingest_folder
from alges_dist.handoff import collect_masks, find_masks
from alges_dist.models import build_model, load_model

FAST = ["data.image_size=[64, 64]", "train.epochs=1", "train.batch_size=4", "loop.initial_labeled=4",
        "loop.budget=3", "loop.n_rounds=1", "scoring.batch_size=8"]


def _sets(*items):
    return [a for s in items for a in ("--set", s)]


def _folder(tmp_path, masks: list[np.ndarray]):
    (tmp_path / "images").mkdir(parents=True)
    (tmp_path / "masks").mkdir()
    for i, m in enumerate(masks):
        Image.fromarray(np.full((*m.shape, 3), 90, np.uint8)).save(tmp_path / "images" / f"{i}.png")
        Image.fromarray(m.astype(np.uint8)).save(tmp_path / "masks" / f"{i}.png")
    return tmp_path / "images", tmp_path / "masks"


# ---- 6: the default mask map must not zero class-id masks silently ----------------------------------
def test_class_id_masks_with_the_default_map_fail_naming_the_class_map(tmp_path):
    masks = [np.zeros((8, 8)) for _ in range(8)]
    masks[1][2:4, 2:4], masks[2][5:, :3] = 1, 2
    images, mask_dir = _folder(tmp_path, masks)
    with pytest.raises(ValueError, match=r"values \[0, 1, 2\].*--class-map '0:0,1:1,2:2'"):
        ingest_folder(images, mask_dir, tmp_path / "pool.parquet")
    assert not (tmp_path / "pool.parquet").exists()
    code = main(["ingest", "folder", "--images", str(images), "--masks", str(mask_dir), "--out",
                 str(tmp_path / "p.parquet"), "--class-map", "0:0,1:1,2:2", "--class-names", "bg,a,b"])
    assert code == 0


def test_binary_and_all_background_masks_still_ingest_with_the_default_map(tmp_path):
    masks = [np.zeros((8, 8)) for _ in range(8)]
    masks[0][:4] = 255
    images, mask_dir = _folder(tmp_path / "a", masks)
    assert ingest_folder(images, mask_dir, tmp_path / "a.parquet").num_rows == 8
    images, mask_dir = _folder(tmp_path / "b", [np.zeros((8, 8))] * 8)
    assert ingest_folder(images, mask_dir, tmp_path / "b.parquet").num_rows == 8  # no polyp anywhere is fine


# ---- 7: returned masks: image suffixes only, one per frame, copied in ---------------------------------
def test_returned_masks_ignore_other_files_refuse_two_candidates_and_are_copied(tmp_path, demo_manifest):
    table, encoding = read_manifest(demo_manifest)
    pool = [f for f, s in zip(table["frame_id"].to_pylist(), table["split"].to_pylist()) if s == "pool"][:2]
    mask_of = dict(zip(table["frame_id"].to_pylist(), table["mask_uri"].to_pylist()))
    folder = tmp_path / "returned"
    folder.mkdir()
    for f in pool:
        (folder / f"{f}.png").write_bytes(Path(mask_of[f]).read_bytes())
        (folder / f"{f}.json").write_text("{}")  # an annotation tool's sidecar: not a mask
    assert set(find_masks(folder, pool)) == set(pool)
    Image.open(mask_of[pool[0]]).save(folder / f"{pool[0]}.bmp")
    with pytest.raises(ValueError, match=rf"frame '{pool[0]}' has two masks in .*{pool[0]}.bmp and {pool[0]}.png"):
        find_masks(folder, pool)
    (folder / f"{pool[0]}.bmp").unlink()
    copies = collect_masks(pool, Manifest(table, encoding), folder, tmp_path / "run" / "labels")
    original = (folder / f"{pool[0]}.png").read_bytes()
    (folder / f"{pool[0]}.png").write_bytes(b"changed later by someone")
    assert Path(copies[pool[0]]).read_bytes() == original
    assert Path(copies[pool[0]]).parent == tmp_path / "run" / "labels"


# ---- 11: manifest rows that would fail after a fit fail at once -------------------------------------
def _raw(**columns):
    base = {"frame_id": ["a", "b", "c"], "video_id": ["v"] * 3, "frame_index": [0, 1, 2],
            "image_uri": ["/i/a", "/i/b", "/i/c"], "mask_uri": ["/m/a", "/m/b", "/m/c"],
            "split": ["pool", "pool", "test"], "labeled_round": [None, None, None]}
    return pa.table({**base, **columns})


@pytest.mark.parametrize(("columns", "message"), [
    ({"image_uri": ["/i/a", "i/b", "/i/c"]}, r"'image_uri' is 'i/b' at row 1 \(frame_id 'b'\); URIs must be absolute"),
    ({"image_uri": ["/i/a", "", "/i/c"]}, r"'image_uri' is '' at row 1"),
    ({"frame_id": ["a", "", "c"]}, r"'frame_id' is empty at row 1"),
    ({"mask_uri": ["/m/a", None, "/m/c"], "labeled_round": [None, 0, None]},
     r"row 1 \(frame_id 'b'\) is labeled \(labeled_round 0\) but has no mask_uri"),
])
def test_manifest_rows_that_cannot_work_are_refused_naming_the_row(columns, message):
    with pytest.raises(ValueError, match=message):
        validate_manifest(_raw(**columns))
    assert validate_manifest(_raw(image_uri=["s3://b/a", "/i/b", "gs://c"])).schema == MANIFEST_SCHEMA


@pytest.mark.ray
def test_a_pool_the_run_cannot_use_fails_before_any_work(ray_local, demo_manifest, tmp_path, capsys):
    table, encoding = read_manifest(demo_manifest)
    masks = table["mask_uri"].to_pylist()
    test_row = table["split"].to_pylist().index("test")
    masks[test_row] = None
    from alges_dist.data.manifest import write_manifest

    pool = tmp_path / "pool.parquet"
    write_manifest(table.set_column(4, "mask_uri", pa.array(masks, pa.string())), pool, encoding)
    assert main(["run", "--pool", str(pool), "--out", str(tmp_path / "run"), *_sets(*FAST)]) == 2
    err = capsys.readouterr().err
    assert f"row {test_row}" in err and "in split 'test' has no mask_uri; the simulated oracle evaluates test frames" in err
    assert not (tmp_path / "run").exists()


# ---- 12: config that cannot be right -----------------------------------------------------------------
@pytest.mark.parametrize(("override", "message"), [
    ("loop.seeds=[0, 1, 0]", r"loop.seeds: .*\['0'\] appear more than once"),
    ("loop.seeds=[]", r"loop.seeds: .*at least one seed"),
    ("loop.strategies=[random, coreset, random]", r"loop.strategies: .*\['random'\] appear more than once"),
    ("selection.device=banana", r"selection.device: .*pattern"),
    ("selection.shards=0", r"selection.shards: .*must be >= 1"),
])
def test_config_refuses_repeats_and_impossible_values_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.ray
def test_more_workers_than_the_cluster_has_fails_before_any_work(ray_local, demo_manifest, tmp_path, capsys):
    code = main(["run", "--pool", str(demo_manifest), "--out", str(tmp_path / "run"),
                 *_sets(*FAST, "train.num_workers=64")])
    assert code == 2
    assert "train.num_workers=64 x train.cpus_per_worker=1 needs 64 CPUs; the Ray cluster has" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---- 13: weights are loaded as weights, never as code --------------------------------------------------
class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_loading_a_checkpoint_never_unpickles_code(tmp_path):
    model = build_model("unet", "resnet18", 2, None)
    torch.save({**model.state_dict(), "extra": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights only|weights_only|unsupported global"):
        load_model("unet", "resnet18", 2, tmp_path / "evil.pt")


# ---- 14: expected failures end in one line, not a traceback -------------------------------------------
def _cli(*args, preexec=None):
    return subprocess.run([sys.executable, "-m", "alges_dist.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, preexec_fn=preexec, timeout=300)


def _one_line_error(res, *needles):
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert "Traceback" not in res.stderr and len(lines) == 1, res.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0]


def test_bad_overrides_and_paths_fail_in_one_line(tmp_path, demo_manifest):
    _one_line_error(_cli("run", "--out", tmp_path / "r", "--set", "x=[1"), "not valid YAML")
    _one_line_error(_cli("run", "--out", tmp_path / "r", "--set", "selection.device=banana"), "selection.device")
    images, masks = _folder(tmp_path, [np.zeros((8, 8))] * 8)
    (tmp_path / "somedir").mkdir()
    _one_line_error(_cli("ingest", "folder", "--images", images, "--masks", masks, "--out", tmp_path / "somedir"),
                    str(tmp_path / "somedir"))
    (tmp_path / "afile").write_text("x")
    _one_line_error(_cli("run", "--pool", demo_manifest, "--out", tmp_path / "afile"), "is a file")


def test_a_full_disk_mid_write_fails_in_one_line_and_leaves_no_half_written_manifest(tmp_path):
    images, masks = _folder(tmp_path, [np.zeros((64, 64))] * 40)
    out = tmp_path / "pool.parquet"
    out.write_bytes(b"the previous manifest")

    def small_files():  # the kernel refuses writes past 2 KB, as a full disk would
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    res = _cli("ingest", "folder", "--images", images, "--masks", masks, "--out", out, preexec=small_files)
    _one_line_error(res, "File too large")
    assert out.read_bytes() == b"the previous manifest"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_mark_labeled_at_a_million_rows_is_columnar():
    n = 1_000_000
    table = pa.table({"frame_id": pa.array([f"f{i:07d}" for i in range(n)]), "video_id": ["v"] * n,
                      "frame_index": np.arange(n), "image_uri": ["/x"] * n, "mask_uri": ["/m"] * n,
                      "split": ["pool"] * n, "labeled_round": pa.nulls(n, pa.int32())})
    out = mark_labeled(table, ["f0000003", "f0999999"], 2)
    rounds = out["labeled_round"]
    assert rounds.null_count == n - 2 and rounds[3].as_py() == 2 and rounds[n - 1].as_py() == 2
    with pytest.raises(ValueError, match=r"frame_id 'f0000003' \(row 3\) is already labeled in round 2"):
        mark_labeled(out, ["f0000003"], 3)
