"""A real Label Studio server for tests: offline, sqlite, on 127.0.0.1, stopped by its PID.

The server runs from ``.venv-ls`` (``make label-studio``; Label Studio's pins clash with
ours). Its first start migrates a fresh database (about a minute); that data folder is
kept as a template under ``.venv-ls/`` with the test user and its token, and every test
starts from a copy (seconds). The environment switches off everything that would call
out (Sentry, the PyPI version check, analytics) and turns on local-files serving and
legacy API tokens (off by default in 1.23), as ../shared/ANNOTATION_TOOLS.md verified.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

REPO_ROOT = Path(__file__).resolve().parents[1]
LS_VENV = REPO_ROOT / ".venv-ls"
LABEL_STUDIO = LS_VENV / "bin" / "label-studio"
TEMPLATE = LS_VENV / "data-template"
USER = "alges-test@example.com"
START_SECONDS = 300  # a cold start migrates the database: ~70 s on an idle 2-core machine


class Server(NamedTuple):
    url: str
    token: str
    document_root: Path
    pid: int
    log: Path


def missing_reason() -> str | None:
    """Why no server can start here (None: it can)."""
    if LABEL_STUDIO.exists():
        return None
    log = REPO_ROOT / ".venv-ls.log"
    why = f"; last lines of {log}: {log.read_text()[-300:]!r}" if log.exists() else ""
    return (f"{LABEL_STUDIO} is absent: `make label-studio` builds it (make test runs it first and fails without "
            f"it unless ALGES_SKIP_LABEL_STUDIO=1){why}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment(data_dir: Path, document_root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DJANGO_"))}
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir), "DJANGO_DB": "sqlite", "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "", "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
    })
    return env


def _start(data_dir: Path, document_root: Path, token: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(LABEL_STUDIO), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
             "--username", USER, "--password", secrets.token_hex(12), "--user-token", token],
            env=_environment(data_dir, document_root), stdout=out, stderr=subprocess.STDOUT, cwd=data_dir)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_SECONDS
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"label-studio exited with {proc.returncode}; log {log}: {log.read_text()[-1500:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if json.loads(response.read()).get("status") == "UP":
                        return proc, url
            except (OSError, ValueError):
                pass
            time.sleep(1)
        raise RuntimeError(f"label-studio did not answer {url}/health within {START_SECONDS} s; log {log}")
    except BaseException:
        _stop(proc)  # never leave a half-started server behind
        raise


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server by its PID (it runs as one process, without an autoreload child)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def template() -> tuple[Path, str]:
    """The migrated data folder and its user's token, made on first use (renamed into place when done)."""
    if not (TEMPLATE / "token").is_file():
        building = TEMPLATE.with_name(f".{TEMPLATE.name}.{os.getpid()}")
        shutil.rmtree(building, ignore_errors=True)
        (building / "data").mkdir(parents=True)
        token = secrets.token_hex(16)  # a throwaway local server's token, kept beside its database
        proc, _ = _start(building / "data", building, token, building / "first-start.log")
        _stop(proc)  # the database is migrated and the user and token exist
        (building / "token").write_text(token)
        try:
            building.rename(TEMPLATE)
        except OSError:  # another test process finished first: use its template
            shutil.rmtree(building, ignore_errors=True)
    return TEMPLATE / "data", (TEMPLATE / "token").read_text()


class running:
    """``with running(tmp_path) as server:`` a server on a copy of the template, stopped on exit
    (also when the test fails)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        data, token = template()
        shutil.copytree(data, self.folder / "ls-data")
        root = self.folder / "ls-root"
        root.mkdir()
        log = self.folder / "label-studio.log"
        self.proc, url = _start(self.folder / "ls-data", root, token, log)
        return Server(url, token, root, self.proc.pid, log)

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            _stop(self.proc)
