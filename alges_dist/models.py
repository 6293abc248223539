"""smp model factory, and the head layer whose weight gradient ALGES embeds.

ALGES (DESIGN "The math") differentiates the segmentation loss with respect to the
weight of the network's last conv. In segmentation_models_pytorch that conv is
`model.segmentation_head[0]`; what follows it in the head is either nothing (Unet,
UnetPlusPlus: 3x3 conv at full resolution) or a fixed bilinear upsampling (FPN,
DeepLabV3Plus: 1x1 conv at 1/4 resolution, then `nn.Upsample(scale_factor=4)`).
`head_spec` finds both, so scoring can carry dL/dlogits back through the upsampling,
and `capture_head_input` records the conv's input during the forward pass.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import segmentation_models_pytorch as smp
import torch
from torch import nn

from alges_dist.errors import InputError

log = logging.getLogger(__name__)

# Name -> smp class. Lookups lowercase the name, so "Unet" and "DeepLabV3Plus" work.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "unet": smp.Unet,
    "unetplusplus": smp.UnetPlusPlus,
    "fpn": smp.FPN,
    "deeplabv3plus": smp.DeepLabV3Plus,
}


def architecture_class(arch: str) -> type[nn.Module]:
    """The smp class registered under `arch` (case-insensitive).

    Raises:
        ValueError: `arch` is not a key of ARCHITECTURES; the message lists the keys.
    """
    try:
        return ARCHITECTURES[arch.lower()]
    except KeyError:
        raise InputError(
            f"unknown architecture {arch!r}; valid architectures: {sorted(ARCHITECTURES)}"
        ) from None


def build_model(
    arch: str,
    encoder: str,
    classes: int,
    encoder_weights: str | None = None,
    **kwargs,
) -> nn.Module:
    """An smp segmentation model whose head ALGES can differentiate.

    Args:
        arch: a key of ARCHITECTURES, any case ("unet", "DeepLabV3Plus", ...).
        encoder: an smp encoder name ("resnet18", "resnet34", ...).
        classes: number of output classes K (>= 2: the scores need a softmax).
        encoder_weights: pretrained encoder weights ("imagenet") or None. Downloads
            them on first use; offline, pass None.
        **kwargs: passed to the smp class (encoder_depth, decoder_channels, ...).
            `activation` must stay None: scoring needs raw logits.

    Returns:
        The model, in train mode as smp builds it. `head_spec(model)` has been checked.

    Raises:
        ValueError: unknown `arch`, `classes < 2`, or a non-identity activation.
    """
    model_class = architecture_class(arch)
    if classes < 2:
        raise InputError(f"classes must be >= 2 (softmax over classes), got {classes}")
    if kwargs.get("activation") is not None:
        raise InputError(
            f"activation must be None (ALGES scores need raw logits), got {kwargs['activation']!r}"
        )
    model = model_class(
        encoder_name=encoder, encoder_weights=encoder_weights, classes=classes, **kwargs
    )
    spec = head_spec(model)  # fail at build time, not in the first scoring batch
    log.debug(
        "built %s-%s: head conv %s, then %s x%g", arch, encoder, spec.conv, spec.mode,
        spec.scale_factor,
    )
    return model


def load_model(arch: str, encoder: str, classes: int, weights: str | Path) -> nn.Module:
    """build_model with no pretrained download, then the state dict saved at ``weights`` (on CPU)."""
    model = build_model(arch, encoder, classes, encoder_weights=None)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model


class HeadSpec(NamedTuple):
    """The last conv of a segmentation model and the linear map applied after it.

    conv: the conv whose weight gradient ALGES embeds; weight (K, C_in, kh, kw).
    upsample: the `nn.Upsample` applied to the conv's output (FPN, DeepLabV3Plus), or
        None when the conv's output is the model's output (Unet). It is linear and
        separable over rows and columns, which scoring uses to carry dL/dlogits back.
    """

    conv: nn.Conv2d
    upsample: nn.Upsample | None

    @property
    def scale_factor(self) -> float:
        """Output size / conv output size per spatial axis (1.0 without upsampling)."""
        if self.upsample is None:
            return 1.0
        factor = self.upsample.scale_factor
        return float(factor[0] if isinstance(factor, tuple) else factor)

    @property
    def mode(self) -> str:
        """Interpolation mode after the conv ("bilinear", "nearest"), "identity" if none."""
        return "identity" if self.upsample is None else self.upsample.mode

    def upsampling_matrices(
        self, conv_size: tuple[int, int], device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The upsampling as matrices, upsample(x) = rows @ x @ cols.T per channel, with
        rows (H, h) and cols (W, w) for a conv output of conv_size = (h, w); None when
        the head does not upsample. Scoring carries dL/dlogits back with their
        transposes (the adjoint).

        Built by applying `upsample` itself to identity images, so they hold exactly the
        model's interpolation weights (align_corners and all).
        """
        if self.upsample is None:
            return None
        height, width = conv_size
        # the identity as `height` one-column images, and `width` one-row images
        eye_rows = torch.eye(height, device=device).view(height, 1, height, 1)
        eye_cols = torch.eye(width, device=device).view(width, 1, 1, width)
        rows = self.upsample(eye_rows)[:, 0, :, 0]  # (h, H)
        cols = self.upsample(eye_cols)[:, 0, 0, :]  # (w, W)
        return rows.T.contiguous(), cols.T.contiguous()


