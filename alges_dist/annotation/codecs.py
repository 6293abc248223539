"""The three mask run-length encodings annotation tools speak, in numpy.

- **Label Studio brush RLE** (``brush_encode`` / ``brush_decode``): thi.ng ``rle-pack``
  over the flattened RGBA buffer (``H*W*4`` bytes), bit-packed MSB first. Header: 32-bit
  value count, 5-bit ``wordsize-1``, four 4-bit ``rle_sizes-1``. Then groups: 1 bit
  (1 = repeat, 0 = literals), a 2-bit index into ``rle_sizes``, ``length-1`` in that many
  bits, then one value (repeat) or ``length`` values (literals). The mask is the alpha
  channel. The encoder writes the bytes of ``label_studio_sdk.converter.brush.mask2rle``
  exactly (its run-size choices, its 65,536-value split and its padding, which adds a
  whole zero byte when the bits already end on a byte); the decoder reads any rle-pack
  stream, including the literal chunks the Label Studio editor writes.
- **CVAT mask RLE** (``cvat_encode`` / ``cvat_decode``): alternating run lengths,
  starting with a (possibly empty) background run, row-major over the mask's box,
  as ``cvat_sdk.masks.encode_mask`` writes the ``points`` of a mask shape.
- **COCO RLE** (``coco_encode`` / ``coco_decode``): alternating run lengths starting
  with 0s, column-major (Fortran order), compressed into pycocotools' ASCII string
  (6-bit LEB128-style, counts after the second stored as differences). Uncompressed
  ``counts`` lists are read too.

All functions are pure: arrays in, arrays or lists out; bad input raises ValueError
saying what is wrong with it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from alges_dist.errors import InputError

# ---------------------------------------------------------------------------- runs


def _runs(flat: np.ndarray) -> np.ndarray:
    """Lengths of runs of equal values in a 1-D array (int64)."""
    if flat.size == 0:
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    return np.diff(np.concatenate([[0], starts, [flat.size]])).astype(np.int64)


def _binary_runs(flat: np.ndarray) -> list[int]:
    """Alternating run lengths of a bool array, the first one counting False values (may be 0)."""
    runs = _runs(flat)
    if flat.size and flat[0]:
        runs = np.concatenate([[0], runs])
    return runs.tolist()


def _expand_binary_runs(counts: list[int] | np.ndarray, n: int, what: str) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any():
        raise InputError(f"{what}: run lengths must be a flat list of integers >= 0")
    if int(counts.sum()) != n:
        raise InputError(f"{what}: run lengths sum to {int(counts.sum())}, expected {n} pixels")
    return np.repeat(np.arange(len(counts)) % 2 == 1, counts)


def _as_bool_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"a mask must be (H, W), got shape {mask.shape}")
    return mask.astype(bool, copy=False)


# ---------------------------------------------------------------------------- Label Studio brush

_BRUSH_RLE_SIZES = (3, 4, 8, 16)
_BRUSH_HEADER_BITS = 32 + 5 + 4 * 4


def _brush_run_bits(length: int, value: int) -> str:
    """One run as the SDK writes it: singles as 1-value literals, longer runs as repeats."""
    word = f"{value:08b}"
    if length == 1:
        return "000000" + word
    if length <= 8:
        return f"100{length - 1:03b}{word}"
    if length <= 16:
        return f"101{length - 1:04b}{word}"
    if length <= 256:
        return f"110{length - 1:08b}{word}"
    out = []
    while length > 1 << 16:  # the SDK splits long runs into 65,536-value repeats
        out.append(f"111{(1 << 16) - 1:016b}{word}")
        length -= 1 << 16
    out.append(f"111{length - 1:016b}{word}")
    return "".join(out)


def brush_encode(mask: np.ndarray) -> list[int]:
    """Label Studio brush RLE of a mask ``(H, W)``: bool or 0/1 -> alpha 0/255 (bytes as ints).

    Equal to ``label_studio_sdk.converter.brush.mask2rle(mask.astype(uint8) * 255)``.
    """
    flat = _as_bool_mask(mask).ravel()
    values = np.where(flat, 255, 0).astype(np.uint8)
    runs = _runs(values)
    starts = np.concatenate([[0], np.cumsum(runs)[:-1]]).astype(np.int64)
    header = f"{flat.size * 4:032b}{8 - 1:05b}" + "".join(f"{s - 1:04b}" for s in _BRUSH_RLE_SIZES)
    # every pixel is 4 equal RGBA bytes, so the byte runs are the pixel runs times 4
    body = "".join(_brush_run_bits(4 * int(n), int(values[s])) for n, s in zip(runs, starts))
    bits = header + body
    bits += "0" * (8 - len(bits) % 8)  # the SDK always pads, a whole byte when already aligned
    return np.packbits(np.frombuffer(bits.encode("ascii"), np.uint8) - ord("0")).tolist()


class _BitReader:
    """MSB-first reads from a byte list; ``read`` for header fields, ``words`` for literal runs."""

    def __init__(self, data: bytes):
        self.bits = np.unpackbits(np.frombuffer(data, np.uint8))
        self.text = self.bits.tobytes().translate(bytes.maketrans(b"\x00\x01", b"01")).decode("ascii")
        self.pos = 0

    def read(self, n: int) -> int:
        if self.pos + n > len(self.text):
            raise InputError(f"brush RLE ends early: needs {n} more bits at bit {self.pos} of {len(self.text)}")
        value = int(self.text[self.pos:self.pos + n], 2)
        self.pos += n
        return value

    def words(self, count: int, size: int) -> np.ndarray:
        end = self.pos + count * size
        if end > len(self.bits):
            raise InputError(f"brush RLE ends early: {count} literal values at bit {self.pos} of {len(self.bits)}")
        block = self.bits[self.pos:end].reshape(count, size).astype(np.int64)  # (count, size)
        self.pos = end
        return block @ (1 << np.arange(size - 1, -1, -1, dtype=np.int64))


def brush_decode_values(rle: list[int] | bytes) -> np.ndarray:
    """Decode any rle-pack stream to its flat values (uint8 for word sizes <= 8, else uint32)."""
    try:
        data = bytes(rle)
    except (TypeError, ValueError):
        raise InputError("brush RLE must be a list of byte values 0..255") from None
    if len(data) * 8 < _BRUSH_HEADER_BITS:
        raise InputError(f"brush RLE of {len(data)} bytes is shorter than its {_BRUSH_HEADER_BITS}-bit header")
    reader = _BitReader(data)
    num = reader.read(32)
    word_size = reader.read(5) + 1
    rle_sizes = [reader.read(4) + 1 for _ in range(4)]
    out = np.zeros(num, np.uint8 if word_size <= 8 else np.uint32)
    i = 0
    while i < num:
        repeat = reader.read(1)
        j = i + 1 + reader.read(rle_sizes[reader.read(2)])
        if j > num:
            raise InputError(f"brush RLE: a run reaches value {j} of a {num}-value stream")
        if repeat:
            out[i:j] = reader.read(word_size)
        else:
            out[i:j] = reader.words(j - i, word_size)
        i = j
    return out


def brush_decode(rle: list[int] | bytes, height: int, width: int) -> np.ndarray:
    """The alpha channel ``(H, W)`` uint8 of a Label Studio brush RLE for an image of that size.

    Raises ValueError when the stream's value count is not ``height * width * 4``.
    """
    values = brush_decode_values(rle)
    if values.size != height * width * 4:
        raise InputError(f"brush RLE holds {values.size} values, but a {width}x{height} RGBA image "
                         f"has {height * width * 4} (width x height)")
    return values.reshape(height, width, 4)[:, :, 3].astype(np.uint8)  # (H, W) alpha


# ---------------------------------------------------------------------------- CVAT


class CvatMask(NamedTuple):
    """A CVAT mask shape: ``counts`` row-major over the box at (``left``, ``top``) of
    ``width`` x ``height`` px, the first run counting background pixels."""

    counts: list[int]
    left: int
    top: int
    width: int
    height: int


def cvat_encode(mask: np.ndarray) -> CvatMask:
    """CVAT RLE of a non-empty mask ``(H, W)`` over its tight bounding box.

    ``counts`` equals ``cvat_sdk.masks.encode_mask(mask)[:-4]``. Raises ValueError for an
    empty mask (CVAT has no empty mask shape).
    """
    mask = _as_bool_mask(mask)
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise InputError("an empty mask has no CVAT encoding (CVAT shapes cover at least one pixel)")
    top, left, bottom, right = int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1
    counts = _binary_runs(mask[top:bottom, left:right].ravel())
    return CvatMask(counts, left, top, right - left, bottom - top)


def cvat_decode(shape: CvatMask, height: int, width: int) -> np.ndarray:
    """The bool mask ``(H, W)`` of a CVAT mask shape on an image of ``height`` x ``width`` px.

    Raises ValueError when the box leaves the image or the runs do not fill the box.
    """
    counts, left, top, w, h = shape
    if w <= 0 or h <= 0 or left < 0 or top < 0 or left + w > width or top + h > height:
        raise InputError(f"mask box left={left} top={top} width={w} height={h} does not fit in the "
                         f"{width}x{height} image")
    box = _expand_binary_runs(counts, w * h, f"mask box {w}x{h}").reshape(h, w)
    out = np.zeros((height, width), bool)
    out[top:top + h, left:left + w] = box
    return out


# ---------------------------------------------------------------------------- COCO


def _coco_compress(counts: list[int]) -> str:
    """pycocotools' ``rleToString``: differences from two counts back (after the third), 5 bits
    per character plus a continuation bit, offset by 48."""
    out = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: negative differences end at -1
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def _coco_decompress(text: str) -> list[int]:
    """pycocotools' ``rleFrString``, the inverse of :func:`_coco_compress`."""
    counts: list[int] = []
    p = 0
    data = text.encode("ascii")
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            if p >= len(data):
                raise InputError("COCO RLE string ends inside a count")
            c = data[p] - 48
            if not 0 <= c < 64:
                raise InputError(f"COCO RLE string has {chr(data[p])!r} at {p}, outside the 64 characters it uses")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def coco_encode(mask: np.ndarray) -> dict:
    """COCO compressed RLE ``{"size": [H, W], "counts": str}`` of a mask ``(H, W)``.

    Equal to ``pycocotools.mask.encode(np.asfortranarray(mask.astype(uint8)))`` with
    ``counts`` decoded to ASCII.
    """
    mask = _as_bool_mask(mask)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])],
            "counts": _coco_compress(_binary_runs(mask.ravel(order="F")))}


def coco_decode(rle: dict) -> np.ndarray:
    """The bool mask ``(H, W)`` of a COCO RLE (compressed string or uncompressed list counts)."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise InputError(f"a COCO RLE needs 'size' and 'counts', got {type(rle).__name__} "
                         f"{sorted(rle) if isinstance(rle, dict) else ''}")
    size = rle["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s >= 0 for s in size)):
        raise InputError(f"COCO RLE size must be [height, width], got {size!r}")
    height, width = size
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    counts = _coco_decompress(counts) if isinstance(counts, str) else list(counts)
    flat = _expand_binary_runs(counts, height * width, f"COCO RLE of size {height}x{width}")
    return flat.reshape(width, height).T  # column-major -> (H, W)
