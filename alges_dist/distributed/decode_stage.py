"""The scoring job's decode stage: pool rows -> ``{frame_id, image (B, H, W, 3) uint8, error}``.

Image rows are decoded one file per row (:func:`decode_frames`) in Ray Data tasks over
the manifest's blocks. Video rows (``/abs/video.mp4#t=SECONDS``) are sorted by (video,
time) in the driver and cut into chunks of about :data:`VIDEO_CHUNK_FRAMES` frames of
one video (:func:`video_chunks`); one task decodes a chunk with one seek and one forward
decode, one decoder thread, so Ray parallelises across chunks (:func:`decode_video_chunks`).
A pool may mix both kinds. Either way a frame that cannot be decoded keeps its row with
``error`` set, so the job's ``scoring.max_error_rate`` applies to both.

Why chunks: one seek per frame decodes on average half a keyframe interval (125 frames
with x264's default) for every 1 fps row; a forward decode through a chunk decodes each
source frame once (bench: scripts/bench_video.py, numbers in the README).
"""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alges_dist.data.frames import DEFAULT_MAX_PIXELS, FrameDecodeError, load_image, resize_rgb
from alges_dist.data.video import is_video_uri, iter_frames
from alges_dist.errors import InputError

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

__all__ = ["VIDEO_CHUNK_FRAMES", "decode_frames", "decode_video_chunks", "decoded_pool", "video_chunks"]

#: Rows per video chunk: at 1 fps about 100 s of video (2,500 source frames at 25 fps), so
#: the one seek per chunk (at most one keyframe interval of extra decode) costs a few percent.
VIDEO_CHUNK_FRAMES = 100
#: Chunks travel in at most this many Ray Data blocks (a task decodes its block's chunks in turn).
MAX_VIDEO_BLOCKS = 2000
_SECONDS = r"^\d+(\.\d{1,6})?$"


def decode_frames(batch: dict[str, np.ndarray], *, size: tuple[int, int],
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, np.ndarray]:
    """Ray Data CPU stage for image rows: image_uri -> uint8 (B, H, W, 3); undecodable frames get ``error``.

    Video rows (``#t=``) are left out: :func:`decode_video_chunks` decodes them by chunk.
    """
    keep = [i for i, uri in enumerate(batch["image_uri"]) if not is_video_uri(str(uri))]
    images = np.zeros((len(keep), size[0], size[1], 3), dtype=np.uint8)  # failed rows are never scored
    errors = np.full(len(keep), "", dtype=object)
    for j, i in enumerate(keep):
        try:
            images[j] = load_image(str(batch["image_uri"][i]), size, max_pixels=max_pixels)
        except (FrameDecodeError, OSError) as exc:
            errors[j] = str(exc)
    return {"frame_id": np.asarray(batch["frame_id"])[keep], "image": images, "error": errors}


def video_chunks(frame_ids: pa.Array | list[str], uris: pa.Array | list[str], *,
                 chunk_frames: int = VIDEO_CHUNK_FRAMES) -> pa.Table:
    """Video rows grouped into decode chunks: one row per chunk of at most ``chunk_frames``
    frames of one video, in (video, time) order.

    Columns: ``path`` (the video file), ``frame_ids`` and ``times`` (lists; times as the
    URIs spell them). Vectorised (pyarrow, numpy): millions of rows take seconds. Raises
    ValueError naming the first URI whose ``#t=`` is not a plain decimal.
    """
    if chunk_frames < 1:
        raise InputError(f"chunk_frames must be >= 1, got {chunk_frames}")
    parts = pc.split_pattern(pa.array(uris, pa.string()), "#t=", max_splits=1, reverse=True)
    times = pc.list_element(parts, 1)
    bad = pc.invert(pc.fill_null(pc.match_substring_regex(times, _SECONDS), False))
    if pc.any(bad).as_py():
        row = pc.index(bad, True).as_py()
        raise InputError(f"row {row} (frame_id {pa.array(frame_ids)[row].as_py()!r}): image_uri {uris[row]!r} is not "
                         "VIDEO#t=SECONDS with seconds as a decimal of at most 6 fractional digits")
    table = pa.table({"frame_id": pa.array(frame_ids, pa.string()), "path": pc.list_element(parts, 0), "time": times,
                      "seconds": pc.cast(times, pa.float64())})  # float64 orders decimals of 6 digits exactly
    table = table.sort_by([("path", "ascending"), ("seconds", "ascending")])
    n = table.num_rows
    video = table["path"].combine_chunks().dictionary_encode().indices.to_numpy()
    first_of_video = np.flatnonzero(np.r_[True, video[1:] != video[:-1]])
    position = np.arange(n) - np.repeat(first_of_video, np.diff(np.r_[first_of_video, n]))
    starts = np.flatnonzero(position % chunk_frames == 0)
    offsets = pa.array(np.r_[starts, n].astype(np.int32))
    return pa.table({
        "path": table["path"].take(pa.array(starts)),
        "frame_ids": pa.ListArray.from_arrays(offsets, table["frame_id"].combine_chunks()),
        "times": pa.ListArray.from_arrays(offsets, table["time"].combine_chunks()),
    })


