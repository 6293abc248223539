"""Manifest steps of an experiment: check the pool, draw the initial set, label picks.

Each reads or rewrites a whole manifest, so the loop runs them on a Ray worker
(``distributed.tasks.on_worker``): the driver never holds the pool's rows. They are
plain functions of files, callable in-process too (``alges label`` runs without Ray).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alges_dist.data.manifest import (
    check_pool_for_run,
    filter_manifest,
    mark_labeled,
    read_manifest,
    set_uris,
    write_manifest,
)


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def pool_summary(pool: str, *, needs_pool_masks: bool) -> dict[str, Any]:
    """Validate the pool manifest for an experiment and count what the config is checked against.

    Raises ValueError naming the first row at fault (structure, URIs, masks the run needs).
    """
    table, encoding = read_manifest(pool)
    check_pool_for_run(table, needs_pool_masks=needs_pool_masks, source=f"manifest {pool}")
    pool_rows = filter_manifest(table, split="pool")
    return {
        "n_pool": pool_rows.num_rows,
        "n_labeled": pool_rows.num_rows - pool_rows["labeled_round"].null_count,
        "n_test": filter_manifest(table, split="test").num_rows,
        "n_classes": encoding.n_classes,
        "sha256": file_sha256(pool),
    }


def draw_initial_set(pool: str, out: str, n: int, seed: int) -> int:
    """Write the experiment's initial manifest: ``n`` pool frames drawn with ``seed`` labeled
    in round 0 (a pool that already has labeled frames keeps them instead). Returns the count."""
    from alges_dist.selection import random

    table, encoding = read_manifest(pool)
    unlabeled = filter_manifest(table, split="pool", labeled=False)
    labeled = filter_manifest(table, split="pool", labeled=True).num_rows
    if labeled == 0:
        ids = unlabeled["frame_id"].to_numpy(zero_copy_only=False)
        picks = random(None, np.zeros(len(ids), bool), n, seed=seed)
        table = mark_labeled(table, ids[picks.indices].tolist(), 0)
        labeled = len(picks.indices)
    write_manifest(table, out, encoding)
    return labeled


def full_data_manifest(pool: str, out: str) -> int:
    """The full-data reference's manifest: every pool frame with a mask labeled (round 0; frames
    labeled in the pool already stay labeled). Returns the labeled count."""
    table, encoding = read_manifest(pool)
    unlabeled = filter_manifest(table, split="pool", labeled=False)
    masked = unlabeled.filter(pc.is_valid(unlabeled["mask_uri"]))["frame_id"].to_pylist()
    table = mark_labeled(table, masked, 0)
    labeled = filter_manifest(table, split="pool", labeled=True).num_rows
    if labeled == 0:
        raise ValueError(f"loop.full_data_reference: no pool frame of {pool} has a mask to train on")
    write_manifest(table, out, encoding)
    return labeled


def label_frames(manifest: str, picks: list[str], round_index: int, *,
                 mask_uris: dict[str, str] | None = None, image_uris: dict[str, str] | None = None) -> int:
    """Mark ``picks`` labeled in ``round_index`` (with new mask / image files where given) and
    rewrite the manifest atomically; returns the labeled count. Idempotent: a batch already
    labeled in this round (a crash after the write) is left as it is."""
    table, encoding = read_manifest(manifest)
    rounds = table.filter(pc.is_in(table["frame_id"], value_set=_strings(picks)))["labeled_round"]
    if len(picks) and pc.all(pc.equal(pc.fill_null(rounds, -1), round_index)).as_py():
        return count_labeled(manifest)
    if mask_uris:
        table = set_uris(table, "mask_uri", mask_uris)
    if image_uris:
        table = set_uris(table, "image_uri", image_uris)
    table = mark_labeled(table, picks, round_index)
    write_manifest(table, manifest, encoding)
    return table.num_rows - table["labeled_round"].null_count


def count_labeled(manifest: str | Path, up_to_round: int | None = None) -> int:
    """Labeled frames (through ``up_to_round``), from the one int column (cheap at any size)."""
    column = pq.read_table(manifest, columns=["labeled_round"])["labeled_round"]
    if up_to_round is None:
        return len(column) - column.null_count
    return pc.sum(pc.less_equal(column, up_to_round)).as_py() or 0


def labeled_in_round(manifest: str | Path, round_index: int) -> bool:
    column = pq.read_table(manifest, columns=["labeled_round"])["labeled_round"]
    return pc.any(pc.equal(column, round_index)).as_py() is True


def _strings(values: list[str]):
    import pyarrow as pa

    return pa.array(values, pa.string())
