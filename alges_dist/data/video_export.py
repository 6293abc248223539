"""Video frames that people label become files, once: lossless PNG of exactly the decoded pixels.

Training and evaluation then read static files and never seek into a video (a seek
costs 25-95 CPU-ms per frame with 10 s keyframe intervals, every epoch), and
annotators see exactly the pixels the model scored. Each export folder keeps
``sources.csv`` (frame_id, source_uri, width, height, sha256): where every PNG came
from, so a run folder still knows each labeled frame's video time.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from collections import defaultdict
from fractions import Fraction
from pathlib import Path

from PIL import Image

from alges_dist.data.atomic import atomic_path, atomic_write_text
from alges_dist.data.frames import DEFAULT_MAX_PIXELS, FrameDecodeError
from alges_dist.data.video import iter_frames, parse_video_uri
from alges_dist.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["SOURCES_CSV", "export_video_frames", "read_sources"]

SOURCES_CSV = "sources.csv"
_SOURCE_COLUMNS = ["frame_id", "source_uri", "width", "height", "sha256"]


def read_sources(folder: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of ``folder/sources.csv`` (empty when there is none)."""
    path = Path(folder) / SOURCES_CSV
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def export_video_frames(folder: str | os.PathLike[str], uris: dict[str, str], *,
                        max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, str]:
    """Write ``folder/FRAME_ID.png`` for each ``{frame_id: video #t= uri}``; return frame_id -> PNG path.

    A PNG already there is kept (frames are written once). Frames are decoded grouped
    by video, one open per video and one forward decode through its picks (another seek
    only across long gaps). Raises FrameDecodeError naming the frame and the video when
    a picked frame cannot be decoded.
    """
    folder = Path(folder)
    out: dict[str, str] = {}
    by_video: dict[str, list[tuple[str, Fraction]]] = defaultdict(list)
    for frame_id, uri in uris.items():
        if not frame_id or "/" in frame_id or frame_id.startswith("."):
            raise InputError(f"frame_id {frame_id!r} cannot name a file; video frame ids look like VIDEO_000123")
        png = folder / f"{frame_id}.png"
        target = parse_video_uri(uri)
        if target is None:
            raise InputError(f"frame {frame_id}: {uri!r} is not a video frame URI (VIDEO#t=SECONDS)")
        if png.is_file():
            out[frame_id] = str(png.resolve())
        else:
            by_video[target[0]].append((frame_id, target[1]))
    records = []
    for path, items in by_video.items():
        ids = [frame_id for frame_id, _ in items]
        for i, rgb, error in iter_frames(path, [t for _, t in items], max_pixels=max_pixels):
            if error is not None:
                raise FrameDecodeError(f"picked frame {ids[i]}: {error}")
            buffer = io.BytesIO()
            Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)  # lossless; level 1: 3x faster than 6
            data = buffer.getvalue()
            png = folder / f"{ids[i]}.png"
            with atomic_path(png) as tmp:
                tmp.write_bytes(data)
            out[ids[i]] = str(png.resolve())
            records.append({"frame_id": ids[i], "source_uri": uris[ids[i]], "width": rgb.shape[1],
                            "height": rgb.shape[0], "sha256": hashlib.sha256(data).hexdigest()})
    if records:
        known = {r["frame_id"]: r for r in read_sources(folder)}
        known.update({r["frame_id"]: r for r in records})
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=_SOURCE_COLUMNS)
        writer.writeheader()
        writer.writerows(known.values())
        atomic_write_text(folder / SOURCES_CSV, buffer.getvalue())
        log.info("exported %d video frames as PNG to %s", len(records), folder)
    return out
