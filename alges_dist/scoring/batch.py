"""score_batch: one forward pass, then the closed-form ALGES scores of every frame.

Validates the inputs, runs the network (under autocast if asked) while capturing the head
conv's input, then computes the scores in chunks of images by one of two paths: "eager"
(closed_form.py, in place, tuned on the CPU) or "compiled" (compiled.py, torch.compile's
fused kernels, for CUDA). "auto" takes the compiled path on CUDA where Triton is
installed, the eager path elsewhere.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch import nn

from alges_dist.errors import InputError
from alges_dist.models import HeadSpec, capture_head_input, head_spec
from alges_dist.scoring import closed_form, compiled
from alges_dist.scoring.closed_form import SCALAR_SCORE_NAMES
from alges_dist.scoring.input_norms import norm_terms
from alges_dist.scoring.projection import ProjectionCache

log = logging.getLogger(__name__)

# Every key score_batch can return; "alges_img_proj" only when projection_dim is set.
SCORE_NAMES = (
    "alges_img",
    "alges_img_norms",
    "alges_sem",
    *SCALAR_SCORE_NAMES,
    "feature",
    "alges_img_proj",
)
MATH_PATHS = ("auto", "eager", "compiled")

_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16)
# Default chunk_bytes: a chunk's (images, K, H, W) float32 tensors stay below this many
# bytes, so its passes run in cache. Measured on this 2-core CPU, Unet 224 px, batch 16,
# 2 threads: 4 MiB (one image) 118 ms, 16 MiB 166 ms, whole batch 252 ms. Elsewhere
# (CUDA) up to 1 GiB per chunk, usually the whole batch.
DEFAULT_CHUNK_BYTES = {"cpu": 4 << 20}
DEFAULT_CHUNK_BYTES_OTHER = 1 << 30


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
    math_path: str = "auto",
    chunk_bytes: int | None = None,
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
        math_path: "eager", "compiled" (torch.compile; the first call per kind of
            input compiles, seconds to a minute) or "auto" (compiled on CUDA where Triton
            is installed, else eager).
        chunk_bytes: the math runs on chunks of images whose (images, K, H, W) float32
            tensors stay below this many bytes (at least one image); None: 4 MiB on the
            CPU (cache-sized), 1 GiB elsewhere.

    Returns:
        float32 tensors on the images' device:
        "alges_img" (B, K*D): ALGES-img (Eq. 4), in the head weight's (K, C_in, kh, kw)
            order, bias excluded; "alges_img_norms" (B, K): its per-class row norms;
        "alges_sem" (B, K): ALGES-sem (Eq. 6); "entropy", "margin", "least_confidence"
            (B,); "feature" (B, C_in * feature_grid^2); "alges_img_proj"
            (B, projection_dim) when projection_dim is set.

    Bit-for-bit deterministic on the CPU (eager path). On CUDA the eager path sums
    "alges_sem" with atomic adds (index_add_), so reruns may differ in the last bits.

    Raises:
        ValueError: bad shapes, dtypes or options; a frame without valid pixels;
            NaN logits or non-finite scores (the message lists the frames).
    """
    _check_options(feature_grid, projection_dim)
    _check_images(images, valid_mask, autocast_dtype)
    path = resolve_math_path(math_path, images.device)
    _check_chunk_bytes(chunk_bytes)
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
                raise InputError(
                    f"{type(model).__name__} never called its head conv {spec.conv} in forward"
                )
            logits = output[0] if isinstance(output, tuple) else output  # smp aux head
            scores = head_scores(
                logits,
                captured.value,
                spec,
                valid_mask=valid_mask,
                feature_grid=feature_grid,
                math_path=path,
                chunk_bytes=chunk_bytes,
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


def resolve_math_path(math_path: str, device: torch.device) -> str:
    """"eager" or "compiled" for math_path on device ("auto": see score_batch).

    Raises:
        ValueError: math_path is not one of MATH_PATHS.
    """
    if math_path not in MATH_PATHS:
        raise InputError(f"math_path must be one of {MATH_PATHS}, got {math_path!r}")
    if math_path != "auto":
        return math_path
    return "compiled" if device.type == "cuda" and compiled.triton_available() else "eager"


def head_scores(
    logits: torch.Tensor,
    head_input: torch.Tensor,
    spec: HeadSpec,
    *,
    valid_mask: torch.Tensor | None = None,
    feature_grid: int = 1,
    math_path: str = "auto",
    chunk_bytes: int | None = None,
) -> dict[str, torch.Tensor]:
    """The scores of score_batch from the network's output and the head conv's input.

    Args:
        logits: (B, K, H, W) float, the model's output, spec.upsample(spec.conv(z)).
            The eager path computes in float32 and overwrites float32 logits (it reuses
            their memory); the compiled path reads any float dtype and leaves them.
        head_input: (B, C_in, h, w) float, z.
        spec: the head, from `models.head_spec`.
        valid_mask, feature_grid, math_path, chunk_bytes: see score_batch.

    Returns:
        score_batch's outputs except "alges_img_proj".
    """
    if not logits.is_floating_point() or not head_input.is_floating_point():
        raise InputError(
            f"logits and head_input must be float tensors, got {logits.dtype} and {head_input.dtype}"
        )
    path = resolve_math_path(math_path, logits.device)
    _check_chunk_bytes(chunk_bytes)
    n_images, n_classes, height, width = logits.shape
    if head_input.shape[0] != n_images or head_input.shape[1] != spec.conv.in_channels:
        raise InputError(
            f"head input has shape {tuple(head_input.shape)}; expected ({n_images}, "
            f"{spec.conv.in_channels}, h, w) for logits of shape {tuple(logits.shape)}"
        )
    if n_classes != spec.conv.out_channels:
        raise InputError(
            f"logits have {n_classes} channels but the head conv has "
            f"{spec.conv.out_channels} outputs: something after the head changes classes"
        )
    upsample = spec.upsampling_matrices(tuple(head_input.shape[2:]), logits.device)
    conv_out_size = tuple(head_input.shape[2:]) if upsample is None else (
        upsample[0].shape[0], upsample[1].shape[0]
    )
    if conv_out_size != (height, width):
        raise InputError(
            f"logits are {height}x{width} but the head conv's output "
            f"{tuple(head_input.shape[2:])} after {spec.mode} x{spec.scale_factor} "
            f"upsampling is {conv_out_size[0]}x{conv_out_size[1]}"
        )
    pixel_weights = _pixel_weights(valid_mask, n_images, (height, width), logits.device)
    terms = None if upsample is None else norm_terms(*upsample)
    if chunk_bytes is None:
        chunk_bytes = DEFAULT_CHUNK_BYTES.get(logits.device.type, DEFAULT_CHUNK_BYTES_OTHER)
    per_chunk = min(n_images, max(1, chunk_bytes // (n_classes * height * width * 4)))
    kernel_size = spec.conv.kernel_size
    if path == "eager":
        logits, head_input = logits.float(), head_input.float()
        buffers = closed_form.workspace(per_chunk, logits, head_input, kernel_size)
    chunks = []
    for start in range(0, n_images, per_chunk):
        part = slice(start, start + per_chunk)
        weights = None if pixel_weights is None else pixel_weights[part]
        args = (logits[part], head_input[part], kernel_size, upsample, terms, weights)
        if path == "eager":
            chunks.append(closed_form.chunk_scores(*args, buffers, first_frame=start))
        else:
            chunks.append(compiled.chunk_scores(*args, first_frame=start))
    scores = {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}
    pooled = F.adaptive_avg_pool2d(head_input.float(), feature_grid)  # (B, C_in, g, g)
    scores["feature"] = pooled.flatten(1)
    return scores


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
        raise InputError(
            f"valid_mask has shape {tuple(valid_mask.shape)}; the model's output needs "
            f"({n_images}, {size[0]}, {size[1]})"
        )
    n_valid = valid_mask.sum(dim=(1, 2))
    empty = (n_valid == 0).nonzero().flatten().tolist()
    if empty:
        raise InputError(
            f"valid_mask has no valid pixel in frames {empty} of the batch; leave those "
            "frames out (they have no prediction to score)"
        )
    return valid_mask.to(device=device, dtype=torch.float32) / n_valid.view(-1, 1, 1)


def _check_options(feature_grid: int, projection_dim: int | None) -> None:
    if not isinstance(feature_grid, int) or feature_grid < 1:
        raise InputError(f"feature_grid must be an int >= 1, got {feature_grid!r}")
    if projection_dim is not None and (not isinstance(projection_dim, int) or projection_dim < 1):
        raise InputError(f"projection_dim must be None or an int >= 1, got {projection_dim!r}")


def _check_chunk_bytes(chunk_bytes: int | None) -> None:
    if chunk_bytes is not None and (
        isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1
    ):
        raise InputError(f"chunk_bytes must be None or an int >= 1, got {chunk_bytes!r}")


def _check_images(
    images: torch.Tensor, valid_mask: torch.Tensor | None, autocast_dtype: torch.dtype | None
) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        dtype = images.dtype if isinstance(images, torch.Tensor) else None
        raise InputError(f"images must be a float (B, 3, H, W) tensor, got {shape} {dtype}")
    if images.shape[0] == 0:
        raise InputError("images is an empty batch (B = 0)")
    if valid_mask is not None:
        if valid_mask.dtype != torch.bool:
            raise InputError(f"valid_mask must be a bool tensor, got {valid_mask.dtype}")
        expected = (images.shape[0], *images.shape[2:])
        if tuple(valid_mask.shape) != expected:
            raise InputError(
                f"valid_mask has shape {tuple(valid_mask.shape)}; expected {expected} "
                "(batch, height, width of the images)"
            )
        if valid_mask.device != images.device:
            raise InputError(
                f"valid_mask is on {valid_mask.device} but images are on {images.device}"
            )
    if autocast_dtype is not None and autocast_dtype not in _AUTOCAST_DTYPES:
        raise InputError(
            f"autocast_dtype must be None or one of {_AUTOCAST_DTYPES}, got {autocast_dtype}"
        )


def _check_finite(scores: dict[str, torch.Tensor]) -> None:
    """One device-to-host transfer for all outputs (one per output cost a sync each)."""
    bad = torch.stack(
        [~torch.isfinite(value.reshape(value.shape[0], -1)).all(dim=1) for value in scores.values()]
    ).any(dim=0).cpu()
    if bad.any():
        raise InputError(
            f"non-finite scores for frames {bad.nonzero().flatten().tolist()} of the batch "
            "(NaN or inf in the network's output or head input)"
        )
