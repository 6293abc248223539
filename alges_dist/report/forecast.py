"""When to stop: the Dice the next round buys and the frames a target needs, extrapolated.

Unlike frames-to-target (read off the measured curve, never beyond its last round) this is
a *forecast*: each seed's learning curve is fitted with an inverse power law

    Dice(n) = a - b * n^(-c)        a <= 1 (the asymptote), b >= 0, c > 0

and extrapolated. Why this law: learning curves of supervised models are well described by
a power law in the training-set size that saturates at the model's capacity (Hestness et al.
2017; Figueroa et al. 2012, "Predicting sample size required for classification performance",
fitted exactly this three-parameter form to small medical samples), it has one parameter per
question asked (ceiling a, distance b, rate c), and it is monotone, so "frames to reach D"
has one answer: n = (b / (a - D))^(1/c) when D < a, none when D >= a.

The forecast is that of the seeds' mean curve, as the learning curves show it: the Dice after
one more round is the mean of the seeds' fitted curves there, and the frames to a target are
where that mean fitted curve crosses it (not the mean of each seed's frames: one seed whose
ceiling lies just above the target would send that mean to thousands of frames).

The band: a bootstrap over seeds and fit residuals. Each resample draws the seeds with
replacement, replaces each drawn seed's curve by its fit plus residuals drawn with
replacement from that fit, refits, and takes the drawn seeds' mean curve; the 2.5% and
97.5% quantiles of its answers are the band (``numpy.random.default_rng(0)``: reproducible).

Refused, with the reason, when the curve cannot carry an extrapolation: fewer than
``MIN_POINTS`` rounds (three parameters and one residual degree of freedom), a flat curve,
a fit that explains less than ``MIN_R2`` of the curve's variance, fewer than half the
seeds fitting, or a target at or above the fitted asymptote (the law says never).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from alges_dist.report.comparisons import common_rounds, seed_curves, strategy_order

#: Points a fit needs: three parameters plus one degree of freedom for the residuals.
MIN_POINTS = 4
#: Share of a seed's curve variance the fit must explain (R^2), else that seed is refused.
MIN_R2 = 0.6
#: The band's bootstrap: resamples and seed, fixed so a report is reproducible.
N_RESAMPLES = 200
SEED = 0
NAN = float("nan")


class ForecastRefused(ValueError):
    """The curve cannot carry an extrapolation; the message says why."""


class PowerLawFit(NamedTuple):
    a: float  # the asymptote: the Dice the law says the model saturates at
    b: float
    c: float
    r2: float
    residuals: np.ndarray  # (n_points,) measured - fitted

    def dice_at(self, n: float) -> float:
        return inverse_power_law(np.float64(n), self.a, self.b, self.c)

    def frames_for(self, target: float) -> float:
        """Labeled frames at which the fitted curve reaches ``target`` (inf when target >= a)."""
        if target >= self.a:
            return float("inf")
        if self.b == 0:
            return 0.0
        return float((self.b / (self.a - target)) ** (1 / self.c))


def inverse_power_law(n: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    """Dice(n) = a - b * n^(-c); n: labeled frames (> 0)."""
    return a - b * np.power(n, -c)


def fit_inverse_power_law(xs: Sequence[float], ys: Sequence[float],
                          start: tuple[float, float, float] | None = None) -> PowerLawFit:
    """Least-squares fit of :func:`inverse_power_law` (scipy's bounded trust-region solver).

    xs: labeled frames per round (> 0), ys: the metric there; start: (a, b, c) to start from
    (the bootstrap's refits start at their seed's fit). Raises ForecastRefused with
    fewer than MIN_POINTS distinct points, a flat curve, a failed fit or R^2 < MIN_R2.
    """
    from scipy.optimize import curve_fit

    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if len(np.unique(xs)) < MIN_POINTS:
        raise ForecastRefused(f"{len(np.unique(xs))} measured rounds; a fit of 3 parameters needs {MIN_POINTS}")
    if np.any(xs <= 0) or not np.all(np.isfinite(ys)):
        raise ForecastRefused(f"labeled frames must be > 0 and the metric finite, got {xs.tolist()}, {ys.tolist()}")
    ss_total = float(np.sum((ys - ys.mean()) ** 2))
    if ss_total <= 1e-12:
        raise ForecastRefused(f"flat curve (every round {ys[0]:.4f}): nothing to extrapolate")
    a0 = min(1.0, float(ys.max()) + 0.05)
    p0 = start or (a0, max((a0 - float(ys[0])) * float(xs[0]) ** 0.5, 1e-3), 0.5)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # OptimizeWarning on a degenerate covariance: R^2 judges the fit
            params, _ = curve_fit(inverse_power_law, xs, ys, p0=p0, bounds=([0.0, 0.0, 1e-3], [1.0, np.inf, 5.0]),
                                  maxfev=10_000)
    except (RuntimeError, ValueError) as err:
        raise ForecastRefused(f"the fit did not converge ({err})") from None
    a, b, c = (float(v) for v in params)
    residuals = ys - inverse_power_law(xs, a, b, c)
    r2 = 1 - float(np.sum(residuals**2)) / ss_total
    if r2 < MIN_R2:
        raise ForecastRefused(f"poor fit (R^2 {r2:.2f} < {MIN_R2}): the rounds do not follow a saturating curve")
    return PowerLawFit(a, b, c, r2, residuals)


def frames_of_mean_curve(fits: Sequence[PowerLawFit], target: float) -> float:
    """Labeled frames where the mean of the fitted curves reaches ``target`` (inf: never, the
    target at or above the mean asymptote). The mean of increasing curves is increasing: bisection."""
    a, b, c = (np.array(v, dtype=np.float64) for v in zip(*((f.a, f.b, f.c) for f in fits)))  # (n_fits,) each
    if target >= a.mean():
        return float("inf")
    mean = lambda n: float(np.mean(a - b * n ** -c))  # noqa: E731
    low, high = 1e-9, 1.0
    if mean(low) >= target:
        return 0.0
    while mean(high) < target:  # the mean tends to a > target: a bracket exists
        low, high = high, high * 2
    for _ in range(48):  # the bracket's width / 2^48: far below a frame
        mid = (low + high) / 2
        low, high = (mid, high) if mean(mid) < target else (low, mid)
    return high


class Forecast(NamedTuple):
    frames: float  # frames at which the seeds' mean fitted curve reaches the target (NaN: refused or no target)
    frames_low: float
    frames_high: float  # inf: some resamples never reach the target
    dice_next: float  # mean over seeds of the fitted Dice after one more round
    dice_next_low: float
    dice_next_high: float
    asymptote: float
    n_fit: int
    refused: str  # "" when the frames forecast is given


def forecast_curves(curves: dict[int, tuple[np.ndarray, np.ndarray]], target: float | None, budget: int, *,
                    n_resamples: int = N_RESAMPLES, seed: int = SEED) -> Forecast:
    """Forecast from one strategy's per-seed curves ``{seed: (frames, metric)}``.

    The next round adds ``budget`` frames to each seed's last point. Seeds whose fit is refused
    are left out when at least half fit; otherwise everything is refused with the first reason.
    """
    fits, reasons = {}, {}
    for s, (xs, ys) in sorted(curves.items()):
        try:
            fits[s] = fit_inverse_power_law(xs, ys)
        except ForecastRefused as err:
            reasons[s] = str(err)
    if not fits or len(fits) * 2 < len(curves):
        first = next(iter(reasons.items()))
        why = f"{len(reasons)} of {len(curves)} seeds refused (seed {first[0]}: {first[1]})"
        return Forecast(NAN, NAN, NAN, NAN, NAN, NAN, NAN, len(fits), why)
    seeds = sorted(fits)
    next_n = {s: float(curves[s][0][-1]) + budget for s in seeds}
    rng = np.random.default_rng(seed)
    draws_frames, draws_dice = [], []
    for _ in range(n_resamples):
        chosen = rng.choice(seeds, size=len(seeds))
        refits, dice = [], []
        for s in chosen:
            xs, fit = curves[s][0], fits[s]
            ys = inverse_power_law(xs, fit.a, fit.b, fit.c) + rng.choice(fit.residuals, size=len(xs))
            try:
                refit = fit_inverse_power_law(xs, ys, start=(fit.a, fit.b, fit.c))
            except ForecastRefused:
                refit = fit  # a resample too noisy to fit keeps its seed's own fit, not a gap in the band
            refits.append(refit)
            dice.append(refit.dice_at(next_n[s]))
        draws_frames.append(frames_of_mean_curve(refits, target) if target is not None else NAN)
        draws_dice.append(float(np.mean(dice)))
    # inverted_cdf: quantiles are drawn values, never an interpolation between inf and a number
    dice_low, dice_high = np.quantile(draws_dice, [0.025, 0.975], method="inverted_cdf")
    dice_next = float(np.mean([fits[s].dice_at(next_n[s]) for s in seeds]))
    asymptote = float(np.mean([fits[s].a for s in seeds]))
    refused = "" if len(reasons) == 0 else f"({len(reasons)} of {len(curves)} seeds left out: {next(iter(reasons.values()))}) "
    if target is None:
        return Forecast(NAN, NAN, NAN, dice_next, float(dice_low), float(dice_high), asymptote, len(fits),
                        "no target Dice: pass --target-dice or set loop.full_data_reference")
    if target >= asymptote:
        return Forecast(NAN, NAN, NAN, dice_next, float(dice_low), float(dice_high), asymptote, len(fits),
                        f"target {target:.4f} lies at or above the fitted asymptote {asymptote:.4f} (mean over "
                        "seeds): the curve is not expected to reach it")
    frames = frames_of_mean_curve([fits[s] for s in seeds], target)
    low, high = np.quantile(draws_frames, [0.025, 0.975], method="inverted_cdf")
    return Forecast(frames, float(low), float(high), dice_next, float(dice_low), float(dice_high), asymptote,
                    len(fits), refused.strip())


def forecast_table(rows: Sequence[dict[str, Any]], target: float | None, budget: int, metric: str = "dice", *,
                   n_resamples: int = N_RESAMPLES) -> list[dict[str, Any]]:
    """``report/forecast.csv``: per strategy, the forecast of its seeds' curves over the common rounds."""
    curves = seed_curves(rows, metric, common_rounds(rows))
    out = []
    for strategy in strategy_order(rows):
        f = forecast_curves(curves[strategy], target, budget, n_resamples=n_resamples)
        out.append({"strategy": strategy, "target_dice": NAN if target is None else target,
                    "frames_forecast": f.frames, "frames_low": f.frames_low, "frames_high": f.frames_high,
                    "dice_next_round": f.dice_next, "dice_next_low": f.dice_next_low,
                    "dice_next_high": f.dice_next_high, "asymptote": f.asymptote,
                    "n_seeds": len(curves[strategy]), "n_seeds_fit": f.n_fit, "note": f.refused})
    return out

