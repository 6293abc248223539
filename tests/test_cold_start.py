"""From an unlabeled archive to annotated rounds: the cold start, test frames for people, imports
without bookkeeping, ingest defaults for archives (issue 21).

The spread rule is checked against brute force; the k-center cold start against a brute-force
farthest-first traversal of the same embedding; the whole human loop through the CLI, from a
video pool with zero masks.
"""

from __future__ import annotations

import csv
import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from video_fixtures import write_archive

from alges_dist.cli import main
from alges_dist.cold_start import spread
from alges_dist.data.manifest import video_times
from alges_dist.data.manifest import read_manifest

FAST = ["data.image_size=[64, 64]", "train.epochs=1", "train.batch_size=4", "loop.initial_labeled=4",
        "loop.budget=3", "scoring.batch_size=8", "loop.oracle=human"]
CLASS_MAP = "0:0,1:1,2:2,3:3,4:4"


def _sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


# ---- the spread rule ---------------------------------------------------------------------------------
def _min_gap_within_videos(groups, keys, picks) -> float:
    gaps = [abs(keys[a] - keys[b]) for i, a in enumerate(picks) for b in picks[i + 1:] if groups[a] == groups[b]]
    return min(gaps) if gaps else np.inf


@pytest.mark.parametrize("seed", range(6))
def test_spread_covers_every_video_keeps_the_gap_and_follows_video_lengths(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 60, size=rng.integers(2, 7))
    groups = np.repeat(np.arange(len(lengths)), lengths)
    keys = np.concatenate([np.arange(n) * 1.0 for n in lengths])  # 1 fps sampling
    perm = rng.permutation(groups.size)  # row order in a manifest is arbitrary
    groups, keys = groups[perm], keys[perm]
    budget = int(rng.integers(len(lengths), 3 * len(lengths) + 1))
    picks = spread(groups, keys, budget, gap_s=2.0)
    assert len(picks) == budget == len(set(picks.tolist()))
    assert set(groups[picks]) == set(range(len(lengths)))  # every video, since the budget allows
    assert _min_gap_within_videos(groups, keys, picks.tolist()) >= 2.0
    shares = np.bincount(groups[picks], minlength=len(lengths))
    fair = lengths * budget / lengths.sum()
    assert np.all(shares >= np.minimum(np.floor(fair) - 1, lengths)) and np.all(shares <= np.ceil(fair) + 1)


def test_spread_spaces_frames_evenly_in_time_and_names_the_gap_when_the_budget_cannot_fit():
    groups, keys = np.zeros(100, int), np.arange(100) * 0.5  # one 50 s video at 2 fps
    picks = spread(groups, keys, 4)
    np.testing.assert_allclose(np.sort(keys[picks]), [6.0, 18.5, 31.0, 43.5], atol=0.5)  # centres of 4 equal spans
    assert len(spread(groups, keys, 5, gap_s=10.0)) == 5
    with pytest.raises(ValueError, match=r"selection\.min_gap_s=20"):
        spread(groups, keys, 4, gap_s=20.0)  # 50 s hold at most 3 frames 20 s apart
    assert len(spread(groups, keys, 4, gap_s=20.0, allow_short=True)) == 3
    smaller = spread(np.array([0, 0, 1, 1, 1, 1, 1, 1]), np.array([0, 1, 0, 1, 2, 3, 4, 5.0]), 1)
    assert len(smaller) == 1 and smaller[0] >= 2  # one frame: the longest video gets it


def test_image_rows_have_no_time_so_no_gap_applies(demo_manifest):
    table, _ = read_manifest(demo_manifest)
    groups, keys, timed = video_times(table)
    assert timed.all() == ("#t=" in table["image_uri"][0].as_py())
    picks = spread(groups, keys, 6, timed=np.zeros_like(timed), gap_s=1e9)  # a gap nothing could meet
    assert len(picks) == 6


# ---- ingest defaults ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Four 12-second videos at 2 fps (64 px), and the masks people would return for every frame."""
    return write_archive(tmp_path_factory.mktemp("archive"))


def test_ingest_video_without_masks_puts_every_frame_in_the_pool(archive, tmp_path, capsys):
    videos, _ = archive
    assert main(["ingest", "video", "--videos", str(videos), "--fps", "1", "--out", str(tmp_path / "p.parquet")]) == 0
    table, _ = read_manifest(tmp_path / "p.parquet")
    assert set(table["split"].to_pylist()) == {"pool"} and table["mask_uri"].null_count == table.num_rows
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(videos / "case0.mp4", one)
    capsys.readouterr()
    assert main(["ingest", "video", "--videos", str(one), "--fractions", "0.7,0.15,0.15",
                 "--out", str(tmp_path / "q.parquet")]) == 2
    err = capsys.readouterr().err
    assert "--fractions 1,0,0" in err and "split='ranges'" not in err  # a flag this command takes
    assert main(["ingest", "video", "--videos", str(one), "--fractions", "1,0,0",
                 "--out", str(tmp_path / "q.parquet")]) == 0


