"""What every tool's export becomes, and the checks that turn it into one label map per frame.

Each format reader (``labelstudio``, ``cvat``, ``coco``) turns a file into
:class:`FrameAnnotation` records: the frame id, where in the file it came from, the size
the tool saw, labelled regions as full-frame bool masks, and the time the tool says the
annotator spent. :func:`resolve_labels` then checks the whole batch before anything is
written (every pick exactly once, known label names, sizes, overlaps, unpainted pixels)
and rasterizes each frame to class ids. It reports every problem at once, each line
naming the frame and the file, so annotators can fix them in one pass.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np

from alges_dist.errors import InputError

#: Class id of a pixel no region covers, before the unpainted policy is applied.
UNPAINTED = -1
#: Problems listed in one error before "... and N more".
MAX_LISTED = 12


class Region(NamedTuple):
    """One labelled area: ``mask`` bool ``(H, W)`` at the frame's size; higher ``z_order`` on top."""

    label: str
    mask: np.ndarray
    z_order: int
    where: str  # e.g. "result 'a1b2' of annotation 7", for error messages


class FrameAnnotation(NamedTuple):
    """One frame's annotation as a tool exported it."""

    frame_id: str
    source: str  # the file and the place in it, e.g. "export.json, task 12"
    height: int
    width: int
    regions: list[Region]
    seconds: float | None = None  # annotation time the tool reports (Label Studio's lead_time)


