"""The report's numbers: learning curves per seed, compared with a baseline paired by seed.

Pure functions of result rows (as ``run_folder.read_results`` returns them) to table rows;
the math is ``report.statistics``. Every comparison uses the rounds that all runs have
completed (:func:`common_rounds`) and the seeds that both sides of it have.

- :func:`aulc_table`: area under each seed's curve, mean and std per strategy, and per
  baseline the paired mean difference, its bootstrap 95% interval and sign-flip p-value;
- :func:`round_differences`: the same paired test at every round (the curves' markers);
- :func:`frames_to_target_table`: labeled frames each strategy needs to reach a target
  Dice (the baseline's at its largest budget, fractions of the full-data reference),
  and the annotation saved against the baseline; :func:`headline` says it in words.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from alges_dist.errors import InputError
from alges_dist.report.statistics import MIN_SEEDS_FOR_INTERVAL, aulc, bootstrap_ci, frames_to_target, paired_difference

METRICS = ("dice", "miou")
METRIC_LABELS = {"dice": "Dice (paper)", "miou": "mIoU"}
SIGNIFICANCE_LEVEL = 0.05
#: The report's bootstrap: fixed, so a report is reproducible from its run folder.
BOOTSTRAP = {"n_resamples": 10_000, "seed": 0}
NAN = float("nan")

Curve = tuple[np.ndarray, np.ndarray]  # (labeled frames, metric), sorted by frames


def common_rounds(rows: Sequence[dict[str, Any]]) -> int:
    """The last round that every (strategy, seed) run has completed (-1: none)."""
    last: dict[tuple[str, int], int] = defaultdict(lambda: -1)
    for r in rows:
        last[r["strategy"], r["seed"]] = max(last[r["strategy"], r["seed"]], r["round"])
    return min(last.values(), default=-1)


def strategy_order(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Strategies in the order they first appear (the config's order)."""
    return list(dict.fromkeys(r["strategy"] for r in rows))