# ---- the human loop through the CLI, from zero masks ------------------------------------------------------
def _people_return(masks: Path, csv_path: Path, dest: Path) -> list[dict[str, str]]:
    """What annotators hand back: one mask per listed frame (and nothing else)."""
    rows = list(csv.DictReader(open(csv_path)))
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for row in rows:
        shutil.copy(masks / f"{row['frame_id']}.png", dest)
    return rows


@pytest.mark.ray
@pytest.mark.slow
def test_unlabeled_archive_to_two_annotated_rounds(ray_local, archive, tmp_path, capsys):
    """ingest (no masks, test videos held out) -> run: the first batch and test frames -> export
    without predictions -> label -> run: round 0 trained and evaluated on the annotated test
    frames -> label -> run -> report with curves. Reruns while waiting pick nothing new."""
    videos, masks = archive
    pool = tmp_path / "pool.parquet"
    assert main(["ingest", "video", "--videos", str(videos), "--fps", "1", "--fractions", "0.5,0,0.5",
                 "--class-map", CLASS_MAP, "--out", str(pool)]) == 0
    table, _ = read_manifest(pool)
    assert table["mask_uri"].null_count == table.num_rows == 48
    out = tmp_path / "run"
    run = ["run", "--pool", str(pool), "--out", str(out),
           *_sets(*FAST, "loop.n_rounds=2", "loop.strategies=[random]", "loop.test_frames=6", "selection.min_gap_s=2")]

    assert main(run) == 3
    said = capsys.readouterr().out
    assert "the first batch: 4 frames and 6 test frames await annotation" in said
    assert f"alges label --out {out} --masks FOLDER" in said and "--strategy" not in said  # one batch: no bookkeeping
    listed = list(csv.DictReader(open(out / "initial" / "to_annotate.csv")))
    assert [r["split"] for r in listed] == ["pool"] * 4 + ["test"] * 6
    by_split = {s: [r["frame_id"] for r in listed if r["split"] == s] for s in ("pool", "test")}
    split_of = dict(zip(table["frame_id"].to_pylist(), table["split"].to_pylist()))
    assert all(split_of[f] == s for s, ids in by_split.items() for f in ids)
    video_of = dict(zip(table["frame_id"].to_pylist(), table["video_id"].to_pylist()))
    assert {video_of[f] for f in by_split["pool"]} == {"case0", "case1"}  # spread: every pool video
    assert {video_of[f] for f in by_split["test"]} == {"case2", "case3"}
    groups, keys, _ = video_times(table)
    index = {f: i for i, f in enumerate(table["frame_id"].to_pylist())}
    assert _min_gap_within_videos(groups, keys, [index[f] for f in by_split["pool"]]) >= 2
    record = json.loads((out / "initial" / "selection.json").read_text())
    assert record["rule"] == "spread" and record["where"]["device"] == "cpu"

    before = (out / "initial" / "selection.parquet").read_bytes()
    assert main(run) == 3  # rerun while waiting: the same batch, nothing picked again
    assert (out / "initial" / "selection.parquet").read_bytes() == before

    # the tools get the batch without predictions (no model yet), test frames marked
    assert main(["export", "--out", str(out), "--format", "labelstudio"]) == 0
    tasks = json.loads((out / "initial" / "export_labelstudio" / "tasks.json").read_text())
    assert [t["data"]["split"] for t in tasks] == ["pool"] * 4 + ["test"] * 6
    assert all("predictions" not in t for t in tasks)
    assert main(["export", "--out", str(out), "--format", "coco"]) == 0
    coco = json.loads((out / "initial" / "export_coco" / "instances.json").read_text())
    assert coco["annotations"] == [] and [i["split"] for i in coco["images"]] == ["pool"] * 4 + ["test"] * 6
    assert all((i["width"], i["height"]) == (64, 64) for i in coco["images"])
    assert main(["export", "--out", str(out), "--format", "cvat"]) == 0
    assert "<mask" not in (out / "initial" / "export_cvat" / "annotations.xml").read_text()

    _people_return(masks, out / "initial" / "to_annotate.csv", tmp_path / "returned0")
    assert main(["label", "--out", str(out), "--masks", str(tmp_path / "returned0")]) == 0
    assert main(["label", "--out", str(out), "--masks", str(tmp_path / "returned0")]) == 2  # nothing waits now
    assert "has no batch waiting for labels" in capsys.readouterr().err
    initial, _ = read_manifest(out / "initial" / "manifest.parquet")
    labeled = initial.filter(initial["labeled_round"].is_valid())["frame_id"].to_pylist()
    assert sorted(labeled) == sorted(by_split["pool"])
    test_masked = [f for f, s, m in zip(initial["frame_id"].to_pylist(), initial["split"].to_pylist(),
                                        initial["mask_uri"].to_pylist()) if s == "test" and m is not None]
    assert sorted(test_masked) == sorted(by_split["test"])  # evaluated, never trained on

    for r in (0, 1):
        assert main(run) == 3
        assert f"round {r} of random/seed 0: 3 frames await annotation" in capsys.readouterr().out
        round_dir = out / "random" / "seed_0" / f"round_{r:02d}"
        evaluation = json.loads((round_dir / "eval.json").read_text()) if r else json.loads(
            (out / "initial" / "seed_0" / "round_00" / "eval.json").read_text())
        assert evaluation["n_frames"] == 6 and 0 <= evaluation["dice"] <= 1  # the annotated test frames
        _people_return(masks, round_dir / "to_annotate.csv", tmp_path / f"returned{r + 1}")
        assert main(["label", "--out", str(out), "--masks", str(tmp_path / f"returned{r + 1}")]) == 0
    assert main(run) == 0
    results = list(csv.DictReader(open(out / "results.csv")))
    assert [int(r["n_labeled"]) for r in results] == [4, 7, 10] and all(r["dice"] for r in results)
    assert (out / "report" / "learning_curves.png").is_file()
    first = json.loads((out / "initial" / "record.json").read_text())
    assert first["strategy"] == "spread" and first["n_test"] == 6 and set(first["stages"]) == {"select", "label"}


