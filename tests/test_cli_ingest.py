"""`alges ingest` end to end through the command line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from alges_dist.data.frames import load_mask
from alges_dist.data.manifest import read_manifest


def _alges(*args):
    return subprocess.run([sys.executable, "-m", "alges_dist.cli", *map(str, args)], capture_output=True, text=True)


@pytest.mark.shared_data
def test_ingest_folder_on_cvc_clinicdb_needs_no_flags(shared_data, tmp_path):
    root = shared_data / "cvc_clinicdb_dev"
    out = tmp_path / "cvc.parquet"
    res = _alges("ingest", "folder", "--images", root / "images", "--masks", root / "masks", "--out", out)
    assert res.returncode == 0, res.stderr
    assert "300 frames (pool 210, val 45, test 45)" in res.stdout
    table, encoding = read_manifest(out)
    assert encoding.n_classes == 2
    uri = table["mask_uri"][0].as_py()
    assert set(np.unique(load_mask(uri, encoding))) <= {0, 1}


def test_ingest_error_names_the_file_and_leaves_no_manifest(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(1, 8):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / f"f{i}.png")
        mask = np.full((8, 8), 77 if i == 4 else 255, np.uint8)
        Image.fromarray(mask).save(tmp_path / "masks" / f"f{i}.png")
    out = tmp_path / "pool.parquet"
    res = _alges("ingest", "folder", "--images", tmp_path / "images", "--masks", tmp_path / "masks",
                 "--out", out, "--class-map", "0:0,255:1")
    assert res.returncode == 2
    assert "f4.png" in res.stderr and "77" in res.stderr
    assert not out.exists()
