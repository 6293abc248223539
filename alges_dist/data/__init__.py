"""Frame data: the manifest (schema + atomic writes), sources, frame decoding, the demo pool.

Names are re-exported lazily (PEP 562), so ``import alges_dist.data.manifest`` does not
pull in torch through :mod:`alges_dist.data.frames`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "atomic": ["atomic_directory", "atomic_path", "atomic_write_bytes", "atomic_write_text"],
    "manifest": [
        "MANIFEST_SCHEMA", "MASK_ENCODING_KEY", "SPLITS", "Manifest", "MaskEncoding",
        "filter_manifest", "make_manifest", "mark_labeled", "read_manifest", "validate_manifest",
        "write_manifest",
    ],
    "frames": [
        "FrameDataset", "FrameDecodeError", "decode_mask", "load_frame", "load_image", "load_mask",
        "normalize_images", "validate_frame",
    ],
    "sources": ["BINARY_ENCODING", "ingest_folder", "natural_key", "parse_class_map"],
    "cholecseg8k": ["CHOLECSEG8K_ENCODING", "CHOLECSEG8K_ENCODINGS", "PAPER_SPLIT", "ingest_cholecseg8k"],
    "demo": ["DEMO_ENCODING", "demo_pool", "synthetic_video"],
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'alges_dist.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"alges_dist.data.{_MODULE_OF[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
