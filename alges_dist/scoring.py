"""Per-frame ALGES embeddings and uncertainty scores from one forward pass.

DESIGN "The math". With z the head conv's input (unfolded over its kh x kw taps),
p the softmax of the logits and y = argmax p the pseudo-label, the cross-entropy of
pixel (i, j) has the head-weight gradient G_ij = (p_ij - onehot(y_ij)) (outer) z_ij.

- ALGES-img (Eq. 4): the mean of G_ij over (valid) output pixels, i.e. the gradient
  of the frame's mean pseudo-label cross-entropy with respect to the head weight.
  Closed form: R = dL/dlogits = (p - onehot(y)) / n_valid, carried back through the
  head's upsampling (its adjoint, two small matrices), then sum_uv R_uv (outer) z_uv
  as kh*kw batched matmuls on shifted views of the padded input. No backward pass,
  no per-pixel K x D tensor.
- ALGES-sem (Eq. 6): for each class k, the sum over pixels predicted as k of
  ||G_ij||_F = ||p_ij - onehot(y_ij)||_2 * ||z_ij||_2.
  Upsampling heads (FPN, DeepLabV3Plus): the pixels are the OUTPUT pixels, the ones
  the pseudo-labels and the ignore mask live on, and G_ij is the exact gradient of
  pixel (i, j)'s cross-entropy, whose input vector is the upsampled unfolded z,
  U(z)_ij. So ALGES-img is still the mean of the same G_ij whose norms ALGES-sem sums,
  and both are checked against autograd. ||U(z)_ij|| is computed from inner products
  of neighbouring z vectors at the conv's resolution (a 2x2 neighbourhood for
  bilinear), never by upsampling z itself.
- entropy (natural log), margin (p1 - p2) and least_confidence (1 - p1): means over
  valid pixels. feature: adaptive average pool of z (all pixels) for core-set.

Everything runs under torch.no_grad(): the backbone never requires grad. The model is
in eval mode for the call (BatchNorm running stats untouched) and its modes are
restored afterwards. Only the network runs under autocast; the math above is fp32.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from alges_dist.models import HeadSpec, capture_head_input, head_spec

log = logging.getLogger(__name__)

SCALAR_SCORE_NAMES = ("entropy", "margin", "least_confidence")
# Every key score_batch can return; "alges_img_proj" only when projection_dim is set.
SCORE_NAMES = (
    "alges_img",
    "alges_img_norms",
    "alges_sem",
    *SCALAR_SCORE_NAMES,
    "feature",
    "alges_img_proj",
)

_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16)
# Images per chunk of the math: a chunk's (images, K, H, W) float32 tensors stay below
# this many bytes, so its passes run in cache. Measured on this 2-core CPU, Unet 224 px,
# batch 16, 2 threads: 4 MiB (one image) 118 ms, 16 MiB 166 ms, whole batch 252 ms.
# Elsewhere (CUDA) up to 1 GiB per chunk, usually the whole batch.
_CHUNK_BYTES = {"cpu": 4 << 20}
_CHUNK_BYTES_DEFAULT = 1 << 30


def score_dims(
    model: nn.Module, *, feature_grid: int = 1, projection_dim: int | None = None
) -> dict[str, int]:
    """Length of each score_batch output per frame (1 for scalar scores), without running
    the model, e.g. for fixed-size-list Parquet schemas.

    Raises:
        ValueError: as `models.head_spec`, or a bad feature_grid / projection_dim.
    """
    _check_options(feature_grid, projection_dim)
    conv = head_spec(model).conv
    n_classes, n_inputs = conv.out_channels, conv.in_channels
    kh, kw = conv.kernel_size
    dims = {
        "alges_img": n_classes * n_inputs * kh * kw,
        "alges_img_norms": n_classes,
        "alges_sem": n_classes,
        **{name: 1 for name in SCALAR_SCORE_NAMES},
        "feature": n_inputs * feature_grid**2,
    }
    if projection_dim is not None:
        dims["alges_img_proj"] = projection_dim
    return dims


def gaussian_projection_matrix(in_dim: int, out_dim: int, *, seed: int) -> torch.Tensor:
    """The Johnson-Lindenstrauss matrix R (in_dim, out_dim), float32, on the CPU.

    R = torch.randn(in_dim, out_dim, generator=torch.Generator("cpu").manual_seed(seed))
        / sqrt(out_dim)
    so E ||x R||^2 = ||x||^2. Drawn on the CPU so that every device projects with the
    same matrix; reproducible from the seed (for a given torch version, which the round
    record stores).
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    matrix = torch.randn(in_dim, out_dim, generator=generator, dtype=torch.float32)
    return matrix.div_(math.sqrt(out_dim))


