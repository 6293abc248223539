"""Picks near another pick or a labeled frame of the same video: brute force, hand-made cases, run folders."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alges_dist.config import load_config
from alges_dist.data.demo import DEMO_ENCODING
from alges_dist.data.manifest import make_manifest, write_manifest
from alges_dist.data.atomic import atomic_write_text
from alges_dist.near_picks import count_near_picks, frame_times, near_pick_column, near_pick_counts
from alges_dist.run_folder import RunLayout


def _brute_force(picks, labeled, times, within_s):
    near = 0
    for p in picks:
        if p not in times:
            continue
        others = [f for f in itertools.chain(picks, labeled) if f != p and f in times]
        near += any(times[f][0] == times[p][0] and abs(times[f][1] - times[p][1]) < within_s for f in others)
    return near


def test_count_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    times = {f"f{i}": (f"v{rng.integers(4)}", float(rng.integers(0, 300))) for i in range(400)}
    ids = list(times) + ["image_only"]
    for _ in range(20):
        chosen = rng.choice(ids, 60, replace=False).tolist()
        picks, labeled = chosen[:20], chosen[20:]
        within = float(rng.choice([0.5, 1, 5, 30]))
        assert count_near_picks(picks, labeled, times, within_s=within) == _brute_force(picks, labeled, times, within)


def test_hand_made_batch():
    times = {"a10": ("a", 10.0), "a12": ("a", 12.0), "b3": ("b", 3.0), "b0": ("b", 0.0), "c100": ("c", 100.0),
             "a17": ("a", 17.0), "c95": ("c", 95.0)}
    picks = ["a10", "a12", "b3", "c100", "png_frame"]
    assert count_near_picks(picks, ["b0"], times, within_s=5) == 3  # a10~a12, b3~labeled b0
    assert count_near_picks(picks, ["b0", "a17", "c95"], times, within_s=5) == 3  # exactly 5 s apart is not near
    assert count_near_picks(picks, ["b0", "a17", "c95"], times, within_s=5.01) == 4
    assert count_near_picks(["png_frame"], [], times, within_s=5) is None  # nothing to measure
    with pytest.raises(ValueError, match="within_s"):
        count_near_picks(picks, [], times, within_s=-1)


def test_run_folder_times_survive_the_switch_to_exported_pngs(tmp_path):
    """Labeled rows point at PNGs; their sources.csv still says which second of which video they are."""
    run = tmp_path / "run"
    layout = RunLayout(run)
    ids = ["v1_000000", "v1_000003", "v1_000010", "v2_000004", "img_1"]
    uris = ["/vid/v1.mp4#t=0", str(run / "initial" / "frames" / "v1_000003.png"), "/vid/v1.mp4#t=10",
            "/vid/v2.mp4#t=4", "/frames/img_1.png"]
    table = make_manifest(frame_ids=ids, video_ids=["v1", "v1", "v1", "v2", "img"], frame_indices=[0, 3, 10, 4, 1],
                          image_uris=uris, mask_uris=["/m.png"] * 5, splits=["pool"] * 5,
                          labeled_rounds=[None, 0, 1, None, None])
    write_manifest(table, layout.initial_manifest_path, DEMO_ENCODING)
    write_manifest(table, layout.manifest_path("entropy", 0), DEMO_ENCODING)
    atomic_write_text(run / "initial" / "frames" / "sources.csv",
                      "frame_id,source_uri,width,height,sha256\nv1_000003,/vid/v1.mp4#t=3,64,64,00\n")
    assert frame_times(run, table) == {"v1_000000": ("v1", 0.0), "v1_000003": ("v1", 3.0),
                                       "v1_000010": ("v1", 10.0), "v2_000004": ("v2", 4.0)}
    queries = pa.table({"strategy": ["entropy"] * 4, "seed": [0] * 4, "round": [0, 0, 1, 1],
                        "frame_id": ["v1_000010", "v2_000004", "v1_000000", "img_1"]})
    # round 0: v1@10 is 7 s from labeled v1@3, v2@4 alone -> 0 within 5 s, 1 within 8 s
    # round 1: v1@0 is 3 s from v1@3 (labeled in round 0) -> 1; the image row is not counted
    assert near_pick_counts(run, queries, ["entropy"], [0], within_s=5) == {("entropy", 0): 0, ("entropy", 1): 1}
    assert near_pick_counts(run, queries, ["entropy"], [0], within_s=8)[("entropy", 0)] == 1
    with open(layout.queries_path, "wb") as fh:
        pq.write_table(queries, fh)
    cfg = load_config(None, ["loop.strategies=[entropy]"])
    table = [{"strategy": "entropy", "round": r} for r in range(3)]
    name = near_pick_column(table, run, cfg)
    assert name == "picks_within_5s" and [row[name] for row in table][:2] == [0, 1] and np.isnan(table[2][name])
