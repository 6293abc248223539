"""Test inputs made at run time: stamped H.264 clips (PyAV + libx264) and PNG decompression bombs.

Each clip frame stamps its ordinal into its pixels as 16 black/white 16x16 blocks (two
rows of eight at the top), which survive H.264, so a test asserts *which* frame a
decoder returned. Below the stamp a gradient moves and noise changes every frame, so
the encoder writes real P-frames. Encoded here with plain PyAV, independent of the
code under test.
"""

from __future__ import annotations

import struct
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

HEIGHT, WIDTH = 96, 128
_BLOCK = 16


def stamped_frame(ordinal: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """uint8 RGB (H, W, 3) whose top 32 rows encode ``ordinal`` in 16 bits."""
    rng = np.random.default_rng(ordinal)
    image = np.empty((height, width, 3), np.uint8)
    ramp = (np.arange(width)[None, :, None] * 2 + ordinal * 7 + np.arange(3) * 40) % 256
    image[:] = np.clip(ramp + rng.integers(-12, 13, (height, width, 3)), 0, 255)
    for bit in range(16):
        row, col = divmod(bit, 8)
        image[row * _BLOCK:(row + 1) * _BLOCK, col * _BLOCK:(col + 1) * _BLOCK] = 255 if ordinal >> bit & 1 else 0
    return image


def read_stamp(rgb: np.ndarray) -> int:
    """The ordinal stamped by :func:`stamped_frame` (block centres, threshold at mid-grey)."""
    value = 0
    for bit in range(16):
        row, col = divmod(bit, 8)
        block = rgb[row * _BLOCK + 4:(row + 1) * _BLOCK - 4, col * _BLOCK + 4:(col + 1) * _BLOCK - 4]
        value |= int(block.mean() > 128) << bit
    return value


def encode_stamped(path: Path, n_frames: int, *, fps: int = 25, gop: int = 250, pts_ms: list[int] | None = None,
                   preset: str = "ultrafast", container_options: dict | None = None,
                   height: int = HEIGHT, width: int = WIDTH) -> Path:
    """H.264 clip of ``n_frames`` stamped frames: constant ``fps``, or variable with ``pts_ms``
    (presentation times in ms). ``gop``: keyframe interval (x264's default is 250).
    ``preset="veryfast"`` adds B-frames; ``ultrafast`` has none."""
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": preset, "g": str(gop), "crf": "18"}
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(stamped_frame(i, height, width), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def encode_audio_only(path: Path) -> Path:
    """An mp4 with one AAC audio stream and no video."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def truncate(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def overwrite_middle(src: Path, dst: Path, n_bytes: int = 2048, seed: int = 0) -> Path:
    """Bit rot: ``n_bytes`` of random bytes over the middle of the file."""
    data = bytearray(src.read_bytes())
    middle = len(data) // 2
    data[middle:middle + n_bytes] = np.random.default_rng(seed).integers(0, 256, n_bytes, np.uint8).tobytes()
    dst.write_bytes(bytes(data))
    return dst


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png_bomb(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of ``width x height`` zeros: a few KiB on disk, width*height pixels decoded.

    Streamed through zlib row block by row block, so the test never holds the image.
    """
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = bytearray()
    block = row * 256
    for start in range(0, height, 256):
        idat += compressor.compress(block if start + 256 <= height else row * (height - start))
    idat += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grey
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", bytes(idat))
                     + _chunk(b"IEND", b""))
    return path


def write_archive(root: Path) -> tuple[Path, Path]:
    """Four 12-second synthetic surgical videos at 2 fps (64 px) in ``root/videos``, and the mask
    of every frame in ``root/masks`` (FRAME_ID.png: what people would return), as an archive holds them."""
    from PIL import Image

    from alges_dist.data.demo import synthetic_video
    from alges_dist.data.video import write_h264

    videos, masks = Path(root) / "videos", Path(root) / "masks"
    videos.mkdir(parents=True)
    masks.mkdir()
    for v in range(4):
        clip = synthetic_video(np.random.default_rng([7, v]), n_frames=24, size=64)
        write_h264(videos / f"case{v}.mp4", clip.images, fps=2)
        for i in range(24):
            Image.fromarray(clip.masks[i]).save(masks / f"case{v}_{i:06d}.png")
    return videos, masks

