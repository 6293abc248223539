"""A two-node Ray cluster on this machine: a CPU head (the driver's node) and a "GPU" node.

`ray start` brings up a head with no CPUs or GPUs (like the shipped clusters) and a second
node that offers one GPU resource (no CUDA here: workers fall back to the CPU and log it),
both with token auth. `cluster/submit.sh` (ray job submit, the token from ~/.ray) runs a
small archive-like config with `train.use_gpu: true` and two scoring actors. The round's
records must show training, scoring, evaluation and selection on the GPU node with a GPU
assigned, and the driver's peak memory under a bound that does not depend on the pool.
Both nodes are stopped by PID (never `ray stop`, which would end every Ray on the machine).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from cli_runs import sets

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DRIVER_RSS_BOUND_MB = 2048  # imports (torch, Ray, pyarrow) + orchestration; independent of the pool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_job_api(address: str, env: dict, timeout_s: float = 120) -> None:
    """The head's job API answers a little after `ray start` returns."""
    deadline = time.time() + timeout_s
    while True:
        res = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True,
                             text=True, timeout=60)
        if res.returncode == 0:
            return
        if time.time() > deadline:
            raise AssertionError(f"the job API at {address} did not answer: {res.stderr[-2000:]}")
        time.sleep(2)


def _stop_by_pid(temp_dir: Path) -> None:
    """End every process of the cluster under temp_dir: its gcs/raylets/agents (their command
    lines name the folder) and every worker of those raylets (RAY_RAYLET_PID)."""
    mine = [p for p in psutil.process_iter(["cmdline"]) if str(temp_dir) in " ".join(p.info["cmdline"] or [])]
    raylets = {str(p.pid) for p in mine}
    for p in psutil.process_iter():
        try:
            if p.environ().get("RAY_RAYLET_PID") in raylets:
                mine.append(p)
        except psutil.Error:
            continue
    for p in mine:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(mine, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def test_a_two_node_cluster_runs_every_heavy_stage_on_the_gpu_node(demo_manifest, tmp_path):
    if not (BIN / "ray").exists():
        pytest.skip(f"no `ray` executable beside {sys.executable}")
    temp_dir = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "token", "HF_HUB_OFFLINE": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = _free_port(), _free_port()
    start = [str(BIN / "ray"), "start", "--disable-usage-stats", f"--temp-dir={temp_dir}"]

    def node_ports() -> list[str]:  # two nodes on one machine: their agents must not share a port
        return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]

    out, people = tmp_path / "run", tmp_path / "people"
    fast = sets("data.image_size=[64, 64]", "train.epochs=1", "train.batch_size=4", "train.use_gpu=true",
                "scoring.num_actors=2", "scoring.gpus_per_actor=0.5", "scoring.batch_size=8",
                "selection.storage_dtype=bfloat16", "loop.initial_labeled=4", "loop.budget=3", "loop.n_rounds=1",
                "loop.strategies=[alges-img-kcenter]")

    def submit(*alges: str) -> subprocess.CompletedProcess:
        for _ in range(3):  # the head's job agent registers a little later than its job API answers
            res = subprocess.run(["bash", "cluster/submit.sh", "--address", f"http://127.0.0.1:{dashboard}", "--",
                                  *alges], cwd=REPO, env=env, timeout=1500, capture_output=True, text=True)
            if "No available agent" not in res.stdout + res.stderr:
                break
            time.sleep(10)
        return res

    waiting = []
    try:
        subprocess.run([*start, *node_ports(), "--head", f"--port={gcs}", "--num-cpus=0", "--num-gpus=0",
                        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}"],
                       check=True, env=env, timeout=300, capture_output=True)
        # the GPU node in a temp dir of its own, as on its own machine: sharing the head's, its
        # runtime-env agent garbage-collected the job's working_dir, the driver's cwd (issue 23)
        subprocess.run([*start[:-1], f"--temp-dir={temp_dir / 'gpu-node'}", *node_ports(),
                        f"--address=127.0.0.1:{gcs}", "--num-cpus=3", "--num-gpus=1"],
                       check=True, env=env, timeout=300, capture_output=True)
        _wait_for_job_api(f"http://127.0.0.1:{dashboard}", env)
        # two jobs at once, as a shared cluster runs them: a simulated-oracle run, and people in the
        # loop: that job stops after the hand-off (exit 3), labels come in with `alges label` where
        # the run folder is, and the same submission continues
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            simulated = pool.submit(submit, "run", "--pool", str(demo_manifest), "--out", str(out), *fast)
            human = ["run", "--pool", str(demo_manifest), "--out", str(people), *fast,
                     *sets("loop.oracle=human", "loop.initial_strategy=kcenter")]
            waiting.append(submit(*human))
            if waiting[0].returncode == 3:
                _return_masks(demo_manifest, people / "initial" / "to_annotate.csv", tmp_path / "masks0")
                from alges_dist.cli import main

                assert main(["label", "--out", str(people), "--masks", str(tmp_path / "masks0")]) == 0
                waiting.append(submit(*human))
            res = simulated.result()
    finally:
        _stop_by_pid(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "succeeded" in (res.stdout + res.stderr).lower()

    (command,) = [json.loads(line) for line in (out / "commands.jsonl").read_text().splitlines()]
    driver_node = command["driver_node_id"]
    assert driver_node and command["exit"] == 0
    assert command["driver_peak_rss_mb"] < DRIVER_RSS_BOUND_MB
    record = json.loads((out / "alges-img-kcenter" / "seed_0" / "round_00" / "record.json").read_text())
    stages = record["stages"]
    ran_on = {"train": stages["train"]["where"], "evaluate": stages["evaluate"]["where"],
              "select": stages["select"]["where"]}
    for stage, where in ran_on.items():
        assert where["node_id"] != driver_node and where["gpu_ids"], (stage, where)
        assert where["device"] == "cpu"  # a GPU resource without CUDA: the CPU fallback
    workers = stages["score"]["where"]
    assert len(workers) >= 1 and all(w.startswith(ran_on["train"]["node_id"]) and "/gpu" in w for w in workers)
    assert len({w["node_id"] for w in ran_on.values()}) == 1  # the one GPU node
    with open(out / "results.csv") as fh:
        assert len(fh.read().splitlines()) == 3  # header + rounds 0 and 1

    for res in waiting:
        assert res.returncode == 3, res.stdout[-4000:] + res.stderr[-4000:]
    assert len(waiting) == 2
    assert "the first batch: 4 frames await annotation" in waiting[0].stdout
    assert "round 0 of alges-img-kcenter/seed 0: 3 frames await annotation" in waiting[1].stdout
    first = json.loads((people / "initial" / "record.json").read_text())["stages"]
    for stage in ("select",):  # the k-center cold start's embedding and picks ran on the GPU node
        assert first[stage]["where"]["node_id"] != driver_node and first[stage]["where"]["gpu_ids"], first
    assert all("/gpu" in w for w in first["score"]["where"])


def _return_masks(manifest: Path, listed: Path, dest: Path) -> None:
    """People's masks for the listed frames (here the demo pool's own)."""
    import csv

    import pyarrow.parquet as pq

    table = pq.read_table(manifest, columns=["frame_id", "mask_uri"])
    mask_of = dict(zip(table["frame_id"].to_pylist(), table["mask_uri"].to_pylist()))
    dest.mkdir(parents=True)
    for row in csv.DictReader(open(listed)):
        shutil.copyfile(mask_of[row["frame_id"]], dest / f"{row['frame_id']}.png")
