"""Models, inputs and independent references (autograd) for the scoring tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from alges_dist.models import build_model, capture_head_input, head_spec

ARCHS = ["unet", "fpn", "deeplabv3plus"]  # 3x3 head; 1x1 head + bilinear x4 (two decoders)
N_CLASSES = 4


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())  # detached by the caller


def make_model(arch: str, seed: int = 0, classes: int = N_CLASSES) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(arch, "resnet18", classes, encoder_weights=None)
        # sharper logits than the default init, so pixels disagree and have confident ones
        nn.init.normal_(head_spec(model).conv.weight, std=0.5)
    return model.eval()


def make_images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def make_mask(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, size, size, generator=torch.Generator().manual_seed(seed)) > 0.3


def autograd_head_gradient(model, image, mask=None):
    """d/dW of the frame's mean pseudo-label cross-entropy (valid pixels), full network."""
    conv = head_spec(model).conv
    logits = model(image.unsqueeze(0))  # (1, K, H, W)
    loss = F.cross_entropy(logits, logits.argmax(1), reduction="none")  # (1, H, W)
    if mask is not None:
        loss = loss[mask.unsqueeze(0)]
    (grad,) = torch.autograd.grad(loss.mean(), conv.weight)
    return grad  # (K, C, kh, kw)


def per_pixel_sem(model, image, mask=None):
    """ALGES-sem by brute force: the head-weight gradient of every pixel's own
    cross-entropy (autograd through the real head, upsampling included), its norm,
    summed by predicted class."""
    spec = head_spec(model)
    conv = spec.conv
    with torch.no_grad(), capture_head_input(model) as captured:
        label = model(image.unsqueeze(0)).argmax(1)  # (1, H, W)

    def pixel_losses(weight):
        out = F.conv2d(captured.value, weight, conv.bias, padding=conv.padding)
        if spec.upsample is not None:
            out = spec.upsample(out)
        return F.cross_entropy(out, label, reduction="none").flatten()  # (H*W,)

    jac = torch.func.jacrev(pixel_losses)(conv.weight.detach())  # (H*W, K, C, kh, kw)
    norms = jac.detach().flatten(1).norm(dim=1)
    if mask is not None:
        norms = norms * mask.flatten()
    return torch.zeros(conv.out_channels).index_add_(0, label.flatten(), norms)


class ToyHeadNet(nn.Module):
    """A 3x3 head followed by upsampling: no smp architecture has it, the math allows it."""

    def __init__(self, mode: str, align_corners: bool | None):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU())
        up = nn.Upsample(scale_factor=2, mode=mode, align_corners=align_corners)
        self.segmentation_head = nn.Sequential(nn.Conv2d(6, 3, 3, padding=1), up)

    def forward(self, x):
        return self.segmentation_head(self.body(x))