@pytest.mark.ray
@pytest.mark.slow
def test_kcenter_cold_start_is_k_center_on_the_label_free_embedding_and_no_test_split_skips_evaluation(
        ray_local, archive, tmp_path, capsys):
    """kcenter: the Ray Data scoring job embeds the pool with the initial weights, and the picks
    are a brute-force farthest-first traversal of that embedding. The pool has no test split:
    the run trains and selects, evaluation is skipped and the report says so."""
    videos, masks = archive
    pool = tmp_path / "pool.parquet"
    assert main(["ingest", "video", "--videos", str(videos), "--fps", "1", "--class-map", CLASS_MAP,
                 "--out", str(pool)]) == 0
    out = tmp_path / "run"
    run = ["run", "--pool", str(pool), "--out", str(out),
           *_sets(*FAST, "loop.n_rounds=1", "loop.strategies=[random]", "loop.initial_strategy=kcenter")]
    assert main(run) == 3
    assert "the first batch: 4 frames await annotation" in capsys.readouterr().out
    picks = pq.read_table(out / "initial" / "selection.parquet").sort_by("pick_rank")

    shards = pq.read_table(out / "initial" / "scores", columns=["frame_id", "feature"]).sort_by("frame_id")
    x = np.stack(shards["feature"].to_numpy(zero_copy_only=False)).astype(np.float64)
    ids = shards["frame_id"].to_pylist()
    chosen = [int(np.argmax((x ** 2).sum(1)))]  # no labeled frame: the largest-norm row starts
    d2 = ((x - x[chosen[0]]) ** 2).sum(1)
    for _ in range(3):
        chosen.append(int(np.argmax(d2)))
        d2 = np.minimum(d2, ((x - x[chosen[-1]]) ** 2).sum(1))
    assert picks["frame_id"].to_pylist() == [ids[i] for i in chosen]
    np.testing.assert_allclose(picks["value"].to_numpy()[1:], np.sqrt([
        min(((x[c] - x[p]) ** 2).sum() for p in chosen[:k]) for k, c in enumerate(chosen) if k]), rtol=1e-4)
    record = json.loads((out / "initial" / "scores.json").read_text())
    assert record["n_rows"] == 48 and record["n_errors"] == 0

    for step in range(3):
        csv_path = out / "initial" / "to_annotate.csv" if step == 0 else \
            out / "random" / "seed_0" / f"round_{step - 1:02d}" / "to_annotate.csv"
        _people_return(masks, csv_path, tmp_path / f"returned{step}")
        assert main(["label", "--out", str(out), "--masks", str(tmp_path / f"returned{step}")]) == 0
        if main(run) == 0:
            break
    else:
        pytest.fail("the run did not finish")
    said = capsys.readouterr().out
    assert "not evaluated" in said and "nan" not in said.lower()
    headline = (out / "report" / "headline.md").read_text()
    assert headline.startswith("Not evaluated: no test frame of this run has a mask")
    assert "Not evaluated" in (out / "report" / "report.html").read_text()
    assert not (out / "report" / "learning_curves.png").exists()
    results = list(csv.DictReader(open(out / "results.csv")))
    assert [int(r["n_labeled"]) for r in results] == [4, 7] and all(r["dice"] == "" for r in results)


