"""Segmentation metrics: the ALGES paper's per-image Dice and dataset-level IoU/Dice.

Pure torch; label maps in, numbers out. Pixels equal to ``ignore_index`` in the target
count nowhere.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from alges_dist.errors import InputError


def _check_labels(pred: Tensor, target: Tensor, n_classes: int) -> None:
    if pred.shape != target.shape:
        raise InputError(f"pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    if pred.dtype.is_floating_point or target.dtype.is_floating_point:
        raise InputError("pred and target must be integer label maps (argmax the logits first)")
    if pred.numel() and (pred.min() < 0 or pred.max() >= n_classes):
        raise InputError(f"pred holds labels outside 0..{n_classes - 1}: min {int(pred.min())}, max {int(pred.max())}")


def paper_dice(
    pred: Tensor,
    target: Tensor,
    *,
    n_classes: int,
    classes: list[int] | None = None,
    ignore_index: int = 255,
) -> Tensor:
    """Per-image Dice as the ALGES paper defines it, one value per image.

    For image b and class k: (2|P∩T| + 1) / (|P| + |T| + 1), then the mean over
    ``classes`` (paper: {0,1,2,3,4,5,9,10} on CholecSeg8k; None = all classes). The +1
    makes a class absent from both maps count as 1. Average the result over images
    for the paper's number.

    pred, target: (B, H, W) integer labels. Returns (B,) float32.
    """
    classes = list(range(n_classes)) if classes is None else list(classes)
    bad = [c for c in classes if not 0 <= c < n_classes]
    if bad:
        raise InputError(f"classes {bad} outside 0..{n_classes - 1}")
    return paper_dice_per_class(pred, target, n_classes=n_classes, ignore_index=ignore_index)[:, classes].mean(1)


def paper_dice_per_class(pred: Tensor, target: Tensor, *, n_classes: int, ignore_index: int = 255) -> Tensor:
    """The paper's per-image Dice of every class, before the mean over classes.

    pred, target: (B, H, W) integer labels. Returns (B, K) float32.
    """
    _check_labels(pred, target, n_classes)
    valid = (target != ignore_index).flatten(1)  # (B, P)
    pred_1h = torch.nn.functional.one_hot(pred.flatten(1).long(), n_classes) & valid[..., None]  # (B, P, K)
    target_1h = torch.nn.functional.one_hot(
        torch.where(valid, target.flatten(1).long(), 0), n_classes
    ) & valid[..., None]  # (B, P, K)
    inter = (pred_1h & target_1h).sum(1).float()  # (B, K)
    total = pred_1h.sum(1).float() + target_1h.sum(1).float()  # (B, K)
    return (2 * inter + 1) / (total + 1)  # (B, K)


def confusion_matrix(pred: Tensor, target: Tensor, *, n_classes: int, ignore_index: int = 255) -> Tensor:
    """(K, K) int64 counts, rows = true class, columns = predicted class.

    Sum it over batches for dataset-level scores.
    """
    _check_labels(pred, target, n_classes)
    valid = target != ignore_index
    t = target[valid].long()
    if t.numel() and (t.min() < 0 or t.max() >= n_classes):
        raise InputError(f"target holds labels outside 0..{n_classes - 1} that are not ignore_index={ignore_index}")
    flat = t * n_classes + pred[valid].long()
    return torch.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


class ClassScores(NamedTuple):
    """Dataset-level scores from a confusion matrix; classes absent from both are NaN."""

    iou: Tensor  # (K,)
    dice: Tensor  # (K,)
    miou: float
    mdice: float


def scores_from_confusion(cm: Tensor) -> ClassScores:
    """Per-class IoU = TP/(TP+FP+FN) and Dice = 2TP/(2TP+FP+FN), and their nan-means."""
    cm = cm.double()
    tp = cm.diag()
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    denom = tp + fp + fn
    nan = torch.full_like(tp, float("nan"))
    iou = torch.where(denom > 0, tp / denom.clamp(min=1), nan)
    dice = torch.where(denom > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), nan)
    return ClassScores(iou.float(), dice.float(), float(iou.nanmean()), float(dice.nanmean()))
