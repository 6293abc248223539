"""Paired statistics over seeds for learning curves: is a strategy's gain more than luck?

Pure numpy, no I/O. Every strategy of one seed starts from the same initial labeled set
and the same initial weights, so a strategy and its baseline are compared *paired by
seed*: the unit of evidence is one seed's difference, and the questions are

- how large is the mean difference over seeds, and how sure are we
  (:func:`bootstrap_ci`: percentile bootstrap over seeds, seeded and reproducible);
- could a difference this large come from luck alone (:func:`sign_flip_test`: under
  "no difference" each seed's difference is as likely positive as negative; with few
  seeds every one of the 2^n sign patterns is enumerated, so the p-value is exact);
- how many labeled frames does a curve need to reach a Dice (:func:`frames_to_target`:
  linear interpolation between measured rounds, never beyond the last one).

With n seeds the exact test cannot give a p-value below 2 / 2^n (0.25 for 3 seeds), and
a percentile bootstrap cannot be wider than the range of the seed differences: below
``MIN_SEEDS_FOR_INTERVAL`` seeds no interval is given at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from alges_dist.errors import InputError

#: Fewer seeds than this: no confidence interval (two values give a meaningless bootstrap).
MIN_SEEDS_FOR_INTERVAL = 3
#: Up to this many seeds the sign-flip test enumerates all 2^n patterns (65,536 at 16).
MAX_EXACT_SIGN_FLIPS = 16


class Interval(NamedTuple):
    low: float
    high: float


class SignFlipTest(NamedTuple):
    """Two-sided sign-flip (paired permutation) test of "mean difference = 0"."""

    p_value: float
    exact: bool  # True: all 2^n patterns enumerated; False: Monte Carlo over n_patterns draws
    n_patterns: int
    smallest_p: float  # the smallest p-value this many seeds can give (exact test: 2 / 2^n)


class PairedDifference(NamedTuple):
    """Mean of per-seed differences (strategy - baseline), its interval and p-value."""

    n: int
    mean: float
    ci: Interval | None  # None with fewer than MIN_SEEDS_FOR_INTERVAL seeds
    test: SignFlipTest


def aulc(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Trapezoid area under (xs, ys) over the span of xs (a mean metric); one point: that point.

    A round that added no frames (xs repeats) adds no area; a curve that never grew (no span:
    every round short of picks) is the mean of its points, not a division by zero.
    """
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if len(xs) == 1 or xs[-1] == xs[0]:
        return float(ys.mean())
    area = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))
    return area / float(xs[-1] - xs[0])


