"""A contact sheet: thumbnails of frames in a grid, captioned, optionally with masks painted over.

Used by the hand-off (the batch people get) and the report (the last query batch), so it
lives below both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alges_dist.data.atomic import atomic_path

PALETTE = np.array([  # class id -> overlay colour: class 0 (usually background) is not drawn;
    # greens, blues and yellows first, since endoscopic tissue is red
    [0, 0, 0], [0, 230, 118], [0, 176, 255], [255, 234, 0], [213, 0, 249], [255, 145, 0], [0, 229, 255],
    [118, 255, 3], [255, 64, 129], [101, 31, 255], [255, 255, 255], [0, 150, 136], [255, 23, 68],
], dtype=np.float32)


def overlay_mask(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """uint8 RGB (H, W, 3) with class ids (H, W) painted over it (class 0 left clear)."""
    colours = PALETTE[mask % len(PALETTE)]
    blend = np.where((mask > 0)[..., None], (1 - alpha) * image + alpha * colours, image)
    return blend.round().clip(0, 255).astype(np.uint8)


def contact_sheet(image_uris: list[str], labels: list[str], out_png: Path, *, thumb_px: int = 160,
                  columns: int = 8, masks: list[np.ndarray] | None = None) -> Path:
    """A grid of thumbnails with their captions; ``masks`` (class ids at thumbnail size) are overlaid."""
    from PIL import Image, ImageDraw

    from alges_dist.data.frames import load_image

    rows = max(1, -(-len(image_uris) // columns))
    caption = 14
    sheet = Image.new("RGB", (columns * thumb_px, rows * (thumb_px + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (uri, label) in enumerate(zip(image_uris, labels)):
        thumb = load_image(uri, (thumb_px, thumb_px))
        if masks is not None:
            thumb = overlay_mask(thumb, masks[i])
        x, y = (i % columns) * thumb_px, (i // columns) * (thumb_px + caption)
        sheet.paste(Image.fromarray(thumb), (x, y))
        draw.text((x + 2, y + thumb_px + 1), f"{i}: {label}"[:26], fill="black")
    with atomic_path(out_png) as tmp:
        sheet.save(tmp, format="PNG")
    return out_png
