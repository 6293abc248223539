"""Atomic writes: a reader sees the old file or the complete new one, never half of one.

Every file this project writes (manifests, score shards, CSV hand-offs, JSON records,
generated pools) goes through here: write into a temporary sibling in the same folder,
flush and fsync, then ``os.replace`` it over the target. ``os.replace`` is atomic on POSIX
when source and target share a file system, which a sibling guarantees. On any exception,
including KeyboardInterrupt, the temporary is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_directory"]


def _temp_sibling(target: Path) -> Path:
    """A fresh hidden name next to ``target`` (same folder, so same file system):
    ``.NAME.PID-HEX.tmp``. The writer's PID tells a run folder's crash-litter cleanup
    (``run_folder.remove_crash_litter``) to leave a live process's temp alone: a reader such
    as ``alges report`` writes beside a writer without the lock."""
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(6)}.tmp")


def temp_owner(path: Path) -> int | None:
    """The PID that made the temp sibling ``path`` (None: a name without one)."""
    stem = path.name[:-len(".tmp")] if path.name.endswith(".tmp") else ""
    pid, dash, _ = stem.rpartition(".")[2].partition("-")
    return int(pid) if dash and pid.isdigit() else None


def _fsync_dir(folder: Path) -> None:
    # Persist the rename itself; some file systems refuse O_RDONLY on dirs (ignore then).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on clean exit it replaces ``path``.

    Use it with any writer that takes a path (``pq.write_table``, ``Image.save``,
    ``csv`` via ``open``)::

        with atomic_path(out) as tmp:
            pq.write_table(table, tmp)

    The parent folder is created if missing. Raises whatever the body raises, after
    removing the temporary file.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a folder; give the path of a file to write")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target)
    # O_EXCL: never reuse a stranger's file; 0o666 & ~umask like a plain open() (mkstemp
    # would leave 0600, unreadable to Ray workers running as another user).
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        # The writer may have closed without fsync; make the bytes durable before rename.
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same folder + rename)."""
    atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on clean exit it is renamed to ``path``.

    For generated folders (the demo pool): a crash leaves no half-filled ``path``.
    ``path`` must not exist yet (raises FileExistsError, so a finished folder is never
    overwritten); if another process finished the same folder first, its copy is kept
    and ours is discarded.
    """
    target = Path(path)
    if target.exists():
        raise FileExistsError(f"{target} already exists; remove it or pick another folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target)
    tmp.mkdir(mode=0o777)  # umask applies, unlike mkdtemp's 0700
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent writer won the race
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
