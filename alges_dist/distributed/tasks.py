"""Run one function as a Ray task on a worker and say where it ran.

The driver only orchestrates (DESIGN): anything that reads a whole manifest, loads a
model or touches the embeddings runs through :func:`on_worker`, on the cluster's workers
or, locally, on the local instance's. The result comes back with a ``where`` record
(node, IP, device) that the round records keep.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
from typing import Any, Callable, NamedTuple

log = logging.getLogger(__name__)


class Where(NamedTuple):
    """Where a stage ran: Ray node id, host IP, device ("cpu", "cuda:0"), the GPUs Ray assigned."""

    node_id: str
    ip: str
    device: str
    pid: int
    gpu_ids: tuple = ()

    def as_dict(self) -> dict[str, Any]:
        return self._asdict()


    def label(self) -> str:
        """One string for a score-shard column: node id, IP, device."""
        return f"{self.node_id}/{self.ip}/{self.device}" + (f"/gpu{','.join(self.gpu_ids)}" if self.gpu_ids else "")


def process_started() -> float:
    """This process's start, wall clock: the first mark of a fit's or a scoring actor's phases."""
    import psutil

    return psutil.Process().create_time()


def worker_device() -> str:
    """The device this worker computes on: its GPU when Ray assigned one and torch sees CUDA,
    else the CPU; a GPU resource without CUDA (a simulated GPU node, a driver mismatch) falls
    back to the CPU with one warning per process."""
    import ray

    if not ray.is_initialized() or not ray.get_gpu_ids():
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    _warn_no_cuda(tuple(ray.get_gpu_ids()))
    return "cpu"


@functools.cache
def _warn_no_cuda(gpu_ids: tuple) -> None:
    log.warning("Ray assigned GPU %s to this worker but torch sees no CUDA device: computing on the CPU",
                ",".join(map(str, gpu_ids)))


def here(device: str | None = None) -> Where:
    """The calling worker's node and device (``worker_device`` unless given)."""
    import ray

    device = worker_device() if device is None else device
    if not ray.is_initialized():
        return Where("", socket.gethostname(), device, os.getpid())
    return Where(ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), device, os.getpid(),
                 tuple(str(g) for g in ray.get_gpu_ids()))


def import_model_modules() -> None:
    """Import torch, smp and the modules of the model stages (evaluation, scoring) in this worker."""
    import alges_dist.evaluation  # noqa: F401
    import alges_dist.models  # noqa: F401
    import alges_dist.scoring  # noqa: F401


@contextlib.contextmanager
def warming_a_worker() -> Any:
    """While the block runs (a local fit, which leaves a core free: its worker takes one CPU and its
    controller none), one task worker imports torch and smp, so the evaluate and scoring tasks after
    the fit start warm (4-5 s less each on the 2-core machine, issue 24). At the end it waits a
    few seconds for the task at most, then cancels it (a fit that ended first has no more use for it)."""
    import ray

    ref = _remote(1, 0, False).remote(import_model_modules, (), {})
    stopping = True  # an error or Ctrl-C in the block: cancel at once
    try:
        yield
        stopping = False
    finally:  # settled before the command can shut Ray down (see on_worker)
        done, _ = ray.wait([ref], timeout=0 if stopping else 5)
        if not done:
            ray.cancel(ref, force=True)
            with contextlib.suppress(BaseException):
                ray.wait([ref], timeout=10)


def _call_and_locate(fn: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[Any, Where]:
    return fn(*args, **kwargs), here()


@functools.cache
def _remote(num_cpus: float, num_gpus: float, fresh: bool):
    import ray

    # A worker crash is retried once; an exception in fn is the stage's error, not retried.
    # fresh: the worker process exits after the task (its memory and device go back at once).
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=1,
                      **({"max_calls": 1} if fresh else {}))(_call_and_locate)


def on_worker(fn: Callable[..., Any], *args: Any, gpu: bool = False, cpus: float = 1, fresh: bool = False,
              **kwargs: Any) -> tuple[Any, Where]:
    """``fn(*args, **kwargs)`` as a Ray task (one GPU when ``gpu``); returns (result, where).

    ``fn`` must be importable by workers (a module-level function of this package). fresh:
    run it in a worker process of its own, which exits afterwards. Exceptions raised by
    ``fn`` are re-raised here with their own type.
    """
    import ray

    ref = _remote(cpus, 1 if gpu else 0, fresh).remote(fn, args, kwargs)
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        log.debug("%s on a worker failed:\n%s", getattr(fn, "__name__", fn), err)  # the remote traceback, for run.log
        if isinstance(err.cause, Exception):
            raise err.cause from None  # the stage's own error (ValueError naming a row, ...)
        raise
    except BaseException:
        ray.cancel(ref, force=True)  # Ctrl-C in the driver: do not leave the task running
        # and let the cancellation settle before the command shuts Ray down: a reply that
        # arrives after shutdown crashes Ray's core ("Tried to complete task that was not pending")
        with contextlib.suppress(BaseException):
            ray.wait([ref], timeout=10)
        raise
