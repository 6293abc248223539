"""COCO instances JSON: one RLE annotation per (frame, class) out; RLE or polygon annotations back.

Category ids are the pool's class ids + 1 (COCO reserves 0). Masks are written as
compressed RLE with ``iscrowd: 1`` (CVAT keeps them as masks then; with 0 it converts
them to polygons); either ``iscrowd`` value is read back. Images are matched to frames
by the stem of ``file_name`` (``FRAME_ID.png``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alges_dist.annotation.codecs import coco_decode, coco_encode
from alges_dist.annotation.cvat import frame_id_of
from alges_dist.annotation.regions import FrameAnnotation, Region
from alges_dist.errors import InputError

#: ``info.description`` of the pre-annotation file alges writes: never imported as labels.
PREANNOTATION_MARK = "alges pre-annotations"


def instances(frames: Sequence[dict[str, Any]], predicted: Sequence[np.ndarray | None], class_names: Sequence[str],
              colours: Sequence[Sequence[int]]) -> dict[str, Any]:
    """The instances JSON of a batch. ``frames``: per image ``file_name`` plus extra keys kept on
    the image record (``frame_id``, ``pick_rank``, ``acquisition``, ``split``; ``height`` and
    ``width`` where ``predicted`` is None); ``predicted``: class ids ``(H, W)``, or None (no model yet)."""
    images, annotations = [], []
    for image_id, (frame, ids) in enumerate(zip(frames, predicted), 1):
        height, width = ids.shape if ids is not None else (frame["height"], frame["width"])
        images.append({"id": image_id, **frame, "width": int(width), "height": int(height)})
        for class_id in [] if ids is None else np.unique(ids).tolist():
            if class_id >= len(class_names):
                continue
            mask = ids == class_id
            ys, xs = np.nonzero(mask)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": class_id + 1, "iscrowd": 1,
                "segmentation": coco_encode(mask), "area": int(mask.sum()),
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
            })
    categories = [{"id": i + 1, "name": n, "supercategory": "", "color": "#{:02x}{:02x}{:02x}".format(*c)}
                  for i, (n, c) in enumerate(zip(class_names, colours))]
    return {"info": {"description": f"{PREANNOTATION_MARK}: model predictions"}, "licenses": [],
            "images": images, "categories": categories, "annotations": annotations}


def _polygons(segmentation: list, height: int, width: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for flat in segmentation:
        xy = list(zip(flat[0::2], flat[1::2]))
        if len(xy) >= 3:
            draw.polygon(xy, fill=1, outline=1)
    return np.array(canvas, dtype=bool)


def read_instances(doc: Any, source: str) -> tuple[list[FrameAnnotation], list[str]]:
    """Frame annotations from a COCO instances JSON, and the problems found."""
    if not isinstance(doc, dict) or not {"images", "annotations", "categories"} <= set(doc):
        raise InputError(f"{source}: a COCO instances file has 'images', 'annotations' and 'categories'")
    if str((doc.get("info") or {}).get("description", "")).startswith(PREANNOTATION_MARK):
        raise InputError(f"{source} holds the model's pre-annotations written by `alges export`, not people's "
                         "labels; import the tool's COCO export after the frames were corrected")
    problems = []
    category = {c.get("id"): str(c.get("name")) for c in doc["categories"]}
    by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for ann in doc["annotations"]:
        by_image[ann.get("image_id")].append(ann)
    out = []
    for image in doc["images"]:
        name = str(image.get("file_name", ""))
        where = f"{source}, image {image.get('id')} ({name!r})"
        try:
            height, width = int(image["height"]), int(image["width"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{where}: no width/height")
            continue
        regions = []
        for ann in by_image.get(image.get("id"), []):
            spot = f"annotation {ann.get('id')}"
            label = category.get(ann.get("category_id"))
            if label is None:
                problems.append(f"{where}, {spot}: category_id {ann.get('category_id')} is not in 'categories'")
                continue
            seg = ann.get("segmentation")
            try:
                if isinstance(seg, dict):
                    if list(seg.get("size", [])) != [height, width]:
                        raise InputError(f"RLE size {seg.get('size')} differs from the image's [{height}, {width}]")
                    mask = coco_decode(seg)
                elif isinstance(seg, list) and seg:
                    mask = _polygons(seg, height, width)
                else:
                    raise InputError("has no segmentation (a box alone is not a mask)")
            except ValueError as err:
                problems.append(f"{where}, {spot}: {err}")
                continue
            regions.append(Region(label, mask, 0, f"{spot} ({label!r})"))
        out.append(FrameAnnotation(frame_id_of(name), where, height, width, regions))
    return out, problems


def read_export_file(path: Path) -> tuple[list[FrameAnnotation], list[str]]:
    try:
        doc = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not JSON ({err})") from None
    return read_instances(doc, str(path))
