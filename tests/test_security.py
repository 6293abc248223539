"""Safe by default (issue 10): local Ray on loopback with token auth, locked-down cluster files,
an allow-listed job upload, a pinned non-root image, spreadsheet-safe hand-off CSVs."""

from __future__ import annotations

import concurrent.futures
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import yaml

from cli_runs import FAST, Watched, alges_env, sets, wait_for_line

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
# the hostile client's setting, spelled so that a grep for auth switched off finds only real uses
CLIENT_WITHOUT_AUTH = "dis" "abled"


def _connect(address: str, **env: str) -> subprocess.CompletedProcess:
    """A second process that tries to join the instance and run code there."""
    code = textwrap.dedent(f"""
        import ray
        ray.init(address={address!r}, logging_config=ray.LoggingConfig(log_level="ERROR"))
        print("RAN", ray.get(ray.remote(lambda: 6 * 7).remote()))
    """)
    base = {k: v for k, v in alges_env().items() if not k.startswith("RAY_AUTH")}
    # the client must dial 127.0.0.1 itself (Ray would swap it for the node IP) and give up soon
    base.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_gcs_rpc_server_connect_timeout_s="5")
    return subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                          timeout=180)


def _network_addresses() -> list[str]:
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")]


def _listening(pids) -> list:
    """(pid, address) of every listening inet socket of these processes (gone ones skipped)."""
    found = []
    for pid in pids:
        try:
            found += [(pid, c.laddr) for c in psutil.Process(pid).net_connections("inet")
                      if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.mark.ray
@pytest.mark.slow
def test_local_ray_listens_on_loopback_and_refuses_clients_without_the_token(demo_manifest, tmp_path):
    out = tmp_path / "run"
    watched = Watched(["train", "--pool", str(demo_manifest), "--out", str(out),
                       *sets(*FAST, "train.epochs=500")])  # a long fit: the instance is up while we knock
    try:
        gcs = wait_for_line(out / "run.log", r"local Ray at (\S+) ", 300, watched.proc).group(1)
        wait_for_line(out / "run.log", r"round 0: train\n", 300, watched.proc)
        listening = _listening(list(watched.seen))
        assert listening, "the instance's processes listen on no port?"
        exposed = [(pid, a) for pid, a in listening if a.ip not in LOOPBACK]
        assert exposed == [], f"Ray ports open beyond loopback: {exposed}"
        assert gcs.startswith("127.0.0.1:")

        port = int(gcs.rsplit(":", 1)[1])
        for address in _network_addresses():  # from the network, the GCS port is not even open
            with socket.socket() as s, pytest.raises(ConnectionRefusedError):
                s.settimeout(5)
                s.connect((address, port))
        clients = {  # three clients at once (each a Python + Ray start-up)
            "no token": {"RAY_AUTH_MODE": CLIENT_WITHOUT_AUTH},
            "wrong token": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32},
            "the user's token": {"RAY_AUTH_MODE": "token"},  # the token this user's commands write to ~/.ray
        }
        with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
            done = {name: pool.submit(_connect, gcs, **env) for name, env in clients.items()}
            no_token, wrong, right = (done[name].result() for name in clients)
        assert no_token.returncode != 0 and "RAN" not in no_token.stdout
        assert wrong.returncode != 0 and "RAN" not in wrong.stdout
        assert "RAN 42" in right.stdout, right.stderr[-2000:]  # the same client with the token runs code
    finally:
        watched.signal(signal.SIGINT)
        watched.wait(120)


@pytest.mark.ray
def test_the_test_suites_own_ray_listens_on_loopback_only_and_wants_the_token(ray_session):
    # issue 23.10: conftest's plain ray.init(num_cpus=4) listened on the machine's network address
    listening = _listening(ray_session.record_processes())
    assert listening, "the instance's processes listen on no port?"
    assert [(pid, a) for pid, a in listening if a.ip not in LOOPBACK] == []
    gcs = re.search(r"local Ray at (\S+) \(auth: token", ray_session.description).group(1)
    assert gcs.startswith("127.0.0.1:")
    no_token = _connect(gcs, RAY_AUTH_MODE=CLIENT_WITHOUT_AUTH)
    assert no_token.returncode != 0 and "RAN" not in no_token.stdout


# RAY_AUTH_MODE set to "disabled" in any spelling: shell/env (=), YAML or a dict (:), a call
# such as monkeypatch.setenv or os.environ.setdefault (,), a Kubernetes env entry (name/value)
AUTH_OFF = re.compile(r"""RAY_AUTH_MODE["'\]]*\s*(?:[:=,]|\n\s*-?\s*value\s*:)\s*["']?""" + CLIENT_WITHOUT_AUTH)


def test_the_auth_grep_catches_every_spelling():
    off = CLIENT_WITHOUT_AUTH
    for form in (f"export RAY_AUTH_MODE={off}", f"RAY_AUTH_MODE: {off}", f'env: {{"RAY_AUTH_MODE": "{off}"}}',
                 f'monkeypatch.setenv("RAY_AUTH_MODE", "{off}")', f"os.environ['RAY_AUTH_MODE'] = '{off}'",
                 f"- name: RAY_AUTH_MODE\n  value: {off}", f'dict(RAY_AUTH_MODE="{off}")'):
        assert AUTH_OFF.search(form), form
    assert not AUTH_OFF.search("RAY_AUTH_MODE: token") and not AUTH_OFF.search("RAY_AUTH_MODE=CLIENT_WITHOUT_AUTH")


