"""The generated demo pool: SYNTHETIC surgical-like videos, not real data.

The embedded default for ``make demo`` and for fast tests: a deterministic generator
(numpy + PIL, a few seconds) of short videos that share the properties the active-learning
loop cares about in real laparoscopic video:

- tissue classes as textured regions (background cavity, liver, fat, gallbladder) with
  soft shading and dark boundaries, and a metallic instrument class;
- instruments as elongated shafts with jaws that enter from the frame border and move
  smoothly (angle, insertion depth, jaw opening);
- specular highlights on wet tissue, vignetting, sensor noise;
- smooth camera motion over a larger scene, so consecutive frames are near-duplicates
  (a few pixels apart) and distant frames differ, as in real video;
- exact masks: the label map the pixels were painted from.

Each video is one scene with its own seed; split by video (the last video is test, the
one before it val, the rest pool). The pool is stored the way archives hold surgery: as
H.264 mp4 files (``videos/``, :data:`DEMO_FPS` frames per second, x264's default 250-frame
keyframe interval) with one mask per frame (``masks/FRAME_ID.png``, class ids, identity
LUT), and ingested with the video path (``alges ingest video``); ``source="frames"``
keeps the PNG-folder layout (``alges ingest folder``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from alges_dist.data.atomic import atomic_directory
from alges_dist.data.manifest import MaskEncoding
from alges_dist.errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "DEMO_CLASS_NAMES",
    "DEMO_ENCODING",
    "DEMO_FPS",
    "GENERATOR_VERSION",
    "SyntheticVideo",
    "demo_pool",
    "synthetic_video",
]

#: Bump when the generator's output changes: cached pools are keyed on it.
GENERATOR_VERSION = 2  # 2: videos (H.264) instead of PNG frames
#: Frames per second of the demo videos, and the rate ingest samples them at: one row per
#: rendered frame, so "N seconds apart" in a report means N frames.
DEMO_FPS = 1
DEMO_CLASS_NAMES: list[str] = ["background", "liver", "fat", "gallbladder", "instrument"]
DEMO_ENCODING = MaskEncoding(mode="lut", class_map={i: i for i in range(5)}, class_names=DEMO_CLASS_NAMES)
BACKGROUND, LIVER, FAT, GALLBLADDER, INSTRUMENT = range(5)

# Mean RGB of each tissue (0..255): dark cavity, red-brown liver, yellow fat, green-grey gallbladder.
_TISSUE_RGB = np.array([[45, 20, 18], [140, 45, 38], [215, 180, 95], [100, 125, 70]], dtype=np.float32)
# Texture: (noise cells, relative amplitude) per tissue; fat is lobular, liver mottled.
_TEXTURE = [(8, 0.25), (20, 0.12), (28, 0.22), (10, 0.08)]
_CAMERA_SPEED_CYCLES_PER_FRAME = (0.004, 0.01)  # ~<= 2 px/frame at size 128


class SyntheticVideo(NamedTuple):
    """``images``: uint8 ``(T, H, W, 3)``; ``masks``: uint8 ``(T, H, W)`` class ids 0..4."""

    images: np.ndarray
    masks: np.ndarray


def _smooth_noise(rng: np.random.Generator, side: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-std smooth noise ``(side, side)``: a random grid, bicubic-upsampled."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    field = np.asarray(Image.fromarray(grid).resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32)
    return (field - field.mean()) / (field.std() + 1e-6)


def _scene(rng: np.random.Generator, side: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A static scene larger than the view: RGB float ``(side, side, 3)``, labels ``(side, side)``."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    center = side / 2
    scores = [np.full((side, side), 0.3, np.float32) + 0.1 * _smooth_noise(rng, side, 5)]
    rotation = rng.uniform(0, 2 * np.pi)
    for k in range(3):  # liver, fat, gallbladder
        score = 0.3 * _smooth_noise(rng, side, 6)
        # First bump in the always-visible middle, one sector per tissue, so every view
        # of the video shows each class; the others anywhere.
        angle = rotation + 2 * np.pi * k / 3 + rng.uniform(-0.3, 0.3)
        centers = [(center + 0.22 * size * np.sin(angle), center + 0.22 * size * np.cos(angle))]
        centers += [tuple(rng.uniform(0.15 * side, 0.85 * side, 2)) for _ in range(rng.integers(1, 3))]
        for i, (cy, cx) in enumerate(centers):
            sigma = rng.uniform(0.1, 0.16) * side
            score += (1.4 if i == 0 else 0.9) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        scores.append(score)
    labels = np.argmax(np.stack(scores), axis=0).astype(np.uint8)  # (side, side)

    rgb = _TISSUE_RGB[labels]  # (side, side, 3)
    for k, (cells, amplitude) in enumerate(_TEXTURE):
        texture = 1 + amplitude * _smooth_noise(rng, side, cells) + 0.03 * _smooth_noise(rng, side, 64)
        rgb[labels == k] *= texture[labels == k, None]
    rgb *= (1 + 0.15 * _smooth_noise(rng, side, 3))[..., None]  # uneven lighting
    edge = np.zeros((side, side), bool)
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    rgb[edge] *= 0.75  # tissue boundaries read as creases
    wet = (labels == LIVER) | (labels == GALLBLADDER)
    spots = np.argwhere(wet)
    spots = spots[rng.choice(len(spots), size=min(len(spots), 40), replace=False)]
    for y, x in spots:
        radius = rng.uniform(0.6, 2.0)
        y0, y1, x0, x1 = max(0, y - 6), min(side, y + 7), max(0, x - 6), min(side, x + 7)
        glint = np.exp(-((yy[y0:y1, x0:x1] - y) ** 2 + (xx[y0:y1, x0:x1] - x) ** 2) / (2 * radius**2))
        glint *= wet[y0:y1, x0:x1]  # highlights stay on their tissue
        rgb[y0:y1, x0:x1] += (250 - rgb[y0:y1, x0:x1]) * glint[..., None]
    return rgb, labels


class _Instrument(NamedTuple):
    entry_angle: float  # where the shaft enters, angle around the view centre
    sway: float  # amplitude of the shaft angle (radians)
    depth: float  # mean insertion length (px)
    depth_swing: float
    width: float
    phases: np.ndarray  # (3,) sway, depth, jaw
    speeds: np.ndarray  # (3,) cycles per frame


def _instrument_pixels(tool: _Instrument, t: int, size: int, yy: np.ndarray, xx: np.ndarray):
    """(inside mask ``(H, W)`` bool, shading ``(H, W)`` in 0..1) of one instrument at frame ``t``."""
    # Scalars via math (Python floats) keep the float32 grids float32; numpy scalars upcast.
    phase = [float(p) for p in 2 * np.pi * tool.speeds * t + tool.phases]
    c = size / 2
    ey, ex = c + 0.75 * size * math.sin(tool.entry_angle), c + 0.75 * size * math.cos(tool.entry_angle)
    heading = tool.entry_angle + math.pi + tool.sway * math.sin(phase[0])
    dy, dx = math.sin(heading), math.cos(heading)
    length = 0.25 * size + tool.depth + tool.depth_swing * math.sin(phase[1])
    along = (yy - ey) * dy + (xx - ex) * dx
    across = (xx - ex) * dy - (yy - ey) * dx
    half = tool.width / 2
    shaft = (along >= 0) & (along <= length) & (np.abs(across) <= half)
    shade = np.zeros_like(yy)
    shade[shaft] = np.cos(across[shaft] / half * (np.pi / 2))
    ty, tx = ey + length * dy, ex + length * dx
    opening = 0.15 + 0.25 * (1 + math.sin(phase[2])) / 2
    jaw_length = 1.6 * tool.width
    inside = shaft
    for side_sign in (-1, 1):
        jaw_heading = heading + side_sign * opening
        jy, jx = math.sin(jaw_heading), math.cos(jaw_heading)
        j_along = (yy - ty) * jy + (xx - tx) * jx
        j_across = (xx - tx) * jy - (yy - ty) * jx
        taper = half * 0.7 * (1 - 0.6 * np.clip(j_along / jaw_length, 0, 1))
        jaw = (j_along >= 0) & (j_along <= jaw_length) & (np.abs(j_across) <= taper)
        tip_only = jaw & ~inside
        shade[tip_only] = 0.6 + 0.4 * np.cos(j_across[tip_only] / taper[tip_only] * (np.pi / 2))
        inside = inside | jaw
    return inside, shade


def synthetic_video(rng: np.random.Generator, *, n_frames: int, size: int) -> SyntheticVideo:
    """Render one synthetic video of ``n_frames`` frames of ``size x size`` px (SYNTHETIC data)."""
    side = 2 * size
    scene_rgb, scene_labels = _scene(rng, side, size)
    reach = (side - size) / 2  # the view's top-left corner moves within [0, side - size]
    amplitude = rng.uniform(0.35, 0.5, 2) * reach
    speeds = rng.uniform(*_CAMERA_SPEED_CYCLES_PER_FRAME, 2)
    phases = rng.uniform(0, 2 * np.pi, 2)
    tools = [
        _Instrument(
            entry_angle=float(angle),
            sway=float(rng.uniform(0.1, 0.3)),
            depth=float(rng.uniform(0.35, 0.5) * size),
            depth_swing=float(rng.uniform(0.05, 0.12) * size),
            width=float(rng.uniform(0.06, 0.09) * size),
            phases=rng.uniform(0, 2 * np.pi, 3),
            speeds=rng.uniform(0.005, 0.02, 3),
        )
        for angle in rng.uniform(0, 2 * np.pi) + np.pi * np.arange(rng.integers(1, 3)) + rng.uniform(-0.4, 0.4)
    ]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r2 = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (size / 2) ** 2
    vignette = np.clip(1 - 0.35 * r2, 0.3, 1)[..., None]
    metal = np.array([150, 155, 165], np.float32)

    images = np.empty((n_frames, size, size, 3), np.uint8)
    masks = np.empty((n_frames, size, size), np.uint8)
    for t in range(n_frames):
        oy, ox = np.rint(reach + amplitude * np.sin(2 * np.pi * speeds * t + phases)).astype(int)
        rgb = scene_rgb[oy : oy + size, ox : ox + size].copy()
        labels = scene_labels[oy : oy + size, ox : ox + size].copy()
        for tool in tools:
            inside, shade = _instrument_pixels(tool, t, size, yy, xx)
            tool_shade = shade[inside][:, None]  # (n_inside, 1)
            rgb[inside] = metal * (0.45 + 0.55 * tool_shade) + 60 * (tool_shade > 0.93)
            labels[inside] = INSTRUMENT
        rgb = rgb * vignette + 2.0 * rng.standard_normal(rgb.shape, dtype=np.float32)  # sensor noise
        images[t] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
        masks[t] = labels
    return SyntheticVideo(images, masks)


def _pool_folder(cache_dir: Path | None, params: dict) -> Path:
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = Path("~/.cache/alges_dist").expanduser() if cache_dir is None else Path(cache_dir)
    return root / f"demo-{digest}"


def demo_pool(
    cache_dir: Path | None = None,
    *,
    seed: int = 0,
    n_videos: int = 6,
    frames_per_video: int = 50,
    size: int = 128,
    source: str = "video",
) -> Path:
    """Path of the manifest of the SYNTHETIC demo pool, generating it on first use.

    The pool lives in ``cache_dir / demo-<hash of the parameters and GENERATOR_VERSION>/``
    (``cache_dir`` defaults to ``~/.cache/alges_dist``): ``videos/synthNN.mp4`` (H.264 at
    :data:`DEMO_FPS`), ``masks/FRAME_ID.png`` (class ids, :data:`DEMO_ENCODING`) and
    ``manifest.parquet`` (+ ``manifest.videos.parquet``) from :func:`ingest_video`; with
    ``source="frames"``, ``images/FRAME_ID.png`` ingested by :func:`ingest_folder`
    instead. The files are generated into a temporary folder renamed into place when
    complete, so a crash leaves no half pool. Same parameters -> the same files. Videos
    are named ``synth00 ..``; the last is the test split, the one before it val, the rest
    pool; all frames start unlabeled; frame ids are ``synthNN_FRAMEINDEX``.
    """
    for name, value, low in (("n_videos", n_videos, 3), ("frames_per_video", frames_per_video, 2), ("size", size, 32)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    if size % 2:
        raise InputError(f"size must be even (H.264 stores colour at half resolution), got {size}")
    if source not in ("video", "frames"):
        raise InputError(f"source must be 'video' or 'frames', got {source!r}")
    params = {"version": GENERATOR_VERSION, "seed": int(seed), "n_videos": n_videos,
              "frames_per_video": frames_per_video, "size": size, "source": source}  # fmt: skip
    folder = _pool_folder(cache_dir, params)
    manifest = folder / "manifest.parquet"
    if manifest.is_file():
        return manifest
    if not folder.exists():  # a folder without manifest was renamed complete: only ingest again
        log.info("generating synthetic demo pool in %s (%s)", folder, params)
        with atomic_directory(folder) as tmp:
            _write_pool_files(tmp, seed=seed, n_videos=n_videos, frames_per_video=frames_per_video, size=size,
                              source=source)
    fractions = ((n_videos - 2) / n_videos, 1 / n_videos, 1 / n_videos)  # whole videos: last test, one val
    if source == "video":
        from alges_dist.data.video_source import ingest_video  # local: sources import this package's frames

        log.info("demo pool: alges ingest video --videos %s --fps %d --masks %s --out %s", folder / "videos",
                 DEMO_FPS, folder / "masks", manifest)
        ingest_video(folder / "videos", manifest, fps=DEMO_FPS, masks=folder / "masks", encoding=DEMO_ENCODING,
                     fractions=fractions)
    else:
        from alges_dist.data.sources import ingest_folder

        ingest_folder(folder / "images", folder / "masks", manifest, encoding=DEMO_ENCODING, split="video",
                      fractions=fractions, video_pattern=r"(?P<video>synth\d+)_(?P<index>\d+)")
    return manifest


def _write_pool_files(folder: Path, *, seed: int, n_videos: int, frames_per_video: int, size: int,
                      source: str) -> None:
    from alges_dist.data.video import write_h264

    (folder / "masks").mkdir()
    (folder / ("videos" if source == "video" else "images")).mkdir()
    for v in range(n_videos):
        video_id = f"synth{v:02d}"
        video = synthetic_video(np.random.default_rng([int(seed), v]), n_frames=frames_per_video, size=size)
        if source == "video":
            write_h264(folder / "videos" / f"{video_id}.mp4", video.images, fps=DEMO_FPS)
        for t in range(frames_per_video):
            frame_id = f"{video_id}_{t:06d}"  # = VIDEOID_FRAMEINDEX of ingest at DEMO_FPS
            if source == "frames":
                Image.fromarray(video.images[t]).save(folder / "images" / f"{frame_id}.png", compress_level=1)
            Image.fromarray(video.masks[t]).save(folder / "masks" / f"{frame_id}.png", compress_level=1)
