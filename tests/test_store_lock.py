"""One writer per run folder in an object store (issue 22): the lock object against a real
S3-compatible server (moto on 127.0.0.1): two writers, a stale holder, the heartbeat, release."""

from __future__ import annotations

import json
import time

import pytest

from alges_dist import storage
from alges_dist.store_lock import StoreLock, StoreLockBusy


def _holder(uri):
    return json.loads(storage.read_bytes(uri))


def test_a_second_writer_is_refused_naming_the_holder_and_release_frees_the_folder(s3):
    run = "s3://runs/two-writers"
    with StoreLock(run, "run --out " + run) as first:
        held = _holder(first.uri)
        assert held["command"] == "run --out " + run and held["pid"] > 0 and held["host"]
        with pytest.raises(StoreLockBusy, match=r"in use by pid \d+ on .* \(`alges run --out s3://runs/two-writers`"):
            with StoreLock(run, "label --out x"):
                pass
        assert _holder(first.uri)["command"] == "run --out " + run  # the refused writer changed nothing
    assert not storage.exists(f"{run}/.lock")
    with StoreLock(run, "label --out x"):  # free again
        assert _holder(f"{run}/.lock")["command"] == "label --out x"


def test_a_crashed_holders_lock_is_taken_over_after_its_heartbeat_went_silent(s3):
    run = "s3://runs/stale"
    crashed = {"pid": 4242, "host": "gpu-node-7", "command": "run --out " + run, "since": "2026-12-01 03:00:00",
               "heartbeat": time.time() - 600}
    storage.write_bytes(f"{run}/.lock", json.dumps(crashed).encode())
    with StoreLock(run, "run --out " + run, stale_after_s=120) as lock:
        assert lock.took_over_from["host"] == "gpu-node-7"
        assert _holder(lock.uri)["pid"] != 4242
    recent = dict(crashed, heartbeat=time.time() - 5)  # a holder still beating is not taken over
    storage.write_bytes(f"{run}/.lock", json.dumps(recent).encode())
    with pytest.raises(StoreLockBusy, match=r"pid 4242 on gpu-node-7 .*heartbeat \d+ s ago"):
        with StoreLock(run, "run --out " + run, stale_after_s=120):
            pass


def test_of_two_writers_taking_over_one_stale_lock_one_wins(s3):
    run = "s3://runs/race"
    storage.write_bytes(f"{run}/.lock", json.dumps({"pid": 1, "heartbeat": 0}).encode())
    import alges_dist.store_lock as store_lock

    client = store_lock._client()
    stale = client.get_object(Bucket="runs", Key="race/.lock")
    stale_body = stale["Body"].read()
    with StoreLock(run, "first") as first:  # took over
        assert _holder(first.uri)["command"] == "first"

        class SawTheStaleLock:  # the second writer read the lock before the first replaced it
            def __getattr__(self, name):
                return getattr(client, name)

            def get_object(self, **kwargs):
                return {**stale, "Body": type("B", (), {"read": lambda self: stale_body})()}

        with pytest.MonkeyPatch.context() as m:
            m.setattr(store_lock, "_client", lambda: SawTheStaleLock())
            with pytest.raises(StoreLockBusy, match="another writer took over the stale lock first"):
                with StoreLock(run, "second"):
                    pass
        assert _holder(first.uri)["command"] == "first"


def test_the_heartbeat_advances_and_a_holder_whose_lock_was_taken_notices(s3):
    run = "s3://runs/beat"
    with StoreLock(run, "run", heartbeat_s=0.2) as lock:
        first = _holder(lock.uri)["heartbeat"]
        time.sleep(1.0)
        assert _holder(lock.uri)["heartbeat"] > first
        storage.write_bytes(lock.uri, json.dumps({"pid": 7, "host": "other", "heartbeat": time.time()}).encode())
        deadline = time.time() + 5
        while not lock.lost and time.time() < deadline:
            time.sleep(0.1)
        assert lock.lost
    assert _holder(f"{run}/.lock")["pid"] == 7  # the new holder's lock is not deleted by the old one
