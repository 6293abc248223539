"""Connect to Ray: a cluster when RAY_ADDRESS is set, else a local instance of this command's own.

The same commands run on a laptop, in CI and on a cluster; only this module differs.

Local mode (no RAY_ADDRESS) starts a fresh instance (``address="local"``: never an
instance another command started), bound to 127.0.0.1 with Ray's token auth on, and
ends it when the command ends, however it ends: ``RaySession.__exit__`` shuts Ray down,
then ends by PID any process of the instance that outlived the shutdown (a worker
orphaned when its raylet died) and removes the instance's session folder. Cluster mode
leaves the cluster alone: disconnecting ends the actors and tasks this driver submitted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Ray Train V2 settings for short local fits, measured in scripts/bench_local.py: the
# controller polls its workers every 2 s by default, and the preemption watcher and
# metrics actors cost a worker process each per fit. Ray Train reads them from the driver's
# environment at each fit() and forwards them to its controller; clusters keep the defaults.
LOCAL_TRAIN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.05",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    # ours (distributed/training.py): no placement-group cleaner actor, whose job (a crashed
    # controller's placement group) ends with a local instance anyway
    "ALGES_LOCAL_FITS": "1",
}


def bind_to_loopback() -> None:
    """Make a local Ray instance listen on 127.0.0.1 only (GCS, raylet, object manager, agents).

    Ray binds its gRPC ports to the node IP's interfaces; it uses the loopback address as
    node IP only where it considers clusters unsupported (Windows/macOS), which its
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` switch turns on here too. The constant is read
    at import, so it is set on the imported module as well; the environment variable
    carries it to every process the instance starts. Checked with the listening sockets of
    the instance's processes in tests/test_security.py. Token auth stays on either way.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def _drop_opt_out_notice(record: logging.LogRecord) -> bool:
    # Ray 2.60 announces its default token auth at every local start and how to switch it
    # off; auth stays on here, the run log says so ("auth: token"), the console stays quiet.
    return "to opt out" not in record.getMessage()


def on_cluster() -> bool:
    return bool(os.environ.get("RAY_ADDRESS"))


def in_local_instance() -> bool:
    """This driver runs inside a local instance of its own (``RaySession`` started it: its settings
    are in the environment while the session lasts; RAY_ADDRESS then names the local instance)."""
    return os.environ.get("ALGES_LOCAL_FITS") == "1"


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: the command stops where it is (the run folder stays resumable)."""


def raise_on_signals() -> None:
    """SIGTERM (a job scheduler stopping us) raises like Ctrl-C does, so ``finally`` blocks run."""
    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


class RaySession:
    """``with RaySession(): ...`` starts or joins Ray for one command and cleans up after it.

    Inside a process where Ray is already initialized (tests calling ``cli.main``), the
    session uses that instance and leaves it running.
    """

    def __init__(self, *, num_cpus: int | None = None, dashboard: bool = False, keep_logs: bool = False):
        self.num_cpus, self.dashboard, self.keep_logs = num_cpus, dashboard, keep_logs
        self.owned = False  # this session started the instance (and must end it)
        self.session_dir: Path | None = None
        self.raylet_pid: int | None = None
        self.pids: set[int] = set()  # the instance's processes, recorded as they are seen
        self.started_at = 0.0
        self.description = "the Ray instance already running in this process"
        self._saved_env: dict[str, str | None] = {}

    def __enter__(self) -> RaySession:
        import ray

        if ray.is_initialized():
            return self
        if on_cluster():
            # A job's runtime_env (working_dir, env_vars) comes from `ray job submit`.
            ray.init(logging_config=ray.LoggingConfig(log_level="WARNING"))
            self.description = f"joined the Ray cluster at {os.environ['RAY_ADDRESS']}"
            log.info(self.description)
            return self
        bind_to_loopback()
        notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
        if _drop_opt_out_notice not in notice.filters:
            notice.addFilter(_drop_opt_out_notice)
        self.started_at = time.time()
        self.owned = True
        # The instance's own address in every process it starts: Ray's internals that look an
        # instance up (Ray Train's placement-group cleaner, the state API) then find this one,
        # never another command's ("Found multiple active Ray instances"). RAY_GCS_SERVER_PORT
        # makes the new head listen where RAY_ADDRESS says; address="local" ignores RAY_ADDRESS.
        self._saved_env = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT", *LOCAL_TRAIN_ENV)}
        port = _free_port()
        os.environ.update(RAY_GCS_SERVER_PORT=str(port), RAY_ADDRESS=f"127.0.0.1:{port}")
        # Ray's own INFO lines (every worker start, every report) drown the command's
        # console; worker output stays in the instance's log files (--keep-ray-logs keeps
        # them) and worker errors reach the driver as exceptions.
        try:
            info = ray.init(
                address="local",
                num_cpus=self.num_cpus,
                include_dashboard=self.dashboard,
                dashboard_host="127.0.0.1",
                log_to_driver=False,
                logging_config=ray.LoggingConfig(log_level="WARNING"),
            )
        except BaseException:
            self._restore_env()
            raise
        for key, value in LOCAL_TRAIN_ENV.items():  # after ray.init: the driver's fits only
            os.environ.setdefault(key, value)
        node = ray._private.worker.global_worker.node
        self.session_dir = Path(node.get_session_dir_path())
        self.raylet_pid = _raylet_pid(node)
        # right after ray.init this driver's new children are the instance's own (gcs, raylet, ...)
        self.pids = {p.pid for p in _children_since(self.started_at)}
        self.record_processes()
        self.description = (f"local Ray at {info.address_info['gcs_address']} (auth: token, session "
                            f"{self.session_dir}, raylet pid {self.raylet_pid}, "
                            f"{int(ray.cluster_resources().get('CPU', 0))} CPUs)")
        log.info(self.description)
        return self

    def _restore_env(self) -> None:
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def record_processes(self) -> set[int]:
        """The instance's processes seen so far: the driver's children that ray.init started
        (gcs, raylet, ...) and every process its raylet started (workers and agents carry
        ``RAY_RAYLET_PID`` in their environment, orphans too)."""
        if self.owned:
            self.pids |= {p.pid for p in _instance_processes(self.raylet_pid, self.started_at)}
        return self.pids

    def __exit__(self, *exc: Any) -> None:
        import ray

        if not self.owned:
            if on_cluster() and ray.is_initialized():
                ray.shutdown()  # the job's actors and tasks end with their driver
            return
        self._restore_env()
        self.record_processes()
        # Ctrl-C or a scheduler's SIGTERM again while we clean up must not leave half an instance
        # behind: they are held back until the cleanup is done, then raised if nothing else is
        arrived: list[int] = []
        with _signals_deferred(arrived):
            try:
                ray.shutdown()
            finally:
                leftover = end_processes(self.pids, self.raylet_pid, self.started_at)
                if leftover:
                    log.warning("ended %d Ray processes that outlived the shutdown: %s", len(leftover), leftover)
                if self.session_dir is not None and not self.keep_logs:
                    remove_session_dir(self.session_dir)
        if arrived and exc[0] is None:
            raise Interrupted(signal.Signals(arrived[0]).name)


@contextlib.contextmanager
def _signals_deferred(arrived: list[int]) -> Iterator[None]:
    """SIGINT and SIGTERM only record themselves in ``arrived`` inside the block (main thread;
    elsewhere Python delivers no signals anyway); the previous handlers come back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, lambda signum, frame: arrived.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raylet_pid(node: Any) -> int | None:
    try:
        return node.all_processes["raylet"][0].process.pid
    except (AttributeError, KeyError, IndexError):
        return None


def _children_since(started_at: float) -> list:
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if p.create_time() >= started_at - 1]


def _instance_processes(raylet_pid: int | None, started_at: float) -> list:
    """Processes (orphans included) whose environment names this instance's raylet and
    that started after the instance did."""
    import psutil

    found = []
    if raylet_pid is None:
        return found
    marker = str(raylet_pid)
    for p in psutil.process_iter(["pid", "create_time"]):
        if p.info["create_time"] is None or p.info["create_time"] < started_at - 1:
            continue
        try:
            if p.environ().get("RAY_RAYLET_PID") == marker:
                found.append(p)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def end_processes(pids: set[int], raylet_pid: int | None, started_at: float, *, grace_s: float = 3.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace_s``, every still-running process of the instance.

    Only PIDs recorded for this instance (or found by its raylet marker) are touched, and
    a PID is only ended when its process started after the instance did, so a PID reused by
    an unrelated process is left alone. Returns the PIDs that had to be ended.
    """
    import psutil

    alive = []
    for pid in pids | {p.pid for p in _instance_processes(raylet_pid, started_at)}:
        try:
            p = psutil.Process(pid)
            if p.create_time() >= started_at - 1 and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            continue
    for p in alive:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, still = psutil.wait_procs(alive, timeout=grace_s)
    for p in still:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(still, timeout=grace_s)
    return sorted(p.pid for p in alive)


def remove_session_dir(session_dir: Path) -> None:
    """Remove the instance's folder under Ray's temp dir (logs, sockets, spilled objects)."""
    shutil.rmtree(session_dir, ignore_errors=True)
    latest = session_dir.parent / "session_latest"
    if latest.is_symlink() and not latest.exists():  # it pointed at the folder just removed
        latest.unlink(missing_ok=True)


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
