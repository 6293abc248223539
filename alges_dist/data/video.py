"""Video files as frame sources: probe, ``#t=`` addresses, exact time arithmetic, decoding.

A manifest row addresses a video frame as ``/abs/video.mp4#t=SECONDS`` (W3C media
fragment, npt seconds as a decimal with at most 6 fractional digits). The rule: **the
frame on screen at t**, i.e. the last frame whose presentation time
``(pts - stream.start_time) * time_base`` is ``<= t``. Times are ``fractions.Fraction``
throughout, so a 25 fps frame at 0.04 s or a 1/12800 time base never meets a float
rounding error; a time that is not a finite decimal (30000/1001 fps) is written rounded
*up* to 1 microsecond, and the floor rule still lands on the same frame (the next frame
is milliseconds later).

Decoding (:func:`iter_frames`) opens a file once, seeks once to the first target and
decodes forward packet by packet, emitting the on-screen frame of every target; it seeks
again only when the next target is more than ``seek_gap_s`` ahead (a forward decode
that long costs more than a seek). Damaged data never raises: a packet that fails to
decode, the frames that depend on it (until the next keyframe) and targets past the
real end of a truncated file come back as error strings naming the file and the time.

Measured facts behind these choices: /work/shared/VIDEO.md (issue 11).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np

from alges_dist import storage
from alges_dist.data.atomic import atomic_path
from alges_dist.errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "SEEK_GAP_S",
    "VIDEO_SUFFIXES",
    "VideoError",
    "VideoInfo",
    "format_seconds",
    "frame_index_at",
    "is_video_uri",
    "iter_frames",
    "packet_times",
    "parse_video_uri",
    "probe_video",
    "read_frame",
    "sample_times",
    "video_uri",
    "write_h264",
]

VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".mkv", ".mov", ".avi", ".ts", ".m4v", ".webm", ".mpg", ".mpeg")
#: Seek again when the next target is this far ahead: x264's default keyframe interval is
#: 250 frames (10 s at 25 fps), so a seek costs at most ~10 s of decode; 20 s of forward
#: decode costs more.
SEEK_GAP_S = Fraction(20)
_FRAGMENT = "#t="
_SECONDS = re.compile(r"^\d+(\.\d{1,6})?$")
_MICRO = Fraction(1, 1_000_000)


class VideoError(InputError):
    """A video that cannot be used (unopenable, no video stream, too many pixels); names the file."""


# ---------------------------------------------------------------------------- addresses


def format_seconds(t: Fraction) -> str:
    """``t`` as a decimal with at most 6 fractional digits, rounded up to 1 us when inexact.

    ``Fraction(1, 25)`` -> ``"0.04"``, ``Fraction(3)`` -> ``"3"``, ``Fraction(1001, 30000)``
    -> ``"0.033367"`` (rounded up, so the floor rule still finds that frame).
    """
    if t < 0:
        raise InputError(f"time {t} is negative")
    micros = math.ceil(Fraction(t) / _MICRO)
    whole, frac = divmod(micros, 1_000_000)
    return str(whole) if frac == 0 else f"{whole}.{frac:06d}".rstrip("0")


def video_uri(path: str | os.PathLike[str], t: Fraction) -> str:
    """``/abs/path/video.mp4#t=SECONDS`` for the frame on screen at ``t``."""
    return f"{os.fspath(path)}{_FRAGMENT}{format_seconds(t)}"


def parse_video_uri(uri: str) -> tuple[str, Fraction] | None:
    """``(path, t)`` of a ``#t=`` URI, or None for a plain image URI.

    Only the last ``#t=`` counts and its value must be a plain decimal, so a ``#``
    elsewhere in a path does not break it. Raises ValueError naming the URI for a
    malformed time (``#t=1e3``, ``#t=-1``, ``#t=1.1234567``).
    """
    path, sep, seconds = uri.rpartition(_FRAGMENT)
    if not sep:
        return None
    if not path or not _SECONDS.match(seconds):
        raise InputError(f"{uri}: '#t=' needs a path before it and seconds as a decimal with at most "
                         f"6 fractional digits after it (e.g. video.mp4#t=12.48)")
    return path, Fraction(seconds)


