"""models.py: the architecture registry and the head conv ALGES differentiates."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

from alges_dist.models import (
    ARCHITECTURES,
    architecture_class,
    build_model,
    capture_head_input,
    head_layer,
    head_spec,
)

# (arch, head kernel, upsampling factor after the head conv) as smp 0.5/0.6 build them
HEADS = {
    "unet": (3, 1.0),
    "unetplusplus": (3, 1.0),
    "fpn": (1, 4.0),
    "deeplabv3plus": (1, 4.0),
}


def small_model(arch: str, classes: int = 3, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_model(arch, "resnet18", classes, encoder_weights=None)


def test_registry_holds_the_supported_architectures():
    assert set(ARCHITECTURES) == set(HEADS)
    assert ARCHITECTURES["deeplabv3plus"] is smp.DeepLabV3Plus


@pytest.mark.parametrize(
    ("name", "expected"),
    [("Unet", smp.Unet), ("DeepLabV3Plus", smp.DeepLabV3Plus), ("FPN", smp.FPN)],
)
def test_architecture_lookup_ignores_case(name, expected):
    assert architecture_class(name) is expected


def test_unknown_architecture_error_lists_valid_names():
    with pytest.raises(
        ValueError,
        match=r"unknown architecture 'segnet'; valid architectures: "
        r"\['deeplabv3plus', 'fpn', 'unet', 'unetplusplus'\]",
    ):
        build_model("segnet", "resnet18", 3)


def test_build_model_rejects_activation_and_single_class():
    with pytest.raises(ValueError, match="activation must be None"):
        build_model("unet", "resnet18", 3, activation="softmax2d")
    with pytest.raises(ValueError, match="classes must be >= 2"):
        build_model("unet", "resnet18", 1)


@pytest.mark.parametrize("arch", sorted(HEADS))
def test_head_layer_found_for_every_architecture(arch):
    model = small_model(arch, classes=5)
    kernel, scale = HEADS[arch]
    conv = head_layer(model)
    assert conv is model.segmentation_head[0]
    assert conv.out_channels == 5
    assert conv.kernel_size == (kernel, kernel)
    spec = head_spec(model)
    assert spec.scale_factor == scale
    assert spec.mode == ("identity" if scale == 1.0 else "bilinear")


@pytest.mark.parametrize("arch", ["unet", "deeplabv3plus"])
def test_capture_head_input_reproduces_the_output_and_removes_its_hook(arch):
    model = small_model(arch).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), capture_head_input(model) as captured:
        logits = model(images)
    conv = head_layer(model)
    assert not conv._forward_pre_hooks
    with torch.no_grad():
        again = model.segmentation_head(captured.value)
    torch.testing.assert_close(again, logits)


def test_head_spec_rejects_an_activation_after_the_conv():
    model = smp.Unet("resnet18", encoder_weights=None, classes=3, activation="sigmoid")
    with pytest.raises(ValueError, match="raw logits"):
        head_spec(model)


def test_head_spec_rejects_models_without_segmentation_head():
    with pytest.raises(ValueError, match="has no `segmentation_head`"):
        head_layer(nn.Conv2d(3, 3, 1))


def test_head_spec_rejects_a_strided_head_conv():
    model = small_model("fpn")
    model.segmentation_head[0] = nn.Conv2d(128, 3, 3, stride=2, padding=1)
    with pytest.raises(ValueError, match=r"stride=\(2, 2\) \(1 only\)"):
        head_layer(model)


def test_head_spec_rejects_a_non_separable_upsampling():
    model = small_model("fpn")
    model.segmentation_head[1] = nn.Upsample(scale_factor=4, mode="area")
    with pytest.raises(ValueError, match="not separable"):
        head_spec(model)


@pytest.mark.parametrize(
    "upsample",
    [
        nn.Upsample(scale_factor=4, mode="bilinear", align_corners=True),  # smp's
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        nn.Upsample(scale_factor=3, mode="nearest"),
        nn.Upsample(scale_factor=2, mode="bicubic", align_corners=False),
    ],
    ids=["bilinear_aligned", "bilinear", "nearest", "bicubic"],
)
def test_upsampling_matrices_reproduce_the_upsampling(upsample):
    model = small_model("fpn")
    model.segmentation_head[1] = upsample
    rows, cols = head_spec(model).upsampling_matrices((5, 7))
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rows @ x @ cols.T, upsample(x))


def test_upsampling_matrices_none_without_upsampling():
    assert head_spec(small_model("unet")).upsampling_matrices((8, 8)) is None
