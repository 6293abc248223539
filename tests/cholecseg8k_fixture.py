"""A small CholecSeg8k folder in the dataset's exact layout and mask encoding (test helper).

Generated at test time (the dataset is not on these machines and is never copied into
the repository). Reproduces ../shared/CHOLECSEG8K.md:

- ``root/videoNN/videoNN_XXXXX/frame_N_endo.png`` (RGB frame) with
  ``frame_N_endo_watershed_mask.png`` (RGB, three equal channels) and the unused
  ``frame_N_endo_mask.png`` / ``frame_N_endo_color_mask.png``;
- every one of the 13 grey values of the class table, a white (255) one-pixel frame
  around the mask and a few black (0) unsegmented pixels.

The expected class ids are painted first and turned into grey values with the table
written out below from the document, independently of the reader under test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IGNORE = 255
# CHOLECSEG8K.md, "Watershed mask values": grey (hex) -> class id.
TABLE_GREY_TO_CLASS = {
    0x50: 0, 0x11: 1, 0x21: 2, 0x13: 3, 0x12: 4, 0x31: 5, 0x23: 6,
    0x24: 7, 0x25: 8, 0x32: 9, 0x22: 10, 0x33: 11, 0x05: 12,
}  # fmt: skip
CLASS_TO_TABLE_GREY = {c: g for g, c in TABLE_GREY_TO_CLASS.items()}


def _class_ids(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Class ids ``(H, W)``: all 13 classes as vertical bands in shuffled order, plus IGNORE."""
    order = rng.permutation(13)
    bands = np.array_split(np.arange(width), 13)
    ids = np.empty((height, width), np.uint8)
    for class_id, columns in zip(order, bands):
        ids[:, columns] = class_id
    ids[0, :] = ids[-1, :] = ids[:, 0] = ids[:, -1] = IGNORE  # the white 1-px frame
    inner = rng.integers(1, [height - 1, width - 1], size=(5, 2))
    ids[inner[:, 0], inner[:, 1]] = IGNORE  # unsegmented black pixels
    return ids


def make_cholecseg8k(
    root: Path,
    clips: dict[str, list[int]],
    *,
    frames_per_clip: int = 3,
    size: tuple[int, int] = (48, 86),
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write a CholecSeg8k-layout folder; return ``{frame_id: expected class ids (H, W)}``.

    ``clips`` maps a video to its clips' first frame numbers, e.g.
    ``{"video01": [80, 160], "video12": [15750]}``; ``size`` is ``(height, width)``.
    """
    rng = np.random.default_rng(seed)
    height, width = size
    expected: dict[str, np.ndarray] = {}
    for video, starts in clips.items():
        for start in starts:
            clip = root / video / f"{video}_{start:05d}"
            clip.mkdir(parents=True)
            for number in range(start, start + frames_per_clip):
                ids = _class_ids(rng, height, width)
                grey = np.zeros((height, width), np.uint8)
                for class_id, value in CLASS_TO_TABLE_GREY.items():
                    grey[ids == class_id] = value
                grey[ids == IGNORE] = 0
                grey[0, :] = grey[-1, :] = grey[:, 0] = grey[:, -1] = 255
                frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(frame).save(clip / f"frame_{number}_endo.png")
                Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(
                    clip / f"frame_{number}_endo_watershed_mask.png"
                )
                # The unused files hold values the watershed table rejects: reading them would fail.
                Image.fromarray(np.full((height, width, 4), 7, np.uint8)).save(clip / f"frame_{number}_endo_mask.png")
                colour = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(colour).save(clip / f"frame_{number}_endo_color_mask.png")
                expected[f"{video}_{number:06d}"] = ids
    return expected
