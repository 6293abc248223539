"""The two paths of the scoring math (issue 15): eager (closed_form.py) and compiled
(compiled.py, torch.compile), held to brute-force references, to autograd and to each other.

The compiled path is built for CUDA; on the CPU inductor compiles C++ instead, which is
what the slow tests here run (seconds to tens of seconds per kind of input).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alges_dist.models import HeadSpec, capture_head_input, head_spec
from alges_dist.scoring import (
    MATH_PATHS,
    head_scores,
    resolve_math_path,
    score_batch,
)
from alges_dist.scoring import alges_img, alges_sem, compiled, input_norms
from alges_dist.scoring.closed_form import chunk_outputs
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

OFFSETS = [(0, 0), (0, 1), (1, -1), (1, 0), (1, 1), (2, -2)]


def brute_force_inner_products(z, kernel_size, dy, dx):
    """<unfold(z)_uv, unfold(z)_(u+dy, v+dx)> from F.unfold's patch vectors; 0 for
    partners outside the image (no value is promised there: weight 0 in norm_terms)."""
    n, _, height, width = z.shape
    kh, kw = kernel_size
    patches = F.unfold(z, kernel_size, padding=(kh // 2, kw // 2))  # (n, C*kh*kw, h*w)
    patches = patches.view(n, -1, height, width)
    out = torch.zeros(n, height, width, dtype=z.dtype)
    for u in range(height):
        for v in range(width):
            if 0 <= u + dy < height and 0 <= v + dx < width:
                out[:, u, v] = (patches[:, :, u, v] * patches[:, :, u + dy, v + dx]).sum(1)
    return out


@pytest.mark.parametrize("kernel_size", [(1, 1), (3, 3), (5, 3)])
def test_inner_product_maps_equal_brute_force_and_the_eager_products(kernel_size):
    z = torch.randn(2, 5, 9, 11, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    maps = input_norms.inner_product_maps(z, kernel_size, OFFSETS)  # (6, n, h, w), float32
    assert maps.dtype == torch.float32
    height, width = z.shape[2:]
    for t, (dy, dx) in enumerate(OFFSETS):
        inside = (slice(None), slice(max(0, -dy), height - max(0, dy)), slice(max(0, -dx), width - max(0, dx)))
        expected = brute_force_inner_products(z, kernel_size, dy, dx)
        torch.testing.assert_close(maps[t][inside].double(), expected[inside], rtol=1e-5, atol=1e-5)
        eager = input_norms.unfolded_inner_products(z.float(), kernel_size, dy, dx)
        torch.testing.assert_close(maps[t], eager, rtol=1e-5, atol=1e-5)


def test_sum_by_class_onehot_equals_index_add_and_a_loop():
    gen = torch.Generator().manual_seed(2)
    label = torch.randint(0, 5, (3, 7, 6), generator=gen)
    values = torch.rand(3, 7, 6, generator=gen)
    expected = torch.zeros(3, 5)
    for i in range(3):
        for k in range(5):
            expected[i, k] = values[i][label[i] == k].sum()
    torch.testing.assert_close(alges_sem.sum_by_class_onehot(label, values, 5), expected)
    torch.testing.assert_close(alges_sem.sum_by_class(label.clone(), values, 5), expected)


def fused_scores(model, images, mask=None):
    """score_batch's alges/uncertainty outputs from compiled.pixel_terms run as plain
    (uncompiled) torch: the formulation the compiler receives."""
    spec = head_spec(model)
    with torch.no_grad(), capture_head_input(model) as captured:
        logits = model(images)
        z = captured.value
        upsample = spec.upsampling_matrices(tuple(z.shape[2:]))
        terms = None if upsample is None else input_norms.norm_terms(*upsample)
        weights = None if mask is None else mask.float() / mask.sum(dim=(1, 2)).view(-1, 1, 1)
        kernel_size = spec.conv.kernel_size
        grad_conv, sem, frame_means, has_nan = compiled.pixel_terms(
            logits, z, kernel_size, upsample, terms, weights
        )
        weight_grad = alges_img.head_weight_gradient(grad_conv, z, kernel_size)
    assert not has_nan.any()
    return chunk_outputs(weight_grad, sem, frame_means)


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    return request.param, make_model(request.param)


@pytest.mark.parametrize("masked", [False, True], ids=["all_pixels", "masked"])
def test_fused_formulation_matches_autograd_and_the_eager_path(arch_model, masked):
    arch, model = arch_model
    images = make_images(2, size=32, seed=3)
    mask = make_mask(2, 32, seed=3) if masked else None
    fused = fused_scores(model, images, mask)
    eager = score_batch(model, images, valid_mask=mask, math_path="eager")
    for name, value in fused.items():
        assert relative_error(value, eager[name]) <= 1e-5, name
    for i in range(2):
        frame_mask = None if mask is None else mask[i]
        expected = autograd_head_gradient(model, images[i], frame_mask)
        assert relative_error(fused["alges_img"][i], expected.flatten()) <= 1e-4, arch
    sem = per_pixel_sem(model, images[1], None if mask is None else mask[1])  # a jacobian: one frame
    assert relative_error(fused["alges_sem"][1], sem) <= 1e-4, arch


def tied_logits_head() -> tuple[torch.Tensor, torch.Tensor, HeadSpec]:
    """Logits with exact ties for the max (classes 1 and 3, or 0 and 2 everywhere)."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 4, 6, 6, generator=gen)
    logits[:, 3] = logits[:, 1] = logits.amax(dim=1) + 1.0
    logits[1, 0] = logits[1, 2] = logits[1].amax(dim=0) + 2.0
    return logits, torch.randn(2, 3, 6, 6, generator=gen), HeadSpec(nn.Conv2d(3, 4, 1), None)