# Interpolations that act on rows and columns separately (one 1-D kernel per axis):
# the only ones whose adjoint scoring builds from two small matrices.
_SEPARABLE_MODES = ("nearest", "bilinear", "bicubic", "nearest-exact")


def head_spec(model: nn.Module) -> HeadSpec:
    """Find the head conv and the upsampling after it in an smp model.

    smp's `SegmentationHead` is `Sequential(conv, Upsample | Identity, Activation)`.
    The conv is the last `nn.Conv2d` in `model.segmentation_head`; every module after
    it must be an identity or a separable `nn.Upsample` (at most one), so that the
    model's output is a linear, separable function of the conv's output.

    Raises:
        ValueError: no `segmentation_head`, no conv in it, a conv that ALGES's closed
            form does not cover (stride, dilation, groups, non-"same" padding), or a
            module after the conv that is not identity/upsampling (e.g. an activation).
    """
    head = getattr(model, "segmentation_head", None)
    if not isinstance(head, nn.Module):
        raise InputError(
            f"{type(model).__name__} has no `segmentation_head` module; ALGES scoring "
            f"needs an smp segmentation model (one of {sorted(ARCHITECTURES)})"
        )
    modules = list(head.modules())[1:] if isinstance(head, nn.Sequential) else [head]
    conv_positions = [i for i, m in enumerate(modules) if isinstance(m, nn.Conv2d)]
    if not conv_positions:
        raise InputError(
            f"{type(model).__name__}.segmentation_head has no nn.Conv2d: {head}"
        )
    conv = modules[conv_positions[-1]]
    _check_conv(conv)
    upsample = None
    for after in modules[conv_positions[-1] + 1 :]:
        if isinstance(after, nn.Upsample) and upsample is None:
            if after.mode not in _SEPARABLE_MODES:
                raise InputError(
                    f"head upsampling mode {after.mode!r} is not separable; "
                    f"supported: {_SEPARABLE_MODES}"
                )
            upsample = after
        elif isinstance(after, nn.Identity) or _is_identity_container(after):
            continue
        else:
            raise InputError(
                f"segmentation_head applies {after} after its last conv; ALGES needs the "
                "raw logits (build the model with activation=None)"
            )
    return HeadSpec(conv=conv, upsample=upsample)


def head_layer(model: nn.Module) -> nn.Conv2d:
    """The conv whose weight gradient ALGES uses (smp: `model.segmentation_head[0]`).

    Raises:
        ValueError: as `head_spec`.
    """
    return head_spec(model).conv


class HeadInput:
    """Holder for the head conv's input, filled by `capture_head_input` during forward.

    value: (B, C_in, h, w), the tensor the conv received (not a copy), or None before
        the forward pass.
    """

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None


@contextmanager
def capture_head_input(model: nn.Module) -> Iterator[HeadInput]:
    """Record the head conv's input on every forward pass inside the block.

    >>> with capture_head_input(model) as captured:   # doctest: +SKIP
    ...     logits = model(images)
    >>> z = captured.value                           # (B, C_in, h, w)

    The hook is removed on exit, also when the block raises.
    """
    conv = head_layer(model)
    captured = HeadInput()

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        captured.value = inputs[0]

    handle = conv.register_forward_pre_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _check_conv(conv: nn.Conv2d) -> None:
    kh, kw = conv.kernel_size
    same_padding = (kh // 2, kw // 2)
    problems = []
    if kh % 2 == 0 or kw % 2 == 0:
        problems.append(f"kernel_size={conv.kernel_size} (odd sizes only)")
    if conv.stride != (1, 1):
        problems.append(f"stride={conv.stride} (1 only)")
    if conv.dilation != (1, 1):
        problems.append(f"dilation={conv.dilation} (1 only)")
    if conv.groups != 1:
        problems.append(f"groups={conv.groups} (1 only)")
    if conv.padding != same_padding or conv.padding_mode != "zeros":
        problems.append(
            f"padding={conv.padding}, padding_mode={conv.padding_mode!r} "
            f"(zero padding {same_padding} only)"
        )
    if problems:
        raise InputError(f"head conv {conv} is not supported: " + "; ".join(problems))


def _is_identity_container(module: nn.Module) -> bool:
    # smp's Activation(None) wraps an nn.Identity; the wrapped Identity is visited too.
    children = list(module.children())
    return bool(children) and all(
        isinstance(c, nn.Identity) or _is_identity_container(c) for c in children
    )
