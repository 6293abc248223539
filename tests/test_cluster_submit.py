"""`ray start --head` on 127.0.0.1, `cluster/submit.sh` (ray job submit) of `alges round`, `ray stop`."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_a_round_on_a_local_head(demo_manifest, tmp_path):
    import ray

    # `ray stop` ends every Ray process on the machine: release the test session's first.
    if ray.is_initialized():
        ray.shutdown()
    if not (BIN / "ray").exists():
        pytest.skip(f"no `ray` executable beside {sys.executable}")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "HF_HUB_OFFLINE": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    dashboard = _free_port()
    subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={_free_port()}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", "--disable-usage-stats"],
        check=True, env=env, timeout=180, capture_output=True,
    )
    out = tmp_path / "run"
    try:
        res = subprocess.run(
            ["bash", "cluster/submit.sh", "--address", f"http://127.0.0.1:{dashboard}", "--",
             "round", "--pool", str(demo_manifest), "--out", str(out),
             "--set", "data.image_size=[64, 64]", "--set", "train.epochs=1", "--set", "loop.initial_labeled=4",
             "--set", "loop.budget=3", "--set", "loop.strategies=[alges-sem]"],
            cwd=REPO, env=env, timeout=900, capture_output=True, text=True,
        )
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, timeout=120, capture_output=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "succeeded" in (res.stdout + res.stderr).lower()
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["strategy"], r["round"], r["n_labeled"]) for r in rows] == [("alges-sem", "0", "4")]
    assert (out / "alges-sem" / "seed_0" / "round_00" / "selection.parquet").exists()
