"""One writer per run folder, honest resume, crash litter, exactly-once score shards (issue 10: 3, 4, 5, 15)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alges_dist.cli import main
from alges_dist.config import RESUMABLE_KEYS, load_config
from alges_dist.data.manifest import make_manifest, write_manifest
from alges_dist.data.manifest import MaskEncoding
from alges_dist.distributed.scoring_job import check_score_shards
from alges_dist.run_folder import (
    RunFolderBusy,
    RunFolderLock,
    RunLayout,
    SettingsChanged,
    check_settings,
    fingerprint,
    forced_changes,
)

HOLD = """
import sys, time
from alges_dist.run_folder import RunFolderLock
with RunFolderLock(sys.argv[1], "run --out " + sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def held(tmp_path):
    """A run folder whose lock another process holds (until the test kills it)."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    yield run, holder
    holder.kill()
    holder.wait()


def test_a_second_writer_fails_at_once_naming_the_holder(held):
    run, holder = held
    with pytest.raises(RunFolderBusy, match=rf"in use by pid {holder.pid} \(`alges run --out {run}`"):
        with RunFolderLock(run, "label --out x"):
            pass
    assert holder.poll() is None  # refused while the holder still holds it (sleeping 120 s): no waiting for it


def test_alges_run_on_a_busy_folder_is_refused_before_ray_starts(held, demo_manifest, monkeypatch, capsys):
    # issue 23.7: the refusal came after Ray's start and the pool check (19 s)
    from alges_dist.distributed.runtime import RaySession

    run, holder = held
    started = []

    def no_ray(self):
        started.append(self)
        raise RuntimeError("Ray started before the lock was taken")

    monkeypatch.setattr(RaySession, "__enter__", no_ray)
    assert main(["run", "--pool", str(demo_manifest), "--out", str(run)]) == 2
    assert f"in use by pid {holder.pid}" in capsys.readouterr().err and started == []


def test_a_refused_command_leaves_no_folder_the_lock_created(tmp_path):
    new = tmp_path / "new_run"
    with RunFolderLock(new, "run --out x"):
        assert (new / ".lock").exists()
    assert not new.exists()  # refused before writing anything (the pool check): as if never run
    with RunFolderLock(new, "run --out x"):
        (new / "config.yaml").write_text("{}")
    assert sorted(p.name for p in new.iterdir()) == [".lock", "config.yaml"]
    existing = tmp_path / "existing"
    existing.mkdir()
    with RunFolderLock(existing, "run --out x"):
        pass
    assert existing.is_dir()  # a folder the user made stays


def test_the_lock_goes_when_its_holder_dies_however_it_dies(held):
    run, holder = held
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with RunFolderLock(run, "run --out x"):
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()


def test_alges_label_on_a_busy_folder_fails_in_one_line_and_writes_nothing(pending_run, tmp_path, capsys):
    out = pending_run.out
    (out / "results.csv").write_text("strategy,seed,round,n_labeled,dice,miou,mdice\n"
                                     "random,0,0,8,0.5,0.4,0.5\nalges-img-kcenter,0,0,8,0.5,0.4,0.5\n")
    def state():  # every file but the lock, the report and the append-only logs of each command
        return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "report" not in p.parts
                and p.name not in (".lock", "run.log", "commands.jsonl")}

    before = state()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        masks = tmp_path / "masks"
        masks.mkdir()
        code = main(["label", "--out", str(out), "--strategy", "alges-img-kcenter", "--masks", str(masks)])
        err = capsys.readouterr().err
        assert code == 2 and f"in use by pid {holder.pid}" in err and len(err.strip().splitlines()) == 1
        # a reader takes no lock: the report renders while the writer holds the folder
        assert main(["report", str(out)]) == 0
    finally:
        holder.kill()
        holder.wait()
    assert state() == before


def test_taking_the_lock_removes_what_crashed_writers_left(tmp_path):
    run = tmp_path / "run"
    (run / "a" / "seed_0" / "round_00" / ".scores-1a2b").mkdir(parents=True)
    (run / "a" / "seed_0" / "round_00" / ".scores-1a2b" / "shard-0.parquet").write_bytes(b"half")
    litter = [run / ".results.csv.9f8e.tmp", run / "a" / "seed_0" / ".manifest.parquet.77aa.tmp",
              run / "a" / "seed_0" / "round_00" / ".labels.partial"]
    for path in litter:
        path.write_text("half-written")
    kept = [run / "results.csv", run / "a" / "seed_0" / "manifest.parquet", run / "notes.tmp"]
    for path in kept:
        path.write_text("finished")
    with RunFolderLock(run, "run"):
        pass
    assert not any(p.exists() for p in litter) and not (run / "a" / "seed_0" / "round_00" / ".scores-1a2b").exists()
    assert all(p.read_text() == "finished" for p in kept)


def test_taking_the_lock_leaves_the_temp_files_of_a_running_reader_alone(tmp_path):
    # issue 23.8: a writer taking the lock deleted `alges report`'s temp, whose os.replace then failed
    from alges_dist.data.atomic import atomic_path

    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = run / f".results.csv.{int(gone.stdout)}-9f8e.tmp"  # a writer that died mid-write
    dead.write_text("half-written")
    with atomic_path(run / "report" / "aulc.csv") as tmp:  # a report writing right now (a live process)
        tmp.write_text("strategy,aulc\n")
        with RunFolderLock(run, "run"):
            pass
        assert tmp.exists()
    assert (run / "report" / "aulc.csv").read_text() == "strategy,aulc\n" and not dead.exists()


def _fp(*overrides, sha="aa" * 32):
    return fingerprint(load_config(None, list(overrides)).model_dump(mode="json"), sha, ignore=RESUMABLE_KEYS)


def test_resume_with_other_settings_or_another_pool_is_refused_naming_them(tmp_path):
    layout = RunLayout(tmp_path / "run")
    layout.out.mkdir()
    assert check_settings(layout, _fp(), force=False) == []
    assert check_settings(layout, _fp(), force=False) == []  # the same settings resume
    # keys that do not change results may change (more rounds, more actors, another device)
    assert check_settings(layout, _fp("loop.n_rounds=5", "scoring.num_actors=2"), force=False) == []
    with pytest.raises(SettingsChanged) as refused:
        check_settings(layout, _fp("train.epochs=7", "selection.min_gap_s=5"), force=False)
    assert "train.epochs: 4 -> 7" in str(refused.value) and "selection.min_gap_s: 0.0 -> 5.0" in str(refused.value)
    assert "--force-config" in str(refused.value)
    with pytest.raises(SettingsChanged, match="pool manifest content: sha256 aaaaaaaaaaaa -> bbbbbbbbbbbb"):
        check_settings(layout, _fp(sha="bb" * 32), force=False)


def test_force_config_accepts_the_change_and_records_it(tmp_path):
    layout = RunLayout(tmp_path / "run")
    layout.out.mkdir()
    check_settings(layout, _fp(), force=False)
    assert check_settings(layout, _fp("train.epochs=7"), force=True) == ["train.epochs: 4 -> 7"]
    assert [c["changes"] for c in forced_changes(layout)] == [["train.epochs: 4 -> 7"]]
    assert check_settings(layout, _fp("train.epochs=7"), force=False) == []  # the new settings are the run's now


ENCODING = MaskEncoding(mode="threshold", threshold=127, class_names=["bg", "fg"])


@pytest.mark.parametrize(("shards", "message"), [
    ([["f0", "f1"], ["f2"]], None),
    ([["f0", "f1"], ["f1", "f2"]], r"frames \['f1'\] were scored more than once"),
    ([["f0"], ["f2"]], r"1 pool frames missing \(first \['f1'\]\)"),
    ([["f0", "f1", "f2", "t0"]], r"1 not in the pool \(first \['t0'\]\)"),
])
def test_score_shards_must_cover_the_pool_exactly_once(tmp_path, shards, message):
    manifest = tmp_path / "pool.parquet"
    write_manifest(make_manifest(frame_ids=["f0", "f1", "f2", "t0"], video_ids=["v"] * 4, frame_indices=[0, 1, 2, 3],
                                 image_uris=[f"/f/{i}.png" for i in range(4)], mask_uris=[None] * 4,
                                 splits=["pool", "pool", "pool", "test"]), manifest, ENCODING)
    scores = tmp_path / "scores"
    scores.mkdir()
    for k, ids in enumerate(shards):
        pq.write_table(pa.table({"frame_id": ids, "error": pa.nulls(len(ids), pa.string()),
                                 "worker": ["node/cpu"] * len(ids)}), scores / f"shard-{k}.parquet")
    if message is None:
        assert check_score_shards(str(scores), str(manifest), str(tmp_path / "errors.parquet"))["n_rows"] == 3
    else:
        with pytest.raises(ValueError, match=message):
            check_score_shards(str(scores), str(manifest), str(tmp_path / "errors.parquet"))
