"""The per-pixel closed form as one function for torch.compile (the CUDA path).

closed_form.chunk_scores runs the math as ~40 separate kernels, each a pass over the
(n, K, H, W) logits or the head input: on the CPU that suits in-place buffers, but on an
H100 those passes at full resolution cost as much as the forward pass itself (issue 15:
score_batch at 0.51x plain inference, Unet-resnet18, 224 px, batch 32). Written
functionally, the same math compiles (inductor) into a handful of fused kernels: one
over the logits (max, first argmax, softmax residual, uncertainty maps, dL/dlogits,
read in the network's dtype and computed in float32), one over the head input for every
inner-product map, and one reduction for ALGES-sem by class and the frame means.
The head-weight gradient stays outside (one cuDNN call, alges_img.py).

Exact in float32 like the eager path (tests hold it to autograd and to chunk_scores on
the CPU, where inductor compiles C++). The batch dimension is marked dynamic, so a
smaller last batch reuses the same kernels.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from alges_dist.errors import InputError
from alges_dist.scoring.alges_img import head_weight_gradient
from alges_dist.scoring.alges_sem import sum_by_class_onehot
from alges_dist.scoring.closed_form import chunk_outputs
from alges_dist.scoring.input_norms import NormTerm, inner_product_maps


def triton_available() -> bool:
    """Whether torch.compile's default backend (inductor) can build CUDA kernels: it
    writes them in Triton (on the CPU it writes C++ and needs a C++ compiler instead)."""
    return importlib.util.find_spec("triton") is not None


def chunk_scores(
    logits: torch.Tensor,
    z: torch.Tensor,
    kernel_size: tuple[int, int],
    upsample: tuple[torch.Tensor, torch.Tensor] | None,
    terms: list[NormTerm] | None,
    pixel_weights: torch.Tensor | None,
    *,
    first_frame: int,
) -> dict[str, torch.Tensor]:
    """closed_form.chunk_scores through the compiled kernels: logits (n, K, H, W) and z
    (n, C, h, w) in the network's dtype (not modified), the rest as there."""
    for tensor in (logits, z, pixel_weights):
        if tensor is not None:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
    grad_conv, sem, frame_means, has_nan = _compiled_pixel_terms()(
        logits, z, kernel_size, upsample, terms, pixel_weights
    )
    # (n, K, C_in, kh, kw): one cuDNN weight-gradient on CUDA, queued before the NaN test
    # waits for the device
    weight_grad = head_weight_gradient(grad_conv, z.float(), kernel_size)
    if has_nan.any():
        frames = (has_nan.nonzero().flatten() + first_frame).tolist()
        raise InputError(f"NaN logits in frames {frames} of the batch: no pseudo-label there")
    return chunk_outputs(weight_grad, sem, frame_means)


@functools.cache
def _compiled_pixel_terms():
    """pixel_terms compiled once per process (torch.compile is lazy: kernels are built,
    and cached by torch per input kind, on the first call)."""
    return torch.compile(pixel_terms, fullgraph=True)


def pixel_terms(
    logits: torch.Tensor,
    z: torch.Tensor,
    kernel_size: tuple[int, int],
    upsample: tuple[torch.Tensor, torch.Tensor] | None,
    terms: list[NormTerm] | None,
    pixel_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Everything of closed_form.chunk_scores but the head-weight gradient, functionally.

    Returns (float32 unless said):
        grad_conv (n, K, h, w): dL/d(head conv output) of each frame's mean pseudo-label
            cross-entropy (dL/dlogits carried back through the upsampling);
        sem (n, K): ALGES-sem; frame_means (3, n): entropy, margin, least confidence;
        has_nan (n,) bool: frames whose logits hold NaN (their other outputs are junk).
    """
    n, n_classes, height, width = logits.shape
    x = logits.float()
    top = x.amax(dim=1, keepdim=True)  # (n, 1, H, W)
    label = x.argmax(dim=1, keepdim=True)  # (n, 1, H, W): the first class reaching the max
    is_label = torch.arange(n_classes, device=x.device).view(1, n_classes, 1, 1) == label
    shifted = x - top  # (n, K, H, W), <= 0
    # exp(logit - max) off the label: the softmax without cancellation (closed_form.py)
    rest = torch.where(is_label, 0.0, torch.exp(shifted))
    rest_sum = rest.sum(dim=1)  # (n, H, W)
    total = rest_sum + 1.0  # softmax denominator
    residual_norm = torch.sqrt((rest * rest).sum(dim=1) + rest_sum * rest_sum) / total
    neg_entropy = (shifted * rest).sum(dim=1) / total - torch.log(total)
    pixel_maps = torch.stack(
        [-neg_entropy, (1.0 - rest.amax(dim=1)) / total, rest_sum / total]
    )  # (3, n, H, W): entropy, margin, least confidence per pixel

    if pixel_weights is None:
        scale = total.reciprocal() * (1.0 / (height * width))  # (n, H, W)
    else:
        scale = pixel_weights / total
    scale = scale.unsqueeze(1)
    grad_logits = torch.where(is_label, -rest_sum.unsqueeze(1) * scale, rest * scale)
    if upsample is not None:  # carried back through the upsampling: U_rows^T G U_cols
        up_rows, up_cols = upsample
        grad_conv = up_rows.T @ (grad_logits @ up_cols)  # (n, K, h, w)
        maps = inner_product_maps(z, kernel_size, [(dy, dx) for dy, dx, _, _ in terms])
        squared = sum(rows @ maps[t] @ cols.T for t, (_, _, rows, cols) in enumerate(terms))
        input_norm = squared.clamp(min=0.0).sqrt()  # (n, H, W)
    else:
        grad_conv = grad_logits
        input_norm = inner_product_maps(z, kernel_size, [(0, 0)])[0].sqrt()  # (n, H, W)

    pixel_grad_norm = residual_norm * input_norm  # ||G_ij||_F
    if pixel_weights is not None:
        pixel_grad_norm = pixel_grad_norm * (pixel_weights > 0)
    sem = sum_by_class_onehot(label[:, 0], pixel_grad_norm, n_classes)
    if pixel_weights is None:
        frame_means = pixel_maps.mean(dim=(-2, -1))  # (3, n)
    else:
        frame_means = (pixel_maps * pixel_weights).sum(dim=(-2, -1))
    has_nan = torch.isnan(top).flatten(1).any(dim=1)
    return grad_conv, sem, frame_means, has_nan
