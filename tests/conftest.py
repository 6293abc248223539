"""Shared fixtures: seeds, the ../shared/data location, one session-wide local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No hub downloads in tests: asking for weights otherwise retries for 20-50 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

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


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray runtime for the whole session (start-up costs 4-6 s and ~0.75 GB).

    4 logical CPUs on 2 cores: a scoring job needs 2 actors plus read tasks at once.
    """
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
