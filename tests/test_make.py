"""`make test` (issue 23.11): a Label Studio venv that cannot be built fails the target, unless
ALGES_SKIP_LABEL_STUDIO=1 opts out; then those tests skip and pytest lists why at the end."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no `make` on PATH")


def _make(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", str(REPO), f"LS_VENV={tmp_path / 'ls'}", *args], capture_output=True,
                          text=True, timeout=300)


def test_a_label_studio_that_cannot_be_built_fails_make(tmp_path):
    res = _make(f"LABEL_STUDIO={tmp_path / 'no-such-package'}", "label-studio", tmp_path=tmp_path)
    assert res.returncode != 0, res.stdout + res.stderr
    assert "could not be built" in res.stderr and "ALGES_SKIP_LABEL_STUDIO=1" in res.stderr
    assert not (tmp_path / "ls" / ".installed").exists()


def test_make_test_builds_label_studio_unless_told_to_skip_it(tmp_path):
    plan = _make("-n", "test", tmp_path=tmp_path).stdout  # -n: print the recipes, run none
    assert "label-studio==" in plan and "-m pytest" in plan
    skipped = _make("-n", "test", "ALGES_SKIP_LABEL_STUDIO=1", tmp_path=tmp_path).stdout
    assert "label-studio==" not in skipped and "-m pytest" in skipped


def test_pytest_lists_every_skip_reason_and_the_slowest_tests():
    addopts = re.search(r'^addopts = "(.*)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert "-ra" in addopts.split() and "--durations=25" in addopts.split()  # -ra: skips with reasons, too
