"""A video archive end to end through the CLI: ingest, two human-labeled rounds, picks exported as PNG."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from alges_dist.cli import main
from alges_dist.data.frames import load_image
from alges_dist.data.manifest import read_manifest
from alges_dist.data.video import is_video_uri
from alges_dist.data.video_export import read_sources
from video_fixtures import write_archive

FAST = ["data.image_size=[64, 64]", "train.epochs=1", "train.batch_size=4", "loop.initial_labeled=4",
        "loop.budget=3", "loop.n_rounds=2", "scoring.batch_size=8", "loop.strategies=[entropy]",
        "loop.oracle=human"]


@pytest.fixture
def archive(tmp_path):
    """Four 12-second videos at 2 fps (64 px) and a mask for every frame, as an archive would hold them."""
    return write_archive(tmp_path / "archive")


@pytest.mark.ray
@pytest.mark.slow
def test_ingest_run_two_rounds_export_pngs_import_labels(ray_local, archive, tmp_path, capsys):
    videos, masks = archive
    pool = tmp_path / "pool.parquet"
    assert main(["ingest", "video", "--videos", str(videos), "--fps", "1", "--masks", str(masks), "--out", str(pool),
                 "--class-map", "0:0,1:1,2:2,3:3,4:4", "--fractions", "0.5,0.25,0.25"]) == 0
    table, _ = read_manifest(pool)
    assert table.num_rows == 48 and all(is_video_uri(u) for u in table["image_uri"].to_pylist())
    uri_of = dict(zip(table["frame_id"].to_pylist(), table["image_uri"].to_pylist()))

    out = tmp_path / "run"
    run = ["run", "--pool", str(pool), "--out", str(out), "--no-dashboard", *[a for s in FAST for a in ("--set", s)]]
    assert main(run) == 3  # nothing labeled yet: the first batch goes to people (spread over the pool videos)
    first = [row["frame_id"] for row in csv.DictReader(open(out / "initial" / "to_annotate.csv"))]
    (tmp_path / "returned_first").mkdir()
    for f in first:
        shutil.copyfile(masks / f"{f}.png", tmp_path / "returned_first" / f"{f}.png")
    assert main(["label", "--out", str(out), "--masks", str(tmp_path / "returned_first")]) == 0
    for r in (0, 1):
        assert main(run) == 3  # waiting for people
        round_dir = out / "entropy" / "seed_0" / f"round_{r:02d}"
        picks = pq.read_table(round_dir / "selection.parquet")["frame_id"].to_pylist()
        listed = list(csv.DictReader(open(round_dir / "to_annotate.csv")))
        assert [row["frame_id"] for row in listed] == picks
        for row in listed:  # each pick is a PNG file of exactly the pixels decoded from its video
            assert row["image_uri"] == str(round_dir / "frames" / f"{row['frame_id']}.png")
            np.testing.assert_array_equal(load_image(row["image_uri"]), load_image(uri_of[row["frame_id"]]))
        sources = {s["frame_id"]: s["source_uri"] for s in read_sources(round_dir / "frames")}
        assert sources == {f: uri_of[f] for f in picks}
        returned = tmp_path / f"returned_{r}"
        returned.mkdir()
        for f in picks:
            shutil.copyfile(masks / f"{f}.png", returned / f"{f}.png")
        stamp = (round_dir / "frames" / f"{picks[0]}.png").stat().st_mtime_ns
        assert main(["label", "--out", str(out), "--masks", str(returned), "--strategy", "entropy"]) == 0
        assert (round_dir / "frames" / f"{picks[0]}.png").stat().st_mtime_ns == stamp  # written once
    assert main(run) == 0
    capsys.readouterr()

    results = list(csv.DictReader(open(out / "results.csv")))
    assert [(row["round"], row["n_labeled"]) for row in results] == [("0", "4"), ("1", "7"), ("2", "10")]
    labeled, _ = read_manifest(out / "entropy" / "seed_0" / "manifest.parquet")
    for row in labeled.to_pylist():  # what training and evaluation read: files, never video seeks
        if row["labeled_round"] is not None or row["split"] != "pool":
            assert not is_video_uri(row["image_uri"]) and row["image_uri"].startswith(str(out)), row
            np.testing.assert_array_equal(load_image(row["image_uri"]), load_image(uri_of[row["frame_id"]]))
        else:
            assert row["image_uri"] == uri_of[row["frame_id"]]  # the unlabeled pool stays in the videos
    assert sorted(r["labeled_round"] for r in labeled.to_pylist() if r["labeled_round"] is not None) == \
        [0] * 4 + [1] * 3 + [2] * 3
    assert (out / "entropy" / "seed_0" / "round_02" / "model.pt").exists()  # round 2 trained on round 1's labels
