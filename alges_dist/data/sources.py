"""Sources that build a manifest from image folders (`alges ingest folder`).

:func:`ingest_folder` pairs ``images/`` and ``masks/`` files by stem, orders them
naturally (1, 2, ..., 10), splits them so near-duplicate neighbours stay together, decodes
every frame and mask once (bad input fails here, naming the file), and writes the
manifest atomically: a failed ingest never leaves a partial manifest.

:func:`parse_class_map` turns the CLI's class-map spec into a :class:`MaskEncoding`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

from alges_dist import storage
from alges_dist.data.frames import DEFAULT_MAX_PIXELS, validate_frame
from alges_dist.data.manifest import SPLITS, MaskEncoding, make_manifest, write_manifest
from alges_dist.errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "BINARY_ENCODING",
    "IMAGE_SUFFIXES",
    "SPLIT_METHODS",
    "ingest_folder",
    "natural_key",
    "parse_class_map",
    "split_by_ranges",
    "split_by_videos",
    "validate_frames",
]

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLIT_METHODS: tuple[str, ...] = ("ranges", "video")

#: Default for mask folders: 0/255 binary masks, anti-aliased grey edges binarised (> 127).
BINARY_ENCODING = MaskEncoding(mode="threshold", threshold=127, class_names=["background", "foreground"])


def natural_key(text: str) -> list[int | str]:
    """Sort key that orders embedded numbers by value: "2" < "10", "f_9" < "f_10"."""
    # re.split with a group alternates text, number, text, ...: same types compare.
    return [int(part) if i % 2 else part.lower() for i, part in enumerate(re.split(r"(\d+)", text))]


# ---------------------------------------------------------------------------- splits


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(not isinstance(f, (int, float)) or f < 0 for f in fractions):
        raise InputError(f"fractions must be 3 numbers >= 0 for (pool, val, test), got {tuple(fractions)}")
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise InputError(f"fractions {tuple(fractions)} sum to {sum(fractions):.6f}; they must sum to 1")
    return float(fractions[0]), float(fractions[1]), float(fractions[2])


def split_by_ranges(n_frames: int, fractions: Sequence[float] = (0.7, 0.15, 0.15)) -> list[str]:
    """Split labels for ``n_frames`` ordered frames: contiguous pool, val, test blocks.

    Block sizes follow ``fractions`` (largest remainder rounding); consecutive frames share
    a block, so near-duplicates can only meet across the two block boundaries.
    Raises ValueError when a split with a positive fraction would get no frame.
    """
    fracs = _check_fractions(fractions)
    raw = [f * n_frames for f in fracs]
    counts = [math.floor(r) for r in raw]
    by_remainder = sorted(range(3), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in by_remainder[: n_frames - sum(counts)]:
        counts[i] += 1
    empty = [SPLITS[i] for i in range(3) if fracs[i] > 0 and counts[i] == 0]
    if empty:
        raise InputError(
            f"{n_frames} frames with fractions {fracs} leave split(s) {empty} empty; "
            "add frames or set those fractions to 0"
        )
    return [split for split, count in zip(SPLITS, counts) for _ in range(count)]


def split_by_videos(frames_per_video: dict[str, int], fractions: Sequence[float] = (0.7, 0.15, 0.15)) -> dict[str, str]:
    """Assign whole videos to pool/val/test: contiguous runs in natural video order.

    The two cut points are the ones whose cumulative frame counts come nearest to the
    ``fractions`` targets, keeping at least one video in each split with a positive
    fraction. Returns ``{video_id: split}``.
    """
    fracs = _check_fractions(fractions)
    videos = sorted(frames_per_video, key=natural_key)
    n_positive = sum(f > 0 for f in fracs)
    if len(videos) < n_positive:
        raise InputError(
            f"{len(videos)} video(s) cannot fill {n_positive} splits with whole videos; set the unused splits' "
            f"fractions to 0: --fractions 1,0,0 (every frame in the pool)"
            + (", or --fractions 0.8,0,0.2 (test videos held out)" if len(videos) >= 2 else "")
            + " (`alges ingest folder` also takes --split ranges)"
        )
    cumulative = [0]
    for video in videos:
        cumulative.append(cumulative[-1] + frames_per_video[video])
    total = cumulative[-1]
    n = len(videos)

    def best_cut(target: float, low: int, high: int) -> int:
        # cut c: videos[:c] lie before it; cumulative[c] frames
        return min(range(low, high + 1), key=lambda c: (abs(cumulative[c] - target), c))

    pool_needs, val_needs, test_needs = (int(f > 0) for f in fracs)
    cut1 = best_cut(fracs[0] * total, pool_needs, n - val_needs - test_needs) if fracs[0] > 0 else 0
    if fracs[2] == 0:
        cut2 = n
    elif fracs[1] == 0:
        cut2 = cut1
    else:
        cut2 = best_cut((fracs[0] + fracs[1]) * total, cut1 + 1, n - 1)
    labels = ["pool"] * cut1 + ["val"] * (cut2 - cut1) + ["test"] * (n - cut2)
    return dict(zip(videos, labels))


# ---------------------------------------------------------------------------- validation


def validate_frames(
    image_paths: Sequence[str],
    mask_paths: Sequence[str | None],
    encoding: MaskEncoding,
    *,
    n_threads: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> None:
    """Decode every image and mask once; raise on the first bad one in input order.

    PIL releases the GIL while decoding, so a thread pool uses all cores. Errors are
    FileNotFoundError or FrameDecodeError, each naming the file (frames above
    ``max_pixels`` are refused from their header, before decoding).
    """
    n_threads = n_threads or min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=n_threads)
    try:
        # map yields in input order, so the reported error is deterministic
        pairs = zip(image_paths, mask_paths)
        for _ in pool.map(lambda pair: validate_frame(*pair, encoding, max_pixels=max_pixels), pairs):
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on error, skip the frames not started yet


# ---------------------------------------------------------------------------- folders


def _list_frames(folder: Path | storage.ObjectPath, role: str) -> dict[str, Path | storage.ObjectPath]:
    """Image files of a folder (or an object-store prefix, one level) by frame id (the stem)."""
    if not storage.is_dir(folder):
        raise FileNotFoundError(f"{role} folder {folder} does not exist or is not a folder")
    if isinstance(folder, storage.ObjectPath):
        prefix = folder.uri + "/"
        files = [storage.ObjectPath(u) for u in storage.list_files(folder) if "/" not in u[len(prefix):]]
    else:
        files = list(folder.iterdir())
    by_stem: dict[str, Path | storage.ObjectPath] = {}
    for path in files:
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
            continue
        if path.stem in by_stem:
            raise InputError(
                f"duplicate frame id {path.stem!r}: {by_stem[path.stem]} and {path} share a stem; "
                "keep one file per frame"
            )
        by_stem[path.stem] = path
    if not by_stem:
        raise InputError(f"{role} folder {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return by_stem


def ingest_folder(
    images: Path,
    masks: Path | None,
    out: Path,
    *,
    encoding: MaskEncoding | None = None,
    split: str = "ranges",
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    video_pattern: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> pa.Table:
    """Build and write a manifest for an image folder (and its mask folder); return the table.

    - Frames pair by file stem (``images/12.png`` with ``masks/12.png``); a missing mask,
      a mask without an image, or two files with one stem is an error naming the files.
      ``masks=None`` gives an unlabeled pool (``mask_uri`` null).
    - ``encoding`` defaults to :data:`BINARY_ENCODING` (``> 127`` is class 1), which reads
      0/255 masks with anti-aliased grey edges as they come.
    - ``frame_id`` is the file stem. Without ``video_pattern`` the whole folder is one
      video, named after the folder holding ``images`` (``cvc_clinicdb_dev/images`` ->
      ``cvc_clinicdb_dev``). ``video_pattern`` is a regex searched in each stem with a
      named group ``video`` and optionally ``index`` (an integer frame number), e.g.
      ``r"(?P<video>seq\\d+)_(?P<index>\\d+)"``. Without ``index``, ``frame_index`` is the
      position in natural order within the video.
    - ``split="ranges"``: contiguous pool/val/test blocks over the natural order (videos
      first, then frames). ``split="video"``: whole videos per split (needs
      ``video_pattern``), see :func:`split_by_videos`.
    - Every image and mask is decoded before anything is written; bad input raises
      (FileNotFoundError, FrameDecodeError, ValueError) naming the file, and ``out`` is
      left as it was.
    """
    images, out = storage.as_path(images), storage.as_path(out)
    encoding = BINARY_ENCODING if encoding is None else encoding
    if split not in SPLIT_METHODS:
        raise InputError(f"split {split!r} is not one of {list(SPLIT_METHODS)}")
    if split == "video" and video_pattern is None:
        raise InputError("split='video' needs video_pattern (a regex with a named group 'video')")
    pattern = _compile_video_pattern(video_pattern) if video_pattern is not None else None

    image_files = _list_frames(images, "images")
    mask_files: dict[str, Path | None] = dict.fromkeys(image_files)
    if masks is not None:
        found = _list_frames(storage.as_path(masks), "masks")
        no_mask = sorted(set(image_files) - set(found), key=natural_key)
        if no_mask:
            raise FileNotFoundError(
                f"no mask in {masks} for image {image_files[no_mask[0]]} "
                f"({len(no_mask)} images without a mask, e.g. {no_mask[:5]}); masks pair with images by file stem"
            )
        no_image = sorted(set(found) - set(image_files), key=natural_key)
        if no_image:
            raise InputError(
                f"mask {found[no_image[0]]} has no image in {images} "
                f"({len(no_image)} masks without an image, e.g. {no_image[:5]})"
            )
        mask_files = dict(found)

    stems = sorted(image_files, key=natural_key)
    if pattern is None:
        video_name = images.resolve().parent.name or images.resolve().name
        video_of = dict.fromkeys(stems, video_name)
        index_of: dict[str, int | None] = dict.fromkeys(stems)
    else:
        video_of, index_of = {}, {}
        for stem in stems:
            match = pattern.search(stem)
            if match is None:
                raise InputError(f"{image_files[stem]}: stem {stem!r} does not match video_pattern {video_pattern!r}")
            video_of[stem] = match.group("video")
            index_of[stem] = int(match.group("index")) if "index" in pattern.groupindex else None

    def order(stem: str) -> tuple:
        index = index_of[stem]
        return (natural_key(video_of[stem]), 0 if index is None else index, natural_key(stem))

    stems.sort(key=order)
    position: dict[str, int] = {}
    frame_indices = []
    for stem in stems:
        video = video_of[stem]
        position[video] = position.get(video, -1) + 1
        frame_indices.append(index_of[stem] if index_of[stem] is not None else position[video])

    if split == "ranges":
        splits = split_by_ranges(len(stems), fractions)
    else:
        counts: dict[str, int] = {}
        for stem in stems:
            counts[video_of[stem]] = counts.get(video_of[stem], 0) + 1
        split_of = split_by_videos(counts, fractions)
        splits = [split_of[video_of[stem]] for stem in stems]

    image_uris = [str(image_files[s].resolve()) for s in stems]
    mask_uris = [str(mask_files[s].resolve()) if mask_files[s] is not None else None for s in stems]
    log.info("ingest %s: %d frames, %d videos; decoding every frame", images, len(stems), len(set(video_of.values())))
    validate_frames(image_uris, mask_uris, encoding, max_pixels=max_pixels)
    if encoding is BINARY_ENCODING and masks is not None:
        check_default_map_keeps_labels([m for m in mask_uris if m is not None])
    table = make_manifest(
        frame_ids=stems,
        video_ids=[video_of[s] for s in stems],
        frame_indices=frame_indices,
        image_uris=image_uris,
        mask_uris=mask_uris,
        splits=splits,
    )
    write_manifest(table, out, encoding)
    return table


def check_default_map_keeps_labels(mask_paths: Sequence[str]) -> None:
    """The default map (> 127 is class 1) turns 0/1 or 0..K class-id masks into all background,
    silently. Raise when no mask has a value above 127 although the values vary, naming a
    ``--class-map`` that reads them as class ids."""
    from PIL import Image

    values: set[int] = set()
    for path in mask_paths:
        with Image.open(storage.open_input(path)) as image:
            grey = np.asarray(image.convert("L")) if image.mode not in ("L", "P") else np.asarray(image)
        found = np.unique(grey)
        if found.max(initial=0) > BINARY_ENCODING.threshold:
            return  # some pixel is class 1: the default map is the right reading
        values.update(int(v) for v in found)
    if len(values) > 1:
        suggestion = ",".join(f"{v}:{i}" for i, v in enumerate(sorted(values)))
        raise InputError(
            f"every mask in {storage.as_path(mask_paths[0]).parent} decodes to class 0 with the default map (> 127 is "
            f"class 1), but the masks hold the values {sorted(values)}: they look like class-id masks. "
            f"Give their map, e.g. --class-map '{suggestion}'")


def _compile_video_pattern(video_pattern: str) -> re.Pattern[str]:
    try:
        pattern = re.compile(video_pattern)
    except re.error as err:
        raise InputError(f"video_pattern {video_pattern!r} is not a valid regex ({err})") from None
    if "video" not in pattern.groupindex:
        raise InputError(f"video_pattern {video_pattern!r} needs a named group 'video', e.g. (?P<video>seq\\d+)")
    return pattern


# ---------------------------------------------------------------------------- class maps


def parse_class_map(spec: str | os.PathLike[str], *, class_names: Sequence[str] | None = None) -> MaskEncoding:
    """Turn a CLI class-map spec into a :class:`MaskEncoding`.

    Accepted forms:

    - a ``.json`` / ``.yaml`` / ``.yml`` file holding either a full MaskEncoding
      (``{"mode": "lut", "class_map": {...}, "class_names": [...], ...}``) or a plain
      mapping ``{value: class_id}`` whose keys are grey values (``80``) or colours
      (``"255,0,0"``); a class id may be ``"ignore"``;
    - inline grey values: ``"0:0,255:1"`` (``;`` also separates entries);
    - inline colours, entries separated by ``;``: ``"0,0,0:0;255,0,0:1;0,128,0:2"``;
    - inline threshold: ``">127"`` (binary masks: value > 127 is class 1).

    ``class_names`` names the class ids; without it they are ``class_0 .. class_{max}``.
    Examples: ``parse_class_map("0:0,255:1", class_names=["background", "polyp"])``;
    ``parse_class_map("0:0,10:1,20:2,30:3,255:ignore")``.
    """
    text = os.fspath(spec)
    path = Path(text)
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"class-map file {path} does not exist")
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh) if path.suffix.lower() == ".json" else yaml.safe_load(fh)
        if isinstance(data, dict) and "mode" in data:
            if class_names is not None:
                data = {**data, "class_names": list(class_names)}
            return MaskEncoding.model_validate(data)
        if not isinstance(data, dict) or not data:
            raise InputError(f"class-map file {path} must hold a MaskEncoding or a mapping {{value: class_id}}")
        entries = [(str(k), str(v)) for k, v in data.items()]
        return _encoding_from_entries(entries, class_names, source=str(path))

    text = text.strip()
    if text.startswith(">"):
        try:
            threshold = int(text[1:])
        except ValueError:
            raise InputError(f"class map {spec!r}: threshold form is '>N' with an integer N, e.g. '>127'") from None
        names = list(class_names) if class_names is not None else ["background", "foreground"]
        return MaskEncoding(mode="threshold", threshold=threshold, class_names=names)
    parts = [p for p in text.split(";") if p.strip()]
    if len(parts) == 1 and all(":" in token for token in parts[0].split(",")):
        parts = parts[0].split(",")  # "0:0,255:1": commas separate grey entries
    entries = []
    for part in parts:
        key, sep, value = part.rpartition(":")
        if not sep or not key.strip() or not value.strip():
            raise InputError(
                f"class map {spec!r}: entry {part!r} is not 'value:class_id' "
                "(grey '0:0,255:1', colour '0,0,0:0;255,0,0:1', threshold '>127', or a .json/.yaml file)"
            )
        entries.append((key.strip(), value.strip()))
    return _encoding_from_entries(entries, class_names, source=repr(spec))


def _encoding_from_entries(
    entries: list[tuple[str, str]], class_names: Sequence[str] | None, *, source: str
) -> MaskEncoding:
    mode = "rgb" if any("," in key for key, _ in entries) else "lut"
    if mode == "rgb" and not all("," in key for key, _ in entries):
        raise InputError(f"class map {source} mixes grey values and colours; use one kind")
    class_map: dict[str, int] = {}
    ignore: list[str] = []
    for key, value in entries:
        if value.lower() == "ignore":
            ignore.append(key)
            continue
        try:
            class_map[key] = int(value)
        except ValueError:
            raise InputError(
                f"class map {source}: class id {value!r} for {key!r} is not an integer or 'ignore'"
            ) from None
    if not class_map:
        raise InputError(f"class map {source} maps no value to a class")
    if class_names is None:
        class_names = [f"class_{i}" for i in range(max(class_map.values()) + 1)]
    try:
        return MaskEncoding(mode=mode, class_map=class_map, ignore_values=ignore, class_names=list(class_names))
    except ValueError as err:
        raise InputError(f"class map {source}: {err}") from None