@pytest.mark.ray
@pytest.mark.slow
def test_a_driver_killed_after_picking_the_first_batch_resumes_with_the_same_picks(archive, tmp_path):
    """A real SIGKILL of `alges run` once the first batch's picks are written; the rerun hands off
    those picks (not new ones), and after the import a rerun continues from them."""
    from cli_runs import Watched, alges_env

    videos, masks = archive
    pool = tmp_path / "pool.parquet"
    assert main(["ingest", "video", "--videos", str(videos), "--fps", "1", "--fractions", "0.5,0,0.5",
                 "--class-map", CLASS_MAP, "--out", str(pool)]) == 0
    out = tmp_path / "run"
    run = ["run", "--pool", str(pool), "--out", str(out), *_sets(*FAST, "loop.n_rounds=1", "loop.strategies=[random]",
                                                                 "loop.initial_strategy=random")]
    cmd = Watched(run, env=alges_env())
    selection = out / "initial" / "selection.parquet"
    deadline = time.monotonic() + 120
    while not selection.exists() and cmd.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    cmd.signal(signal.SIGKILL)
    cmd.wait(timeout=60)
    picked = pq.read_table(selection)["frame_id"].to_pylist()
    assert main(run) == 3
    listed = [r["frame_id"] for r in csv.DictReader(open(out / "initial" / "to_annotate.csv"))]
    assert listed == picked
    _people_return(masks, out / "initial" / "to_annotate.csv", tmp_path / "returned")
    assert main(["label", "--out", str(out), "--masks", str(tmp_path / "returned")]) == 0
    assert main(run) == 3  # round 0 trained on the imported first batch, its picks wait
    labeled = read_manifest(out / "random" / "seed_0" / "manifest.parquet")[0]
    assert sorted(labeled.filter(pc.equal(labeled["labeled_round"], 0))["frame_id"].to_pylist()) == sorted(
        f for f, r in zip(listed, pq.read_table(selection)["split"].to_pylist()) if r == "pool")


# ---- imports without bookkeeping ----------------------------------------------------------------------
def test_label_names_the_batches_when_more_than_one_waits(pending_run, demo_manifest, tmp_path, capsys):
    """--strategy/--seed are needed only when several batches wait, and the error lists them."""
    exp = pending_run
    other = exp.round_dir("entropy", 0, 0)
    other.mkdir(parents=True)
    shutil.copy(exp.selection_path("random", 0, 0), exp.selection_path("entropy", 0, 0))
    shutil.copy(exp.manifest_path("random", 0), exp.manifest_path("entropy", 0))
    import yaml

    config = yaml.safe_load(exp.config_path.read_text())
    config["loop"]["strategies"] = ["random", "entropy"]
    exp.config_path.write_text(yaml.safe_dump(config))
    picks = pq.read_table(exp.selection_path("random", 0, 0))["frame_id"].to_pylist()
    table, encoding = read_manifest(demo_manifest)
    masks = tmp_path / "masks"
    masks.mkdir()
    for f, uri in zip(table["frame_id"].to_pylist(), table["mask_uri"].to_pylist()):
        if f in picks:
            shutil.copy(uri, masks / f"{f}.png")
    assert main(["label", "--out", str(exp.out), "--masks", str(masks)]) == 2
    err = capsys.readouterr().err
    assert "2 batches" in err and "--strategy random --seed 0" in err and "--strategy entropy --seed 0" in err
    assert main(["label", "--out", str(exp.out), "--masks", str(masks), "--strategy", "entropy"]) == 0
    assert main(["label", "--out", str(exp.out), "--masks", str(masks)]) == 0  # one left: no flags needed