def is_video_uri(uri: str) -> bool:
    return _FRAGMENT in uri


# ---------------------------------------------------------------------------- probing


class VideoInfo(NamedTuple):
    """What the container headers say about a file's first video stream (nothing decoded)."""

    path: str
    codec: str
    width: int
    height: int
    time_base: Fraction
    start_pts: int
    avg_rate: Fraction | None
    guessed_rate: Fraction | None
    n_frames: int  # 0 when the container does not say
    duration: Fraction  # seconds from the first frame's time
    cfr: bool | None  # constant frame rate: average == guessed rate and the frame count fits the
    # duration; None when the container states no frame count (mkv, ts): then it cannot tell

    @property
    def rate(self) -> Fraction:
        """The rate ``frame_index`` counts in: average, else guessed."""
        rate = self.avg_rate or self.guessed_rate
        if not rate:
            raise VideoError(f"{self.path}: the stream states no frame rate; cannot number its frames")
        return rate


def _open(path: str | os.PathLike[str]) -> av.container.InputContainer:
    try:
        if storage.is_uri(path):  # a seekable file over ranged GETs: only the GOPs decoded are read
            return av.open(storage.open_input(path))
        return av.open(os.fspath(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (av.FFmpegError, OSError, UnicodeDecodeError) as err:
        hint = ""
        if Path(path).suffix.lower() in (".mp4", ".mov", ".m4v"):
            hint = ("; an mp4 whose recording was cut off mid-write has no index (moov atom) and looks like this: "
                    "re-mux or repair it")
        raise VideoError(f"{path}: cannot be opened as a video ({type(err).__name__}: {err}){hint}") from None


def _video_stream(container: av.container.InputContainer, path: str | os.PathLike[str]) -> av.VideoStream:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise VideoError(f"{path}: has no video stream (streams: {', '.join(kinds)})")
    return container.streams.video[0]


def _check_pixels(width: int, height: int, max_pixels: int | None, where: str) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise VideoError(f"{where}: {width}x{height} = {width * height / 1e6:.1f} megapixels per frame, more than "
                         f"the cap of {max_pixels / 1e6:g} MP (data.max_pixels / --max-pixels)")


def probe_video(path: str | os.PathLike[str], *, max_pixels: int | None = None) -> VideoInfo:
    """Read a file's headers (milliseconds; no frame is decoded).

    Raises FileNotFoundError, or VideoError naming the file: unopenable, no video
    stream, frames larger than ``max_pixels``, or no duration anywhere.
    """
    with _open(path) as container:
        stream = _video_stream(container, path)
        width, height = stream.codec_context.width, stream.codec_context.height
        _check_pixels(width, height, max_pixels, os.fspath(path))
        tb = Fraction(stream.time_base)
        start = stream.start_time or 0
        avg = Fraction(stream.average_rate) if stream.average_rate else None
        guessed = Fraction(stream.guessed_rate) if stream.guessed_rate else None
        if stream.duration:
            duration = stream.duration * tb
        elif container.duration:
            duration = Fraction(container.duration, av.time_base)
        else:
            times = packet_times(path)  # no header says it (some mkv/ts): one demux-only pass
            if not times:
                raise VideoError(f"{path}: no duration in the headers and no video packets in the file")
            duration = times[-1] + (1 / avg if avg else 0)
        n_frames = int(stream.frames or 0)
        cfr = None if not n_frames else bool(avg and avg == guessed and abs(n_frames - duration * avg) <= 1)
        return VideoInfo(os.fspath(path), stream.codec_context.name, width, height, tb, start, avg, guessed,
                         n_frames, duration, cfr)


def packet_times(path: str | os.PathLike[str]) -> list[Fraction]:
    """Presentation time of every video frame, from a demux-only pass (no decode), sorted.

    Exact frame times for variable-frame-rate files; about 0.2-0.45 CPU-s per hour of
    25 fps video (VIDEO.md section 5.2).
    """
    with _open(path) as container:
        stream = _video_stream(container, path)
        tb, start = Fraction(stream.time_base), stream.start_time or 0
        pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None and p.size)
    return [(p - start) * tb for p in pts]


def sample_times(duration: Fraction, fps: Fraction) -> list[Fraction]:
    """``k / fps`` for every ``k / fps < duration``, rounded up to 1 us (URIs hold 6 digits)."""
    if fps <= 0:
        raise InputError(f"fps must be positive, got {fps}")
    n = math.ceil(Fraction(duration) * fps)  # k < duration * fps
    return [Fraction(format_seconds(Fraction(k) / fps)) for k in range(n)]


def frame_index_at(t: Fraction, rate: Fraction) -> int:
    """Source frame ordinal on screen at ``t`` for a constant ``rate`` (an estimate for VFR)."""
    return math.floor(Fraction(t) * rate)


# ---------------------------------------------------------------------------- decoding


class _Frame(NamedTuple):
    frame: av.VideoFrame
    t: Fraction
    tainted: bool  # decoded after damaged data, before the next keyframe


def _rgb(entry: _Frame, cache: list) -> np.ndarray:
    """RGB of ``entry``, converted once even when several targets share the frame.

    ``cache`` holds ``[entry, rgb]``; it keeps the entry alive, so identity cannot be reused.
    """
    if not cache or cache[0] is not entry:
        cache[:] = [entry, entry.frame.to_ndarray(format="rgb24")]  # BT.601, as every path decodes it
    return cache[1]


def iter_frames(
    path: str | os.PathLike[str],
    times: Sequence[Fraction],
    *,
    max_pixels: int | None = None,
    seek_gap_s: Fraction = SEEK_GAP_S,
) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    """Decode the frame on screen at each of ``times``: yields ``(i, rgb, None)`` or ``(i, None, error)``.

    ``i`` indexes ``times``; results come in time order, one per target. ``rgb`` is
    uint8 ``(H, W, 3)`` at the stream's size. One seek to the first target, then one
    forward decode with one decoder thread (parallelism belongs to the caller, across
    chunks); another seek only when the next target is more than ``seek_gap_s`` ahead.
    Never raises for bad data: an unopenable file, a missing stream, too many pixels,
    damaged packets (and the frames decoded from them until the next keyframe) and times
    past the real end of the stream become per-target error strings naming the file and t.
    """
    order = sorted(range(len(times)), key=lambda i: times[i])
    targets = [Fraction(times[i]) for i in order]
    if not targets:
        return
    where = os.fspath(path)
    try:
        container = _open(path)
    except (VideoError, FileNotFoundError) as err:
        yield from ((i, None, str(err)) for i in order)
        return
    with container:
        try:
            stream = _video_stream(container, path)
            _check_pixels(stream.codec_context.width, stream.codec_context.height, max_pixels, where)
        except VideoError as err:
            yield from ((i, None, str(err)) for i in order)
            return
        stream.codec_context.thread_count = 1
        tb, start = Fraction(stream.time_base), stream.start_time or 0
        k, position = 0, None
        while k < len(targets):
            k, position = yield from _decode_forward(container, stream, tb, start, targets, order, k, where,
                                                     seek_gap_s, position)


def _decode_forward(container, stream, tb, start, targets, order, k, where, seek_gap_s, position):
    """One seek to ``targets[k]`` and a forward decode; yields results, returns (next k, time decoded to).

    ``position``: where the previous pass stopped. A seek that lands at or before it (the
    keyframe before the target is behind us) must not be repeated: then this pass decodes
    forward and seeks again only after a keyframe past ``position``.
    """
    n = len(targets)
    cache: list = []
    try:
        container.seek(start + math.floor(targets[k] / tb), stream=stream, backward=True)
    except av.FFmpegError as err:
        for j in range(k, n):
            yield order[j], None, f"{where}#t={format_seconds(targets[j])}: seek failed ({err})"
        return n, position
    prev: _Frame | None = None
    may_seek: bool | None = None  # decided by where the seek landed
    damaged = False  # a packet failed since the last keyframe: frames decoded now are unreliable
    lost_from: Fraction | None = None  # earliest time of a frame lost since `prev`
    n_bad = 0

    def result(j: int, entry: _Frame | None, lost: Fraction | None):
        t = targets[j]
        name = f"{where}#t={format_seconds(t)}"
        if entry is None:
            return order[j], None, f"{name}: no frame decodes at or after this time"
        if lost is not None and t >= lost:
            return order[j], None, f"{name}: undecodable (damaged data from t={float(lost):.3f} s, {n_bad} bad packets)"
        if entry.tainted:
            return order[j], None, (f"{name}: undecodable (decoded from damaged data, {n_bad} bad packets; "
                                    "frames are unreliable until the next keyframe)")
        return order[j], _rgb(entry, cache), None

    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError:
                n_bad += 1
                damaged = True
                lost = (packet.pts - start) * tb if packet.pts is not None else (prev.t if prev else targets[k])
                lost_from = lost if lost_from is None else min(lost_from, lost)
                continue
            for frame in frames:
                if frame.pts is None:
                    continue
                if frame.key_frame:
                    damaged = False
                entry = _Frame(frame, (frame.pts - start) * tb, damaged)
                if may_seek is None:
                    may_seek = position is None or entry.t > position
                elif frame.key_frame and (position is None or entry.t > position):
                    may_seek = True  # a seek from here on lands past where we have been
                while k < n and targets[k] < entry.t:  # their on-screen frame is the one before
                    yield result(k, prev if prev is not None else entry, lost_from)
                    k += 1
                prev, lost_from = entry, None
                if k == n:
                    return n, entry.t
                if may_seek and targets[k] - entry.t > seek_gap_s:
                    return k, entry.t  # cheaper to seek than to decode that far
    except av.FFmpegError as err:  # the container itself broke mid-file
        for j in range(k, n):
            yield order[j], None, f"{where}#t={format_seconds(targets[j])}: demuxing failed ({err})"
        return n, position
    # End of stream: the last frame stays on screen for its duration, then the video is over.
    if prev is not None:
        rate = stream.average_rate or stream.guessed_rate
        shown = prev.frame.duration * tb if prev.frame.duration else (1 / Fraction(rate) if rate else Fraction(0))
        end = prev.t + shown
        while k < n and targets[k] < end:
            yield result(k, prev, lost_from)
            k += 1
    stated = stream.duration * tb if stream.duration else None
    for j in range(k, n):
        ends = f"video ends at t={float(end):.3f} s" if prev is not None else "no frame decodes"
        probed = f" (headers say {float(stated):.3f} s: truncated?)" if stated is not None else ""
        yield order[j], None, f"{where}#t={format_seconds(targets[j])}: {ends}{probed}"
    return n, prev.t if prev is not None else position


def read_frame(path: str | os.PathLike[str], t: Fraction, *, max_pixels: int | None = None) -> np.ndarray:
    """The RGB uint8 ``(H, W, 3)`` frame on screen at ``t``; raises VideoError naming file and t."""
    ((_, rgb, error),) = list(iter_frames(path, [t], max_pixels=max_pixels))
    if error is not None:
        raise VideoError(error)
    return rgb


# ---------------------------------------------------------------------------- encoding


def write_h264(path: str | os.PathLike[str], frames: np.ndarray, *, fps: int | Fraction, crf: int = 18,
               gop: int = 250, preset: str = "veryfast") -> Path:
    """Encode uint8 RGB frames ``(T, H, W, 3)`` (even H and W) as an H.264 mp4, atomically.

    For generated pools (the demo) and benchmarks; ``gop=250`` is x264's default keyframe
    interval, as in real recordings. One encoder thread, so the same frames give the same bytes.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise InputError(f"H.264 in yuv420p needs even height and width, got {frames.shape[1]}x{frames.shape[2]}")
    with atomic_path(path) as tmp:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps))
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            stream.codec_context.thread_count = 1
            stream.options = {"preset": preset, "crf": str(crf), "g": str(gop)}
            for rgb in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
            container.mux(stream.encode())
    return Path(path)
