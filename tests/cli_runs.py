"""Run `alges` commands as real processes and watch what they leave behind (processes, folders)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

FAST = ["data.image_size=[64, 64]", "train.epochs=1", "train.batch_size=4", "loop.initial_labeled=4",
        "loop.budget=3", "loop.n_rounds=1", "scoring.batch_size=8"]


REFERENCE_STRATEGY = "alges-img-kcenter"


def sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def reference_args(pool: Path, out: Path, *extra: str) -> list[str]:
    """`alges run` of the shared reference run (conftest's ``reference_run``) and of the runs
    compared with it: FAST, one strategy, one seed, two fits."""
    return ["run", "--pool", str(pool), "--out", str(out), *sets(*FAST, f"loop.strategies=[{REFERENCE_STRATEGY}]",
                                                                    *extra)]


def alges_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


class Watched:
    """An `alges` command in a subprocess, with every process of its tree recorded while it runs."""

    def __init__(self, args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "alges_dist.cli", *args], cwd=cwd, env=env or alges_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.seen: dict[int, float] = {}  # pid -> create_time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._record, daemon=True)
        self._thread.start()

    def _record(self) -> None:
        root = psutil.Process(self.proc.pid)
        while not self._stop.is_set():
            try:
                for p in root.children(recursive=True):
                    self.seen.setdefault(p.pid, p.create_time())
            except psutil.Error:
                pass
            time.sleep(0.1)

    def signal(self, signum: int = signal.SIGINT) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> tuple[int, str, str]:
        try:
            self.stdout, self.stderr = self.proc.communicate(timeout=timeout)
        finally:
            self._stop.set()
            self._thread.join()
        return self.proc.returncode, self.stdout, self.stderr

    def survivors(self, within_s: float = 10.0) -> list[str]:
        """Recorded processes still alive ``within_s`` after the command ended (same PID and start time)."""
        deadline = time.time() + within_s
        while True:
            alive = []
            for pid, created in self.seen.items():
                try:
                    p = psutil.Process(pid)
                    if abs(p.create_time() - created) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(f"{pid} {p.name()} {' '.join(p.cmdline())[:80]}")
                except psutil.NoSuchProcess:
                    continue
            if not alive or time.time() > deadline:
                return alive
            time.sleep(0.5)


def wait_for_line(path: Path, pattern: str, timeout: float, proc: subprocess.Popen | None = None) -> re.Match:
    """Poll a log file until a line matches (or the process ends, or time runs out)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists():
            match = re.search(pattern, path.read_text())
            if match:
                return match
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the command ended (exit {proc.returncode}) before {pattern!r} appeared in {path}")
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} did not appear in {path} within {timeout} s")


def session_dir(run_log: Path) -> Path:
    """The session folder of the last command that ran on the folder (run.log is appended to)."""
    return Path(re.findall(r"local Ray at \S+ \(auth: token, session (\S+),", run_log.read_text())[-1])


def raylet_pid(run_log: Path) -> int:
    return int(re.findall(r"raylet pid (\d+)", run_log.read_text())[-1])


def instance_processes(raylet: int) -> list[int]:
    """Every live process started by that raylet (Ray puts RAY_RAYLET_PID in their environment)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("RAY_RAYLET_PID") == str(raylet):
                found.append(p.pid)
        except psutil.Error:
            continue
    return found