class ProjectionCache:
    """Projection matrices kept between score_batch calls, one per (seed, dims, device).

    Explicit and owned by the caller (a scoring actor holds one for its lifetime), so
    nothing is global. Without it each call draws R again (milliseconds for K*D x 256).
    """

    def __init__(self) -> None:
        self._matrices: dict[tuple[int, int, int, str], torch.Tensor] = {}

    def matrix(
        self, *, seed: int, in_dim: int, out_dim: int, device: torch.device
    ) -> torch.Tensor:
        key = (seed, in_dim, out_dim, str(device))
        if key not in self._matrices:
            self._matrices[key] = gaussian_projection_matrix(in_dim, out_dim, seed=seed).to(
                device
            )
        return self._matrices[key]


def score_batch(
    model: nn.Module,
    images: torch.Tensor,
    *,
    feature_grid: int = 1,
    projection_dim: int | None = None,
    projection_seed: int = 0,
    valid_mask: torch.Tensor | None = None,
    autocast_dtype: torch.dtype | None = None,
    projection_cache: ProjectionCache | None = None,
) -> dict[str, torch.Tensor]:
    """ALGES embeddings and uncertainty scores of each frame, from one forward pass.

    Args:
        model: an smp segmentation model (see `models.head_spec`) with K classes and a
            head conv of C_in inputs and kh x kw taps; D = C_in * kh * kw.
        images: (B, 3, H, W) float, normalized as the model expects.
        feature_grid: the pooled feature is z averaged over a feature_grid^2 grid.
        projection_dim: also return "alges_img_proj" = alges_img @ R with
            R = gaussian_projection_matrix(K*D, projection_dim, seed=projection_seed).
        projection_seed: the seed of R.
        valid_mask: optional bool (B, H, W) at the output resolution; False pixels (the
            ignore label) are left out of every per-pixel mean and sum.
        autocast_dtype: torch.float16 / torch.bfloat16 to run the network under
            autocast; the scores are computed in float32 either way.
        projection_cache: where to keep R between calls (see ProjectionCache).

    Returns:
        float32 tensors on the images' device:
        "alges_img" (B, K*D): ALGES-img (Eq. 4), in the head weight's (K, C_in, kh, kw)
            order, bias excluded; "alges_img_norms" (B, K): its per-class row norms;
        "alges_sem" (B, K): ALGES-sem (Eq. 6); "entropy", "margin", "least_confidence"
            (B,); "feature" (B, C_in * feature_grid^2); "alges_img_proj"
            (B, projection_dim) when projection_dim is set.

    Bit-for-bit deterministic on the CPU. On CUDA "alges_sem" is summed with atomic
    adds (index_add_), so reruns may differ in the last bits.

    Raises:
        ValueError: bad shapes, dtypes or options; a frame without valid pixels;
            NaN logits or non-finite scores (the message lists the frames).
    """
    _check_options(feature_grid, projection_dim)
    _check_images(images, valid_mask, autocast_dtype)
    spec = head_spec(model)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), capture_head_input(model) as captured:
            autocast = (
                torch.autocast(images.device.type, dtype=autocast_dtype)
                if autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with autocast:
                output = model(images)
            if captured.value is None:
                raise ValueError(
                    f"{type(model).__name__} never called its head conv {spec.conv} in forward"
                )
            logits = output[0] if isinstance(output, tuple) else output  # smp aux head
            scores = head_scores(
                logits.float(),
                captured.value.float(),
                spec,
                valid_mask=valid_mask,
                feature_grid=feature_grid,
            )
            if projection_dim is not None:
                cache = projection_cache or ProjectionCache()
                projection = cache.matrix(
                    seed=projection_seed,
                    in_dim=scores["alges_img"].shape[1],
                    out_dim=projection_dim,
                    device=images.device,
                )
                scores["alges_img_proj"] = scores["alges_img"] @ projection
    finally:
        for module, training in modes:
            module.training = training
    _check_finite(scores)
    return scores


def head_scores(
    logits: torch.Tensor,
    head_input: torch.Tensor,
    spec: HeadSpec,
    *,
    valid_mask: torch.Tensor | None = None,
    feature_grid: int = 1,
) -> dict[str, torch.Tensor]:
    """The scores of score_batch from the network's output and the head conv's input.

    Args:
        logits: (B, K, H, W) float32, the model's output, spec.upsample(spec.conv(z)).
            Overwritten: the math reuses its memory.
        head_input: (B, C_in, h, w) float32, z.
        spec: the head, from `models.head_spec`.
        valid_mask: optional bool (B, H, W); see score_batch.
        feature_grid: see score_batch.

    Returns:
        score_batch's outputs except "alges_img_proj".
    """
    if logits.dtype != torch.float32 or head_input.dtype != torch.float32:
        raise ValueError(
            f"logits and head_input must be float32, got {logits.dtype} and {head_input.dtype}"
        )
    n_images, n_classes, height, width = logits.shape
    if head_input.shape[0] != n_images or head_input.shape[1] != spec.conv.in_channels:
        raise ValueError(
            f"head input has shape {tuple(head_input.shape)}; expected ({n_images}, "
            f"{spec.conv.in_channels}, h, w) for logits of shape {tuple(logits.shape)}"
        )
    if n_classes != spec.conv.out_channels:
        raise ValueError(
            f"logits have {n_classes} channels but the head conv has "
            f"{spec.conv.out_channels} outputs: something after the head changes classes"
        )
    upsample = spec.upsampling_matrices(tuple(head_input.shape[2:]), logits.device)
    conv_out_size = tuple(head_input.shape[2:]) if upsample is None else (
        upsample[0].shape[0], upsample[1].shape[0]
    )
    if conv_out_size != (height, width):
        raise ValueError(
            f"logits are {height}x{width} but the head conv's output "
            f"{tuple(head_input.shape[2:])} after {spec.mode} x{spec.scale_factor} "
            f"upsampling is {conv_out_size[0]}x{conv_out_size[1]}"
        )
    pixel_weights = _pixel_weights(valid_mask, n_images, (height, width), logits.device)

    norm_terms = None if upsample is None else _norm_terms(*upsample)
    bytes_per_image = n_classes * height * width * 4
    budget = _CHUNK_BYTES.get(logits.device.type, _CHUNK_BYTES_DEFAULT)
    per_chunk = min(n_images, max(1, budget // bytes_per_image))
    kernel_size = spec.conv.kernel_size
    workspace = _workspace(per_chunk, logits, head_input, kernel_size)
    chunks = []
    for start in range(0, n_images, per_chunk):
        part = slice(start, start + per_chunk)
        weights = None if pixel_weights is None else pixel_weights[part]
        chunks.append(
            _chunk_scores(
                logits[part], head_input[part], kernel_size, upsample, norm_terms, weights,
                workspace, first_frame=start,
            )
        )
    scores = {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}
    pooled = F.adaptive_avg_pool2d(head_input, feature_grid)  # (B, C_in, g, g)
    scores["feature"] = pooled.flatten(1)
    return scores


def _chunk_scores(
    logits: torch.Tensor,
    z: torch.Tensor,
    kernel_size: tuple[int, int],
    upsample: tuple[torch.Tensor, torch.Tensor] | None,
    norm_terms: list[tuple[int, int, torch.Tensor, torch.Tensor]] | None,
    pixel_weights: torch.Tensor | None,
    workspace: _Workspace,
    *,
    first_frame: int,
) -> dict[str, torch.Tensor]:
    """score_batch's math for a few images; shapes as head_scores (n images).

    upsample: the head's upsampling as (H, h) and (W, w) matrices, None if it has none;
    norm_terms: _norm_terms(*upsample); workspace: _workspace for >= n images;
    first_frame: index of the first image in the batch.
    Every pass over (n, K, H, W) counts (Unet-resnet18 at 224 px on this 2-core CPU: each
    costs ~0.5% of the forward pass), hence in-place updates and no one-hot tensor.
    """
    n, n_classes, height, width = logits.shape
    # (n, H, W): max logit, pseudo-label y
    top, label = _max_and_first_argmax(logits, workspace.first_max[:n])
    has_nan = torch.isnan(top).flatten(1).any(dim=1)  # (n,)
    if has_nan.any():
        frames = (has_nan.nonzero().flatten() + first_frame).tolist()
        raise ValueError(f"NaN logits in frames {frames} of the batch: no pseudo-label there")
    shifted = logits.sub_(top.unsqueeze(1))  # (n, K, H, W): logit - max, <= 0
    # exp(logit - max) off the label (exactly 1 at it): the softmax without cancellation,
    # 1 - p_y = rest_sum / total, even for confident pixels.
    rest = torch.exp(shifted, out=workspace.softmax[:n])
    rest.scatter_(1, label.unsqueeze(1), 0.0)
    rest_sum = rest.sum(dim=1)  # (n, H, W)
    total = rest_sum + 1.0  # softmax denominator
    second = rest.amax(dim=1)  # exp(second logit - max)
    # ||p - onehot(y)||_2 (x * x: vector_norm over dim 1 is 40x and square() 5x slower here)
    squares = torch.mul(rest, rest, out=workspace.squares[:n]).sum(dim=1)
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
        input_norm = _upsampled_unfolded_norms(  # (n, H, W)
            z, kernel_size, norm_terms, scratch=workspace.input_products
        )
    else:
        grad_conv = grad_logits
        input_norm = _unfolded_inner_products(  # (n, H, W)
            z, kernel_size, 0, 0, scratch=workspace.input_products
        ).sqrt_()
    # (n, K, C_in, kh, kw)
    weight_grad = _head_weight_gradient(grad_conv, z, kernel_size, workspace.taps)

    pixel_grad_norm = residual_norm.mul_(input_norm)  # ||G_ij||_F, (n, H, W)
    if pixel_weights is not None:
        pixel_grad_norm.mul_(pixel_weights > 0)
    flat_label = label.add_(  # (n, H, W): index into (n * K) class bins
        n_classes * torch.arange(n, device=label.device).view(n, 1, 1)
    )
    sem = logits.new_zeros(n * n_classes)
    sem.index_add_(0, flat_label.flatten(), pixel_grad_norm.flatten())

    if pixel_weights is None:
        frame_means = pixel_maps.mean(dim=(-2, -1))  # (3, n)
    else:
        frame_means = (pixel_maps * pixel_weights).sum(dim=(-2, -1))
    return {
        "alges_img": weight_grad.flatten(1),
        "alges_img_norms": torch.linalg.vector_norm(weight_grad.flatten(2), dim=2),
        "alges_sem": sem.view(n, n_classes),
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


class _TapBuffers(NamedTuple):
    """Zero-bordered buffers for _head_weight_gradient, reused by every chunk of a batch:
    a fresh multi-MB tensor per chunk costs page faults on the CPU (measured: 3 ms per
    224 px image for pad + channels-last copy, 0.5 ms into these)."""

    z_padded: torch.Tensor  # (n, C, h + kh - 1, w + kw - 1), zero border
    z_channels_last: torch.Tensor  # the same shape, channels-last memory format
    grad_padded: torch.Tensor  # (n, K, h, w + kw - 1), zero right columns


def _tap_buffers(
    n: int, n_classes: int, z_shape: torch.Size, kernel_size: tuple[int, int], like: torch.Tensor
) -> _TapBuffers:
    n_inputs, height, width = z_shape[1:]
    kh, kw = kernel_size
    padded = (n, n_inputs, height + kh - 1, width + kw - 1)
    return _TapBuffers(
        z_padded=like.new_zeros(padded),
        z_channels_last=like.new_empty(padded).contiguous(memory_format=torch.channels_last),
        grad_padded=like.new_zeros(n, n_classes, height, width + kw - 1),
    )


class _Workspace(NamedTuple):
    """Buffers that every chunk of a batch reuses instead of allocating its own: on the
    CPU, fresh multi-MB tensors cost page faults chunk after chunk (measured: 1-3 ms per
    224 px image each), which glibc's heap trimming brings back every chunk."""

    softmax: torch.Tensor  # (n, K, H, W) float32: exp(logit - max), then dL/dlogits
    squares: torch.Tensor  # (n, K, H, W) float32 scratch
    first_max: torch.Tensor  # (n, K, H, W) uint8 (int32 for K >= 256) scratch
    input_products: torch.Tensor  # (n, C, h, w) float32 scratch
    taps: _TapBuffers | None  # for a kh x kw > 1 head


def _workspace(
    n: int, logits: torch.Tensor, z: torch.Tensor, kernel_size: tuple[int, int]
) -> _Workspace:
    """A _Workspace for chunks of up to n images of (B, K, H, W) logits, (B, C, h, w) z."""
    n_classes, height, width = logits.shape[1:]
    shape = (n, n_classes, height, width)
    return _Workspace(
        softmax=logits.new_empty(shape),
        squares=logits.new_empty(shape),
        first_max=logits.new_empty(
            shape, dtype=torch.uint8 if n_classes < 256 else torch.int32
        ),
        input_products=z.new_empty(n, *z.shape[1:]),
        taps=None if kernel_size == (1, 1) else _tap_buffers(n, n_classes, z.shape, kernel_size, z),
    )


def _head_weight_gradient(
    grad_conv: torch.Tensor,
    z: torch.Tensor,
    kernel_size: tuple[int, int],
    buffers: _TapBuffers | None = None,
) -> torch.Tensor:
    """sum_uv grad_conv[:, k, u, v] * z_pad[:, c, u + a, v + b], the weight gradient of a
    stride-1 "same" conv, per image: (n, K, h, w), (n, C, h, w) -> (n, K, C, kh, kw).

    One batched matmul per tap on shifted views; no unfolded copy of z. buffers: from
    _tap_buffers for at least n images (allocated here when None).
    """
    n, n_classes, height, width = grad_conv.shape
    n_inputs = z.shape[1]
    kh, kw = kernel_size
    if z.is_cuda and (kh, kw) != (1, 1):
        return _head_weight_gradient_grouped_conv(grad_conv, z, kernel_size)
    if kh == kw == 1:  # one matmul: the transposed view costs less than a copy of z
        z_t = z.reshape(n, n_inputs, height * width).transpose(1, 2)  # (n, h*w, C)
        grad = torch.bmm(grad_conv.reshape(n, n_classes, height * width), z_t)
        return grad.view(n, n_classes, n_inputs, 1, 1)
    pad_h, pad_w = kh // 2, kw // 2
    pitch = width + 2 * pad_w  # row length of the padded grid
    if buffers is None:
        buffers = _tap_buffers(n, n_classes, z.shape, kernel_size, z)
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


def _head_weight_gradient_grouped_conv(
    grad_conv: torch.Tensor, z: torch.Tensor, kernel_size: tuple[int, int]
) -> torch.Tensor:
    """_head_weight_gradient as one convolution weight-gradient with the images as groups.

    For the GPU: there each tap's bmm reduces h*w terms into a K x C block, a shape that
    leaves most of the device idle (Unet at 224 px on an H100: 1.5 ms per tap, 64% of
    score_batch), while cuDNN's weight-gradient kernels split that reduction. TF32 is
    off for the call, so the sums stay float32 like the bmm path.
    """
    n, n_classes, height, width = grad_conv.shape
    n_inputs = z.shape[1]
    kh, kw = kernel_size
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        grad = torch.nn.grad.conv2d_weight(
            z.reshape(1, n * n_inputs, height, width),  # image i's channels form group i
            (n * n_classes, n_inputs, kh, kw),
            grad_conv.reshape(1, n * n_classes, height, width),
            padding=(kh // 2, kw // 2),
            groups=n,
        )
    return grad.view(n, n_classes, n_inputs, kh, kw)


def _norm_terms(
    up_rows: torch.Tensor, up_cols: torch.Tensor
) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """The (dy, dx, N_dy, M_dx) terms of _upsampled_unfolded_norms for an upsampling
    U(x) = up_rows x up_cols^T, up_rows (H, h), up_cols (W, w).

    Expanding the square, ||U(x)_ij||^2 = sum_(dy, dx) (N_dy G_(dy, dx) M_dx^T)_ij, where
    G_(dy, dx)[u, v] = <x_uv, x_(u+dy, v+dx)> is a map at the conv's resolution,
    N_dy[i, u] = up_rows[i, u] up_rows[i, u + dy] and M_dx likewise for columns. An
    interpolation mixes only neighbouring pixels, so few offsets have N, M != 0 (dy, dx
    in {-1, 0, 1} for bilinear), and the (-dy, -dx) term equals the (dy, dx) one: half
    the offsets, counted twice (the 2 is folded into N_dy).
    """
    span_rows, span_cols = _band_span(up_rows), _band_span(up_cols)
    terms = []
    for dy in range(span_rows):
        for dx in range(1 - span_cols, span_cols):
            if dy == 0 and dx < 0:
                continue  # the mirror of (0, -dx)
            twice = 1.0 if dy == dx == 0 else 2.0
            rows = _offset_products(up_rows, dy).mul_(twice)  # (H, h)
            terms.append((dy, dx, rows, _offset_products(up_cols, dx)))  # cols (W, w)
    return terms


def _upsampled_unfolded_norms(
    z: torch.Tensor,
    kernel_size: tuple[int, int],
    terms: list[tuple[int, int, torch.Tensor, torch.Tensor]],
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """||U(unfold(z))_ij||_2 at every output pixel: (n, C, h, w) -> (n, H, W), from the
    terms of _norm_terms. No (n, C, H, W) tensor is ever formed. scratch: as
    _unfolded_inner_products."""
    squared = 0.0
    for dy, dx, rows, cols in terms:
        inner = _unfolded_inner_products(z, kernel_size, dy, dx, scratch)  # (n, h, w)
        squared = squared + rows @ inner @ cols.T  # (n, H, W)
    return squared.clamp_(min=0.0).sqrt_()


def _offset_products(matrix: torch.Tensor, offset: int) -> torch.Tensor:
    """P[i, u] = matrix[i, u] * matrix[i, u + offset], 0 where u + offset is outside:
    (n_out, n_in) -> (n_out, n_in)."""
    n_in = matrix.shape[1]
    products = torch.zeros_like(matrix)
    lo, hi = max(0, -offset), min(n_in, n_in - offset)
    products[:, lo:hi] = matrix[:, lo:hi] * matrix[:, lo + offset : hi + offset]
    return products


def _band_span(matrix: torch.Tensor) -> int:
    """Widest run from the first to the last nonzero of a row of (n_out, n_in)."""
    nonzero = matrix != 0
    columns = torch.arange(matrix.shape[1], device=matrix.device)
    first = torch.where(nonzero, columns, matrix.shape[1]).amin(dim=1)
    last = torch.where(nonzero, columns, -1).amax(dim=1)
    return int((last - first).amax().item()) + 1


def _unfolded_inner_products(
    z: torch.Tensor,
    kernel_size: tuple[int, int],
    dy: int,
    dx: int,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """<unfold(z)_uv, unfold(z)_(u+dy, v+dx)> for every (u, v): (n, C, h, w) -> (n, h, w).

    unfold = the kh x kw zero-padded patches of the head conv; pairs reaching outside
    the image count only their inside taps (callers give those pairs weight 0).
    scratch: optional float32 buffer of at least z.numel() elements for the products.
    """
    kh, kw = kernel_size
    n, _, height, width = z.shape
    rows = slice(max(0, -dy), height - max(0, dy))
    cols = slice(max(0, -dx), width - max(0, dx))
    here = z[:, :, rows, cols]  # (n, C, h - |dy|, w - |dx|)
    partner = z[:, :, rows.start + dy : rows.stop + dy, cols.start + dx : cols.stop + dx]
    products = None if scratch is None else scratch.view(-1)[: here.numel()].view(here.shape)
    products = torch.mul(here, partner, out=products)
    if dy == dx == 0:
        inner = products.sum(dim=1)  # (n, h, w)
    else:  # 0 where the partner is outside
        inner = z.new_zeros(n, height, width)
        inner[:, rows, cols] = products.sum(dim=1)
    if kh == kw == 1:
        return inner
    # sum over the kernel's taps: a zero-padded (kh, kw) box sum, as shifted adds
    # (avg_pool2d takes 1 ms per 224 px map here, the adds 0.1 ms)
    padded = F.pad(inner, (kw // 2, kw // 2, kh // 2, kh // 2))  # (n, h + kh - 1, w + kw - 1)
    rows = padded[:, :height].clone()
    for a in range(1, kh):
        rows += padded[:, a : a + height]  # (n, h, w + kw - 1)
    box = rows[:, :, :width].clone()
    for b in range(1, kw):
        box += rows[:, :, b : b + width]
    return box


def _pixel_weights(
    valid_mask: torch.Tensor | None,
    n_images: int,
    size: tuple[int, int],
    device: torch.device,
) -> torch.Tensor | None:
    """valid / n_valid per pixel, (B, H, W) float32, or None when every pixel counts."""
    if valid_mask is None:
        return None
    if valid_mask.shape != (n_images, *size):
        raise ValueError(
            f"valid_mask has shape {tuple(valid_mask.shape)}; the model's output needs "
            f"({n_images}, {size[0]}, {size[1]})"
        )
    n_valid = valid_mask.sum(dim=(1, 2))
    empty = (n_valid == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"valid_mask has no valid pixel in frames {empty} of the batch; leave those "
            "frames out (they have no prediction to score)"
        )
    return valid_mask.to(device=device, dtype=torch.float32) / n_valid.view(-1, 1, 1)


def _check_options(feature_grid: int, projection_dim: int | None) -> None:
    if not isinstance(feature_grid, int) or feature_grid < 1:
        raise ValueError(f"feature_grid must be an int >= 1, got {feature_grid!r}")
    if projection_dim is not None and (not isinstance(projection_dim, int) or projection_dim < 1):
        raise ValueError(f"projection_dim must be None or an int >= 1, got {projection_dim!r}")


def _check_images(
    images: torch.Tensor, valid_mask: torch.Tensor | None, autocast_dtype: torch.dtype | None
) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        dtype = images.dtype if isinstance(images, torch.Tensor) else None
        raise ValueError(f"images must be a float (B, 3, H, W) tensor, got {shape} {dtype}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch (B = 0)")
    if valid_mask is not None:
        if valid_mask.dtype != torch.bool:
            raise ValueError(f"valid_mask must be a bool tensor, got {valid_mask.dtype}")
        expected = (images.shape[0], *images.shape[2:])
        if tuple(valid_mask.shape) != expected:
            raise ValueError(
                f"valid_mask has shape {tuple(valid_mask.shape)}; expected {expected} "
                "(batch, height, width of the images)"
            )
        if valid_mask.device != images.device:
            raise ValueError(
                f"valid_mask is on {valid_mask.device} but images are on {images.device}"
            )
    if autocast_dtype is not None and autocast_dtype not in _AUTOCAST_DTYPES:
        raise ValueError(
            f"autocast_dtype must be None or one of {_AUTOCAST_DTYPES}, got {autocast_dtype}"
        )


def _check_finite(scores: dict[str, torch.Tensor]) -> None:
    bad = torch.zeros(next(iter(scores.values())).shape[0], dtype=torch.bool)
    for value in scores.values():
        bad |= ~torch.isfinite(value.reshape(value.shape[0], -1)).all(dim=1).cpu()
    if bad.any():
        raise ValueError(
            f"non-finite scores for frames {bad.nonzero().flatten().tolist()} of the batch "
            "(NaN or inf in the network's output or head input)"
        )
