"""Annotation effort per round: what correcting the picking model's masks costs, not only frames.

Each round folder may hold ``correction.csv`` (one row per labeled pick: the pixels whose
class an annotator changes in the model's pre-annotation, and ``regions_changed``, the
connected regions of them: the click proxy), summed into ``record.json``'s ``correction``.
The simulated oracle writes it from the pool's masks, ``alges label`` from people's
(``annotation.regions.correction_effort``), so both kinds of run give the same table.

Round r's correction is the cost of the picks labeled *after* round r, so the effort a
curve point at round r cost is the sum over rounds before r (round 0: nothing, the initial
set is every arm's alike, annotated without a model's masks and not counted). A seed whose
earlier round has no correction (people imported masks without pre-annotations) has no
effort curve from that round on.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alges_dist.run_folder import RunLayout

#: Column of the cumulative corrected pixels a round's labels cost (the effort curve's x).
EFFORT_X = "corrected_px_cum"


def round_corrections(run: Path, rows: Sequence[dict[str, Any]]) -> dict[tuple[str, int, int], dict[str, Any]]:
    """``record.json``'s ``correction`` of every (strategy, seed, round) of ``rows`` that has one."""
    layout, out = RunLayout(run), {}
    for r in rows:
        path = layout.record_path(r["strategy"], r["seed"], r["round"])
        correction = json.loads(path.read_text()).get("correction") if path.exists() else None
        if correction:
            out[r["strategy"], r["seed"], r["round"]] = correction
    return out


def with_effort(rows: Sequence[dict[str, Any]], corrections: dict[tuple[str, int, int], dict[str, Any]]
                ) -> list[dict[str, Any]]:
    """``rows`` (results.csv) with this round's picks' effort (``corrected_px``, ``regions``: None
    where not measured) and the effort spent to reach the round (``corrected_px_cum``,
    ``regions_cum``: None once an earlier round was not measured)."""
    out = []
    by_run: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_run[r["strategy"], r["seed"]].append(r)
    for (strategy, seed), members in by_run.items():
        px_cum, regions_cum = 0, 0
        for r in sorted(members, key=lambda m: m["round"]):
            c = corrections.get((strategy, seed, r["round"]))
            px = None if c is None else c["pixels_changed"]
            regions = None if c is None else c.get("regions_changed")
            out.append({**r, "corrected_px": px, "regions": regions, EFFORT_X: px_cum, "regions_cum": regions_cum})
            px_cum = None if px is None or px_cum is None else px_cum + px
            regions_cum = None if regions is None or regions_cum is None else regions_cum + regions
    return out


def _mean_std(values: list[float | None]) -> tuple[float, float]:
    if not values or any(v is None for v in values):
        return float("nan"), float("nan")
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def effort_table(rows: Sequence[dict[str, Any]], metric: str = "dice") -> list[dict[str, Any]]:
    """``report/effort.csv``: per (strategy, round), over seeds: labeled frames, the round's
    corrected pixels and regions (mean, std), the cumulative pixels the curve point cost and
    the metric there (NaN where a seed's effort was not measured)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["strategy"], r["round"]].append(r)
    order = {s: i for i, s in enumerate(dict.fromkeys(r["strategy"] for r in rows))}
    out = []
    for (strategy, rnd), members in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        px_mean, px_std = _mean_std([m["corrected_px"] for m in members])
        regions_mean, regions_std = _mean_std([m["regions"] for m in members])
        cum_mean, cum_std = _mean_std([m[EFFORT_X] for m in members])
        value_mean, _ = _mean_std([m[metric] for m in members])
        out.append({"strategy": strategy, "round": rnd, "n_seeds": len(members),
                    "n_labeled": int(np.mean([m["n_labeled"] for m in members])),
                    "corrected_px_mean": px_mean, "corrected_px_std": px_std,
                    "regions_mean": regions_mean, "regions_std": regions_std,
                    "corrected_px_cum_mean": cum_mean, "corrected_px_cum_std": cum_std,
                    f"{metric}_mean": value_mean})
    return out


def measured_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows whose cumulative effort is known (the points of the effort curves)."""
    return [r for r in rows if r[EFFORT_X] is not None]
