"""A real S3-compatible server (moto's server mode) on 127.0.0.1 for the object-storage tests,
started by the test session and stopped by its PID.

The tests reach it as a user reaches an on-premise store: ``AWS_ENDPOINT_URL`` plus
credentials in the environment (``environment()``), no flag.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

MOTO_SERVER = Path(sys.executable).parent / "moto_server"


class S3Server(NamedTuple):
    endpoint: str
    access_key: str
    secret_key: str
    pid: int

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default os.environ) with the variables the AWS tools read for this store."""
        env = dict(os.environ if base is None else base)
        env.update({"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                    "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1"})
        env.pop("AWS_ENDPOINT_URL_S3", None)
        env.pop("AWS_PROFILE", None)
        return env

    def make_buckets(self, *names: str) -> None:
        """Create buckets as their owner would (alges never creates one)."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                              aws_secret_access_key=self.secret_key, region_name="us-east-1")
        for name in names:
            client.create_bucket(Bucket=name)


def missing_reason() -> str | None:
    if MOTO_SERVER.exists():
        return None
    return f"{MOTO_SERVER} is absent: `make install` installs moto[server] (the dev extra)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class running:
    """``with running(log) as server:`` a moto S3 server, stopped by PID on exit."""

    def __init__(self, log: Path):
        self.log = Path(log)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> S3Server:
        port = _free_port()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
                                         stdout=out, stderr=subprocess.STDOUT)
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"moto_server did not answer on {endpoint}; log {self.log}") from None
                time.sleep(0.1)
        # credentials as a user's: random, so a test can grep every written byte for them
        return S3Server(endpoint, f"AKIA{secrets.token_hex(8).upper()}", secrets.token_hex(20), self.proc.pid)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)


class _Counting:
    """A file whose reads are recorded (the bytes a decoder pulls, GET by GET)."""

    def __init__(self, inner, sizes: list[int]):
        self.inner, self.sizes = inner, sizes

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        self.sizes.append(len(data))
        return data

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class counted_reads:
    """``with counted_reads() as reads:`` every file ``alges_dist.storage.open_input`` opens meanwhile
    records its reads; ``reads.total`` is the bytes read."""

    def __enter__(self) -> counted_reads:
        from alges_dist import storage

        self.sizes: list[int] = []
        self._real = storage.open_input
        storage.open_input = lambda location: _Counting(self._real(location), self.sizes)
        return self

    def __exit__(self, *exc) -> None:
        from alges_dist import storage

        storage.open_input = self._real

    @property
    def total(self) -> int:
        return sum(self.sizes)
