"""Hand-off to people: the query batch out (CSV, contact sheet), their masks in.

Everything between a selection and labels lives here, so the loop only decides *when*
a batch goes out and *which* round its labels belong to:

- :func:`write_batch` writes ``to_annotate.csv`` (rank, frame id, image) and a contact
  sheet beside the selection; picked video frames become PNG files first
  (:func:`batch_images`), and :func:`frames_as_files` points labeled rows at them;
- :func:`collect_masks` matches returned masks to the picks (image suffixes only, one
  candidate per frame), validates every one against its frame and the pool's encoding,
  and copies them into the run folder: nothing is imported unless all of them pass,
  and later changes to the annotators' folder cannot change the labels;
- :func:`contact_sheet` / :func:`predict_masks` are shared with the report.
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alges_dist.data.atomic import atomic_path, atomic_write_text
from alges_dist.data.manifest import Manifest

log = logging.getLogger(__name__)

# Suffixes a returned mask may have; anything else in the folder (an annotation tool's
# JSON, thumbnails, notes) is not a mask and is ignored.
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")

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


def predict_masks(model_path: Path, cfg: Any, image_uris: list[str], size: tuple[int, int] | None) -> list[np.ndarray]:
    """Predicted class ids (H, W) for each image with the run's model and input settings,
    at ``size`` (None: each image's own size)."""
    import torch

    from alges_dist.data.frames import load_image, normalize_images
    from alges_dist.models import load_model

    model = load_model(cfg.model.arch, cfg.model.encoder, cfg.data.n_classes, model_path).eval()
    out = []
    with torch.inference_mode():
        for uri in image_uris:
            target = size or load_image(uri).shape[:2]
            rgb = load_image(uri, tuple(cfg.data.image_size))
            logits = model(normalize_images(rgb[None], cfg.data.normalize))
            logits = torch.nn.functional.interpolate(logits, size=tuple(target), mode="bilinear", align_corners=False)
            out.append(logits.argmax(1)[0].numpy().astype(np.int64))
    return out


def csv_cell(value: Any) -> Any:
    """A CSV cell safe to open in a spreadsheet: text starting with = + - @ (or a tab or CR)
    would run as a formula, so it gets a leading apostrophe (OWASP's CSV-injection advice)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def batch_images(round_dir: Path, picks: list[str], manifest: Manifest) -> dict[str, str]:
    """frame_id -> the image file annotators get for each pick (what every export lists).

    A picked video frame (``VIDEO#t=SECONDS``) is written once as a lossless PNG of exactly
    its decoded pixels, ``round_dir/frames/FRAME_ID.png``, and that file is listed.
    """
    from alges_dist.data.video import is_video_uri
    from alges_dist.data.video_export import export_video_frames

    rows = manifest.table.filter(pc.is_in(manifest.table["frame_id"], pa.array(picks, pa.string())))
    uri = dict(zip(rows["frame_id"].to_pylist(), rows["image_uri"].to_pylist()))
    videos = {f: u for f, u in uri.items() if is_video_uri(u)}
    if videos:
        uri.update(export_video_frames(Path(round_dir) / "frames", videos))
    return {f: uri[f] for f in picks}


def frames_as_files(manifest: Manifest, frame_ids: list[str], round_dir: Path) -> Manifest:
    """``manifest`` with the rows of ``frame_ids`` pointing at their files (:func:`batch_images`),
    so training and evaluation on labeled video frames never seek into a video."""
    files = batch_images(round_dir, frame_ids, manifest)
    table = manifest.table
    uris = [files.get(f, u) for f, u in zip(table["frame_id"].to_pylist(), table["image_uri"].to_pylist())]
    column = table.schema.get_field_index("image_uri")
    return Manifest(table.set_column(column, table.schema.field("image_uri"), pa.array(uris, pa.string())),
                    manifest.encoding)


def write_batch(round_dir: Path, picks: list[str], manifest: Manifest) -> Path:
    """The query batch for annotators: ``to_annotate.csv`` (rank, frame_id, image_uri) and
    ``to_annotate.png`` (a contact sheet); returns the sheet's path."""
    uri = batch_images(round_dir, picks, manifest)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["pick_rank", "frame_id", "image_uri"])
    writer.writerows((i, csv_cell(f), csv_cell(uri[f])) for i, f in enumerate(picks))
    base = Path(round_dir) / "to_annotate"
    atomic_write_text(base.with_suffix(".csv"), buf.getvalue())
    return contact_sheet([uri[f] for f in picks], picks, base.with_suffix(".png"))


def find_masks(folder: Path, picks: list[str]) -> dict[str, Path]:
    """``FRAME_ID.<image suffix>`` in ``folder`` for every pick.

    Raises FileNotFoundError listing the picks without a mask, ValueError naming both files
    when a frame has two candidates (``f4.png`` and ``f4.bmp``: which one is meant?).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"mask folder {folder} does not exist")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in MASK_SUFFIXES:
            continue
        if path.stem in found:
            raise ValueError(f"frame {path.stem!r} has two masks in {folder}: {found[path.stem].name} and "
                             f"{path.name}; keep one")
        found[path.stem] = path
    missing = [f for f in picks if f not in found]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(picks)} picked frames have no mask in {folder}: "
                                f"{missing[:5]} (expected files named FRAME_ID.png)")
    return {f: found[f] for f in picks}


def collect_masks(picks: list[str], manifest: Manifest, masks: Path, dest: Path) -> dict[str, str]:
    """Validate people's masks for ``picks`` and copy them into ``dest``; returns frame_id -> copy.

    All or nothing: every pick needs a mask that decodes with the pool's encoding and
    matches its frame's size, else nothing is copied and the error names the file.
    """
    from alges_dist.data.frames import validate_frame

    found = find_masks(masks, picks)
    rows = manifest.table.filter(pc.is_in(manifest.table["frame_id"], pa.array(picks, pa.string())))
    for frame_id, image_uri in zip(rows["frame_id"].to_pylist(), rows["image_uri"].to_pylist()):
        validate_frame(image_uri, str(found[frame_id]), manifest.encoding)  # raises naming the file
    dest = Path(dest)
    staging = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for frame_id, src in found.items():
        shutil.copyfile(src, staging / f"{frame_id}{src.suffix.lower()}")
    shutil.rmtree(dest, ignore_errors=True)  # an earlier import that never reached the manifest
    staging.rename(dest)
    return {f: str((dest / f"{f}{src.suffix.lower()}").resolve()) for f, src in found.items()}
