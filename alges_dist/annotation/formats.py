"""The three hand-off formats behind one registry: write a batch for a tool, read its export back.

``write_export`` lays out one folder per batch::

    DEST/images/FRAME_ID.png     the frames people annotate (named by frame id)
    DEST/tasks.json + label_config.xml          (labelstudio)
    DEST/annotations.xml + cvat_labels.json     (cvat)
    DEST/instances.json                         (coco)
    DEST/alges_export.json       what alges wrote: batch, picks, classes (for people and tools)
    DEST/README.md               how to load it into the tool and bring the labels back

``read_annotations`` detects the format of an export (or takes ``fmt``) and returns its
frame annotations, the label names that mean each class in that tool, and the names
that mean "no label".
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from alges_dist.annotation import coco, cvat, labelstudio
from alges_dist.annotation.regions import FrameAnnotation
from alges_dist.data.atomic import atomic_directory, atomic_path, atomic_write_text
from alges_dist.errors import InputError

EXPORT_RECORD = "alges_export.json"
#: The files write_export makes: never read back as people's labels.
EXPORT_FILES = ("tasks.json", "label_config.xml", "annotations.xml", "cvat_labels.json", "instances.json", EXPORT_RECORD)


class ExportFrame(NamedTuple):
    """One pick of the batch: its image file and the model's class ids ``(H, W)`` at that size
    (None on a cold start: no model exists yet, so the tool shows the frame unpainted)."""

    frame_id: str
    pick_rank: int
    acquisition: float | None  # the value the pick rule ranked by (distance, score); None for random
    image: Path
    predicted: np.ndarray | None
    split: str = "pool"  # "test": annotated for evaluation only, never trained on

    def shape(self) -> tuple[int, int]:
        """(height, width) of the frame, from the prediction or the image header."""
        if self.predicted is not None:
            return self.predicted.shape[:2]
        from PIL import Image

        with Image.open(self.image) as im:
            return im.size[::-1]


class ToolLabels(NamedTuple):
    """What a tool's export says, in the tool's label names."""

    annotations: list[FrameAnnotation]
    problems: list[str]
    class_of: dict[str, int]  # tool label name -> pool class id
    unlabeled: frozenset[str]  # tool label names that mean "no label"


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise InputError(f"unknown annotation format {fmt!r}; valid: {list(FORMATS)}")
    return fmt


def _image_name(frame: ExportFrame) -> str:
    if "/" in frame.frame_id or "\\" in frame.frame_id or frame.frame_id in ("", ".", ".."):
        raise InputError(f"frame_id {frame.frame_id!r} cannot be a file name; export needs ids without slashes")
    return f"{frame.frame_id}{frame.image.suffix.lower() or '.png'}"


def _readme(fmt: str, frames: Sequence[ExportFrame], batch: str, image_url_root: str | None, label_args: str) -> str:
    painted = any(f.predicted is not None for f in frames)
    how = ("with the model's masks as pre-annotations: correct them rather than painting from scratch" if painted
           else "without pre-annotations (no model exists before the first batch is labeled)")
    tests = [f.frame_id for f in frames if f.split == "test"]
    test_note = (f"{len(tests)} of them are test frames (`split: test`): annotated once to measure the model, "
                 "never trained on. " if tests else "")
    head = (f"# Query batch {batch}\n\n{len(frames)} frames picked by active learning, {how}. {test_note}"
            "`images/` holds the frames as `FRAME_ID.<ext>`; `alges_export.json` lists the picks (rank, acquisition "
            "value, split).\n\n")
    back = (f"Bring the labels back with\n\n    alges label --out RUN{label_args} --from EXPORT\n\n"
            "where EXPORT is the tool's export (below). Every pick must be annotated exactly once with the "
            "classes listed here; nothing is imported until every frame passes.\n")
    if fmt == "labelstudio":
        return head + (
            "## Label Studio\n\n1. Start Label Studio with local files served from the folder above this one:\n"
            f"   `LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={image_url_root}`.\n"
            "2. Create a project with `label_config.xml` (Settings > Labeling Interface > Code).\n"
            "3. Settings > Cloud Storage > Add Source Storage > Local files, path: this folder's `images/` "
            "(no sync needed).\n4. Import `tasks.json`: each task carries the model's masks as a prediction; "
            "open a task and start from the prediction where there is one.\n5. Export > JSON, then:\n\n") + back
    if fmt == "cvat":
        return head + (
            "## CVAT\n\n1. Create a task with the labels of `cvat_labels.json` (Raw label editor) and the files "
            "of `images/` (keep their names).\n2. Upload annotations: format \"CVAT 1.1\", file `annotations.xml` "
            "(the model's masks become the task's annotations; correct them).\n3. Export the task as "
            "\"CVAT for images 1.1\" or \"Segmentation mask 1.1\" (zip), then:\n\n"
            "A pool class named `background` is called `background (class N)` here: CVAT reserves `background` "
            "for unannotated pixels, which alges reads as unlabeled.\n\n") + back
    return head + (
        "## COCO\n\n`instances.json` holds one RLE mask (`iscrowd: 1`) per frame and class; category id = class "
        "id + 1. Load it in any COCO tool with `images/`, correct the masks, export COCO instances JSON "
        "(RLE or polygons), then:\n\n") + back


class _Batch(NamedTuple):
    """What every format writes beside the frames."""

    class_names: Sequence[str]
    colours: Sequence[Sequence[int]]
    model_version: str
    key: str  # the batch's name in tools (alges_batch)
    images_url: str  # Label Studio: the /data/local-files/?d= prefix of images/


def _write_labelstudio(folder: Path, frames: Sequence[ExportFrame], names: list[str], batch: _Batch) -> None:
    tasks = [labelstudio.task(
        {"image": f"{batch.images_url}/{name}", "frame_id": f.frame_id, "pick_rank": f.pick_rank,
         "acquisition": f.acquisition, "split": f.split, "alges_batch": batch.key},
        f.predicted, batch.class_names, model_version=batch.model_version) for f, name in zip(frames, names)]
    atomic_write_text(folder / "tasks.json", json.dumps(tasks))
    atomic_write_text(folder / "label_config.xml", labelstudio.label_config(batch.class_names, batch.colours))


def _write_cvat(folder: Path, frames: Sequence[ExportFrame], names: list[str], batch: _Batch) -> None:
    xml = cvat.annotations_xml([(n, f.predicted, f.shape()) for f, n in zip(frames, names)], batch.class_names,
                               batch.colours)
    atomic_write_text(folder / "annotations.xml", xml)
    labels = [{"name": n, "color": labelstudio.hex_colour(c), "type": "mask", "attributes": []}
              for n, c in zip(cvat.label_names(batch.class_names), batch.colours)]
    atomic_write_text(folder / "cvat_labels.json", json.dumps(labels, indent=1))


def _write_coco(folder: Path, frames: Sequence[ExportFrame], names: list[str], batch: _Batch) -> None:
    doc = coco.instances([{"file_name": n, "frame_id": f.frame_id, "pick_rank": f.pick_rank,
                           "acquisition": f.acquisition, "split": f.split, "height": f.shape()[0],
                           "width": f.shape()[1]} for f, n in zip(frames, names)],
                         [f.predicted for f in frames], batch.class_names, batch.colours)
    atomic_write_text(folder / "instances.json", json.dumps(doc))


class _Tool(NamedTuple):
    write: Callable[[Path, Sequence[ExportFrame], list[str], _Batch], None]
    read: Callable[[Path, bool], tuple[list[FrameAnnotation], list[str]]]  # (export, pick_latest)
    label_names: Callable[[Sequence[str]], list[str]]  # the pool's class names as the tool spells them
    unlabeled: frozenset[str]  # tool labels that mean "no label"


_TOOLS: dict[str, _Tool] = {
    "labelstudio": _Tool(_write_labelstudio, lambda p, latest: labelstudio.read_export_file(p, pick_latest=latest),
                         list, frozenset()),
    "cvat": _Tool(_write_cvat, lambda p, latest: cvat.read_export(p), cvat.label_names, frozenset({cvat.BACKGROUND})),
    "coco": _Tool(_write_coco, lambda p, latest: coco.read_export_file(p), list, frozenset()),
}
FORMATS = tuple(_TOOLS)


def write_export(frames: Sequence[ExportFrame], fmt: str, dest: Path, *, class_names: Sequence[str],
                 colours: Sequence[Sequence[int]], model_version: str, batch: str,
                 document_root: Path | None = None, label_args: str = " --strategy STRATEGY --seed SEED") -> Path:
    """Write the batch for ``fmt`` into ``dest`` (created whole or not at all); returns ``dest``.

    ``document_root`` (Label Studio): the folder the server serves ``/data/local-files/?d=``
    from; image URLs are relative to it (default: ``dest``'s parent). An existing ``dest``
    is replaced only if it is an earlier alges export.
    """
    check_format(fmt)
    dest = Path(dest)
    root = Path(document_root) if document_root is not None else dest.parent
    images_url = ""
    if fmt == "labelstudio":
        try:
            images_url = f"/data/local-files/?d={(dest / 'images').resolve().relative_to(root.resolve()).as_posix()}"
        except ValueError:
            raise InputError(f"export folder {dest} is not inside the Label Studio document root {root}") from None
    names = [_image_name(f) for f in frames]
    if dest.exists():
        if not (dest / EXPORT_RECORD).is_file():
            raise FileExistsError(f"{dest} exists and is not an alges export; pick another folder")
        shutil.rmtree(dest)
    info = _Batch(class_names, colours, model_version, batch, images_url)
    with atomic_directory(dest) as tmp:
        for frame, name in zip(frames, names):
            with atomic_path(tmp / "images" / name) as part:
                shutil.copyfile(frame.image, part)
        _TOOLS[fmt].write(tmp, frames, names, info)
        record = {"format": fmt, "batch": batch, "model_version": model_version, "class_names": list(class_names),
                  "picks": [{"pick_rank": f.pick_rank, "frame_id": f.frame_id, "acquisition": f.acquisition,
                             "split": f.split, "image": f"images/{n}"} for f, n in zip(frames, names)]}
        atomic_write_text(tmp / EXPORT_RECORD, json.dumps(record, indent=1))
        atomic_write_text(tmp / "README.md", _readme(fmt, frames, batch, os.fspath(root.resolve()), label_args))
    return dest


def detect_format(source: Path) -> str:
    """The format of a tool's export file or folder, from its layout and content."""
    source = Path(source)
    if source.is_dir():
        if (source / "annotations.xml").is_file() or (source / "labelmap.txt").is_file():
            return "cvat"
        raise InputError(f"{source} is a folder without annotations.xml or labelmap.txt; pass the tool's export "
                         "file (Label Studio JSON, CVAT XML/zip, COCO JSON)")
    if not source.is_file():
        raise FileNotFoundError(f"annotation export {source} does not exist")
    suffix = source.suffix.lower()
    if suffix in (".xml", ".zip"):
        return "cvat"
    if suffix == ".json":
        with open(source, "rb") as fh:
            head = fh.read(4096).lstrip()
        if head.startswith(b"["):
            return "labelstudio"
        if head.startswith(b"{"):
            return "coco"
    raise InputError(f"cannot tell the format of {source}: expected Label Studio JSON (a list of tasks), "
                     "COCO instances JSON, CVAT XML or a CVAT zip; pass --format")


def read_annotations(source: Path, fmt: str | None, class_names: Sequence[str], *,
                     pick_latest: bool = False) -> ToolLabels:
    """Read a tool's export (format detected unless ``fmt``); raises ValueError for an unreadable file."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"annotation export {source} does not exist")
    folder = source if source.is_dir() else source.parent
    if (folder / EXPORT_RECORD).is_file() and (source.is_dir() or source.name in EXPORT_FILES):
        raise InputError(f"{source} is the batch alges exported (the model's pre-annotations), not the tool's "
                         "export of people's labels; import what the tool exports after the frames were corrected")
    fmt = check_format(fmt) if fmt else detect_format(source)
    tool = _TOOLS[fmt]
    found, problems = tool.read(source, pick_latest)
    return ToolLabels(found, problems, {n: i for i, n in enumerate(tool.label_names(class_names))}, tool.unlabeled)


def class_colours(mode: str, class_map: dict[str, int], n_classes: int, palette: np.ndarray) -> list[tuple[int, int, int]]:
    """One distinct, non-black colour per class: the pool's own colours for ``rgb`` encodings,
    else ``palette`` (black is what CVAT paints unannotated pixels)."""
    chosen: list[tuple[int, int, int] | None] = [None] * n_classes
    if mode == "rgb":
        for key, class_id in sorted(class_map.items()):
            rgb = tuple(int(v) for v in key.split(","))
            if chosen[class_id] is None and rgb != (0, 0, 0):
                chosen[class_id] = rgb  # type: ignore[assignment]
    spare = [tuple(int(v) for v in c) for c in palette if tuple(int(v) for v in c) != (0, 0, 0)]
    spare = [c for c in spare if c not in chosen]
    for i in range(n_classes):
        if chosen[i] is None:
            chosen[i] = spare.pop(0) if spare else ((37 * i) % 256, (91 * i + 60) % 256, (151 * i + 120) % 256)
    return chosen  # type: ignore[return-value]
