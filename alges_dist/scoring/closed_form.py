"""The per-pixel closed form on a chunk of images, eagerly and in place (the CPU path).

From the logits and the head input of n images: the softmax residual p - onehot(y) and
the uncertainty maps, dL/dlogits of each frame's mean pseudo-label cross-entropy, carried
back through the head's upsampling, then ALGES-img (alges_img.py) and ALGES-sem
(alges_sem.py, input_norms.py). Every pass over (n, K, H, W) counts (Unet-resnet18 at
224 px on this project's 2-core CPU: each costs ~0.5% of the forward pass), hence
in-place updates into reused buffers and no one-hot tensor. compiled.py computes the same
for the compiled path; tests hold them to each other and to autograd.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from alges_dist.errors import InputError
from alges_dist.scoring.alges_img import TapBuffers, head_weight_gradient, tap_buffers
from alges_dist.scoring.alges_sem import pixel_gradient_norms, sum_by_class
from alges_dist.scoring.input_norms import (
    NormTerm,
    unfolded_inner_products,
    upsampled_unfolded_norms,
)

SCALAR_SCORE_NAMES = ("entropy", "margin", "least_confidence")


class Workspace(NamedTuple):
    """Buffers that every chunk of a batch reuses instead of allocating its own: on the
    CPU, fresh multi-MB tensors cost page faults chunk after chunk (measured: 1-3 ms per
    224 px image each), which glibc's heap trimming brings back every chunk."""

    softmax: torch.Tensor  # (n, K, H, W) float32: exp(logit - max), then dL/dlogits
    squares: torch.Tensor  # (n, K, H, W) float32 scratch
    first_max: torch.Tensor  # (n, K, H, W) uint8 (int32 for K >= 256) scratch
    input_products: torch.Tensor  # (n, C, h, w) float32 scratch
    taps: TapBuffers | None  # for a kh x kw > 1 head


def workspace(
    n: int, logits: torch.Tensor, z: torch.Tensor, kernel_size: tuple[int, int]
) -> Workspace:
    """A Workspace for chunks of up to n images of (B, K, H, W) logits, (B, C, h, w) z."""
    n_classes, height, width = logits.shape[1:]
    shape = (n, n_classes, height, width)
    return Workspace(
        softmax=logits.new_empty(shape),
        squares=logits.new_empty(shape),
        first_max=logits.new_empty(
            shape, dtype=torch.uint8 if n_classes < 256 else torch.int32
        ),
        input_products=z.new_empty(n, *z.shape[1:]),
        taps=None if kernel_size == (1, 1) else tap_buffers(n, n_classes, z.shape, kernel_size, z),
    )


