"""Nothing outlives a command (issue 17): real `alges run` processes, their Ray instance, Ctrl-C.

Each command here starts its own local Ray instance in a subprocess; the test records the
command's whole process tree while it runs and checks that every one of those processes is
gone a few seconds after the command ends, and that the instance's session folder is
removed: after a finished run, after an error mid-run, and after SIGINT / SIGTERM during
training and during scoring, each followed by a resume that picks what an uninterrupted
run picks.
"""

from __future__ import annotations

import re
import shutil
import signal
import time

import pyarrow.parquet as pq
import pytest

from alges_dist.data.manifest import mark_labeled, read_manifest, set_uris, write_manifest
from cli_runs import REFERENCE_STRATEGY as STRATEGY
from cli_runs import Watched, instance_processes, raylet_pid, reference_args, session_dir, wait_for_line

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def picks(out):
    return pq.read_table(out / STRATEGY / "seed_0" / "round_00" / "selection.parquet")["frame_id"].to_pylist()


def assert_left_nothing(watched, out, *, keep_logs=False):
    assert watched.seen, "no process of the command was recorded"
    assert watched.survivors() == []
    log = out / "run.log"
    assert instance_processes(raylet_pid(log)) == []
    assert session_dir(log).exists() == keep_logs


def test_a_finished_run_leaves_no_ray_process_and_no_session_folder(reference_run):
    watched, out = reference_run
    assert_left_nothing(watched, out)
    assert "Reporting training result" not in watched.stdout + watched.stderr


def test_without_a_tty_the_console_gets_one_line_per_stage_and_no_ray_lines(reference_run):
    watched, out = reference_run
    lines = [line for line in watched.stderr.splitlines() if line.strip()]
    for stage in ("train", "evaluate", "score", "select"):
        assert any(re.fullmatch(rf"{STRATEGY} seed 0 round 0: {stage} done in \d+\.\d s( \(.*\))?", line)
                   for line in lines), (stage, lines)
    noise = [line for line in lines if re.search(r"core_worker|TrainingReport|Reporting training result|"
                                                 r"to opt out|\r|it/s\]", line)]
    assert noise == []
    assert (out / "ray-driver.log").exists()  # where Ray's C++ core writes in the driver


def interrupt(out, demo_manifest, stage, signum):
    """Start the reference run's command in ``out``, send ``signum`` inside ``stage``'s Ray job."""
    watched = Watched(reference_args(demo_manifest, out))
    wait_for_line(out / "run.log", rf"{STRATEGY} seed 0 round 0: {stage}\n", 600, watched.proc)
    time.sleep(1.5)  # inside the stage's Ray job
    watched.signal(signum)
    code, _, stderr = watched.wait(120)
    assert code == 130, stderr[-3000:]
    assert f"during {STRATEGY} seed 0 round 0: {stage}" in stderr and "rerun the same command to resume" in stderr
    assert stderr.count("interrupted") == 1, stderr[-2000:]  # one line, not echoed by log handlers
    assert "interrupted" in (out / "run.log").read_text()
    assert_left_nothing(watched, out)
    round0 = out / "initial" / "seed_0" / "round_00"
    assert not (round0 / ("model.pt" if stage == "train" else "scores.json")).exists()  # nothing half-done counts


def test_interrupts_stop_within_seconds_and_the_rerun_finishes_with_the_same_picks(
        reference_run, demo_manifest, tmp_path):
    # one folder, interrupted twice: Ctrl-C in training, then (resumed) SIGTERM in scoring
    out = tmp_path / "run"
    interrupt(out, demo_manifest, "train", signal.SIGINT)
    interrupt(out, demo_manifest, "score", signal.SIGTERM)
    again = Watched(reference_args(demo_manifest, out))
    code, _, stderr = again.wait(600)
    assert code == 0, stderr[-3000:]
    assert_left_nothing(again, out)
    assert picks(out) == picks(reference_run[1])


def test_an_error_mid_run_leaves_no_ray_process_and_the_failed_stage_does_not_count(demo_manifest, tmp_path):
    # (that the rerun fails the same way again: test_faults.test_a_failed_scoring_stage_is_not_done_on_resume)
    table, encoding = read_manifest(demo_manifest)
    pool_ids = [f for f, s in zip(table["frame_id"].to_pylist(), table["split"].to_pylist()) if s == "pool"]
    table = mark_labeled(table, pool_ids[1:5], 0)  # the initial set; the broken frame is not in it
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    pool = tmp_path / "pool.parquet"
    write_manifest(set_uris(table, "image_uri", {pool_ids[0]: str(broken)}), pool, encoding)
    out = tmp_path / "run"
    watched = Watched(reference_args(pool, out, "scoring.max_error_rate=0"))
    code, _, stderr = watched.wait(600)
    assert code == 2, stderr[-3000:]
    assert "failed to decode, more than scoring.max_error_rate=0.0%" in stderr
    assert "Traceback" not in stderr
    assert_left_nothing(watched, out)
    assert not (out / "initial" / "seed_0" / "round_00" / "scores").exists()
    assert not list(out.rglob(".scores-*"))


def test_two_runs_side_by_side_each_talk_to_their_own_instance_and_keep_their_logs(
        reference_run, demo_manifest, tmp_path):
    outs = [tmp_path / f"run{i}" for i in range(2)]
    watched = [Watched([*reference_args(demo_manifest, out), "--num-cpus", "2", "--keep-ray-logs"]) for out in outs]
    for w in watched:
        code, _, stderr = w.wait(1200)
        assert code == 0, stderr[-3000:]
    sessions = [session_dir(out / "run.log") for out in outs]
    try:
        assert sessions[0] != sessions[1]
        for w, out in zip(watched, outs):
            assert_left_nothing(w, out, keep_logs=True)  # --keep-ray-logs: the session folder stays
            assert picks(out) == picks(reference_run[1])  # as alone, only slower
        for session in sessions:
            for log in session.rglob("*"):
                if log.is_file():
                    assert "multiple active Ray instances" not in log.read_text(errors="ignore"), log
    finally:
        for session in sessions:
            shutil.rmtree(session, ignore_errors=True)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signals_during_the_cleanup_wait_until_it_is_done(tmp_path, monkeypatch, signum):
    # issue 23.9: a scheduler's second SIGTERM interrupted end_processes and left the session folder
    import os

    import ray

    from alges_dist.distributed import runtime

    session = runtime.RaySession()
    session.owned, session.session_dir = True, tmp_path / "session_2026"
    session.session_dir.mkdir()
    monkeypatch.setattr(ray, "shutdown", lambda: None)  # the tests' own instance stays

    def signalled_twice(*args, **kwargs):
        os.kill(os.getpid(), signum)
        os.kill(os.getpid(), signum)
        return []

    monkeypatch.setattr(runtime, "end_processes", signalled_twice)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    runtime.raise_on_signals()  # as in `alges`: SIGTERM and SIGINT raise Interrupted
    try:
        session.__exit__(runtime.Interrupted, runtime.Interrupted("SIGTERM"), None)  # stopping on the first one
        assert not session.session_dir.exists()
        session.session_dir.mkdir()
        with pytest.raises(runtime.Interrupted, match=signal.Signals(signum).name):  # a clean exit: raised after
            session.__exit__(None, None, None)
        assert not session.session_dir.exists()
        assert signal.getsignal(signal.SIGTERM) is signal.getsignal(signal.SIGINT)  # raise_on_signals' handler back
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

