"""Paired statistics against hand-made answers and independent references (no Ray)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from alges_dist.report.statistics import (
    MIN_SEEDS_FOR_INTERVAL,
    aulc,
    bootstrap_ci,
    frames_to_target,
    paired_difference,
    sign_flip_test,
)


def _exhaustive_sign_flip_p(d):
    """Written independently of the library: every sign pattern, |mean| at least the observed."""
    observed = abs(sum(d) / len(d))
    patterns = list(itertools.product((1, -1), repeat=len(d)))
    hits = sum(abs(sum(s * x for s, x in zip(signs, d)) / len(d)) >= observed - 1e-12 for signs in patterns)
    return hits / len(patterns)


def test_curve_shifted_left_by_10_frames_needs_10_fewer_frames():
    xs = np.array([10, 20, 30, 40, 50])
    random_curve = np.array([0.20, 0.35, 0.45, 0.52, 0.60])
    # the strategy's curve is random's shifted left by 10 frames: it shows at x what random shows at x + 10
    shifted_xs, shifted = xs[:-1], random_curve[1:]
    for target in (0.35, 0.40, 0.52, 0.56, 0.60):
        baseline = frames_to_target(xs, random_curve, target)
        assert frames_to_target(shifted_xs, shifted, target) == pytest.approx(baseline - 10)
    # random's own last Dice, reached by the shifted curve at 40 frames: 10 fewer, 20% saved
    assert frames_to_target(xs, random_curve, 0.60) == 50
    assert frames_to_target(shifted_xs, shifted, 0.60) == 40


def test_frames_to_target_interpolates_the_first_crossing_and_never_extrapolates():
    xs, ys = [10, 20, 30, 40], [0.2, 0.6, 0.4, 0.8]
    assert frames_to_target(xs, ys, 0.4) == pytest.approx(15)  # halfway from 0.2 to 0.6
    assert frames_to_target(xs, ys, 0.6) == 20  # reached on a round: that round
    assert frames_to_target(xs, ys, 0.7) == pytest.approx(37.5)  # after the dip: 30 + 10 * 0.3 / 0.4
    assert frames_to_target(xs, ys, 0.1) == 10  # the first round already: its frames, not fewer
    assert frames_to_target(xs, ys, 0.81) is None  # not reached within 40 frames
    assert frames_to_target([10], [0.5], 0.5) == 10
    with pytest.raises(ValueError, match="must not decrease"):
        frames_to_target([10, 5], [0.1, 0.2], 0.1)
    with pytest.raises(ValueError, match="equal length"):
        frames_to_target([10, 20], [0.1], 0.1)


def test_identical_curves_give_zero_difference_an_interval_containing_zero_and_p_one():
    values = np.array([0.51, 0.47, 0.55, 0.49])
    result = paired_difference(values, values.copy())
    assert result.mean == 0 and result.n == 4
    assert result.ci.low <= 0 <= result.ci.high
    assert result.test.p_value == 1.0 and result.test.exact


def test_fewer_than_three_seeds_give_no_interval():
    result = paired_difference([0.6, 0.7], [0.5, 0.5])
    assert result.ci is None and result.mean == pytest.approx(0.15)
    assert result.test.p_value == pytest.approx(_exhaustive_sign_flip_p([0.1, 0.2]))
    with pytest.raises(ValueError, match=f"at least {MIN_SEEDS_FOR_INTERVAL} seeds"):
        bootstrap_ci([0.1, 0.2])


def test_bootstrap_is_seeded_reproducible_and_matches_scipy():
    d = np.array([0.02, -0.01, 0.05, 0.03, 0.00, 0.04])
    first = bootstrap_ci(d, seed=7)
    assert bootstrap_ci(d, seed=7) == first  # same seed, same interval, bit for bit
    spread = np.random.default_rng(0).normal(size=7)  # continuous values: the seed shows in the quantiles
    assert bootstrap_ci(spread, n_resamples=500, seed=7) != bootstrap_ci(spread, n_resamples=500, seed=8)
    assert d.min() <= first.low < d.mean() < first.high <= d.max()
    stats = pytest.importorskip("scipy.stats")
    ref = stats.bootstrap((d,), np.mean, method="percentile", n_resamples=50_000,
                          rng=np.random.default_rng(1)).confidence_interval
    ours = bootstrap_ci(d, n_resamples=50_000, seed=0)
    assert ours.low == pytest.approx(ref.low, abs=0.002) and ours.high == pytest.approx(ref.high, abs=0.002)


def test_paired_bootstrap_resamples_seeds_whole():
    # a ratio of means over paired columns: every resample keeps each seed's pair together
    frames = np.array([[20.0, 40.0], [30.0, 40.0], [25.0, 50.0], [35.0, 40.0]])
    ratio = lambda r: 1 - r[..., 0].mean(axis=1) / r[..., 1].mean(axis=1)  # noqa: E731
    interval = bootstrap_ci(frames, ratio, seed=0)
    per_seed_saved = 1 - frames[:, 0] / frames[:, 1]
    assert per_seed_saved.min() <= interval.low < 1 - frames[:, 0].mean() / frames[:, 1].mean() < interval.high
    with pytest.raises(ValueError, match="need a statistic"):
        bootstrap_ci(frames)


@pytest.mark.parametrize("n", [3, 4, 5])
def test_sign_flip_p_equals_exhaustive_enumeration(n, seed):
    rng = np.random.default_rng(100 * n + seed)
    d = rng.normal(0.02, 0.03, size=n)
    d[0] = -d[1]  # a tie among pattern sums on purpose
    result = sign_flip_test(d)
    assert result.exact and result.n_patterns == 2**n and result.smallest_p == 2 / 2**n
    assert result.p_value == pytest.approx(_exhaustive_sign_flip_p(d.tolist()), abs=1e-15)
    stats = pytest.importorskip("scipy.stats")
    ref = stats.permutation_test((d,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples",
                                 n_resamples=np.inf, alternative="two-sided")
    assert result.p_value == pytest.approx(ref.pvalue, abs=1e-12)


def test_sign_flip_all_one_sign_reaches_the_smallest_p_and_mc_agrees_with_exact():
    assert sign_flip_test([0.01, 0.02, 0.03]).p_value == pytest.approx(0.25)  # the floor with 3 seeds
    assert sign_flip_test([0.0, 0.0, 0.0]).p_value == 1.0
    d = np.random.default_rng(3).normal(0.01, 0.03, size=18)  # past the exact limit: Monte Carlo
    mc = sign_flip_test(d, n_resamples=40_000, seed=1)
    assert not mc.exact and mc == sign_flip_test(d, n_resamples=40_000, seed=1)
    bits = (np.arange(2**18)[:, None] >> np.arange(18)) & 1
    exact = np.mean(np.abs(((2 * bits - 1) * d).sum(1)) >= abs(d.sum()) - 1e-12)
    assert mc.p_value == pytest.approx(exact, abs=4 * np.sqrt(exact * (1 - exact) / 40_000) + 1e-4)
    with pytest.raises(ValueError, match="non-finite"):
        sign_flip_test([0.1, float("nan")])


def test_rounds_that_added_no_frames_neither_divide_by_zero_nor_raise():
    # issue 23.5: a round with 0 picks repeats n_labeled; the report crashed on it
    assert aulc([10, 10], [0.2, 0.4]) == pytest.approx(0.3)  # no span: the mean, not 0/0
    assert aulc([10, 10, 20], [0.2, 0.4, 0.6]) == pytest.approx(0.5)  # the zero-width step adds no area
    assert frames_to_target([10, 10, 20], [0.2, 0.4, 0.6], 0.5) == pytest.approx(15)
    assert frames_to_target([10, 10, 20], [0.2, 0.4, 0.6], 0.3) == 10  # crossed inside the zero-width step