def decode_video_chunks(batch: dict[str, np.ndarray], *, size: tuple[int, int],
                        max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, np.ndarray]:
    """Ray Data CPU stage for video chunks: one open, one seek, one forward decode per chunk.

    Returns the rows of :func:`decode_frames` (frame_id, image resized like every other
    path, error); damaged or missing frames get ``error``.
    """
    frame_ids: list[str] = []
    images: list[np.ndarray] = []
    errors: list[str] = []
    blank = np.zeros((size[0], size[1], 3), np.uint8)
    for path, ids, times in zip(batch["path"], batch["frame_ids"], batch["times"]):
        ids, times = list(ids), [Fraction(str(t)) for t in times]
        decoded: list[tuple[np.ndarray, str]] = [(blank, "")] * len(ids)
        for i, rgb, error in iter_frames(str(path), times, max_pixels=max_pixels):
            decoded[i] = (blank, error) if error is not None else (resize_rgb(rgb, size), "")
        frame_ids += ids
        images += [image for image, _ in decoded]
        errors += [error for _, error in decoded]
    stacked = np.stack(images) if images else np.zeros((0, size[0], size[1], 3), np.uint8)
    return {"frame_id": np.array(frame_ids, dtype=object), "image": stacked, "error": np.array(errors, dtype=object)}


def decoded_pool(manifest: Path, *, size: tuple[int, int], batch_size: int, min_blocks: int,
                 rows_per_block: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> ray.data.Dataset:
    """The pool rows of ``manifest`` as a Ray Data stream of decoded frames (see module doc)."""
    import ray.data
    from ray.data.expressions import col

    manifest = Path(manifest).resolve()
    rows = pq.read_table(manifest, columns=["frame_id", "image_uri"], filters=[("split", "==", "pool")])
    is_video = pc.match_substring(rows["image_uri"], "#t=")
    n_video = pc.sum(is_video).as_py() or 0
    parts = []
    if n_video < rows.num_rows or n_video == 0:
        if n_video == 0:
            ds = ray.data.read_parquet(str(manifest)).select_columns(["frame_id", "image_uri", "split"])
            ds = ds.filter(expr=col("split") == "pool")  # pushed down into the Parquet read
        else:  # a mixed pool: only its image rows, so no batch of this branch comes out empty
            ds = ray.data.from_arrow(rows.filter(pc.invert(is_video)))
        # One manifest file is one block; split it so every actor gets work and a lost
        # actor redoes one block, not the pool. Rows here are ids and URIs: cheap to shuffle.
        ds = ds.repartition(max(min_blocks, -(-pq.ParquetFile(manifest).metadata.num_rows // rows_per_block)))
        parts.append(ds.map_batches(decode_frames, fn_kwargs={"size": size, "max_pixels": max_pixels},
                                    batch_size=batch_size))
    if n_video:
        videos = rows.filter(is_video)
        chunks = video_chunks(videos["frame_id"], videos["image_uri"])
        n_blocks = min(chunks.num_rows, MAX_VIDEO_BLOCKS)
        bounds = np.linspace(0, chunks.num_rows, n_blocks + 1).astype(int)
        blocks = [chunks.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]
        log.info("decoding %d video frames in %d chunks of <= %d frames (%d blocks), %d image frames",
                 n_video, chunks.num_rows, VIDEO_CHUNK_FRAMES, len(blocks), rows.num_rows - n_video)
        parts.append(ray.data.from_arrow(blocks).map_batches(
            decode_video_chunks, fn_kwargs={"size": size, "max_pixels": max_pixels}, batch_size=1, num_cpus=1))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
