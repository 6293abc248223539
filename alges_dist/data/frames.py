"""Frame decoding: image and mask files -> arrays -> model input.

Everything that turns a manifest row into pixels lives here, so training, scoring and
ingest agree on it: :func:`load_image` (bilinear resize), :func:`load_mask` (class ids,
nearest resize), :func:`normalize_images` (the one place uint8 pixels become the
model's float input), and :class:`FrameDataset` for training and evaluation.

Sizes are ``(height, width)``, like the arrays. URIs are local paths (absolute
recommended), ``scheme://`` URIs opened through ``pyarrow.fs.FileSystem.from_uri``, or
video frames ``/abs/video.mp4#t=SECONDS`` (decoded by :mod:`alges_dist.data.video`).

Every decode refuses frames above ``max_pixels`` (default :data:`DEFAULT_MAX_PIXELS`,
config ``data.max_pixels``) from the header, before any pixel is decompressed: a
20000x20000 PNG of zeros is a few hundred KiB on disk and 1.2 GB in memory.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from alges_dist import storage
from alges_dist.data.manifest import MaskEncoding
from alges_dist.data.video import VideoError, parse_video_uri, read_frame
from alges_dist.errors import InputError

if TYPE_CHECKING:
    import torch

# torch is imported by the functions that make tensors: the driver imports this module (for its
# constants and errors, through the report and the stages) and never needs torch (issue 24)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FrameDataset",
    "FrameDecodeError",
    "decode_mask",
    "load_frame",
    "load_image",
    "load_mask",
    "normalize_images",
    "resize_rgb",
    "validate_frame",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Pixels per frame above which a file is refused unread: well above 8K video (33 MP),
#: far below what fills memory. 100-megapixel frames are refused.
DEFAULT_MAX_PIXELS = 40_000_000

# PIL modes that convert to RGB without losing meaning; 16-bit and float images do not.
_RGB_CONVERTIBLE = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}


class FrameDecodeError(InputError):
    """A frame or mask file that cannot be used; the message names the file and why."""


# ---------------------------------------------------------------------------- file access


def _too_many_pixels(uri: str, width: int, height: int, max_pixels: int) -> FrameDecodeError:
    return FrameDecodeError(
        f"{uri}: {width}x{height} = {width * height / 1e6:.1f} megapixels, more than the cap of "
        f"{max_pixels / 1e6:g} MP (data.max_pixels); refused before decoding (a decompression bomb?)"
    )


def _open(uri: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode ``uri`` (truncated files fail here, not later).

    The size comes from the header: frames above ``max_pixels`` are refused before any
    pixel is decompressed.
    """
    try:
        with warnings.catch_warnings():  # PIL's own bomb warning; our cap below says more
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if "://" in uri:  # an object store, or file://
                image = Image.open(io.BytesIO(storage.read_bytes(uri)))
            else:
                image = Image.open(uri)
        if image.width * image.height > max_pixels:
            raise _too_many_pixels(uri, image.width, image.height, max_pixels)
        image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: file not found") from None
    except Image.DecompressionBombError as err:  # PIL refuses > 2x its own limit at open
        raise FrameDecodeError(f"{uri}: refused before decoding, a decompression bomb? ({err})") from None
    except FrameDecodeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, pa.ArrowException) as err:
        raise FrameDecodeError(f"{uri}: unreadable image ({type(err).__name__}: {err})") from None
    return image