def test_ties_pick_the_first_class_on_both_paths():
    logits, z, spec = tied_logits_head()
    eager = head_scores(logits.clone(), z, spec, math_path="eager")
    _, sem, _, _ = compiled.pixel_terms(logits, z, (1, 1), None, None, None)
    assert (eager["alges_sem"][0, [0, 2, 3]] == 0).all() and eager["alges_sem"][0, 1] > 0
    assert (eager["alges_sem"][1, [1, 2, 3]] == 0).all() and eager["alges_sem"][1, 0] > 0
    torch.testing.assert_close(sem, eager["alges_sem"])


def test_math_path_and_chunk_bytes_are_checked():
    assert MATH_PATHS == ("auto", "eager", "compiled")
    assert resolve_math_path("auto", torch.device("cpu")) == "eager"  # the CPU-tuned path
    assert resolve_math_path("compiled", torch.device("cpu")) == "compiled"
    model, images = make_model("unet"), make_images(1, size=32)
    with pytest.raises(ValueError, match=r"math_path must be one of .*got 'fast'"):
        score_batch(model, images, math_path="fast")
    with pytest.raises(ValueError, match="chunk_bytes must be None or an int >= 1, got 0"):
        score_batch(model, images, chunk_bytes=0)


# ---- compiled on the CPU (inductor's C++ backend): slow ------------------------------
@pytest.fixture
def strict_compile():
    """Fail instead of silently running uncompiled when a test makes more graph variants
    than dynamo keeps (its recompile limit), so these tests test compiled code."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.usefixtures("strict_compile")
@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_path_matches_autograd_and_the_eager_path(arch):
    model = make_model(arch)
    images = make_images(2, size=32, seed=5)
    for mask in (None, make_mask(2, 32, seed=5)):
        got = score_batch(model, images, valid_mask=mask, projection_dim=8, math_path="compiled")
        eager = score_batch(model, images, valid_mask=mask, projection_dim=8, math_path="eager")
        assert set(got) == set(eager)
        for name, value in got.items():
            assert value.dtype == torch.float32
            assert relative_error(value, eager[name]) <= 1e-5, name
        for i in range(2):
            frame_mask = None if mask is None else mask[i]
            expected = autograd_head_gradient(model, images[i], frame_mask)
            assert relative_error(got["alges_img"][i], expected.flatten()) <= 1e-4, arch
            sem = per_pixel_sem(model, images[i], frame_mask)
            assert relative_error(got["alges_sem"][i], sem) <= 1e-4, arch


@pytest.mark.slow
@pytest.mark.usefixtures("strict_compile")
def test_compiled_three_by_three_head_with_upsampling_matches_autograd():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ToyHeadNet("bilinear", align_corners=False)
    images = make_images(2, size=18, seed=16)
    scores = score_batch(model, images, math_path="compiled")
    for i in range(2):
        expected = autograd_head_gradient(model, images[i])
        assert relative_error(scores["alges_img"][i], expected.flatten()) <= 1e-4
        assert relative_error(scores["alges_sem"][i], per_pixel_sem(model, images[i])) <= 1e-4


@pytest.mark.slow
@pytest.mark.usefixtures("strict_compile")
def test_compiled_batch_is_dynamic_chunks_equal_and_nan_frames_are_named():
    model = make_model("unet")
    images = make_images(5, size=32, seed=6)
    whole = score_batch(model, images[:2], math_path="compiled")  # compiles for batch n
    with torch.compiler.set_stance("fail_on_recompile"):
        for n in (3, 5):
            got = score_batch(model, images[:n], math_path="compiled")
            eager = score_batch(model, images[:n], math_path="eager")
            for name, value in got.items():
                assert relative_error(value, eager[name]) <= 1e-5, (n, name)
        # two chunks of 2 images: the same kernels, the same scores (a batch of 1 would
        # compile once more: torch specializes sizes 0 and 1)
        chunked = score_batch(model, images[:4], math_path="compiled", chunk_bytes=2 * 4 * 32 * 32 * 4)
        for name, value in chunked.items():
            assert relative_error(value, got[name][:4]) <= 1e-6, name
    assert relative_error(whole["alges_img"], got["alges_img"][:2]) <= 1e-5
    broken = images[:3].clone()
    broken[1, :, :4, :4] = float("nan")
    with pytest.raises(ValueError, match=r"NaN logits in frames \[1\] of the batch"):
        score_batch(model, broken, math_path="compiled")


@pytest.mark.slow
@pytest.mark.usefixtures("strict_compile")
def test_compiled_reads_bfloat16_network_outputs_and_computes_in_float32():
    model = make_model("fpn")
    images = make_images(2, size=32, seed=17)
    with torch.no_grad(), capture_head_input(model) as captured:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(images)
    z = captured.value
    assert logits.dtype == z.dtype == torch.bfloat16
    got = head_scores(logits, z, head_spec(model), math_path="compiled")
    expected = head_scores(logits.float(), z.float(), head_spec(model), math_path="eager")
    for name, value in expected.items():
        assert got[name].dtype == torch.float32
        assert relative_error(got[name], value) <= 1e-5, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["unet", "deeplabv3plus"])
def test_cuda_compiled_equals_cuda_eager(arch, autocast_dtype):
    """"auto" on CUDA is the compiled path; it gives the eager path's scores there, also
    on a bfloat16 network (whose outputs both paths read)."""
    assert resolve_math_path("auto", torch.device("cuda")) == "compiled"
    model = make_model(arch).cuda()
    images, mask = make_images(3, seed=20).cuda(), make_mask(3, 64, seed=20).cuda()
    tf32_off = torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
    with tf32_off if autocast_dtype is None else contextlib.nullcontext():
        runs = {
            path: score_batch(model, images, valid_mask=mask, autocast_dtype=autocast_dtype,
                              math_path=path)
            for path in ("eager", "compiled")
        }
    for name, value in runs["compiled"].items():
        assert relative_error(value, runs["eager"][name]) <= 1e-4, name
