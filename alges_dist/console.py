"""What a round command prints: bars on a terminal, one line per stage and per fit in a log.

On a TTY a bar counts rounds and a second one the epochs of the running fit. Written to a
file or a job log (no TTY) there are no bars (each redraw would be a line): one line per
finished stage, a fit's line with its epochs, metrics and seconds. Ray's own per-report
lines never reach the console (local Ray runs with ``log_to_driver=False``); run.log gets
the same lines through logging.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)


def _fmt(info: dict[str, Any]) -> str:
    parts = []
    for key in ("train_loss", "val_dice", "dice", "miou", "n_scored", "n_errors", "n_candidates", "n_labeled"):
        if key in info and info[key] is not None:
            value = info[key]
            parts.append(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}")
    if info.get("fixed_s") is not None:  # a fit's seconds other than its epochs' work (train.json: timings)
        parts.append(f"fixed cost {info['fixed_s']:.1f} s")
    return ", ".join(parts)


class Console:
    """Receives the loop's stage events (``Experiment.on_stage``) and fit progress (``on_progress``)."""

    def __init__(self, total_rounds: int, *, stream: TextIO | None = None, tty: bool | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.where = "starting"
        self._started = 0.0
        self.rounds = self.epochs = None
        if self.tty:
            from tqdm import tqdm

            self.rounds = tqdm(total=total_rounds, desc="rounds", unit="round", dynamic_ncols=True, file=self.stream)

    def stage(self, event: str, stage: str, strategy: str, seed: int, r: int, info: dict[str, Any]) -> None:
        where = f"{strategy}: {stage}" if r < 0 else f"{strategy} seed {seed} round {r}: {stage}"  # r < 0: before round 0
        if event == "start":
            self.where, self._started = where, time.perf_counter()
            if self.rounds is not None:
                self.rounds.set_postfix_str(where)
            return
        seconds = time.perf_counter() - self._started  # the stage's wall time, driver's view
        line = f"{where} done in {seconds:.1f} s" + (f" ({_fmt(info)})" if _fmt(info) else "")
        log.info(line)
        if self.epochs is not None:
            self.epochs.close()
            self.epochs = None
        if self.rounds is not None:
            self.rounds.write(line)
        else:
            print(line, file=self.stream, flush=True)

    def progress(self, entry: dict[str, Any]) -> None:
        """A fit's latest epoch: advances the epoch bar on a TTY; in a log only the fit's line counts."""
        if self.rounds is None:
            return
        from tqdm import tqdm

        if self.epochs is None:
            self.epochs = tqdm(total=entry["epochs"], desc="epochs", unit="epoch", leave=False, dynamic_ncols=True,
                               file=self.stream)
        self.epochs.n = entry["epoch"] + 1
        self.epochs.set_postfix_str(_fmt(entry))
        self.epochs.refresh()

    def round_done(self) -> None:
        if self.rounds is not None:
            self.rounds.update(1)

    def close(self) -> None:
        for bar in (self.epochs, self.rounds):
            if bar is not None:
                bar.close()


@contextlib.contextmanager
def native_stderr_to(path: Path) -> Iterator[None]:
    """Send what native code writes to file descriptor 2 (Ray's C++ core worker in the driver:
    "core_worker.cc: ...") to ``path``, while Python's ``sys.stderr`` keeps the console.

    Only for a command that owns its process (the CLI), never inside a test runner's process.
    """
    sys.stderr.flush()
    console_fd = os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    previous = sys.stderr
    sys.stderr = os.fdopen(os.dup(console_fd), "w", buffering=1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    for handler in logging.getLogger().handlers:  # the console handler writes to the console still
        if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is previous:
            handler.setStream(sys.stderr)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(console_fd, 2)
        os.close(console_fd)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is sys.stderr:
                handler.setStream(previous)
        sys.stderr.close()
        sys.stderr = previous


def quiet_ray_data(tty: bool) -> None:
    """Ray Data's driver-side INFO lines and, without a TTY, its logged progress stay out of the
    console (they remain in the session's ray-data.log)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = tty
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console one; the session log file stays
            handler.setLevel(logging.WARNING if tty else logging.ERROR)
