"""CVAT: "CVAT for images 1.1" XML with mask pre-annotations; its XML and "Segmentation mask 1.1" back.

Images are named ``FRAME_ID.png`` (CVAT matches annotations to frames by name). CVAT adds
an implicit ``background`` label at (0, 0, 0) for unannotated pixels when it exports
segmentation masks, so a pool class literally called ``background`` would be
indistinguishable from "not annotated": such a class is renamed in the CVAT label set
(:func:`label_names`) and CVAT's own ``background`` always means unlabeled.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from xml.etree import ElementTree as ET

import numpy as np

from alges_dist.annotation.codecs import CvatMask, cvat_decode, cvat_encode
from alges_dist.annotation.regions import FrameAnnotation, Region
from alges_dist.errors import InputError

BACKGROUND = "background"  # CVAT's implicit label for unannotated pixels
#: Marks the pre-annotation file alges writes, so it is never imported as people's labels.
PREANNOTATION_MARK = "alges pre-annotations"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def label_names(class_names: Sequence[str]) -> list[str]:
    """CVAT label per pool class: the pool's name, except ``background`` -> ``background (class i)``."""
    return [f"{n} (class {i})" if n.lower() == BACKGROUND else n for i, n in enumerate(class_names)]


def frame_id_of(name: str) -> str:
    """``images/vid01_f0001.png`` -> ``vid01_f0001`` (folders and one image suffix dropped)."""
    base = PurePosixPath(name.replace("\\", "/")).name
    for suffix in IMAGE_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def annotations_xml(frames: Sequence[tuple[str, np.ndarray | None, tuple[int, int]]], class_names: Sequence[str],
                    colours: Sequence[Sequence[int]]) -> str:
    """CVAT for images 1.1: the label set (mask labels with colours) and one mask per class present.

    ``frames``: (image file name, predicted class ids ``(H, W)`` or None, (H, W)) in pick order.
    """
    names = label_names(class_names)
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    labels = ET.SubElement(ET.SubElement(ET.SubElement(root, "meta"), "task"), "labels")
    for name, colour in zip(names, colours):
        label = ET.SubElement(labels, "label")
        ET.SubElement(label, "name").text = name
        ET.SubElement(label, "color").text = "#{:02x}{:02x}{:02x}".format(*colour)
        ET.SubElement(label, "type").text = "mask"
        ET.SubElement(label, "attributes")
    for index, (file_name, ids, (height, width)) in enumerate(frames):
        image = ET.SubElement(root, "image", id=str(index), name=file_name, width=str(width), height=str(height))
        for class_id in [] if ids is None else np.unique(ids).tolist():
            if class_id >= len(names):
                continue
            shape = cvat_encode(ids == class_id)
            ET.SubElement(image, "mask", label=names[class_id], source="auto", occluded="0", z_order="0",
                          rle=", ".join(map(str, shape.counts)), left=str(shape.left), top=str(shape.top),
                          width=str(shape.width), height=str(shape.height))
    ET.indent(root)
    body = ET.tostring(root, encoding="unicode")
    return f'<?xml version="1.0" encoding="utf-8"?>\n<!-- {PREANNOTATION_MARK}: model predictions -->\n{body}\n'


# ---------------------------------------------------------------------------- reading


def _int(element: ET.Element, key: str, where: str) -> int:
    try:
        return int(float(element.attrib[key]))
    except (KeyError, ValueError):
        raise InputError(f"{where}: attribute {key!r} missing or not a number") from None


def _polygon(points: str, height: int, width: int, where: str, *, box: tuple[float, ...] | None = None) -> np.ndarray:
    from PIL import Image, ImageDraw

    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if box is not None:
        draw.rectangle(box, fill=1)
    else:
        try:
            xy = [tuple(float(v) for v in p.split(",")) for p in points.split(";") if p.strip()]
        except ValueError:
            raise InputError(f"{where}: points {points[:40]!r} are not 'x,y;x,y;...'") from None
        if len(xy) >= 3:
            draw.polygon(xy, fill=1, outline=1)
    return np.array(canvas, dtype=bool)


def _shape_region(shape: ET.Element, height: int, width: int, where: str) -> Region:
    label = shape.attrib.get("label", "")
    z_order = _int(shape, "z_order", where) if "z_order" in shape.attrib else 0
    rotation = float(shape.attrib.get("rotation", 0) or 0)
    if rotation != 0:
        raise InputError(f"{where}: rotation is {rotation}; only unrotated shapes are segmentation labels")
    if shape.tag == "mask":
        try:
            counts = [int(float(c)) for c in shape.attrib["rle"].split(",")]
        except (KeyError, ValueError):
            raise InputError(f"{where}: mask has no valid 'rle' list") from None
        box = CvatMask(counts, *(_int(shape, k, where) for k in ("left", "top", "width", "height")))
        try:
            mask = cvat_decode(box, height, width)
        except ValueError as err:
            raise InputError(f"{where}: {err}") from None
    elif shape.tag == "polygon":
        mask = _polygon(shape.attrib.get("points", ""), height, width, where)
    else:  # box
        corners = tuple(float(shape.attrib[k]) for k in ("xtl", "ytl", "xbr", "ybr"))
        mask = _polygon("", height, width, where, box=corners)
    return Region(label, mask, z_order, f"{shape.tag} {label!r}")


