"""Evaluate a segmentation model over batches of (image, mask): the paper's Dice and mIoU.

Used by the training workers (validation Dice per epoch) and by the round (test split).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from alges_dist.metrics import confusion_matrix, paper_dice, scores_from_confusion


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    n_classes: int,
    dice_classes: list[int] | None = None,
    ignore_index: int = 255,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Paper Dice (mean over images), dataset mIoU and mean Dice, and the frame count.

    batches: (images (B, 3, H, W) normalized float, masks (B, H, W) int64).
    The model is put in eval mode and restored to its previous mode afterwards.
    """
    was_training = model.training
    model.eval()
    dice_sum, n_frames = 0.0, 0
    cm = torch.zeros(n_classes, n_classes, dtype=torch.int64)
    try:
        for images, masks in batches:
            pred = model(images.to(device)).argmax(1).cpu()  # (B, H, W)
            dice_sum += float(
                paper_dice(pred, masks, n_classes=n_classes, classes=dice_classes, ignore_index=ignore_index).sum()
            )
            cm += confusion_matrix(pred, masks, n_classes=n_classes, ignore_index=ignore_index)
            n_frames += len(images)
    finally:
        model.train(was_training)
    if n_frames == 0:
        raise ValueError("no frames to evaluate: the split is empty")
    scores = scores_from_confusion(cm)
    return {"dice": dice_sum / n_frames, "miou": scores.miou, "mdice": scores.mdice, "n_frames": n_frames}
