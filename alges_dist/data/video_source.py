"""Video files as a pool (`alges ingest video`): container headers only, no frame extracted.

:func:`ingest_video` probes every file (milliseconds each), samples ``--fps`` frames per
second of each video and writes one manifest row per sampled frame:

- ``video_id`` = the file stem (two files with one stem are an error naming both);
- ``frame_index`` = the source frame ordinal on screen at t, ``floor(t * average rate)``
  (exact for constant-rate video; an estimate for variable-rate video, whose ``#t=`` is
  still exact);
- ``frame_id`` = ``VIDEOID_FRAMEINDEX`` zero-padded to 6 digits (stable across runs);
- ``image_uri`` = ``/abs/path/video.mp4#t=SECONDS`` (:mod:`alges_dist.data.video`);
- ``mask_uri`` = ``MASKS/FRAME_ID.png`` when given; splits are whole videos.

Beside ``POOL.parquet`` it writes ``POOL.videos.parquet``: one row per file with its
path, size, duration, rates, constant-frame-rate flag, size in pixels, codec, rows
sampled and probe error. A file that cannot be opened or has no video stream fails
ingest naming the file; with ``skip_bad`` it is recorded in the sidecar and skipped.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from alges_dist import storage
from alges_dist.data.frames import DEFAULT_MAX_PIXELS, FrameDecodeError, load_mask
from alges_dist.data.manifest import MaskEncoding, make_manifest, write_manifest
from alges_dist.data.sources import BINARY_ENCODING, _list_frames, natural_key, split_by_videos
from alges_dist.data.video import (
    VIDEO_SUFFIXES,
    VideoError,
    VideoInfo,
    frame_index_at,
    packet_times,
    probe_video,
    sample_times,
    video_uri,
)
from alges_dist.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["SIDECAR_SCHEMA", "find_videos", "ingest_video", "parse_fps", "sidecar_path"]

SIDECAR_SCHEMA = pa.schema([
    pa.field("video_id", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("size_bytes", pa.int64()),
    pa.field("mtime_ns", pa.int64()),
    pa.field("codec", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("time_base", pa.string()),
    pa.field("start_pts", pa.int64()),
    pa.field("avg_fps", pa.float64()),
    pa.field("avg_rate", pa.string()),
    pa.field("duration_s", pa.float64()),
    pa.field("n_frames", pa.int64()),
    pa.field("cfr", pa.bool_()),
    pa.field("rows", pa.int64(), nullable=False),
    pa.field("probe_error", pa.string()),
])  # fmt: skip


def sidecar_path(manifest: str | os.PathLike[str]) -> Path | storage.ObjectPath:
    """``POOL.videos.parquet`` beside ``POOL.parquet`` (a local path or an object-store URI)."""
    manifest = storage.as_path(manifest)
    if isinstance(manifest, storage.ObjectPath):
        return storage.ObjectPath(f"{manifest.uri[:-len(manifest.name)]}{manifest.stem}.videos.parquet")
    return manifest.with_name(f"{manifest.stem}.videos.parquet")


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def parse_fps(text: str | float | Fraction) -> Fraction | None:
    """``"1"``, ``"2.5"``, ``"1/5"`` -> Fraction; ``"native"`` -> None (every frame)."""
    if isinstance(text, str) and text.strip().lower() == "native":
        return None
    try:
        fps = Fraction(str(text).strip())
    except (ValueError, ZeroDivisionError):
        raise InputError(f"--fps {text!r} is not a number (e.g. 1, 2.5, 1/5) or 'native'") from None
    if fps <= 0:
        raise InputError(f"--fps must be positive, got {text!r}")
    return fps


def find_videos(videos: str | os.PathLike[str]) -> list[Path | storage.ObjectPath]:
    """Video files of a folder (recursively, by suffix) or of a glob pattern, in natural order.

    Raises FileNotFoundError when nothing matches, ValueError naming both files when two
    share a stem (the stem is the video id).
    """
    text = os.fspath(videos)
    if storage.is_uri(text):  # a prefix in an object store: every object under it with a video suffix
        found = [storage.ObjectPath(u) for u in storage.list_files(text, VIDEO_SUFFIXES)
                 if not storage.name(u).startswith(".")]
        where = f"{text} (suffixes {', '.join(VIDEO_SUFFIXES)})"
    elif Path(text).is_dir():
        found = [p for p in Path(text).rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES
                 and not p.name.startswith(".")]
        where = f"folder {text} (suffixes {', '.join(VIDEO_SUFFIXES)})"
    else:
        found = [Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file()]
        where = f"pattern {text!r}"
    if not found:
        raise FileNotFoundError(f"no video files in {where}")
    found.sort(key=lambda p: natural_key(str(p)))
    by_stem: dict[str, Path] = {}
    for path in found:
        if path.stem in by_stem:
            raise InputError(f"two videos share the id {path.stem!r}: {by_stem[path.stem]} and {path}; "
                             "rename one (the file stem is the video id)")
        by_stem[path.stem] = path
    return sorted(found, key=lambda p: natural_key(p.stem))


class _Sampled(NamedTuple):
    info: VideoInfo | None
    times: list[Fraction]
    indices: list[int]
    error: str | None


def _sample(path: Path, fps: Fraction | None, max_pixels: int) -> _Sampled:
    """Probe one file and pick its frames; errors come back as text naming the file."""
    try:
        info = probe_video(path, max_pixels=max_pixels)
        if fps is None:  # every frame: exact times from one demux-only pass
            times = packet_times(path)
            indices = list(range(len(times)))
        else:
            if fps > info.rate:
                raise VideoError(f"{path}: --fps {float(fps):g} is above the video's {float(info.rate):.3f} fps, "
                                 "so sampled frames would repeat; lower --fps or use --fps native")
            times = sample_times(info.duration, fps)
            indices = [frame_index_at(t, info.rate) for t in times]
        if not times:
            raise VideoError(f"{path}: no frame to sample (duration {float(info.duration):.3f} s)")
        return _Sampled(info, times, indices, None)
    except (VideoError, FileNotFoundError) as err:
        return _Sampled(None, [], [], str(err))


def _sidecar_row(video_id: str, path: Path, sampled: _Sampled) -> dict:
    size, mtime_ns = storage.size_and_mtime(path)
    info = sampled.info
    return {
        "video_id": video_id, "path": str(path), "size_bytes": size, "mtime_ns": mtime_ns,
        "codec": info.codec if info else None, "width": info.width if info else None,
        "height": info.height if info else None, "time_base": str(info.time_base) if info else None,
        "start_pts": info.start_pts if info else None,
        "avg_fps": float(info.avg_rate) if info and info.avg_rate else None,
        "avg_rate": str(info.avg_rate) if info and info.avg_rate else None,
        "duration_s": float(info.duration) if info else None, "n_frames": info.n_frames if info else None,
        "cfr": info.cfr if info else None, "rows": len(sampled.times), "probe_error": sampled.error,
    }  # fmt: skip


def _attach_masks(frame_ids: list[str], video_of: list[str], sampled: dict[str, _Sampled], masks: Path,
                  encoding: MaskEncoding, max_pixels: int) -> list[str | None]:
    """``MASKS/FRAME_ID.<image suffix>`` per row (None without one); every mask decoded and size-checked."""
    files = _list_frames(masks, "masks")
    uris = [str(files[f].resolve()) if f in files else None for f in frame_ids]
    n_matched = sum(u is not None for u in uris)
    unmatched = sorted(set(files) - set(frame_ids), key=natural_key)
    if n_matched == 0:
        raise InputError(f"no mask in {masks} is named after a sampled frame (FRAME_ID.png, e.g. "
                         f"{frame_ids[0]}.png); found e.g. {sorted(files, key=natural_key)[:3]}")
    if unmatched:
        log.warning("%d masks in %s name no sampled frame (not at the sampled times?), e.g. %s",
                    len(unmatched), masks, unmatched[:3])

    def check(row: int) -> None:
        info = sampled[video_of[row]].info
        ids = load_mask(uris[row], encoding, max_pixels=max_pixels)  # raises naming the file
        if ids.shape != (info.height, info.width):
            raise FrameDecodeError(f"{uris[row]}: mask is {ids.shape[1]}x{ids.shape[0]} but its video "
                                   f"{info.path} is {info.width}x{info.height} (width x height); they must match")

    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        list(pool.map(check, [i for i, u in enumerate(uris) if u is not None]))  # first error in row order
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return uris


def ingest_video(
    videos: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    fps: Fraction | float | str | None = 1,
    masks: str | os.PathLike[str] | None = None,
    encoding: MaskEncoding | None = None,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    skip_bad: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> pa.Table:
    """Build and write the manifest of a folder (or glob) of videos; return the table.

    ``fps``: frames per second of video to sample (``1`` is what surgical segmentation
    sets use); None or ``"native"``: every frame, with exact times from a demux-only pass.
    ``masks``: folder of ``FRAME_ID.png`` masks in ``encoding`` (default
    :data:`~alges_dist.data.sources.BINARY_ENCODING`); rows without one stay unlabeled.
    Whole videos go to pool/val/test by ``fractions`` (:func:`split_by_videos`). Also
    writes the :func:`sidecar_path` table. Bad input raises (FileNotFoundError,
    VideoError, FrameDecodeError, ValueError) naming the file; ``skip_bad`` records
    unusable files in the sidecar instead. Nothing is written unless everything passes.
    """
    out = storage.as_path(out)
    fps = parse_fps(fps) if not isinstance(fps, Fraction) and fps is not None else fps
    encoding = BINARY_ENCODING if encoding is None else encoding
    paths = [p.resolve() for p in find_videos(videos)]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # probing waits on storage
        results = list(pool.map(lambda p: _sample(p, fps, max_pixels), paths))
    sampled = {p.stem: r for p, r in zip(paths, results)}
    bad = [(p, r.error) for p, r in zip(paths, results) if r.error is not None]
    if bad and not skip_bad:
        raise VideoError(f"{bad[0][1]} ({len(bad)} of {len(paths)} files unusable; pass --skip-bad to record "
                         "them in the sidecar and ingest the rest)")
    for path, error in bad:
        log.warning("skipped %s", error)
    good = [p for p in paths if sampled[p.stem].error is None]
    if not good:
        raise VideoError(f"none of the {len(paths)} files in {videos} is a usable video; first: {bad[0][1]}")

    frame_ids, video_of, uris, indices = [], [], [], []
    for path in good:  # find_videos ordered them naturally by id
        s = sampled[path.stem]
        frame_ids += [f"{path.stem}_{i:06d}" for i in s.indices]
        video_of += [path.stem] * len(s.times)
        uris += [video_uri(path, t) for t in s.times]
        indices += s.indices
    split_of = split_by_videos({p.stem: len(sampled[p.stem].times) for p in good}, fractions)
    mask_uris = (_attach_masks(frame_ids, video_of, sampled, storage.as_path(masks), encoding, max_pixels)
                 if masks is not None else [None] * len(frame_ids))
    unlabeled_eval = sum(1 for v, m in zip(video_of, mask_uris) if split_of[v] != "pool" and m is None)
    if unlabeled_eval:
        log.info("%d val/test rows have no mask: people annotate loop.test_frames of the test frames with the "
                 "first batch (loop.oracle: human or labelstudio); the simulated oracle refuses them", unlabeled_eval)
    table = make_manifest(frame_ids=frame_ids, video_ids=video_of, frame_indices=indices, image_uris=uris,
                          mask_uris=mask_uris, splits=[split_of[v] for v in video_of])
    sidecar = pa.Table.from_pylist([_sidecar_row(p.stem, p, sampled[p.stem]) for p in paths], schema=SIDECAR_SCHEMA)
    hours = sum(float(sampled[p.stem].info.duration) for p in good) / 3600
    log.info("ingest %s: %d videos (%.2f h, %d skipped), %d frames at %s fps", videos, len(good), hours, len(bad),
             len(frame_ids), "native" if fps is None else f"{float(fps):g}")
    storage.write_bytes(sidecar_path(out), _parquet_bytes(sidecar))
    write_manifest(table, out, encoding)  # last: a manifest on disk means the ingest finished
    return table