class AnnotationError(InputError):
    """An export that cannot be imported; the message lists each problem with its frame and file."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        shown = self.problems[:MAX_LISTED]
        more = len(self.problems) - len(shown)
        text = "; ".join(shown) + (f"; ... and {more} more" if more > 0 else "")
        super().__init__(f"{len(self.problems)} problem(s) in the annotations, nothing imported: {text}")


def raise_if(problems: Sequence[str]) -> None:
    if problems:
        raise AnnotationError(problems)


def _check_batch_membership(annotations: Sequence[FrameAnnotation], picks: Sequence[str], source: str) -> list[str]:
    problems = []
    counts = Counter(a.frame_id for a in annotations)
    for frame_id, n in counts.items():
        if n > 1:
            sources = [a.source for a in annotations if a.frame_id == frame_id]
            problems.append(f"frame {frame_id!r} appears {n} times ({'; '.join(sources)}); each pick is annotated once")
    wanted = set(picks)
    for a in annotations:
        if a.frame_id not in wanted:
            problems.append(f"{a.source}: frame {a.frame_id!r} is not in this query batch")
    missing = [f for f in picks if f not in counts]
    if missing:
        problems.append(f"{source}: {len(missing)} of {len(picks)} picked frames have no annotation: {missing[:8]}"
                        + (" ..." if len(missing) > 8 else ""))
    return problems


def _paint(a: FrameAnnotation, class_of: dict[str, int], unlabeled: frozenset[str], problems: list[str]) -> np.ndarray:
    """Class ids ``(H, W)`` int16 of one frame (UNPAINTED where no region lies); overlaps of
    different classes at the same ``z_order`` are problems (a higher ``z_order`` wins)."""
    ids = np.full((a.height, a.width), UNPAINTED, np.int16)
    for z in sorted({r.z_order for r in a.regions}):
        layer = np.full((a.height, a.width), UNPAINTED, np.int16)
        for region in (r for r in a.regions if r.z_order == z and r.label not in unlabeled):
            class_id = class_of[region.label]
            clash = region.mask & (layer != UNPAINTED) & (layer != class_id)
            if clash.any():
                other = sorted({int(v) for v in np.unique(layer[clash])})
                names = [k for k, v in class_of.items() if v in other]
                y, x = np.argwhere(clash)[0]
                problems.append(
                    f"{a.source}: frame {a.frame_id!r}: {region.where} ({region.label!r}) overlaps "
                    f"{names} on {int(clash.sum())} px (first at x={x}, y={y}); erase one of them")
            layer[region.mask & (layer == UNPAINTED)] = class_id
        painted = layer != UNPAINTED
        ids[painted] = layer[painted]
        if unlabeled:  # a tool's "no label" region (CVAT's implicit background) clears what lies below
            for region in (r for r in a.regions if r.z_order == z and r.label in unlabeled):
                ids[region.mask & ~painted] = UNPAINTED
    return ids


def resolve_labels(
    annotations: Sequence[FrameAnnotation],
    picks: Sequence[str],
    frame_sizes: dict[str, tuple[int, int]],
    class_of: dict[str, int],
    *,
    unlabeled: frozenset[str] = frozenset(),
    unpainted: Literal["ignore", "refuse"] = "refuse",
    ignore_index: int = 255,
    problems: Sequence[str] = (),
    source: str = "the export",
) -> dict[str, np.ndarray]:
    """Check a whole batch of annotations and rasterize each frame to uint8 class ids ``(H, W)``.

    ``class_of``: the tool's label name -> class id (the allowed names); ``unlabeled``: names
    that mean "no label" (CVAT's implicit ``background``); ``frame_sizes``: frame_id ->
    ``(height, width)`` of the frame people saw. Unpainted pixels become ``ignore_index``
    (``unpainted="ignore"``) or a problem (``"refuse"``); ``problems``: those the reader found.
    Raises AnnotationError listing every problem; returns ``{frame_id: ids}`` for the picks
    only when there is none.
    """
    problems = [*problems, *_check_batch_membership(annotations, picks, source)]
    allowed = sorted(class_of, key=class_of.get)
    for a in annotations:
        expected = frame_sizes.get(a.frame_id)
        if expected is not None and (a.height, a.width) != tuple(expected):
            problems.append(f"{a.source}: frame {a.frame_id!r} is {a.width}x{a.height} in the annotation but "
                            f"{expected[1]}x{expected[0]} on disk (width x height)")
        for region in a.regions:
            if region.label not in class_of and region.label not in unlabeled:
                problems.append(f"{a.source}: frame {a.frame_id!r}: {region.where} has label {region.label!r}, "
                                f"not a class of the pool (allowed: {allowed})")
            elif region.mask.shape != (a.height, a.width):
                problems.append(f"{a.source}: frame {a.frame_id!r}: {region.where} is {region.mask.shape[1]}x"
                                f"{region.mask.shape[0]}, the frame {a.width}x{a.height}")
    raise_if(problems)  # the painting below needs known labels and consistent sizes

    out: dict[str, np.ndarray] = {}
    for a in annotations:
        ids = _paint(a, class_of, unlabeled, problems)
        holes = ids == UNPAINTED
        if holes.any():
            if unpainted == "refuse":
                y, x = np.argwhere(holes)[0]
                problems.append(f"{a.source}: frame {a.frame_id!r} has {int(holes.sum())} unpainted px (first at "
                                f"x={x}, y={y}); paint them (pools with an ignore value: --unpainted ignore)")
            ids[holes] = ignore_index
        out[a.frame_id] = ids.astype(np.uint8)
    raise_if(problems)
    return {f: out[f] for f in picks}


class CorrectionEffort(NamedTuple):
    """How much an annotator changes the model's pre-annotation of one frame."""

    frame_id: str
    n_pixels: int
    pixels_changed: int  # label differs from the prediction (unpainted/ignored pixels count as changed)
    annotation_seconds: float | None
    #: The click proxy: connected regions (8-neighbourhood) of changed pixels, one brush stroke or
    #: polygon each (None: not measured, a correction.csv written before it was recorded).
    regions_changed: int | None = None

    @property
    def fraction_changed(self) -> float:
        return self.pixels_changed / self.n_pixels if self.n_pixels else 0.0


def changed_regions(changed: np.ndarray) -> int:
    """Connected regions (8-neighbourhood) of a bool ``(H, W)`` map of changed pixels.

    Why regions and not boundary length: an annotator fixes a pre-annotation one wrong area
    at a time (a click, a brush stroke or a polygon each, whatever its size), so the count of
    areas tracks clicks, while a boundary length mostly tracks the size of the objects. The
    8-neighbourhood joins a diagonal sliver of boundary error into the one stroke it takes.
    It overcounts speckle (isolated wrong pixels are a region each), which a model trained a
    few epochs produces at object edges; the pixel count is the other half of the picture.
    """
    from scipy import ndimage

    if changed.ndim != 2:
        raise InputError(f"changed must be a (H, W) map, got shape {changed.shape}")
    _, n = ndimage.label(changed, structure=np.ones((3, 3), dtype=bool))
    return int(n)


def correction_effort(frame_id: str, labels: np.ndarray, predicted: np.ndarray,
                      seconds: float | None = None, *, ignore_index: int | None = None) -> CorrectionEffort:
    """Pixels (and connected regions of them) where the label map differs from the predicted
    one (both ``(H, W)``). ``ignore_index``: label pixels of that value are nobody's work (the
    simulated oracle's truth masks: "don't care" pixels), left out of both counts and of n_pixels;
    None (people's imports): every pixel counts, an unpainted one as changed."""
    if labels.shape != predicted.shape:
        raise InputError(f"frame {frame_id!r}: labels {labels.shape} and pre-annotation {predicted.shape} differ in size")
    changed = labels != predicted  # (H, W)
    n_pixels = int(labels.size)
    if ignore_index is not None:
        cared = labels != ignore_index
        changed &= cared
        n_pixels = int(np.count_nonzero(cared))
    return CorrectionEffort(frame_id, n_pixels, int(np.count_nonzero(changed)), seconds, changed_regions(changed))
