"""alges_dist.scoring against torch.autograd and numpy, on small smp models (issues 3, 15)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alges_dist import scoring
from alges_dist.models import capture_head_input, head_spec
from alges_dist.scoring import (
    SCALAR_SCORE_NAMES,
    SCORE_NAMES,
    ProjectionCache,
    alges_img,
    gaussian_projection_matrix,
    score_batch,
    score_dims,
)
from scoring_references import (
    ARCHS,
    ToyHeadNet,
    autograd_head_gradient,
    make_images,
    make_mask,
    make_model,
    per_pixel_sem,
    relative_error,
)


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    return request.param, make_model(request.param)


def test_alges_img_matches_autograd_mean_gradient(arch_model):
    arch, model = arch_model
    images = make_images(2)
    scores = score_batch(model, images)
    for i in range(2):
        expected = autograd_head_gradient(model, images[i])
        assert relative_error(scores["alges_img"][i], expected.flatten()) <= 1e-4, arch
        torch.testing.assert_close(
            scores["alges_img_norms"][i], expected.flatten(1).norm(dim=1), rtol=1e-4, atol=1e-7
        )


def test_valid_mask_matches_autograd_masked_loss(arch_model):
    arch, model = arch_model
    images, mask = make_images(2, seed=3), make_mask(2, 64, seed=3)
    scores = score_batch(model, images, valid_mask=mask)
    for i in range(2):
        expected = autograd_head_gradient(model, images[i], mask[i])
        assert relative_error(scores["alges_img"][i], expected.flatten()) <= 1e-4, arch
        # (the unmasked gradient of these frames differs by ~1e-2, 100x the tolerance)


@pytest.mark.parametrize("masked", [False, True], ids=["all_pixels", "masked"])
def test_alges_sem_matches_per_pixel_autograd_norms(arch_model, masked):
    arch, model = arch_model
    image = make_images(1, size=32, seed=5)
    mask = make_mask(1, 32, seed=5) if masked else None
    scores = score_batch(model, image, valid_mask=mask)
    expected = per_pixel_sem(model, image[0], None if mask is None else mask[0])
    assert relative_error(scores["alges_sem"][0], expected) <= 1e-4, arch


def test_uncertainty_scores_match_numpy_softmax(arch_model):
    _, model = arch_model
    images, mask = make_images(2, size=32, seed=7), make_mask(2, 32, seed=7)
    with torch.no_grad():
        logits = model(images).double().numpy()  # (B, K, H, W)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top2 = np.sort(p, axis=1)[:, ::-1][:, :2]  # (B, 2, H, W)
    pixel = {
        "entropy": -(p * np.log(p)).sum(1),
        "margin": top2[:, 0] - top2[:, 1],
        "least_confidence": 1.0 - top2[:, 0],
    }
    for valid in (None, mask):
        scores = score_batch(model, images, valid_mask=valid)
        keep = np.ones((2, 32, 32), bool) if valid is None else valid.numpy()
        for name in SCALAR_SCORE_NAMES:
            expected = [pixel[name][i][keep[i]].mean() for i in range(2)]
            np.testing.assert_allclose(scores[name].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_batched_equals_per_image_and_chunked(arch_model):
    _, model = arch_model
    images, mask = make_images(2, seed=9), make_mask(2, 64, seed=9)
    batched = score_batch(model, images, valid_mask=mask, feature_grid=2)
    for i in range(2):
        single = score_batch(model, images[i : i + 1], valid_mask=mask[i : i + 1], feature_grid=2)
        for name, value in single.items():  # the network itself differs in the last bits
            assert relative_error(value[0], batched[name][i]) <= 1e-4, name
    # the math runs in chunks of images: one image per chunk gives the same
    chunked = score_batch(model, images, valid_mask=mask, feature_grid=2, chunk_bytes=1)
    for name, value in chunked.items():
        assert relative_error(value, batched[name]) <= 1e-6, name


def test_batch_norm_stats_unchanged_and_train_mode_restored():
    model = make_model("unet").train()
    with torch.no_grad():
        model(make_images(4, seed=11))  # move the running stats away from their init
    before = {k: v.clone() for k, v in model.state_dict().items()}
    score_batch(model, make_images(2, seed=12))
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_scores_are_deterministic_float32_and_on_image_device():
    model = make_model("deeplabv3plus")
    images = make_images(2, seed=13)
    first = score_batch(model, images, projection_dim=8)
    second = score_batch(model, images, projection_dim=8)
    assert set(first) == set(SCORE_NAMES)
    for name in first:
        assert first[name].dtype == torch.float32 and first[name].device == images.device
        assert torch.equal(first[name], second[name]), name


def test_projection_reproducible_from_seed_and_equals_documented_matrix():
    model = make_model("unet")
    images = make_images(2, seed=14)
    scores = score_batch(model, images, projection_dim=16, projection_seed=7)
    in_dim = scores["alges_img"].shape[1]
    generator = torch.Generator().manual_seed(7)
    documented = torch.randn(in_dim, 16, generator=generator) / 16**0.5
    torch.testing.assert_close(gaussian_projection_matrix(in_dim, 16, seed=7), documented)
    torch.testing.assert_close(scores["alges_img_proj"], scores["alges_img"] @ documented)
    cache = ProjectionCache()
    cached = score_batch(
        model, images, projection_dim=16, projection_seed=7, projection_cache=cache
    )
    assert torch.equal(cached["alges_img_proj"], scores["alges_img_proj"])
    assert cache.matrix(seed=7, in_dim=in_dim, out_dim=16, device=images.device) is cache.matrix(
        seed=7, in_dim=in_dim, out_dim=16, device=images.device
    )
    other = score_batch(model, images, projection_dim=16, projection_seed=8)
    assert not torch.allclose(other["alges_img_proj"], scores["alges_img_proj"])


def test_score_dims_and_feature_match_the_outputs(arch_model):
    _, model = arch_model
    images = make_images(2, seed=15)
    scores = score_batch(model, images, feature_grid=2, projection_dim=5)
    dims = score_dims(model, feature_grid=2, projection_dim=5)
    assert dims == {name: value[0].numel() for name, value in scores.items()}
    assert "alges_img_proj" not in score_dims(model)
    with torch.no_grad(), capture_head_input(model) as captured:
        model(images)
    pooled = F.adaptive_avg_pool2d(captured.value, 2).flatten(1)
    torch.testing.assert_close(scores["feature"], pooled)


@pytest.mark.parametrize(
    ("mode", "align_corners"), [("bilinear", False), ("bilinear", True), ("nearest", None)]
)
def test_three_by_three_head_with_upsampling_matches_autograd(mode, align_corners):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ToyHeadNet(mode, align_corners)
    images = make_images(2, size=18, seed=16)
    scores = score_batch(model, images)
    for i in range(2):
        expected = autograd_head_gradient(model, images[i])
        assert relative_error(scores["alges_img"][i], expected.flatten()) <= 1e-4
        sem = per_pixel_sem(model, images[i])
        assert relative_error(scores["alges_sem"][i], sem) <= 1e-4


def test_bfloat16_autocast_runs_only_the_network_in_bfloat16():
    model = make_model("fpn")
    images = make_images(1, size=32, seed=17)
    mixed = score_batch(model, images, autocast_dtype=torch.bfloat16)
    with torch.no_grad(), capture_head_input(model) as captured:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(images)
    assert logits.dtype == captured.value.dtype == torch.bfloat16
    # the math itself in float32 on the bfloat16 network's outputs
    expected = scoring.head_scores(logits.float(), captured.value.float(), head_spec(model))
    for name, value in expected.items():
        assert mixed[name].dtype == torch.float32
        torch.testing.assert_close(mixed[name], value, rtol=1e-5, atol=1e-7)


def test_grouped_conv_weight_gradient_equals_the_per_tap_matmuls():
    """The GPU path of the head-weight gradient (one grouped conv weight-gradient) against
    the per-tap bmm path, both on the CPU here."""
    gen = torch.Generator().manual_seed(21)
    grad_conv, z = torch.randn(3, 5, 12, 10, generator=gen), torch.randn(3, 4, 12, 10, generator=gen)
    for kernel in ((3, 3), (1, 1), (5, 3)):
        expected = alges_img.head_weight_gradient(grad_conv, z, kernel)
        got = alges_img.head_weight_gradient_grouped_conv(grad_conv, z, kernel)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_grouped_conv_weight_gradient_turns_tf32_off_and_keeps_the_callers_cudnn_settings(
    monkeypatch,
):
    seen = {}
    conv2d_weight = torch.nn.grad.conv2d_weight

    def recording(*args, **kwargs):
        cudnn = torch.backends.cudnn
        seen.update(tf32=cudnn.allow_tf32, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic)
        return conv2d_weight(*args, **kwargs)

    monkeypatch.setattr(torch.nn.grad, "conv2d_weight", recording)
    gen = torch.Generator().manual_seed(22)
    grad_conv, z = torch.randn(2, 3, 6, 5, generator=gen), torch.randn(2, 4, 6, 5, generator=gen)
    with torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=True, allow_tf32=True):
        alges_img.head_weight_gradient_grouped_conv(grad_conv, z, (3, 3))
        assert torch.backends.cudnn.allow_tf32  # restored after the call
    assert seen == {"tf32": False, "benchmark": True, "deterministic": True}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("math_path", ["eager", "compiled"])
@pytest.mark.parametrize("arch", ["deeplabv3plus", "unet"])
def test_cuda_matches_cpu(arch, math_path):
    model = make_model(arch)
    images, mask = make_images(2, seed=18), make_mask(2, 64, seed=18)
    cpu = score_batch(model, images, valid_mask=mask, projection_dim=8, math_path="eager")
    # cuDNN convolutions run in TF32 by default: the network's own outputs then differ from
    # the CPU's by ~1e-2 (Unet), which is not the scoring math under test
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        cuda = score_batch(
            model.cuda(), images.cuda(), valid_mask=mask.cuda(), projection_dim=8,
            math_path=math_path,
        )
    for name, value in cpu.items():
        assert relative_error(cuda[name].cpu(), value) < 1e-3, name


def test_invalid_inputs_raise_with_the_value_received():
    model = make_model("unet")
    images = make_images(2, seed=19)
    empty = torch.ones(2, 64, 64, dtype=torch.bool)
    empty[1] = False
    with pytest.raises(ValueError, match=r"no valid pixel in frames \[1\]"):
        score_batch(model, images, valid_mask=empty)
    wrong_shape = r"valid_mask has shape \(2, 32, 32\); expected \(2, 64, 64\)"
    with pytest.raises(ValueError, match=wrong_shape):
        score_batch(model, images, valid_mask=torch.ones(2, 32, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="images must be a float"):
        score_batch(model, images[0])
    with pytest.raises(ValueError, match="projection_dim must be None or an int >= 1, got 0"):
        score_batch(model, images, projection_dim=0)
    with pytest.raises(ValueError, match="autocast_dtype"):
        score_batch(model, images, autocast_dtype=torch.float64)
    broken = images.clone()
    broken[1, :, :4, :4] = float("nan")  # eval mode: only frame 1's output turns NaN
    with pytest.raises(ValueError, match=r"NaN logits in frames \[1\] of the batch"):
        score_batch(model, broken)
