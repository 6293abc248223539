"""Connect to Ray: a cluster when RAY_ADDRESS is set, else a local single-node runtime.

The same commands run on a laptop, in CI and on a cluster; only this function differs.
"""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)

def bind_to_loopback() -> None:
    """Make a local Ray instance listen on 127.0.0.1 only (GCS, raylet, object manager, agents).

    Ray binds its gRPC ports to the node IP's interfaces; it uses the loopback address as
    node IP only where it considers clusters unsupported (Windows/macOS), which its
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` switch turns on here too. The constant is read
    at import, so it is set on the imported module as well; the environment variable
    carries it to every process the instance starts. Measured with ``ss -ltn``: every Ray
    port on 127.0.0.1 (tests/test_security.py). Token auth stays on either way.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def init_ray(*, dashboard: bool = True, num_cpus: int | None = None) -> dict:
    """Start or join Ray once; returns the cluster's resources.

    With RAY_ADDRESS set (``ray job submit`` sets it), joins that cluster. Otherwise
    starts a local runtime with this machine's resources and the dashboard bound to
    127.0.0.1 only.
    """
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            # A job's runtime_env (working_dir, env_vars) comes from `ray job submit`.
            log.info("joining Ray cluster at %s", os.environ["RAY_ADDRESS"])
            ray.init()
        else:
            bind_to_loopback()
            # Local workers inherit this process's environment (HF_HUB_OFFLINE etc.).
            # Ray's own INFO lines (every checkpoint, every worker start) drown the round's
            # log on a laptop; warnings and worker errors still reach the console.
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=dashboard,
                dashboard_host="127.0.0.1",
                logging_config=ray.LoggingConfig(log_level="WARNING"),
            )
    resources = ray.cluster_resources()
    log.info(
        "Ray: %d CPUs, %d GPUs, %.1f GB object store",
        resources.get("CPU", 0),
        resources.get("GPU", 0),
        resources.get("object_store_memory", 0) / 1e9,
    )
    return resources


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0
