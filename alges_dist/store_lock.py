"""One writer per run folder in an object store: a lock object created only if absent.

An object store has no ``flock`` and no process that dies with its holder, so the lock is
``RUN/.lock``, PUT with ``If-None-Match: *`` (S3 conditional writes; MinIO and Ceph take
it too): exactly one of two writers creates it. The holder's PID, host, command and start
time are in it, and a heartbeat thread rewrites it every ``heartbeat_s`` with
``If-Match`` on its last ETag (a holder that lost the lock notices). A lock whose heartbeat
is older than ``stale_after_s`` belongs to a crashed holder: the next writer takes it over
with ``If-Match`` on the stale ETag, so of two writers taking over at once one wins.
Release deletes it. Credentials and endpoint as ``alges_dist.storage`` reads them.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from alges_dist import storage
from alges_dist.errors import AlgesError

HEARTBEAT_S = 30.0
STALE_AFTER_S = 120.0


class StoreLockBusy(AlgesError):
    """Another writer holds the run folder's lock object."""


def _client() -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=storage.s3_endpoint(),
                        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))


def _precondition_failed(err: Exception) -> bool:
    code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


class StoreLock:
    """``with StoreLock("s3://bucket/runs/x", command):`` the run folder's one writer."""

    def __init__(self, out: str, command: str, *, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S):
        parts = urlsplit(storage.join(out, ".lock"))
        if parts.scheme not in ("s3", "s3a"):
            raise AlgesError(f"{out}: a run folder in an object store is supported on s3:// only")
        self.uri, self.bucket, self.key = f"{parts.scheme}://{parts.netloc}{parts.path}", parts.netloc, parts.path[1:]
        self.command, self.heartbeat_s, self.stale_after_s = command, heartbeat_s, stale_after_s
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False  # set when the heartbeat finds another holder's lock

    def _body(self, since: str) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                           "since": since, "heartbeat": time.time()}).encode()

    def __enter__(self) -> StoreLock:
        client = _client()
        self._since = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            self._etag = client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(self._since),
                                           IfNoneMatch="*")["ETag"]
        except Exception as err:
            if not _precondition_failed(err):
                raise
            self._take_over_if_stale(client)
        self._thread = threading.Thread(target=self._beat, name="store-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _take_over_if_stale(self, client: Any) -> None:
        held = client.get_object(Bucket=self.bucket, Key=self.key)
        holder = json.loads(held["Body"].read() or b"{}")
        age = time.time() - float(holder.get("heartbeat", 0))
        if age <= self.stale_after_s:
            raise StoreLockBusy(
                f"run folder {self.uri.rsplit('/', 1)[0]} is in use by pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')} (`alges {holder.get('command', '?')}`, since {holder.get('since', '?')}, "
                f"heartbeat {age:.0f} s ago); one command writes a run folder at a time: wait for it to finish or "
                f"stop it (a holder silent for {self.stale_after_s:.0f} s is taken over)")
        try:  # compare-and-swap on the stale object: of two writers taking over, one wins
            self._etag = client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(self._since),
                                           IfMatch=held["ETag"])["ETag"]
        except Exception as err:
            if _precondition_failed(err):
                raise StoreLockBusy(f"run folder {self.uri.rsplit('/', 1)[0]}: another writer took over the "
                                    "stale lock first") from None
            raise
        self.took_over_from = holder

    def _beat(self) -> None:
        client = _client()
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._etag = client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(self._since),
                                               IfMatch=self._etag)["ETag"]
            except Exception as err:
                if _precondition_failed(err):
                    self.lost = True  # someone took it over: we were considered dead
                    return
                # a transient store error: try again at the next beat

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._etag is not None and not self.lost:
            _client().delete_object(Bucket=self.bucket, Key=self.key)
            self._etag = None