def read_xml(text: str | bytes, source: str) -> tuple[list[FrameAnnotation], list[str]]:
    """Frame annotations from a "CVAT for images 1.1" annotations.xml, and the problems found."""
    if (PREANNOTATION_MARK.encode() if isinstance(text, bytes) else PREANNOTATION_MARK) in text[:300]:
        raise InputError(f"{source} holds the model's pre-annotations written by `alges export`, not people's "
                         "labels; import what CVAT exports after the frames were corrected")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as err:
        raise InputError(f"{source}: not valid XML ({err})") from None
    if root.tag != "annotations":
        raise InputError(f"{source}: the root element is <{root.tag}>, CVAT for images 1.1 has <annotations>")
    problems = []
    if root.find("track") is not None:
        problems.append(f"{source}: has <track> elements (a video task); create the CVAT task from the exported "
                        "images and export it as CVAT for images 1.1")
    out = []
    for image in root.iter("image"):
        name = image.attrib.get("name", "")
        frame_id = frame_id_of(name)
        where = f"{source}, image {name!r}"
        try:
            height, width = _int(image, "height", where), _int(image, "width", where)
        except ValueError as err:
            problems.append(str(err))
            continue
        regions = []
        for shape in image:
            if shape.tag == "tag":
                continue  # image-level tags carry no pixels
            spot = f"{where}, {shape.tag} {shape.attrib.get('label', '')!r}"
            if shape.tag not in ("mask", "polygon", "box"):
                problems.append(f"{spot}: a {shape.tag} has no area; use masks, polygons or boxes")
                continue
            try:
                regions.append(_shape_region(shape, height, width, spot))
            except ValueError as err:
                problems.append(str(err))
        out.append(FrameAnnotation(frame_id, where, height, width, regions))
    return out, problems


def _labelmap(text: str, source: str) -> dict[tuple[int, int, int], str]:
    """``name:R,G,B:parts:actions`` lines -> colour -> label name."""
    colours: dict[tuple[int, int, int], str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, rest = line.partition(":")
        try:
            rgb = tuple(int(v) for v in rest.split(":")[0].split(","))
        except ValueError:
            raise InputError(f"{source}, labelmap.txt line {n}: {line!r} is not name:R,G,B::") from None
        if len(rgb) != 3:
            raise InputError(f"{source}, labelmap.txt line {n}: {line!r} has no R,G,B colour")
        colours[rgb] = name.strip()
    return colours


def read_segmentation_masks(files: dict[str, bytes], source: str) -> tuple[list[FrameAnnotation], list[str]]:
    """Frame annotations from "Segmentation mask 1.1" (``labelmap.txt`` + ``SegmentationClass/*.png``)."""
    from PIL import Image

    colours = _labelmap(files["labelmap.txt"].decode("utf-8"), source)
    out, problems = [], []
    for name in sorted(n for n in files if n.startswith("SegmentationClass/") and n.lower().endswith(".png")):
        where = f"{source}, {name}"
        rgb = np.asarray(Image.open(io.BytesIO(files[name])).convert("RGB"))
        packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
        regions = []
        for value in np.unique(packed).tolist():
            colour = (value >> 16, (value >> 8) & 255, value & 255)
            if colour not in colours:
                problems.append(f"{where}: colour {colour} is not in labelmap.txt")
                continue
            regions.append(Region(colours[colour], packed == value, 0, f"colour {colour}"))
        out.append(FrameAnnotation(frame_id_of(name), where, rgb.shape[0], rgb.shape[1], regions))
    return out, problems


def read_export(path: Path) -> tuple[list[FrameAnnotation], list[str]]:
    """CVAT's export: annotations.xml, a zip of it, a "Segmentation mask 1.1" zip, or such a folder."""
    path = Path(path)
    if path.is_dir():
        if (path / "annotations.xml").is_file():
            return read_xml((path / "annotations.xml").read_bytes(), str(path / "annotations.xml"))
        if (path / "labelmap.txt").is_file():
            files = {p.relative_to(path).as_posix(): p.read_bytes()
                     for p in [path / "labelmap.txt", *sorted((path / "SegmentationClass").glob("*.png"))]}
            return read_segmentation_masks(files, str(path))
        raise InputError(f"{path}: a CVAT export folder holds annotations.xml or labelmap.txt + SegmentationClass/")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if "annotations.xml" in names:
                return read_xml(archive.read("annotations.xml"), f"{path}:annotations.xml")
            if "labelmap.txt" in names:
                return read_segmentation_masks(
                    {n: archive.read(n) for n in names if n == "labelmap.txt" or n.startswith("SegmentationClass/")},
                    str(path))
        raise InputError(f"{path}: the zip holds neither annotations.xml (CVAT for images 1.1) nor labelmap.txt "
                         "(Segmentation mask 1.1)")
    return read_xml(path.read_bytes(), str(path))
