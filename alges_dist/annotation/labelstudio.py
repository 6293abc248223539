"""Label Studio: the labeling config, tasks with brush pre-annotations, and its JSON export.

Tasks carry ``frame_id``, ``pick_rank``, the acquisition value and the batch key in
``data``; Label Studio echoes ``data`` back in its export, so the importer keys on
``data.frame_id``, never on a task id or a file name. Pre-annotations are
``predictions`` (one brush result per class present); only ``annotations`` are ever read
back, without the cancelled ones (Label Studio exports those too).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET
from xml.sax.saxutils import quoteattr

import numpy as np

from alges_dist.annotation.codecs import brush_decode, brush_encode
from alges_dist.annotation.regions import FrameAnnotation, Region
from alges_dist.errors import InputError

BRUSH = "tag"  # the BrushLabels control's name (results' from_name)
POLYGON = "poly"  # the PolygonLabels control's name
IMAGE = "image"  # the Image object's name (results' to_name)
#: Alpha at or above this is painted: strokes drawn in the editor have soft edges; API masks are 0/255.
ALPHA_PAINTED = 128


def hex_colour(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def label_config(class_names: Sequence[str], colours: Sequence[Sequence[int]]) -> str:
    """The labeling config: an Image, BrushLabels and PolygonLabels with every class, the frame id."""
    labels = "\n".join(f"    <Label value={quoteattr(n)} background={quoteattr(hex_colour(c))}/>"
                       for n, c in zip(class_names, colours))
    return (f'<View>\n  <Image name="{IMAGE}" value="$image" zoom="true" zoomControl="true"/>\n'
            f'  <BrushLabels name="{BRUSH}" toName="{IMAGE}">\n{labels}\n  </BrushLabels>\n'
            f'  <PolygonLabels name="{POLYGON}" toName="{IMAGE}" strokeWidth="2">\n{labels}\n  </PolygonLabels>\n'
            '  <Header value="$frame_id"/>\n</View>\n')


def label_names_of_config(config: str) -> set[str]:
    """The ``<Label value=...>`` names of a labeling config."""
    try:
        return {label.attrib.get("value", "") for label in ET.fromstring(config).iter("Label")}
    except ET.ParseError as err:
        raise InputError(f"the labeling config is not valid XML ({err})") from None


def brush_results(class_ids: np.ndarray, class_names: Sequence[str], *, prefix: str = "") -> list[dict[str, Any]]:
    """One brush result per class present in ``class_ids`` ``(H, W)``, ids ``{prefix}c{class}``."""
    height, width = class_ids.shape
    out = []
    for class_id in np.unique(class_ids).tolist():
        if class_id >= len(class_names):
            continue  # ignored pixels stay unpainted
        out.append({
            "id": f"{prefix}c{class_id}", "from_name": BRUSH, "to_name": IMAGE, "type": "brushlabels",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"format": "rle", "rle": brush_encode(class_ids == class_id),
                      "brushlabels": [class_names[class_id]]},
        })
    return out


def task(data: dict[str, Any], predicted: np.ndarray | None, class_names: Sequence[str], *, model_version: str,
         score: float | None = None) -> dict[str, Any]:
    """A task for Label Studio's import: ``data`` and the model's masks as one prediction (none
    when ``predicted`` is None: a cold start has no model)."""
    if predicted is None:
        return {"data": data}
    prediction: dict[str, Any] = {"model_version": model_version, "result": brush_results(predicted, class_names)}
    if score is not None:
        prediction["score"] = score
    return {"data": data, "predictions": [prediction]}


# ---------------------------------------------------------------------------- reading the export


def _polygon_mask(points: Any, height: int, width: int, where: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    try:
        xy = [(float(x) * width / 100, float(y) * height / 100) for x, y in points]
    except (TypeError, ValueError):
        raise InputError(f"{where}: polygon points must be [[x%, y%], ...]") from None
    canvas = Image.new("1", (width, height), 0)
    if len(xy) >= 3:
        ImageDraw.Draw(canvas).polygon(xy, fill=1, outline=1)
    return np.array(canvas, dtype=bool)


def _regions(results: list[dict[str, Any]], where: str, problems: list[str]) -> tuple[list[Region], tuple[int, int] | None]:
    """Regions of one annotation's results, and the (height, width) they state."""
    regions, size = [], None
    for k, result in enumerate(results):
        kind = str(result.get("type", "")).lower()
        if kind not in ("brushlabels", "polygonlabels"):
            continue  # choices, text and other controls carry no pixels
        spot = f"{where}, result {result.get('id', k)!r}"
        try:
            height, width = int(result["original_height"]), int(result["original_width"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{spot}: no original_width/original_height")
            continue
        if size is not None and size != (height, width):
            problems.append(f"{spot}: size {width}x{height} differs from the other results' {size[1]}x{size[0]}")
            continue
        size = (height, width)
        rotation = result.get("image_rotation", 0) or 0
        if rotation != 0:
            problems.append(f"{spot}: image_rotation is {rotation}; rotate the image back to 0 and redo the region")
            continue
        value = result.get("value") or {}
        labels = value.get(kind) or []
        if len(labels) != 1:
            problems.append(f"{spot}: needs exactly one label, has {labels}")
            continue
        try:
            if kind == "brushlabels":
                if value.get("format", "rle") != "rle" or "rle" not in value:
                    raise InputError(f"{spot}: brush value has no 'rle' (format {value.get('format')!r})")
                mask = brush_decode(value["rle"], height, width) >= ALPHA_PAINTED
            else:
                mask = _polygon_mask(value.get("points") or [], height, width, spot)
        except ValueError as err:
            problems.append(f"{spot}: {err}" if not str(err).startswith(spot) else str(err))
            continue
        regions.append(Region(labels[0], mask, 0, f"result {result.get('id', k)!r}"))
    return regions, size


def _latest(annotations: list[dict[str, Any]]) -> dict[str, Any]:
    return max(annotations, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))


def read_export(tasks: Any, source: str, *, pick_latest: bool = False) -> tuple[list[FrameAnnotation], list[str]]:
    """Frame annotations from Label Studio's JSON export (a list of tasks), and the problems found.

    Only ``annotations`` count (``predictions`` never); cancelled ones are dropped. A task
    with two or more remaining annotations is a problem unless ``pick_latest`` (then the
    most recently updated wins). A task without any is left out (so its pick is missing).
    """
    if not isinstance(tasks, list):
        raise InputError(f"{source}: a Label Studio JSON export is a list of tasks, got {type(tasks).__name__}")
    out, problems = [], []
    for n, item in enumerate(tasks):
        task_id = item.get("id", f"#{n}") if isinstance(item, dict) else f"#{n}"
        where = f"{source}, task {task_id}"
        data = item.get("data") if isinstance(item, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("frame_id"), str):
            problems.append(f"{where}: no data.frame_id (import tasks from alges' tasks.json so frames map back)")
            continue
        frame_id = data["frame_id"]
        done = [a for a in item.get("annotations") or [] if not a.get("was_cancelled")]
        if not done:
            continue
        if len(done) > 1 and not pick_latest:
            ids = [a.get("id") for a in done]
            problems.append(f"{where}: frame {frame_id!r} has {len(done)} annotations {ids}; keep one in Label "
                            "Studio or import with --pick latest")
            continue
        chosen = _latest(done)
        where = f"{where} (annotation {chosen.get('id')})"
        regions, size = _regions(chosen.get("result") or [], where, problems)
        if size is None:
            problems.append(f"{where}: frame {frame_id!r} has no brush or polygon region")
            continue
        seconds = chosen.get("lead_time")
        out.append(FrameAnnotation(frame_id, where, size[0], size[1], regions,
                                   float(seconds) if isinstance(seconds, (int, float)) else None))
    return out, problems


def read_export_file(path: Path, *, pick_latest: bool = False) -> tuple[list[FrameAnnotation], list[str]]:
    try:
        tasks = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not JSON ({err})") from None
    return read_export(tasks, str(path), pick_latest=pick_latest)
