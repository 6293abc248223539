"""The cluster manifests parse and carry the keys KubeRay / `ray up` / `ray job submit` need."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import yaml

from alges_dist.cli import build_parser
from alges_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def _gpu_limits(pod_template: dict) -> list[str]:
    return [c["resources"]["limits"].get("nvidia.com/gpu") for c in pod_template["spec"]["containers"]]


def test_raycluster_has_head_and_gpu_workers_on_shared_storage():
    doc = next(yaml.safe_load_all((CLUSTER / "raycluster.yaml").read_text()))
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    spec = doc["spec"]
    head = spec["headGroupSpec"]["template"]
    assert head["spec"]["containers"][0]["image"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (workers,) = spec["workerGroupSpecs"]
    assert _gpu_limits(workers["template"]) == ["1"]
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    mounts = {m["mountPath"] for c in workers["template"]["spec"]["containers"] for m in c["volumeMounts"]}
    assert "/mnt/shared" in mounts


def test_rayjob_entrypoint_is_a_valid_alges_run_with_a_shipped_config():
    doc = next(yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text()))
    assert doc["kind"] == "RayJob"
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["alges", "run"]
    args = build_parser().parse_args(argv[1:])
    shipped = REPO / "configs" / Path(args.config).name  # the image copies configs/ to /opt/alges-dist
    cfg = load_config(shipped)
    assert cfg.train.use_gpu is True and str(args.out).startswith("/mnt/shared")
    assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"]
    assert _gpu_limits(doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]) == ["1"]


def test_ray_up_cluster_file_names_its_node_types():
    doc = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in doc, key
    assert doc["head_node_type"] in doc["available_node_types"]
    assert doc["provider"]["type"] == "aws"


def test_submit_script_is_valid_bash_and_rejects_missing_command():
    script = CLUSTER / "submit.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert res.returncode == 2 and "usage" in res.stderr