# ---- the same loop through a real Label Studio server -----------------------------------------------------
NAMES = ["background", "liver", "fat", "gallbladder", "instrument"]
TOKEN_ENV = "ALGES_TEST_LABEL_STUDIO_TOKEN"
PROJECT = "alges cold start"


def _annotate_in_labelstudio(client, masks: Path, batch_key_part: str) -> list[dict]:
    """An annotator paints every task of the batch with its frame's true mask (through the REST API)."""
    from alges_dist.annotation.labelstudio import brush_results

    (project_id,) = [p["id"] for p in client.request("GET", "/api/projects")["results"] if p["title"] == PROJECT]
    tasks = [t for t in client.request("GET", f"/api/projects/{project_id}/tasks")
             if t["data"]["alges_batch"].endswith(batch_key_part)]
    for t in tasks:
        truth = np.array(Image.open(masks / f"{t['data']['frame_id']}.png"))
        client.request("POST", f"/api/tasks/{t['id']}/annotations",
                       {"result": brush_results(truth, NAMES), "lead_time": 20.0})
    return tasks


@pytest.mark.ray
@pytest.mark.slow
def test_unlabeled_archive_through_label_studio(ray_local, archive, server, tmp_path, monkeypatch, capsys):
    """From a video pool with zero masks: the first batch and its test frames are pushed without
    predictions, annotated through Label Studio's API, pulled; round 0 is trained and evaluated on
    the annotated test frames; the next batches are pushed with the model's masks; two rounds."""
    from alges_dist.annotation.labelstudio_api import LabelStudioClient

    monkeypatch.setenv(TOKEN_ENV, server.token)
    videos, masks = archive
    pool = tmp_path / "pool.parquet"
    assert main(["ingest", "video", "--videos", str(videos), "--fps", "1", "--fractions", "0.5,0,0.5",
                 "--class-map", CLASS_MAP, "--class-names", ",".join(NAMES), "--out", str(pool)]) == 0
    out = tmp_path / "run"
    run = ["run", "--pool", str(pool), "--out", str(out),
           *_sets(*FAST, "loop.n_rounds=2", "loop.strategies=[random]", "loop.test_frames=4",
                  "loop.oracle=labelstudio", f"labelstudio.url={server.url}", f"labelstudio.token_env={TOKEN_ENV}",
                  f"labelstudio.project={PROJECT}", f"labelstudio.document_root={server.document_root}")]
    client = LabelStudioClient(server.url, server.token)

    assert main(run) == 3
    assert "the first batch: 4 frames and 4 test frames await annotation in Label Studio" in capsys.readouterr().out
    tasks = _annotate_in_labelstudio(client, masks, "/first_batch")
    assert sorted(t["data"]["split"] for t in tasks) == ["pool"] * 4 + ["test"] * 4
    assert all(t["total_predictions"] == 0 for t in tasks)  # no model yet: nothing to pre-annotate
    assert main(["label", "--out", str(out), "--from", "labelstudio"]) == 0
    initial, encoding = read_manifest(out / "initial" / "manifest.parquet")
    from alges_dist.data.frames import load_mask

    for t in tasks:  # Label Studio's brush export, decoded, is the annotator's mask pixel for pixel
        row = initial["frame_id"].to_pylist().index(t["data"]["frame_id"])
        assert initial["split"][row].as_py() == t["data"]["split"]
        np.testing.assert_array_equal(load_mask(initial["mask_uri"][row].as_py(), encoding),
                                      np.array(Image.open(masks / f"{t['data']['frame_id']}.png")))

    for r in (0, 1):
        assert main(run) == 3
        assert f"round {r} of random/seed 0: 3 frames await annotation in Label Studio" in capsys.readouterr().out
        evaluation = out / ("initial/seed_0/round_00" if r == 0 else "random/seed_0/round_01") / "eval.json"
        assert json.loads(evaluation.read_text())["n_frames"] == 4  # the annotated test frames
        tasks = _annotate_in_labelstudio(client, masks, f"/random/seed_0/round_{r:02d}")
        assert len(tasks) == 3 and all(t["total_predictions"] == 1 for t in tasks)  # the model's masks
        assert main(["label", "--out", str(out), "--from", "labelstudio"]) == 0
    assert main(run) == 0
    results = list(csv.DictReader(open(out / "results.csv")))
    assert [int(r["n_labeled"]) for r in results] == [4, 7, 10] and all(0 <= float(r["dice"]) <= 1 for r in results)
    correction = json.loads((out / "random" / "seed_0" / "round_00" / "record.json").read_text())["correction"]
    assert correction["n_frames"] == 3 and correction["annotation_seconds"] == pytest.approx(60.0)
