"""The model's predicted class ids for frames: pre-annotations, the report's overlays and the
simulated oracle's correction effort all use this one function."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def predict_masks(model_path: Path, cfg: Any, image_uris: list[str], size: tuple[int, int] | None) -> list[np.ndarray]:
    """Predicted class ids (H, W) for each image with the run's model and input settings,
    at ``size`` (None: each image's own size)."""
    import torch

    from alges_dist.data.frames import load_image, normalize_images
    from alges_dist.models import load_model

    model = load_model(cfg.model.arch, cfg.model.encoder, cfg.data.n_classes, model_path).eval()
    out = []
    with torch.inference_mode():
        for uri in image_uris:
            target = size or load_image(uri).shape[:2]
            rgb = load_image(uri, tuple(cfg.data.image_size))
            logits = model(normalize_images(rgb[None], cfg.data.normalize))
            logits = torch.nn.functional.interpolate(logits, size=tuple(target), mode="bilinear", align_corners=False)
            out.append(logits.argmax(1)[0].numpy().astype(np.int64))
    return out
