"""Manifest steps of an experiment: check the pool, label picks (the initial set: ``cold_start``).

Each reads or rewrites a whole manifest, so the loop runs them on a Ray worker
(``distributed.tasks.on_worker``): the driver never holds the pool's rows. They are
plain functions of files, callable in-process too (``alges label`` runs without Ray).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alges_dist import storage
from alges_dist.data.manifest import (
    check_pool_for_run,
    filter_manifest,
    mark_labeled,
    read_manifest,
    set_uris,
    write_manifest,
)
from alges_dist.errors import InputError


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with storage.open_input(path) as fh:  # a local file or an object-store URI
        for block in iter(lambda: fh.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def pool_summary(pool: str, *, needs_pool_masks: bool, needs_test_masks: bool = True) -> dict[str, Any]:
    """Validate the pool manifest for an experiment and count what the config is checked against.

    Raises ValueError naming the first row at fault (structure, URIs, masks the run needs).
    """
    table, encoding = read_manifest(pool)
    check_pool_for_run(table, needs_pool_masks=needs_pool_masks, needs_test_masks=needs_test_masks,
                       source=f"manifest {pool}")
    pool_rows = filter_manifest(table, split="pool")
    test_rows = filter_manifest(table, split="test")
    return {
        "n_pool": pool_rows.num_rows,
        "n_labeled": pool_rows.num_rows - pool_rows["labeled_round"].null_count,
        "n_test": test_rows.num_rows,
        "n_test_masked": test_rows.num_rows - test_rows["mask_uri"].null_count,
        "n_classes": encoding.n_classes,
        "sha256": file_sha256(pool),
    }


def video_frames_as_files(table: pa.Table, frame_ids: list[str], folder: Path, *,
                          max_pixels: int | None = None) -> pa.Table:
    """``table`` with the video rows (``#t=`` URIs) among ``frame_ids`` pointing at PNG files of
    exactly their decoded pixels, ``folder/frames/FRAME_ID.png`` (written once): labeled and
    evaluated frames are files, so training and evaluation never seek into a video."""
    from alges_dist.data.video_export import export_video_frames

    rows = table.filter(pc.and_(pc.is_in(table["frame_id"], value_set=_strings(frame_ids)),
                                pc.match_substring(table["image_uri"], "#t=")))
    if rows.num_rows == 0:
        return table
    videos = dict(zip(rows["frame_id"].to_pylist(), rows["image_uri"].to_pylist()))
    options = {} if max_pixels is None else {"max_pixels": max_pixels}
    return set_uris(table, "image_uri", export_video_frames(Path(folder) / "frames", videos, **options))


def full_data_manifest(pool: str, out: str, *, max_pixels: int | None = None) -> int:
    """The full-data reference's manifest: every pool frame with a mask labeled (round 0; frames
    labeled in the pool already stay labeled), video frames as files. Returns the labeled count."""
    table, encoding = read_manifest(pool)
    unlabeled = filter_manifest(table, split="pool", labeled=False)
    masked = unlabeled.filter(pc.is_valid(unlabeled["mask_uri"]))["frame_id"].to_pylist()
    table = mark_labeled(table, masked, 0)
    labeled = filter_manifest(table, split="pool", labeled=True)
    if labeled.num_rows == 0:
        raise InputError(f"loop.full_data_reference: no pool frame of {pool} has a mask to train on")
    table = video_frames_as_files(table, labeled["frame_id"].to_pylist(), Path(out).parent, max_pixels=max_pixels)
    write_manifest(table, out, encoding)
    return labeled.num_rows


def label_frames(manifest: str, picks: list[str], round_index: int, *,
                 mask_uris: dict[str, str] | None = None, image_uris: dict[str, str] | None = None,
                 frames_dir: str | None = None, max_pixels: int | None = None) -> int:
    """Mark ``picks`` labeled in ``round_index`` (with new mask / image files where given; video
    picks become PNG files under ``frames_dir``) and rewrite the manifest atomically; returns the
    labeled count. Idempotent: a batch already labeled in this round (a crash after the write)
    is left as it is."""
    table, encoding = read_manifest(manifest)
    rounds = table.filter(pc.is_in(table["frame_id"], value_set=_strings(picks)))["labeled_round"]
    if len(picks) and pc.all(pc.equal(pc.fill_null(rounds, -1), round_index)).as_py():
        return count_labeled(manifest)
    if mask_uris:
        table = set_uris(table, "mask_uri", mask_uris)
    if image_uris:
        table = set_uris(table, "image_uri", image_uris)
    if frames_dir is not None:
        table = video_frames_as_files(table, picks, Path(frames_dir), max_pixels=max_pixels)
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


def _strings(values: list[str]) -> pa.Array:
    return pa.array(values, pa.string())
