"""ALGES-img (paper Eq. 4) in closed form: the head conv's weight gradient per image.

Given R = dL/d(conv output) (n, K, h, w) of the frame's mean pseudo-label cross-entropy,
the gradient of a stride-1 "same" conv's weight is sum_uv R[:, k, u, v] z_pad[:, c, u+a,
v+b]: per image a (K, C, kh, kw) block, computed without a backward pass through the
network and without a per-pixel K x D tensor.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class TapBuffers(NamedTuple):
    """Zero-bordered buffers for head_weight_gradient, reused by every chunk of a batch:
    a fresh multi-MB tensor per chunk costs page faults on the CPU (measured: 3 ms per
    224 px image for pad + channels-last copy, 0.5 ms into these)."""

    z_padded: torch.Tensor  # (n, C, h + kh - 1, w + kw - 1), zero border
    z_channels_last: torch.Tensor  # the same shape, channels-last memory format
    grad_padded: torch.Tensor  # (n, K, h, w + kw - 1), zero right columns


def tap_buffers(
    n: int, n_classes: int, z_shape: torch.Size, kernel_size: tuple[int, int], like: torch.Tensor
) -> TapBuffers:
    """TapBuffers for up to n images of z with z_shape (B, C, h, w), like's dtype and device."""
    n_inputs, height, width = z_shape[1:]
    kh, kw = kernel_size
    padded = (n, n_inputs, height + kh - 1, width + kw - 1)
    return TapBuffers(
        z_padded=like.new_zeros(padded),
        z_channels_last=like.new_empty(padded).contiguous(memory_format=torch.channels_last),
        grad_padded=like.new_zeros(n, n_classes, height, width + kw - 1),
    )


def head_weight_gradient(
    grad_conv: torch.Tensor,
    z: torch.Tensor,
    kernel_size: tuple[int, int],
    buffers: TapBuffers | None = None,
) -> torch.Tensor:
    """sum_uv grad_conv[:, k, u, v] * z_pad[:, c, u + a, v + b], the weight gradient of a
    stride-1 "same" conv, per image: (n, K, h, w), (n, C, h, w) -> (n, K, C, kh, kw).

    One batched matmul per tap on shifted views; no unfolded copy of z. On CUDA a kxk
    head goes through head_weight_gradient_grouped_conv. buffers: from tap_buffers for
    at least n images (allocated here when None).
    """
    n, n_classes, height, width = grad_conv.shape
    n_inputs = z.shape[1]
    kh, kw = kernel_size
    if z.is_cuda and (kh, kw) != (1, 1):
        return head_weight_gradient_grouped_conv(grad_conv, z, kernel_size)
    if kh == kw == 1:  # one matmul: the transposed view costs less than a copy of z
        z_t = z.reshape(n, n_inputs, height * width).transpose(1, 2)  # (n, h*w, C)
        grad = torch.bmm(grad_conv.reshape(n, n_classes, height * width), z_t)
        return grad.view(n, n_classes, n_inputs, 1, 1)
    pad_h, pad_w = kh // 2, kw // 2
    pitch = width + 2 * pad_w  # row length of the padded grid
    if buffers is None:
        buffers = tap_buffers(n, n_classes, z.shape, kernel_size, z)
    # z zero-padded, channels-last, flattened over pixels: (n, (h + 2 pad_h) * pitch, C).
    # Each tap is then a plain (pixels, C) slice, which MKL multiplies ~2x faster than
    # the transposed NCHW view on 2 threads; a padded copy, then a channels-last copy, is
    # the fastest way there (224 px, 16 channels: 0.5 ms vs 1.0 ms for a permuted copy).
    z_padded = buffers.z_padded[:n]
    z_padded[:, :, pad_h : pad_h + height, pad_w : pad_w + width] = z
    z_flat = buffers.z_channels_last[:n]
    z_flat.copy_(z_padded)
    z_flat = z_flat.permute(0, 2, 3, 1).reshape(n, -1, n_inputs)  # a view
    # grad_conv on the same pitch (zero right columns): tap (a, b) is the flat offset
    # a * pitch + b, and a pixel never wraps into the next row.
    grad_padded = buffers.grad_padded[:n]  # (n, K, h, pitch)
    grad_padded[..., :width] = grad_conv
    length = height * pitch - 2 * pad_w  # the last row's zero columns are never needed
    grad_flat = grad_padded.view(n, n_classes, height * pitch)[:, :, :length]
    taps = [
        torch.bmm(grad_flat, z_flat[:, a * pitch + b : a * pitch + b + length])  # (n, K, C)
        for a in range(kh)
        for b in range(kw)
    ]
    return torch.stack(taps, dim=-1).view(n, n_classes, n_inputs, kh, kw)


def head_weight_gradient_grouped_conv(
    grad_conv: torch.Tensor, z: torch.Tensor, kernel_size: tuple[int, int]
) -> torch.Tensor:
    """head_weight_gradient as one convolution weight-gradient with the images as groups.

    For the GPU: there each tap's bmm reduces h*w terms into a K x C block, a shape that
    leaves most of the device idle (Unet at 224 px on an H100: 1.5 ms per tap, 64% of
    score_batch), while cuDNN's weight-gradient kernels split that reduction. TF32 is
    off for the call, so the sums stay float32 like the bmm path; the caller's other
    cuDNN settings (benchmark, deterministic) hold (`cudnn.flags` resets any it is not
    given).
    """
    n, n_classes, height, width = grad_conv.shape
    n_inputs = z.shape[1]
    kh, kw = kernel_size
    cudnn = torch.backends.cudnn
    with cudnn.flags(
        enabled=True,
        benchmark=cudnn.benchmark,
        benchmark_limit=cudnn.benchmark_limit,
        deterministic=cudnn.deterministic,
        allow_tf32=False,
    ):
        grad = torch.nn.grad.conv2d_weight(
            z.reshape(1, n * n_inputs, height, width),  # image i's channels form group i
            (n * n_classes, n_inputs, kh, kw),
            grad_conv.reshape(1, n * n_classes, height, width),
            padding=(kh // 2, kw // 2),
            groups=n,
        )
    return grad.view(n, n_classes, n_inputs, kh, kw)