def _check_size(size: tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
        raise InputError(f"size must be (height, width) with positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _rgb_array(image: Image.Image, uri: str) -> np.ndarray:
    if image.mode not in _RGB_CONVERTIBLE:
        raise FrameDecodeError(f"{uri}: image mode {image.mode!r} is not an 8-bit colour or grey image")
    return np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy


def _resize_rgb(rgb: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    if size is None or rgb.shape[:2] == size:
        return rgb
    return np.array(Image.fromarray(rgb).resize((size[1], size[0]), Image.Resampling.BILINEAR))


def resize_rgb(rgb: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """uint8 RGB ``(H, W, 3)`` resized bilinearly to ``size=(H, W)``, as :func:`load_image` does:
    for decoders outside this module (video chunks) so every path gives the same pixels."""
    return _resize_rgb(rgb, _check_size(size))


def _image_rgb(uri: str, max_pixels: int) -> np.ndarray:
    """Full-size RGB uint8 ``(H, W, 3)`` of an image file or a ``#t=`` video frame."""
    target = parse_video_uri(uri)
    if target is None:
        return _rgb_array(_open(uri, max_pixels), uri)
    try:
        return read_frame(target[0], target[1], max_pixels=max_pixels)
    except VideoError as err:
        raise FrameDecodeError(str(err)) from None


# ---------------------------------------------------------------------------- images


def load_image(uri: str, size: tuple[int, int] | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image as RGB uint8 ``(H, W, 3)``, resized bilinearly to ``size=(H, W)``.

    ``uri`` may address a video frame, ``/abs/video.mp4#t=SECONDS`` (one seek, decode
    forward to the frame on screen at that time). Raises FileNotFoundError, or
    FrameDecodeError naming the file when it cannot be decoded or has more than
    ``max_pixels`` pixels.
    """
    size = _check_size(size)
    return _resize_rgb(_image_rgb(uri, max_pixels), size)


# ---------------------------------------------------------------------------- masks


def _mask_values(image: Image.Image, encoding: MaskEncoding, uri: str) -> np.ndarray:
    """Raw mask values: ``(H, W)`` for grey modes, ``(H, W, 3)`` for ``rgb``."""
    mode = image.mode
    if encoding.mode == "rgb":
        if mode not in _RGB_CONVERTIBLE:
            raise FrameDecodeError(f"{uri}: mask mode {mode!r} cannot be read as colours")
        return np.asarray(image.convert("RGB"))
    # Grey modes: palette PNGs hold class indices (VOC convention), so read the indices.
    if mode in ("L", "P"):
        return np.asarray(image)
    if mode == "1":
        return np.asarray(image.convert("L"))
    if mode == "LA":
        return np.asarray(image)[..., 0]
    if mode in ("RGB", "RGBA", "RGBX"):
        rgb = np.asarray(image)[..., :3]
        unequal = (rgb[..., 0] != rgb[..., 1]) | (rgb[..., 0] != rgb[..., 2])
        if unequal.any():
            y, x = np.argwhere(unequal)[0]
            raise FrameDecodeError(
                f"{uri}: mask has colour pixels (first at x={x}, y={y}: {tuple(int(c) for c in rgb[y, x])}); "
                f"mode '{encoding.mode}' reads grey masks with equal channels; use an 'rgb' class map"
            )
        return rgb[..., 0]
    if mode in ("I", "I;16", "I;16B", "I;16L"):
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 255):
            bad = int(values.max()) if values.max() > 255 else int(values.min())
            raise FrameDecodeError(f"{uri}: mask value {bad} is outside 0..255")
        return values.astype(np.uint8)
    raise FrameDecodeError(f"{uri}: mask mode {mode!r} is not supported (expected grey, palette or RGB)")


def _unknown_values_error(uri: str, values: list[Any], encoding: MaskEncoding) -> FrameDecodeError:
    shown = ", ".join(str(v) for v in values[:8]) + (" ..." if len(values) > 8 else "")
    known = sorted(encoding.class_map, key=lambda k: [int(p) for p in k.split(",")])
    return FrameDecodeError(
        f"{uri}: mask value {shown} is not in the class map "
        f"(mapped: {known}; ignored: {encoding.ignore_values})"
    )


def decode_mask(values: np.ndarray, encoding: MaskEncoding, *, source: str = "mask") -> np.ndarray:
    """Map raw mask values to class ids uint8 ``(H, W)`` (ignored values -> ``ignore_index``).

    ``values``: ``(H, W)`` integers 0..255 for ``lut``/``threshold``, ``(H, W, 3)`` for
    ``rgb``. Raises FrameDecodeError naming ``source`` and the first unmapped values.
    """
    if encoding.mode == "rgb":
        if values.ndim != 3 or values.shape[-1] != 3:
            raise FrameDecodeError(f"{source}: rgb class map needs (H, W, 3) values, got shape {values.shape}")
        packed = (values[..., 0].astype(np.uint32) << 16) | (values[..., 1].astype(np.uint32) << 8) | values[..., 2]
        pairs = [(k, v) for k, v in encoding.class_map.items()]
        pairs += [(k, encoding.ignore_index) for k in encoding.ignore_values]
        keys = np.array([(r << 16) | (g << 8) | b for r, g, b in (map(int, k.split(",")) for k, _ in pairs)], np.uint32)
        targets = np.array([v for _, v in pairs], np.uint8)
        order = np.argsort(keys)
        keys, targets = keys[order], targets[order]
        slot = np.clip(np.searchsorted(keys, packed), 0, len(keys) - 1)
        found = keys[slot] == packed
        if not found.all():
            bad = np.unique(packed[~found])
            colours = [f"({c >> 16},{(c >> 8) & 255},{c & 255})" for c in bad.tolist()]
            raise _unknown_values_error(source, colours, encoding)
        return targets[slot]

    if values.ndim != 2:
        raise FrameDecodeError(f"{source}: grey class map needs (H, W) values, got shape {values.shape}")
    values = values.astype(np.uint8, copy=False)
    table = np.full(256, -1, dtype=np.int16)  # -1: not in the map
    if encoding.mode == "threshold":
        table[: encoding.threshold + 1] = 0
        table[encoding.threshold + 1 :] = 1
    else:
        for key, class_id in encoding.class_map.items():
            table[int(key)] = class_id
    for key in encoding.ignore_values:
        table[int(key)] = encoding.ignore_index
    ids = table[values]
    if (ids < 0).any():
        raise _unknown_values_error(source, np.unique(values[ids < 0]).tolist(), encoding)
    return ids.astype(np.uint8)


def _resize_ids(ids: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    if size is None or ids.shape == size:
        return ids
    image = Image.fromarray(ids).resize((size[1], size[0]), Image.Resampling.NEAREST)
    return np.array(image, dtype=np.uint8)


def load_mask(uri: str, encoding: MaskEncoding, size: tuple[int, int] | None = None, *,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a mask file as class ids uint8 ``(H, W)``, nearest-resized to ``size=(H, W)``.

    Values outside ``encoding`` raise FrameDecodeError naming the file and the values.
    """
    size = _check_size(size)
    ids = decode_mask(_mask_values(_open(uri, max_pixels), encoding, uri), encoding, source=uri)
    return _resize_ids(ids, size)


def load_frame(
    image_uri: str, mask_uri: str, encoding: MaskEncoding, size: tuple[int, int] | None = None, *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray]:
    """Image uint8 ``(H, W, 3)`` and class ids uint8 ``(H, W)`` of one frame, resized together.

    Raises FrameDecodeError when the mask's size differs from the image's (before resizing).
    """
    size = _check_size(size)
    rgb = _image_rgb(image_uri, max_pixels)
    mask = _open(mask_uri, max_pixels)
    if (rgb.shape[1], rgb.shape[0]) != mask.size:
        raise FrameDecodeError(
            f"{mask_uri}: mask is {mask.width}x{mask.height} but its image {image_uri} is "
            f"{rgb.shape[1]}x{rgb.shape[0]} (width x height); they must match"
        )
    ids = _resize_ids(decode_mask(_mask_values(mask, encoding, mask_uri), encoding, source=mask_uri), size)
    return _resize_rgb(rgb, size), ids


def validate_frame(image_uri: str, mask_uri: str | None, encoding: MaskEncoding, *,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Decode a frame (and its mask) fully, as ingest does; return the image's ``(H, W)``.

    Raises FileNotFoundError or FrameDecodeError naming the file: unreadable image,
    more than ``max_pixels`` pixels, mask value outside the map, mask size differing
    from the image.
    """
    if mask_uri is None:
        rgb = _image_rgb(image_uri, max_pixels)
        return rgb.shape[0], rgb.shape[1]
    rgb, _ = load_frame(image_uri, mask_uri, encoding, None, max_pixels=max_pixels)
    return rgb.shape[0], rgb.shape[1]


# ---------------------------------------------------------------------------- model input


def normalize_images(images: np.ndarray | torch.Tensor, mode: str = "imagenet") -> torch.Tensor:
    """uint8 RGB ``(B, H, W, 3)`` -> float32 ``(B, 3, H, W)``: ImageNet mean/std normalized
    (``mode="imagenet"``) or only scaled to [0, 1] (``mode="none"``, the ALGES paper).

    The single place pixels become model input: training and scoring both call it.
    Output is on the input's device (numpy input -> CPU).
    """
    import torch

    if isinstance(images, np.ndarray):
        # torch.from_numpy refuses read-only arrays (np.asarray of a PIL image): copy those
        images = np.ascontiguousarray(images) if images.flags.writeable else np.array(images)
    x = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
    if x.dtype != torch.uint8:
        raise InputError(f"images must be uint8 (raw pixels), got {x.dtype}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise InputError(f"images must have shape (B, H, W, 3), got {tuple(x.shape)}")
    if mode not in ("imagenet", "none"):
        raise InputError(f"normalize mode must be 'imagenet' or 'none', got {mode!r}")
    x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W) in [0, 1]
    if mode == "none":
        return x.contiguous()
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous()


class FrameDataset:
    """Manifest rows as ``(image float32 (3, H, W) normalized, mask int64 (H, W))`` pairs.

    A map-style dataset (``__len__`` and ``__getitem__``: all a DataLoader and its samplers use),
    without torch's ``Dataset`` base class, so this module needs no torch at import.

    For training and evaluation, so every row needs a mask: pass the labeled rows
    (``filter_manifest(table, split="pool", labeled=True)``) or val/test rows.
    Masks keep ``encoding.ignore_index`` for ignored pixels (use it as the loss's
    ``ignore_index``).
    """

    def __init__(self, table: pa.Table, encoding: MaskEncoding, size: tuple[int, int] | None = None,
                 normalize: str = "imagenet", *, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.frame_ids: list[str] = table.column("frame_id").to_pylist()
        self.image_uris: list[str] = table.column("image_uri").to_pylist()
        self.mask_uris: list[str | None] = table.column("mask_uri").to_pylist()
        missing = [f for f, m in zip(self.frame_ids, self.mask_uris) if m is None]
        if missing:
            raise InputError(
                f"FrameDataset needs a mask for every row; {len(missing)} rows have mask_uri null "
                f"(first frame_id {missing[0]!r}); filter to labeled or val/test rows first"
            )
        self.encoding, self.normalize, self.max_pixels = encoding, normalize, max_pixels
        self.size = _check_size(size)

    def __len__(self) -> int:
        return len(self.frame_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rgb, ids = load_frame(self.image_uris[index], self.mask_uris[index], self.encoding, self.size,
                              max_pixels=self.max_pixels)
        import torch

        image = normalize_images(rgb[None], self.normalize)[0]  # (3, H, W)
        mask = torch.from_numpy(ids.astype(np.int64))  # (H, W)
        return image, mask

