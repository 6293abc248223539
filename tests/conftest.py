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


@pytest.fixture
def ray_local():
    """A local Ray runtime shared by the session (start-up costs 4-6 s and ~0.75 GB).

    Started on first use and kept; a test that needs Ray stopped (the `ray start`
    cluster test) shuts it down and the next user starts it again. 4 logical CPUs on
    2 cores: a scoring job needs 2 actors plus read tasks at once.
    """
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        context = ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        _SESSION_DIRS.append(context.address_info["session_dir"])
    return ray


_SESSION_DIRS: list[str] = []  # the instances this test process started: removed at its end


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray_at_exit():
    yield
    import shutil
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()
    for folder in _SESSION_DIRS:
        shutil.rmtree(folder, ignore_errors=True)


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