def chunk_scores(
    logits: torch.Tensor,
    z: torch.Tensor,
    kernel_size: tuple[int, int],
    upsample: tuple[torch.Tensor, torch.Tensor] | None,
    terms: list[NormTerm] | None,
    pixel_weights: torch.Tensor | None,
    buffers: Workspace,
    *,
    first_frame: int,
) -> dict[str, torch.Tensor]:
    """score_batch's math for n images: logits (n, K, H, W) float32 (overwritten), z
    (n, C, h, w) float32.

    upsample: the head's upsampling as (H, h) and (W, w) matrices, None if it has none;
    terms: input_norms.norm_terms(*upsample); pixel_weights: (n, H, W) valid / n_valid or
    None; buffers: workspace() for >= n images; first_frame: index of the first image in
    the batch (for error messages).
    """
    n, n_classes, height, width = logits.shape
    # (n, H, W): max logit, pseudo-label y
    top, label = _max_and_first_argmax(logits, buffers.first_max[:n])
    has_nan = torch.isnan(top).flatten(1).any(dim=1)  # (n,)
    if has_nan.any():
        frames = (has_nan.nonzero().flatten() + first_frame).tolist()
        raise InputError(f"NaN logits in frames {frames} of the batch: no pseudo-label there")
    shifted = logits.sub_(top.unsqueeze(1))  # (n, K, H, W): logit - max, <= 0
    # exp(logit - max) off the label (exactly 1 at it): the softmax without cancellation,
    # 1 - p_y = rest_sum / total, even for confident pixels.
    rest = torch.exp(shifted, out=buffers.softmax[:n])
    rest.scatter_(1, label.unsqueeze(1), 0.0)
    rest_sum = rest.sum(dim=1)  # (n, H, W)
    total = rest_sum + 1.0  # softmax denominator
    second = rest.amax(dim=1)  # exp(second logit - max)
    # ||p - onehot(y)||_2 (x * x: vector_norm over dim 1 is 40x and square() 5x slower here)
    squares = torch.mul(rest, rest, out=buffers.squares[:n]).sum(dim=1)
    residual_norm = squares.add_(rest_sum * rest_sum).sqrt_().div_(total)
    # sum_k p_k log p_k = sum_{k != y} rest_k shifted_k / total - log(total)
    neg_entropy = shifted.mul_(rest).sum(dim=1).div_(total).sub_(total.log())
    pixel_maps = torch.stack(
        [neg_entropy.neg_(), (1.0 - second).div_(total), rest_sum / total]
    )  # (3, n, H, W): entropy, margin, least confidence per pixel

    # dL/dlogits of the frame's mean cross-entropy: (p - onehot(y)) * weight
    if pixel_weights is None:
        scale = total.reciprocal().mul_(1.0 / (height * width))  # (n, H, W)
    else:
        scale = pixel_weights / total
    grad_logits = rest.mul_(scale.unsqueeze(1))  # (n, K, H, W)
    grad_logits.scatter_(1, label.unsqueeze(1), (-rest_sum * scale).unsqueeze(1))
    if upsample is not None:  # carried back through the upsampling: U_rows^T G U_cols
        up_rows, up_cols = upsample
        grad_conv = up_rows.T @ (grad_logits @ up_cols)  # (n, K, h, w)
        input_norm = upsampled_unfolded_norms(  # (n, H, W)
            z, kernel_size, terms, scratch=buffers.input_products
        )
    else:
        grad_conv = grad_logits
        input_norm = unfolded_inner_products(  # (n, H, W)
            z, kernel_size, 0, 0, scratch=buffers.input_products
        ).sqrt_()
    # (n, K, C_in, kh, kw)
    weight_grad = head_weight_gradient(grad_conv, z, kernel_size, buffers.taps)
    sem = sum_by_class(label, pixel_gradient_norms(residual_norm, input_norm, pixel_weights), n_classes)

    if pixel_weights is None:
        frame_means = pixel_maps.mean(dim=(-2, -1))  # (3, n)
    else:
        frame_means = (pixel_maps * pixel_weights).sum(dim=(-2, -1))
    return chunk_outputs(weight_grad, sem, frame_means)


def chunk_outputs(
    weight_grad: torch.Tensor, sem: torch.Tensor, frame_means: torch.Tensor
) -> dict[str, torch.Tensor]:
    """score_batch's per-chunk outputs from the head weight gradient (n, K, C, kh, kw),
    ALGES-sem (n, K) and the uncertainty means (3, n)."""
    return {
        "alges_img": weight_grad.flatten(1),
        "alges_img_norms": torch.linalg.vector_norm(weight_grad.flatten(2), dim=2),
        "alges_sem": sem,
        **{name: frame_means[i] for i, name in enumerate(SCALAR_SCORE_NAMES)},
    }


def _max_and_first_argmax(
    logits: torch.Tensor, scratch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.max(logits, dim=1) for (n, K, H, W): the max and the first class reaching it.

    amax plus an equality test is 1.6x faster than torch.max's index tracking over the
    strided class dim here (CPU, 13 classes, 224 px). scratch: (n, K, H, W) integer.
    Where the max is NaN the label is K (out of range): callers check the max first.
    """
    n_classes = logits.shape[1]
    top = logits.amax(dim=1)  # (n, H, W)
    # K - k at the maxima, 0 elsewhere: the largest value marks the first maximum
    countdown = torch.arange(n_classes, 0, -1, dtype=scratch.dtype, device=logits.device)
    reached = torch.eq(logits, top.unsqueeze(1), out=scratch)
    reached.mul_(countdown.view(1, n_classes, 1, 1))
    return top, n_classes - reached.amax(dim=1).long()
