"""Class ids -> mask files in the pool's own encoding: the inverse of ``frames.decode_mask``.

People's annotations arrive as class names per pixel; the pool's training code reads mask
files through its :class:`MaskEncoding`. Writing imported labels in that same encoding
keeps one reader for every mask in the manifest, so an imported frame trains exactly
like an ingested one (and ``collect_masks`` re-decodes each file as a check).
"""

from __future__ import annotations

import numpy as np

from alges_dist.data.manifest import MaskEncoding
from alges_dist.errors import InputError


def _first_key_of_each_class(encoding: MaskEncoding) -> dict[int, str]:
    """class id -> the smallest raw value (or colour) that decodes to it (one spelling per class)."""
    keys: dict[int, str] = {}
    for key in sorted(encoding.class_map, key=lambda k: [int(p) for p in k.split(",")]):
        keys.setdefault(encoding.class_map[key], key)
    return keys


def ignore_value(encoding: MaskEncoding) -> str | None:
    """The raw value (grey "v" or colour "R,G,B") that decodes to ``ignore_index``; None if the
    encoding cannot store ignored pixels."""
    if not encoding.ignore_values:
        return None
    return sorted(encoding.ignore_values, key=lambda k: [int(p) for p in k.split(",")])[0]


def encode_class_ids(ids: np.ndarray, encoding: MaskEncoding) -> np.ndarray:
    """Raw mask values that ``decode_mask(values, encoding)`` turns back into ``ids``.

    ``ids``: uint8 ``(H, W)`` class ids ``0..n_classes-1`` or ``encoding.ignore_index``.
    Returns uint8 ``(H, W)`` for ``lut``/``threshold``, ``(H, W, 3)`` for ``rgb``.
    Raises ValueError naming the class id the encoding cannot write (a class with no
    value in ``class_map``, or ignored pixels in a pool without ignore values).
    """
    if ids.ndim != 2:
        raise InputError(f"class ids must be (H, W), got shape {ids.shape}")
    present = {int(v) for v in np.unique(ids)}
    n = encoding.n_classes
    bad = sorted(v for v in present if v >= n and v != encoding.ignore_index)
    if bad:
        raise InputError(f"class ids {bad} are outside 0..{n - 1} and not the ignore index {encoding.ignore_index}")
    if encoding.mode == "threshold":
        # decode: value > threshold -> 1; threshold <= 254, so 255 is always class 1
        spelled = {0: "0", 1: "255"}
    else:
        spelled = _first_key_of_each_class(encoding)
    ignored = ignore_value(encoding)
    if ignored is not None:
        spelled[encoding.ignore_index] = ignored
    missing = sorted(v for v in present if v not in spelled)
    if missing:
        what = ["ignored pixels (the pool has no ignore value)" if v == encoding.ignore_index
                else f"class {v} ({encoding.class_names[v]!r}: no value maps to it)" for v in missing]
        raise InputError(f"the pool's mask encoding cannot write {', '.join(what)}")
    channels = 3 if encoding.mode == "rgb" else 1
    table = np.zeros((256, channels), np.uint8)  # class id -> raw value(s)
    for class_id, key in spelled.items():
        table[class_id] = [int(p) for p in key.split(",")]
    values = table[ids]  # (H, W, channels)
    return values if channels == 3 else values[..., 0]
