"""ALGES-sem (paper Eq. 6): for each class k, the sum over the pixels predicted as k of
||G_ij||_F = ||p_ij - onehot(y_ij)||_2 * ||z_ij||_2 (the input norms: input_norms.py).

Two ways to sum by class, one per path: `sum_by_class` bins with index_add_ (one pass,
deterministic on the CPU; atomic adds on CUDA) and `sum_by_class_onehot` reduces a
class comparison over the pixels (no atomics into K bins, which the compiler fuses with
the pixel norms into one reduction).
"""

from __future__ import annotations

import torch


def pixel_gradient_norms(
    residual_norm: torch.Tensor, input_norm: torch.Tensor, pixel_weights: torch.Tensor | None
) -> torch.Tensor:
    """||G_ij||_F (n, H, W) from ||p - onehot(y)|| and ||z|| (n, H, W), 0 at ignored
    pixels (pixel_weights == 0). Overwrites residual_norm."""
    pixel_grad_norm = residual_norm.mul_(input_norm)
    if pixel_weights is not None:
        pixel_grad_norm.mul_(pixel_weights > 0)
    return pixel_grad_norm


def sum_by_class(label: torch.Tensor, values: torch.Tensor, n_classes: int) -> torch.Tensor:
    """out[i, k] = sum of values[i] where label[i] == k: (n, H, W) int64, (n, H, W) float
    -> (n, K). Overwrites label (it becomes the flat bin index)."""
    n = label.shape[0]
    flat_label = label.add_(  # (n, H, W): index into (n * K) class bins
        n_classes * torch.arange(n, device=label.device).view(n, 1, 1)
    )
    sem = values.new_zeros(n * n_classes)
    sem.index_add_(0, flat_label.flatten(), values.flatten())
    return sem.view(n, n_classes)


def sum_by_class_onehot(label: torch.Tensor, values: torch.Tensor, n_classes: int) -> torch.Tensor:
    """sum_by_class as a reduction of (label == k) * values over the pixels, for the
    compiled path: (n, H, W), (n, H, W) -> (n, K); label is not modified."""
    classes = torch.arange(n_classes, device=label.device).view(1, n_classes, 1, 1)
    hits = label.unsqueeze(1) == classes  # (n, K, H, W), fused away by the compiler
    return torch.where(hits, values.unsqueeze(1), 0.0).sum(dim=(2, 3))