def seed_curves(rows: Sequence[dict[str, Any]], metric: str, last_round: int,
                x: str = "n_labeled") -> dict[str, dict[int, Curve]]:
    """``{strategy: {seed: (x, metric)}}`` over rounds 0..last_round; x: labeled frames, or
    an effort column (cumulative corrected pixels)."""
    points: dict[str, dict[int, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["round"] <= last_round:
            points[r["strategy"]][r["seed"]].append((r[x], r[metric]))
    curves: dict[str, dict[int, Curve]] = {}
    for strategy, per_seed in points.items():
        curves[strategy] = {}
        for seed, pts in per_seed.items():
            xs, ys = np.array(sorted(pts), dtype=np.float64).T
            curves[strategy][seed] = (xs, ys)
    return curves


#: The default baseline: random rounds, and in a cold-start comparison (arms INITIAL+STRATEGY,
#: ``loop.initial_strategies``) random rounds after a random first batch.
DEFAULT_BASELINES = ("random", "random+random")


def check_baselines(rows: Sequence[dict[str, Any]], baselines: Sequence[str]) -> list[str]:
    """The default baseline (when the run has it) then each named baseline, once; a named one must exist."""
    present = strategy_order(rows)
    missing = [b for b in baselines if b not in DEFAULT_BASELINES and b not in present]
    if missing:
        raise InputError(f"baseline {missing[0]!r} is not a strategy of this run (strategies: {present})")
    return list(dict.fromkeys(b for b in [*DEFAULT_BASELINES, *baselines] if b in present))


def paired_columns(values: dict[int, float], baseline: dict[int, float], prefix: str) -> dict[str, Any]:
    """Paired (by seed) difference values - baseline as table columns named ``prefix*``."""
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        return {prefix: NAN, f"{prefix}_ci95_low": NAN, f"{prefix}_ci95_high": NAN, f"{prefix}_p": NAN,
                f"{prefix}_n_pairs": 0}
    d = paired_difference([values[s] for s in seeds], [baseline[s] for s in seeds], **BOOTSTRAP)
    return {prefix: d.mean, f"{prefix}_ci95_low": d.ci.low if d.ci else NAN,
            f"{prefix}_ci95_high": d.ci.high if d.ci else NAN, f"{prefix}_p": d.test.p_value,
            f"{prefix}_n_pairs": d.n}


def aulc_table(rows: Sequence[dict[str, Any]], metric: str = "dice",
               baselines: Sequence[str] = ("random",)) -> list[dict[str, Any]]:
    """Per strategy: AULC of each seed's curve over the common rounds, mean and std over seeds,
    and per baseline ``vs_B`` = the paired mean difference with its interval and p-value
    (``vs_random`` is always there, NaN when the run has no random)."""
    last = common_rounds(rows)
    areas = {s: {seed: aulc(*curve) for seed, curve in per_seed.items()}
             for s, per_seed in seed_curves(rows, metric, last).items()}
    compared = check_baselines(rows, baselines)
    out = []
    for strategy in strategy_order(rows):
        values = np.array(list(areas[strategy].values()))
        row: dict[str, Any] = {"strategy": strategy, "metric": metric, "aulc_mean": float(values.mean()),
                               "aulc_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                               "n_seeds": len(values), "rounds": f"0-{last}"}
        for b in compared or ["random"]:
            row.update(paired_columns(areas[strategy], areas.get(b, {}), f"vs_{b}"))
        out.append(row)
    return out


def round_differences(rows: Sequence[dict[str, Any]], metric: str, baseline: str) -> list[dict[str, Any]]:
    """Per (strategy, round): the paired difference of the metric to the baseline over seeds,
    its sign-flip p-value and whether p < SIGNIFICANCE_LEVEL (uncorrected for the rounds)."""
    last = common_rounds(rows)
    by_round: dict[tuple[str, int], dict[int, tuple[int, float]]] = defaultdict(dict)
    for r in rows:
        if r["round"] <= last:
            by_round[r["strategy"], r["round"]][r["seed"]] = (r["n_labeled"], r[metric])
    out = []
    for strategy in strategy_order(rows):
        if strategy == baseline:
            continue
        for rnd in range(last + 1):
            mine, base = by_round.get((strategy, rnd), {}), by_round.get((baseline, rnd), {})
            if not mine or not base:
                continue
            cols = paired_columns({s: v for s, (_, v) in mine.items()}, {s: v for s, (_, v) in base.items()}, "diff")
            out.append({"strategy": strategy, "baseline": baseline, "round": rnd, "metric": metric,
                        "n_labeled": int(np.mean([n for n, _ in mine.values()])), **cols,
                        "significant": bool(cols["diff_p"] < SIGNIFICANCE_LEVEL)})
    return out


def _reached(curves: dict[int, Curve], targets: dict[int, float]) -> dict[int, float | None]:
    return {s: frames_to_target(*curves[s], targets[s]) for s in targets}


def frames_to_target_table(rows: Sequence[dict[str, Any]], metric: str, baseline: str,
                           references: dict[int, float] | None = None,
                           fractions: Sequence[float] = (), *, x: str = "n_labeled",
                           unit: str = "frames") -> list[dict[str, Any]]:
    """Labeled frames each strategy needs to reach a target, per seed on its own curve, and
    ``saved`` = 1 - mean frames / the baseline's mean frames (paired bootstrap interval).

    Targets, per seed: the baseline's metric at its largest budget (common rounds), and
    ``fraction x`` that seed's full-data reference. A seed that does not reach a target
    within its curve is counted in ``n_not_reached`` and the row has no mean.
    ``x``/``unit``: another annotation cost along the curve, e.g. the cumulative corrected
    pixels (``x="corrected_px_cum", unit="pixels"``): the columns say ``pixels_mean``,
    ``within_pixels``, ... instead of frames, and the first target is the baseline's final value.
    """
    last = common_rounds(rows)
    curves = seed_curves(rows, metric, last, x)
    if baseline not in curves:
        return []
    budget = int(max(xs[-1] for xs, _ in curves[baseline].values()))
    at = f"{budget}-frame" if unit == "frames" else "final"
    targets = [(f"{baseline}'s {at} {METRIC_LABELS.get(metric, metric)}",
                {s: float(ys[-1]) for s, (_, ys) in curves[baseline].items()})]
    for fraction in fractions if references else ():
        targets.append((f"{fraction:.0%} of the full-data {METRIC_LABELS.get(metric, metric)}",
                        {s: fraction * v for s, v in references.items() if s in curves[baseline]}))
    out = []
    for label, per_seed_target in targets:
        base = _reached(curves[baseline], per_seed_target)
        for strategy in strategy_order(rows):
            seeds = sorted(set(per_seed_target) & set(curves[strategy]))
            mine = _reached(curves[strategy], {s: per_seed_target[s] for s in seeds})
            within = int(max(curves[strategy][s][0][-1] for s in seeds)) if seeds else 0
            row = _frames_row(label, strategy, baseline, seeds, mine, base, within)
            out.append(row if unit == "frames" else {k.replace("frames", unit): v for k, v in row.items()})
    return out


def _frames_row(target: str, strategy: str, baseline: str, seeds: list[int], mine: dict[int, float | None],
                base: dict[int, float | None], within: int) -> dict[str, Any]:
    row: dict[str, Any] = {"target": target, "strategy": strategy, "baseline": baseline, "n_seeds": len(seeds),
                           "within_frames": within,
                           "n_not_reached": sum(mine[s] is None for s in seeds), "frames_mean": NAN,
                           "frames_ci95_low": NAN, "frames_ci95_high": NAN, "baseline_frames_mean": NAN,
                           "baseline_n_not_reached": sum(base[s] is None for s in seeds), "saved": NAN,
                           "saved_ci95_low": NAN, "saved_ci95_high": NAN, "p": NAN, "smallest_p": NAN}
    if not seeds or row["n_not_reached"]:
        return row
    frames = np.array([mine[s] for s in seeds])
    row["frames_mean"] = float(frames.mean())
    if len(seeds) >= MIN_SEEDS_FOR_INTERVAL:
        row["frames_ci95_low"], row["frames_ci95_high"] = bootstrap_ci(frames, **BOOTSTRAP)
    if row["baseline_n_not_reached"]:
        return row
    pairs = np.array([[mine[s], base[s]] for s in seeds])  # (n, 2): strategy, baseline frames
    row["baseline_frames_mean"] = float(pairs[:, 1].mean())
    row["saved"] = float(1 - pairs[:, 0].mean() / pairs[:, 1].mean())
    if len(seeds) >= MIN_SEEDS_FOR_INTERVAL:
        ratio = lambda r: 1 - r[..., 0].mean(axis=1) / r[..., 1].mean(axis=1)  # noqa: E731  (B, n, 2) -> (B,)
        row["saved_ci95_low"], row["saved_ci95_high"] = bootstrap_ci(pairs, ratio, **BOOTSTRAP)
    test = paired_difference(pairs[:, 0], pairs[:, 1], **BOOTSTRAP).test
    row["p"], row["smallest_p"] = test.p_value, test.smallest_p
    return row


def headline(table: Sequence[dict[str, Any]], baseline: str, unit: str = "frames") -> list[str]:
    """The first target's rows in words, one sentence per strategy other than the baseline;
    ``unit``: the table's (``frames``, or ``pixels`` for corrected pixels)."""
    if not table:
        return [f"No comparison: the run has no {baseline} curve to compare with."]
    first = table[0]["target"]
    if unit != "frames":  # the sentence reads the frames table's column names
        table = [{k.replace(unit, "frames"): v for k, v in r.items()} for r in table]
    sentences = [_sentence(r, baseline, unit) for r in table if r["target"] == first and r["strategy"] != baseline]
    return sentences or [f"Only {baseline} in this run: no other strategy to compare with."]


#: How a sentence names each unit: what is counted, and what fewer of them means.
UNIT_WORDS = {"frames": ("frames", "annotations"), "pixels": ("corrected pixels", "corrected pixels")}


def _sentence(r: dict[str, Any], baseline: str, unit: str = "frames") -> str:
    counted, saving = UNIT_WORDS[unit]
    n = r["n_seeds"]
    if n == 0:
        return f"{r['strategy']}: no seed in common with {baseline}."
    if r["n_not_reached"]:
        return (f"{r['strategy']} did not reach {r['target']} within {r['within_frames']:.0f} {counted} "
                f"in {r['n_not_reached']} of {n} seed{'s' if n != 1 else ''}.")
    interval = (f"95% CI {r['frames_ci95_low']:.0f}-{r['frames_ci95_high']:.0f}" if n >= MIN_SEEDS_FOR_INTERVAL
                else f"no interval with {n} seed{'s' if n != 1 else ''}")
    text = f"{r['strategy']} reached {r['target']} with {r['frames_mean']:.0f} {counted} ({interval})"
    saved = r["saved"]
    if np.isnan(saved):
        return text + f"; {baseline} did not reach it in every seed, so no saving can be given."
    if saved == 0:
        amount = f"as many {saving} as {baseline}"
    else:
        amount = f"{abs(saved):.0%} {'fewer' if saved > 0 else 'more'} {saving} than {baseline}"
    # the baseline's own first crossing: a noisy curve can reach its last value before its last round
    amount += f", which first reached it with {r['baseline_frames_mean']:.0f} {counted} ("
    if n >= MIN_SEEDS_FOR_INTERVAL:
        amount += f"saved 95% CI {r['saved_ci95_low']:.0%} to {r['saved_ci95_high']:.0%}; "
    floor = f", the smallest {n} seeds can give" if r["p"] <= r["smallest_p"] else ""
    return f"{text}: {amount}paired sign-flip p = {r['p']:.2g} over {n} seeds{floor})."


def per_class_round_table(per_class: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (class, strategy, round): labeled frames and the class's Dice, mean and std over seeds."""
    groups: dict[tuple[int, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in per_class:
        groups[r["class_id"], r["strategy"], r["round"]].append(r)
    order = {s: i for i, s in enumerate(strategy_order(per_class))}
    out = []
    for (class_id, strategy, rnd), members in sorted(groups.items(), key=lambda kv: (kv[0][0], order[kv[0][1]], kv[0][2])):
        dice = np.array([m["dice"] for m in members])
        out.append({"class_id": class_id, "class_name": members[0]["class_name"], "strategy": strategy, "round": rnd,
                    "n_labeled": int(np.mean([m["n_labeled"] for m in members])), "n_seeds": len(members),
                    "dice_mean": float(dice.mean()), "dice_std": float(dice.std(ddof=1)) if len(dice) > 1 else 0.0})
    return out


def per_class_aulc_table(per_class: Sequence[dict[str, Any]], baselines: Sequence[str] = ("random",)) -> list[dict[str, Any]]:
    """:func:`aulc_table` of each class's Dice curves, with the class in front."""
    out = []
    for class_id in sorted({r["class_id"] for r in per_class}):
        rows = [r for r in per_class if r["class_id"] == class_id]
        name = rows[0]["class_name"]
        out += [{"class_id": class_id, "class_name": name, **row} for row in aulc_table(rows, "dice", baselines)]
    return out
