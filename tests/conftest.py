"""Shared fixtures: seeds, the ../shared/data location, one session-wide local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No hub downloads in tests: asking for weights otherwise retries for 20-50 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(params=[0, 1, 2], ids=lambda s: f"seed{s}")
def seed(request) -> int:
    return request.param


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip with the reason when this checkout has none beside it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (tests on real frames need it)")
    return SHARED_DATA


_SESSIONS: list = []  # the RaySessions this test process started: ended at its end


def start_ray():
    """The tests' local Ray, started as every `alges` command starts its own (``RaySession``:
    127.0.0.1 only, token auth on, a fresh instance) and kept for the session (start-up costs
    4-6 s and ~0.75 GB). 4 logical CPUs on 2 cores: a scoring job needs 2 actors plus read
    tasks at once. Ray is imported, never skipped: a broken Ray fails the tests that need it.
    """
    import ray

    from alges_dist.distributed.runtime import RaySession

    if not ray.is_initialized():
        saved = dict(os.environ)
        _SESSIONS.append(RaySession(num_cpus=4).__enter__())
        # The instance's processes carry what RaySession set (its address, loopback only, local
        # fit settings); this process reaches it through ray.is_initialized(). The test process's
        # own environment stays as it was: `alges` subprocesses must start instances of their own
        # (RAY_ADDRESS would make them join this one), and a `ray start` cluster must not inherit
        # the loopback switch (it refuses a second node) or the local fit settings.
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)
    return ray


@pytest.fixture
def ray_local():
    """The session's local Ray (``start_ray``), started on first use."""
    return start_ray()


@pytest.fixture(scope="module")
def ray_local_module():
    """``ray_local`` for module-scoped fixtures."""
    return start_ray()


@pytest.fixture
def ray_session(ray_local):
    """The ``RaySession`` that started the running instance."""
    return _SESSIONS[-1]


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray_at_exit():
    yield
    for session in reversed(_SESSIONS):  # ray.shutdown, then any process left, then the session folder
        session.__exit__(None, None, None)


@pytest.fixture(scope="session")
def demo_manifest(tmp_path_factory) -> Path:
    """A small generated demo pool: 4 videos x 12 frames of 64 px (pool 24, val 12, test 12)."""
    from alges_dist.data.demo import demo_pool

    return demo_pool(tmp_path_factory.mktemp("demo_cache"), seed=0, n_videos=4, frames_per_video=12, size=64)


@pytest.fixture(scope="session")
def pending_run_template(demo_manifest, tmp_path_factory) -> Path:
    """A run folder on the demo pool whose round-0 batch waits for labels (built without Ray)."""
    from annotation_fixtures import pending_run

    out = tmp_path_factory.mktemp("annotation") / "run"
    pending_run(demo_manifest, out)
    return out


@pytest.fixture
def pending_run(pending_run_template, tmp_path):
    """A fresh copy of ``pending_run_template`` (an Experiment) for one test."""
    import shutil

    from annotation_fixtures import reopen

    shutil.copytree(pending_run_template, tmp_path / "run")
    return reopen(tmp_path / "run")


@pytest.fixture(autouse=True)
def _quick_suite_starts_no_process(monkeypatch):
    """`make test-quick` (ALGES_QUICK=1): a test that would start a process (a Ray instance, an
    `alges` command, make, a server) skips there, naming it; `make test` runs it."""
    if os.environ.get("ALGES_QUICK") != "1":
        yield
        return
    import subprocess

    def refuse(self, args, *rest, **kwargs):
        shown = args if isinstance(args, str) else " ".join(map(str, args))
        pytest.skip(f"starts a process ({shown[:60]}...): not in the quick suite, run by make test")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    yield


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real Label Studio server (``.venv-ls``) on 127.0.0.1, stopped by its PID at the end of the
    session: started once (~35 s), shared by the tests that use it (each in a project of its own)."""
    import labelstudio_server

    reason = labelstudio_server.missing_reason()
    if reason:
        pytest.skip(reason)
    if os.environ.get("ALGES_QUICK") == "1":
        pytest.skip("starts a process (label-studio): not in the quick suite, run by make test")
    with labelstudio_server.running(tmp_path_factory.mktemp("label-studio")) as running:
        yield running



@pytest.fixture(scope="session")
def reference_run(demo_manifest, tmp_path_factory):
    """One uninterrupted `alges run` (a real process: cli_runs.reference_args on the demo pool), shared
    by every test that compares an interrupted, killed or failed run's rerun with it. Returns the
    watched process (what it left behind) and its run folder."""
    from cli_runs import Watched, reference_args

    out = tmp_path_factory.mktemp("reference") / "run"
    watched = Watched(reference_args(demo_manifest, out))
    code, _, stderr = watched.wait(600)
    assert code == 0, stderr[-3000:]
    return watched, out


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto) on 127.0.0.1 for the session, stopped by its PID."""
    import s3_server as s3

    reason = s3.missing_reason()
    if reason:
        pytest.fail(reason)  # a dev dependency: its absence is a broken install, not a skip
    if os.environ.get("ALGES_QUICK") == "1":
        pytest.skip("starts a process (moto_server): not in the quick suite, run by make test")
    with s3.running(tmp_path_factory.mktemp("s3") / "moto.log") as running:
        running.make_buckets("unit", "frames", "pools", "archive", "side", "runs")
        yield running


@pytest.fixture
def s3(s3_server, monkeypatch):
    """``s3_server`` with its endpoint and credentials in this process's environment (as a user sets
    them); subprocesses get ``s3_server.environment()``."""
    for key, value in s3_server.environment({}).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return s3_server