def test_no_file_switches_ray_auth_off():
    paths = [REPO / "Makefile", REPO / "README.md", REPO / "pyproject.toml", *REPO.glob(".ci/**/*"),
             *REPO.glob("tests/*.py"), *REPO.glob("alges_dist/**/*.py"), *REPO.glob("scripts/*"),
             *REPO.glob("configs/**/*"), *REPO.glob("docs/**/*"), *CLUSTER.glob("**/*")]
    assert any(p.parent.name == "configs" for p in paths) and any(p.parent == CLUSTER for p in paths)
    for path in paths:
        if path.is_file():
            assert not AUTH_OFF.search(path.read_text(errors="ignore")), path


def _docs(name):
    return list(yaml.safe_load_all((CLUSTER / name).read_text()))


def _pods(doc):
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]], spec


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_files_require_the_token_bind_the_dashboard_to_loopback_and_run_as_non_root(name):
    ray_doc, *others = _docs(name)
    groups, spec = _pods(ray_doc)
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    for group in groups:
        pod = group["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
            env = {e["name"]: e for e in container.get("env", [])}
            if spec.get("authOptions", {}).get("mode") != "token":  # else the operator injects them
                assert env["RAY_AUTH_MODE"]["value"] == "token"
                assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]  # from a Secret, never inline
            assert all(p.get("containerPort") != 8265 for p in container.get("ports", []))
    (policy,) = [d for d in others if d["kind"] == "NetworkPolicy"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": selector}}]}]
    for group in groups:  # the policy selects every Ray pod of the cluster
        labels = {**group["template"].get("metadata", {}).get("labels", {}), "ray.io/cluster": ray_doc["metadata"]["name"]}
        assert selector.items() <= labels.items()


def test_ray_up_file_limits_ssh_to_a_configurable_range_and_uses_least_privilege_profiles():
    doc = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    perms = doc["provider"]["security_group"]["IpPermissions"]
    cidrs = [r["CidrIp"] for p in perms for r in p["IpRanges"]]
    assert cidrs and "0.0.0.0/0" not in cidrs
    assert "ADMIN_CIDR" in (CLUSTER / "aws.yaml").read_text()
    for node in doc["available_node_types"].values():
        assert "IamInstanceProfile" in node["node_config"]
    assert "--dashboard-host=127.0.0.1" in " ".join(doc["head_start_ray_commands"])
    assert "-e RAY_AUTH_MODE=token" in doc["docker"]["run_options"]
    policies = json.loads((CLUSTER / "aws-iam.json").read_text())
    for name in ("worker_policy", "head_policy"):
        for statement in policies[name]["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            assert not any(a.endswith(":*") or a == "*" for a in actions), statement
            if any(a.startswith("s3:") for a in actions):
                assert statement["Resource"].startswith("arn:aws:s3:::BUCKET")


def test_submit_uploads_an_allow_list_not_secrets_or_data(tmp_path):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for part in ("alges_dist", "configs", "cluster", "pyproject.toml", "README.md"):
        subprocess.run(["cp", "-r", str(REPO / part), str(checkout / part)], check=True)
    secrets = {".env": "TOKEN=x", ".netrc": "machine x", "credentials.json": "{}", "id_rsa": "KEY",
               "frames/f1.png": "PNG", "runs/r/model.pt": "W", "alges_dist/.env": "TOKEN=y"}
    for rel, text in secrets.items():
        (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
        (checkout / rel).write_text(text)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    record = tmp_path / "uploaded.txt"
    (fake_bin / "ray").write_text(f"#!/usr/bin/env bash\necho \"AUTH=$RAY_AUTH_MODE\" > {record}\n"
                                  f"find . -type f | sort >> {record}\n")
    (fake_bin / "ray").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    res = subprocess.run(["bash", str(checkout / "cluster" / "submit.sh"), "--", "run", "--out", "/mnt/x"],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    uploaded = record.read_text().split("\n")
    assert uploaded[0] == "AUTH=token"
    files = {line[2:] for line in uploaded[1:] if line}
    assert "alges_dist/cli.py" in files and "configs/demo.yaml" in files and "pyproject.toml" in files
    assert not {f for f in files if not (f.startswith(("alges_dist/", "configs/")) or f in ("pyproject.toml", "README.md"))}
    assert not files & set(secrets)


def test_image_pins_its_base_and_dependencies_and_drops_sudo():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:[\w.-]+@\$\{RAY_IMAGE_DIGEST\}$", text, re.M)
    assert "USER ray" in text.split("FROM", 1)[1].rsplit("RUN pip", 1)[0]
    assert "/etc/sudoers.d" in text
    lock = (CLUSTER / "requirements-gpu.lock").read_text().split("\n")
    pins = [line for line in lock if line and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[\w.+-]+", p) for p in pins)
    assert {"torch==2.14.1", "torchvision==0.29.1"} <= set(pins)
    assert "--no-deps" in text


def test_handoff_csv_cells_cannot_run_as_spreadsheet_formulas(tmp_path, demo_manifest):
    import pyarrow as pa

    from alges_dist.data.manifest import Manifest, read_manifest
    from alges_dist.handoff import csv_cell, write_batch

    for bad in ('=HYPERLINK("http://x")', "+1", "-2+3", "@SUM(A1)", "\tx", "\rx"):
        assert csv_cell(bad) == "'" + bad
    assert csv_cell("video01_000080") == "video01_000080" and csv_cell(3) == 3
    table, encoding = read_manifest(demo_manifest)
    ids = table["frame_id"].to_pylist()
    ids[0] = "=1+2"  # frame ids are free text from file names
    table = table.set_column(0, "frame_id", pa.array(ids, pa.string()))
    write_batch(tmp_path, ["=1+2"], Manifest(table, encoding))
    rows = list(csv.DictReader(open(tmp_path / "to_annotate.csv")))
    assert rows[0]["frame_id"] == "'=1+2"
