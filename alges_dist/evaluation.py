"""Evaluate a segmentation model over batches of (image, mask): the paper's Dice and mIoU.

Used by the training workers (validation Dice per epoch) and by the round (test split).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from alges_dist.errors import InputError
from alges_dist.metrics import confusion_matrix, paper_dice_per_class, scores_from_confusion


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    n_classes: int,
    dice_classes: list[int] | None = None,
    ignore_index: int = 255,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Paper Dice (mean over images), dataset mIoU and mean Dice, the frame count, and per class:
    ``dice_per_class`` (the paper's Dice of each class, mean over images; ``dice`` is its mean
    over ``dice_classes``) and ``dataset_dice_per_class`` (2TP / (2TP + FP + FN) over the
    split; None for a class absent from predictions and masks alike).

    batches: (images (B, 3, H, W) normalized float, masks (B, H, W) int64).
    The model is put in eval mode and restored to its previous mode afterwards.
    """
    classes = list(range(n_classes)) if dice_classes is None else list(dice_classes)
    bad = [c for c in classes if not 0 <= c < n_classes]
    if bad:
        raise InputError(f"dice_classes {bad} outside the class ids 0..{n_classes - 1}")
    was_training = model.training
    model.eval()
    dice_sum, n_frames = 0.0, 0
    class_dice_sum = torch.zeros(n_classes, dtype=torch.float64)
    cm = torch.zeros(n_classes, n_classes, dtype=torch.int64)
    try:
        for images, masks in batches:
            pred = model(images.to(device)).argmax(1).cpu()  # (B, H, W)
            per_class = paper_dice_per_class(pred, masks, n_classes=n_classes, ignore_index=ignore_index)  # (B, K)
            dice_sum += float(per_class[:, classes].mean(1).sum())
            class_dice_sum += per_class.double().sum(0)
            cm += confusion_matrix(pred, masks, n_classes=n_classes, ignore_index=ignore_index)
            n_frames += len(images)
    finally:
        model.train(was_training)
    if n_frames == 0:
        raise InputError("no frames to evaluate: the split is empty")
    scores = scores_from_confusion(cm)
    return {"dice": dice_sum / n_frames, "miou": scores.miou, "mdice": scores.mdice, "n_frames": n_frames,
            "dice_per_class": (class_dice_sum / n_frames).tolist(),
            "dataset_dice_per_class": [None if math.isnan(d) else d for d in scores.dice.tolist()]}