def _as_samples(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 0 or len(array) == 0:
        raise InputError(f"{name} needs at least one seed, got {array.tolist()!r}")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{name} holds non-finite values {array.tolist()!r}: drop unreached seeds first")
    return array


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``statistic`` over seeds.

    values: (n,) or (n, k); rows are seeds and are resampled whole, so paired columns
    (a strategy and its baseline) stay paired. statistic maps resamples (B, n[, k]) to
    (B,); default: the mean over seeds of a 1-d ``values``. The resampling uses
    ``numpy.random.default_rng(seed)``: the same call gives the same interval.

    Raises ValueError with fewer than ``MIN_SEEDS_FOR_INTERVAL`` seeds.
    """
    array = _as_samples(values, "bootstrap_ci")
    n = len(array)
    if n < MIN_SEEDS_FOR_INTERVAL:
        raise InputError(f"bootstrap_ci needs at least {MIN_SEEDS_FOR_INTERVAL} seeds for an interval, got {n}")
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise InputError(f"n_resamples must be >= 1, got {n_resamples}")
    if statistic is None:
        if array.ndim != 1:
            raise InputError(f"values of shape {array.shape} need a statistic; the default mean takes (n,)")
        statistic = lambda resamples: resamples.mean(axis=1)  # noqa: E731
    rows = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))  # (B, n) seed indices
    stats = np.asarray(statistic(array[rows]), dtype=np.float64)  # (B,)
    if stats.shape != (n_resamples,):
        raise InputError(f"statistic must map ({n_resamples}, {n}, ...) resamples to ({n_resamples},), got {stats.shape}")
    alpha = 1 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return Interval(float(low), float(high))


def sign_flip_test(
    differences: Sequence[float] | np.ndarray, *, n_resamples: int = 100_000, seed: int = 0
) -> SignFlipTest:
    """Two-sided paired permutation test on the mean of per-seed differences.

    Under the null hypothesis (no difference between the paired strategies) each seed's
    difference is as likely to carry either sign. p = the share of sign patterns whose
    |mean| is at least the observed |mean|. Up to ``MAX_EXACT_SIGN_FLIPS`` seeds all 2^n
    patterns are enumerated (exact); beyond, ``n_resamples`` random patterns from
    ``default_rng(seed)`` give (1 + hits) / (1 + n_resamples). Identical curves
    (all differences 0) give p = 1.
    """
    d = _as_samples(differences, "sign_flip_test")
    if d.ndim != 1:
        raise InputError(f"differences must be one value per seed, got shape {d.shape}")
    n = len(d)
    # Sums that are equal in exact arithmetic can differ in the last bits; count them as ties.
    tolerance = 1e-12 * float(np.abs(d).sum())
    observed = abs(float(d.sum()))
    if n <= MAX_EXACT_SIGN_FLIPS:
        bits = (np.arange(2**n)[:, None] >> np.arange(n)) & 1  # (2^n, n) every sign pattern
        sums = np.abs(((2 * bits - 1) * d).sum(axis=1))  # (2^n,)
        hits = int(np.count_nonzero(sums >= observed - tolerance))
        return SignFlipTest(hits / 2**n, True, 2**n, 2 / 2**n)
    signs = np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=(n_resamples, n))  # (B, n)
    sums = np.abs((signs * d).sum(axis=1))
    hits = int(np.count_nonzero(sums >= observed - tolerance))
    return SignFlipTest((1 + hits) / (1 + n_resamples), False, n_resamples, 1 / (1 + n_resamples))


def paired_difference(
    values: Sequence[float] | np.ndarray,
    baseline: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> PairedDifference:
    """values[i] - baseline[i] over seeds i: mean, bootstrap interval (None below 3 seeds), p-value."""
    values, baseline = _as_samples(values, "values"), _as_samples(baseline, "baseline")
    if values.shape != baseline.shape or values.ndim != 1:
        raise InputError(f"values {values.shape} and baseline {baseline.shape} must be one value per seed, paired")
    d = values - baseline
    ci = None
    if len(d) >= MIN_SEEDS_FOR_INTERVAL:
        ci = bootstrap_ci(d, confidence=confidence, n_resamples=n_resamples, seed=seed)
    return PairedDifference(len(d), float(d.mean()), ci, sign_flip_test(d, seed=seed))


def frames_to_target(xs: Sequence[float], ys: Sequence[float], target: float) -> float | None:
    """Labeled frames at which the curve first reaches ``target``; None when it never does.

    xs: labeled frames per round, non-decreasing (a round short of picks adds fewer frames, or
    none); ys: the metric there. Between two
    rounds the curve is the straight line through them, so the answer is the first
    crossing, interpolated; at or above target on the first round: xs[0]. Never
    extrapolated past xs[-1]: a curve that ends below target returns None ("not reached
    within xs[-1] frames").
    """
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if xs.ndim != 1 or xs.shape != ys.shape or len(xs) == 0:
        raise InputError(f"xs {xs.shape} and ys {ys.shape} must be one non-empty curve of equal length")
    if np.any(np.diff(xs) < 0):
        raise InputError(f"labeled frames must not decrease along the curve, got {xs.tolist()}")
    if not (np.all(np.isfinite(ys)) and np.isfinite(target)):
        raise InputError(f"curve {ys.tolist()} or target {target} is not finite")
    reached = np.flatnonzero(ys >= target)
    if len(reached) == 0:
        return None
    i = int(reached[0])
    if i == 0:
        return float(xs[0])
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]  # y0 < target <= y1
    return float(x0 + (target - y0) * (x1 - x0) / (y1 - y0))
