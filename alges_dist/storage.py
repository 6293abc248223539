"""Where bytes live: local paths and object-store URIs (``s3://bucket/key``, ``gs://...``).

Every reader and writer of frames, videos and manifests that may meet a URI goes through
here; a local path stays a local path (no behaviour changes for it). Object stores go
through ``pyarrow.fs``:

- S3 and S3-compatible stores (MinIO, Ceph, moto): credentials from the AWS SDK's default
  chain (environment, profile, instance role: pyarrow's own), the endpoint from
  ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` as the AWS tools read them (pyarrow's
  S3FileSystem ignores those variables, apache/arrow#49643), so an on-premise store needs
  no flag. Nothing here logs or returns a credential.
- other schemes pyarrow knows (``gs://``, ``hdfs://``): ``pyarrow.fs.FileSystem.from_uri``.

Reads are ranged: ``open_input`` returns a seekable file, so a video decoder reads the
bytes of the GOPs it decodes, not the whole object.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from alges_dist.errors import InputError

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def is_uri(location: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` object-store locations (``file://`` counts as local)."""
    text = os.fspath(location)
    scheme = urlsplit(text).scheme if "://" in text else ""
    return bool(scheme) and scheme != "file"


def s3_endpoint(environ: dict[str, str] | None = None) -> str | None:
    """The S3 endpoint the AWS tools would use (None: AWS itself)."""
    environ = os.environ if environ is None else environ
    for name in ENDPOINT_VARIABLES:
        if environ.get(name):
            return environ[name]
    return None


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str | None) -> Any:
    from pyarrow import fs

    kwargs: dict[str, Any] = {}  # buckets are the user's: never created here
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parts.netloc, scheme=parts.scheme)
    if region:
        kwargs["region"] = region
    return fs.S3FileSystem(**kwargs)  # credentials: the SDK's default chain


def filesystem(location: str | os.PathLike[str]) -> tuple[Any, str]:
    """``(pyarrow filesystem, path within it)`` for a URI or a local path."""
    from pyarrow import fs

    text = os.fspath(location)
    if not is_uri(text):
        local = text[len("file://"):] if text.startswith("file://") else text
        return fs.LocalFileSystem(), os.path.abspath(local)
    parts = urlsplit(text)
    if parts.scheme in ("s3", "s3a"):
        if not parts.netloc:
            raise InputError(f"{text}: an s3:// location needs a bucket (s3://BUCKET/key)")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return _s3(s3_endpoint(), region), f"{parts.netloc}{parts.path}".rstrip("/")
    try:
        return fs.FileSystem.from_uri(text)
    except Exception as err:  # pyarrow raises ArrowInvalid / ArrowNotImplementedError / OSError here
        raise InputError(f"{text}: no filesystem for scheme '{parts.scheme}' ({type(err).__name__}: {err})") from None


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """``base/part/...`` for URIs and local paths alike."""
    text = os.fspath(base)
    if is_uri(text):
        return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(text, *parts)


def name(location: str | os.PathLike[str]) -> str:
    """The last component (``stem.suffix``) of a path or URI."""
    return os.fspath(location).rstrip("/").rsplit("/", 1)[-1]


def exists(location: str | os.PathLike[str]) -> bool:
    from pyarrow import fs

    filesys, path = filesystem(location)
    return filesys.get_file_info(path).type != fs.FileType.NotFound


def is_dir(location: str | os.PathLike[str]) -> bool:
    """A local folder, or an object-store prefix with objects under it."""
    from pyarrow import fs

    if not is_uri(location):
        return Path(location).is_dir()
    filesys, path = filesystem(location)
    info = filesys.get_file_info(path)
    if info.type == fs.FileType.Directory:
        return True
    return bool(filesys.get_file_info(fs.FileSelector(path.rstrip("/") + "/", allow_not_found=True)))


def list_files(location: str | os.PathLike[str], suffixes: Iterable[str] | None = None) -> list[str]:
    """Every file under a folder or prefix (recursive), sorted, as URIs where ``location`` is one."""
    from pyarrow import fs

    wanted = tuple(s.lower() for s in suffixes) if suffixes is not None else None
    text = os.fspath(location)
    if not is_uri(text):
        found = [str(p) for p in Path(text).rglob("*") if p.is_file()]
    else:
        filesys, path = filesystem(text)
        scheme = urlsplit(text).scheme
        infos = filesys.get_file_info(fs.FileSelector(path, recursive=True, allow_not_found=True))
        found = [f"{scheme}://{i.path}" for i in infos if i.type == fs.FileType.File]
    return sorted(f for f in found if wanted is None or f.lower().endswith(wanted))


def open_input(location: str | os.PathLike[str]) -> IO[bytes]:
    """A seekable binary file: ranged reads on an object store, a plain file locally."""
    if not is_uri(location):
        text = os.fspath(location)
        return open(text[len("file://"):] if text.startswith("file://") else text, "rb")
    filesys, path = filesystem(location)
    try:
        return filesys.open_input_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{os.fspath(location)}: file not found") from None
    except OSError as err:
        if "not found" in str(err).lower() or "NoSuchKey" in str(err):
            raise FileNotFoundError(f"{os.fspath(location)}: file not found") from None
        raise


def read_bytes(location: str | os.PathLike[str]) -> bytes:
    with open_input(location) as fh:
        return fh.read()


def write_bytes(location: str | os.PathLike[str], data: bytes) -> None:
    """Write a whole file. An object-store PUT is atomic (readers see the old object or the new
    one, never a part); a local file goes through a temp file and a rename, as everywhere here."""
    if not is_uri(location):
        from alges_dist.data.atomic import atomic_path

        with atomic_path(Path(location)) as tmp:
            Path(tmp).write_bytes(data)
        return
    filesys, path = filesystem(location)
    with filesys.open_output_stream(path) as out:
        out.write(data)


class ObjectPath:
    """An object-store location with the few ``pathlib`` traits the ingest code reads (``name``,
    ``stem``, ``suffix``, ``resolve``); ``os.fspath`` gives the URI, which every reader here
    routes back through this module."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")

    name = property(lambda self: self.uri.rsplit("/", 1)[-1])
    suffix = property(lambda self: os.path.splitext(self.name)[1])
    stem = property(lambda self: os.path.splitext(self.name)[0])

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.uri.rsplit("/", 1)[0])

    def resolve(self) -> ObjectPath:
        return self

    def __fspath__(self) -> str:
        return self.uri

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"ObjectPath({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)


def as_path(location: str | os.PathLike[str]) -> Path | ObjectPath:
    """A ``Path`` for a local location, an :class:`ObjectPath` for a URI (also argparse's ``type=``
    for paths that may be URIs: ``Path("s3://b/k")`` would drop a slash)."""
    text = os.fspath(location)
    return ObjectPath(text) if is_uri(text) else Path(text)


def size_and_mtime(location: str | os.PathLike[str]) -> tuple[int | None, int | None]:
    """``(bytes, modification time in ns)`` of a file or object; ``(None, None)`` when absent."""
    from pyarrow import fs

    filesys, path = filesystem(location)
    info = filesys.get_file_info(path)
    if info.type == fs.FileType.NotFound:
        return None, None
    return info.size, info.mtime_ns
