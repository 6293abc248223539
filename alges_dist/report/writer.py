"""What a run folder says, for people: which strategy saves the most annotation.

``write_report(RUN)`` reads only the run folder (results.csv, queries.parquet, the
runs' manifests and models) and writes ``RUN/report/``:

    headline.md           frames each strategy needs to reach random's Dice, in words
    learning_curves.png   test metric vs labeled frames, mean +- std over seeds, a star where
                          the paired difference to the baseline is significant, the full-data line
    rounds.csv / .md      per (strategy, round): labeled frames, mean and std per metric
    aulc.csv / .md        area under each seed's learning curve, mean +- std per strategy, and
                          the paired difference to each baseline (95% CI, p-value)
    round_differences.csv the paired difference to the baseline at every round
    frames_to_target.csv / .md  labeled frames to reach each target, annotation saved
    effort.csv            per (strategy, round): corrected pixels and regions (the click proxy) of
                          the round's picks, mean and std over seeds, and the cumulative pixels
    effort_to_target.csv / .md, effort_curves.png  the same paired statistics in corrected pixels
    forecast.csv          an inverse power law fitted per seed: Dice after one more round, frames
                          to --target-dice (a band over seeds and residuals), or why not
    per_class_*.csv, per_class_aulc.md, per_class_curves.png   Dice per class
    per_video.csv / .md   how many frames each strategy picked from each video
    last_batch_*.png      the last query batch with the model's predicted masks
    report.html           all of the above in one file that opens offline

The area under the learning curve (AULC) is the trapezoid area of the metric over
the labeled-frame axis divided by that axis' span: the metric averaged over the
budget, in the metric's units. All runs are compared over the rounds every run has
completed, so a run that is further along does not get a larger area. The statistics
(paired by seed) are ``comparisons`` and ``statistics``; the figures ``figures``.
"""

from __future__ import annotations

import html
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alges_dist.contact_sheet import contact_sheet
from alges_dist.data.atomic import atomic_write_text
from alges_dist.errors import InputError
from alges_dist.near_picks import near_pick_column
from alges_dist.predictions import predict_masks
from alges_dist.report.comparisons import (
    METRIC_LABELS,
    METRICS,
    SIGNIFICANCE_LEVEL,
    aulc_table,
    check_baselines,
    common_rounds,
    frames_to_target_table,
    headline,
    per_class_aulc_table,
    per_class_round_table,
    round_differences,
)
from alges_dist.report.effort import (
    EFFORT_X,
    effort_table,
    measured_rows,
    round_corrections,
    with_effort,
)
from alges_dist.report.figures import (
    plot_effort_curves,
    plot_learning_curves,
    plot_per_class_curves,
)
from alges_dist.report.forecast import MIN_POINTS, MIN_R2, forecast_table
from alges_dist.report.statistics import (
    MAX_EXACT_SIGN_FLIPS,
    MIN_SEEDS_FOR_INTERVAL,
    aulc,
)
from alges_dist.report.tables import (
    html_table,
    img_tag,
    markdown_table,
    write_csv,
    write_table,
)
from alges_dist.run_folder import RunLayout, read_results

log = logging.getLogger(__name__)

__all__ = ["aulc", "aulc_table", "common_rounds", "format_results", "markdown_table", "plot_learning_curves",
           "round_table", "write_report"]
#: Targets as fractions of the full-data reference's Dice (``alges report --target-fractions``).
TARGET_FRACTIONS = (0.9, 0.95)


# ---- tables ------------------------------------------------------------------------------------------
def round_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (strategy, round): labeled frames and each metric's mean and std over seeds."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["strategy"], r["round"]].append(r)
    out = []
    for (strategy, rnd), members in sorted(groups.items(), key=lambda kv: (_order(rows, kv[0][0]), kv[0][1])):
        row: dict[str, Any] = {"strategy": strategy, "round": rnd,
                               "n_labeled": int(np.mean([m["n_labeled"] for m in members])),
                               "n_seeds": len(members)}
        for metric in METRICS:
            if any(m[metric] is None for m in members):  # not evaluated: no test frame has a mask
                row[f"{metric}_mean"] = row[f"{metric}_std"] = None
                continue
            values = np.array([m[metric] for m in members], dtype=np.float64)
            row[f"{metric}_mean"] = float(values.mean())
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out.append(row)
    return out


def _order(rows: Sequence[dict[str, Any]], strategy: str) -> int:
    """Strategies in the order they first appear (the config's order)."""
    seen = list(dict.fromkeys(r["strategy"] for r in rows))
    return seen.index(strategy)


def format_results(results_csv: Path) -> str:
    """The per-round table (mean +- std over seeds) as Markdown, for the terminal."""
    rows = read_results(results_csv)
    if not rows:
        return f"{results_csv}: no completed rounds yet"
    def cell(r: dict[str, Any], metric: str) -> str:
        mean = r[f"{metric}_mean"]
        return "not evaluated" if mean is None else f"{mean:.4f} ± {r[f'{metric}_std']:.4f}"

    return markdown_table([
        {"strategy": r["strategy"], "round": r["round"], "labeled": r["n_labeled"], "seeds": r["n_seeds"],
         "dice": cell(r, "dice"), "miou": cell(r, "miou")}
        for r in round_table(rows)
    ])


# ---- the report --------------------------------------------------------------------------------------
def per_video_counts(run: Path, queries: Any, strategies: Sequence[str], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Frames picked per (strategy, video), summed over seeds and rounds."""
    import pyarrow.compute as pc

    from alges_dist.data.manifest import read_manifest

    layout = RunLayout(run)
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for strategy in strategies:
        picked = queries.filter(pc.equal(queries["strategy"], strategy))
        if picked.num_rows == 0:
            continue
        video = {}
        for seed in seeds:
            path = layout.manifest_path(strategy, seed)
            if path.exists():
                table = read_manifest(path).table
                video.update(zip(table["frame_id"].to_pylist(), table["video_id"].to_pylist()))
        for frame_id in picked["frame_id"].to_pylist():
            counts[strategy, video.get(frame_id, "?")] += 1
    return [{"strategy": s, "video_id": v, "n_selected": n} for (s, v), n in sorted(counts.items())]


def last_batches(run: Path, cfg: Any, queries: Any, out_dir: Path, *,
                 predict: Callable[..., list[np.ndarray]] = predict_masks) -> list[tuple[str, Path]]:
    """Per strategy (first seed): the last query batch, overlaid with the masks predicted by
    the model that picked it."""
    import pyarrow.compute as pc

    from alges_dist.data.manifest import read_manifest

    layout = RunLayout(run)
    seed = cfg.loop.seeds[0]
    sheets = []
    for strategy in cfg.loop.arms:
        mine = queries.filter(pc.and_(pc.equal(queries["strategy"], strategy), pc.equal(queries["seed"], seed)))
        if mine.num_rows == 0:
            continue
        last = max(mine["round"].to_pylist())
        batch = mine.filter(pc.equal(mine["round"], last)).sort_by("pick_rank")
        picks = batch["frame_id"].to_pylist()
        table = read_manifest(layout.manifest_path(strategy, seed)).table
        uri = dict(zip(table["frame_id"].to_pylist(), table["image_uri"].to_pylist()))
        model_path = layout.model_dir(strategy, seed, last) / "model.pt"
        thumb = 128
        masks = predict(model_path, cfg, [uri[f] for f in picks], (thumb, thumb)) if model_path.exists() else None
        out = contact_sheet([uri[f] for f in picks], picks, out_dir / f"last_batch_{strategy}.png", thumb_px=thumb,
                            masks=masks)
        sheets.append((f"{strategy}, seed {seed}, round {last} ({len(picks)} frames"
                       f"{', predicted masks' if masks is not None else ''})", out))
    return sheets


def correction_table(run: Path, strategies: Sequence[str], seeds: Sequence[int], n_rounds: int) -> list[dict[str, Any]]:
    """Per (strategy, seed, round) whose labels people corrected from the model's masks: frames,
    share of pixels changed and the annotation time the tool reported (record.json's ``correction``)."""
    import json

    layout, rows = RunLayout(run), []
    for strategy in strategies:
        for seed in seeds:
            for r in range(n_rounds + 1):
                path = layout.record_path(strategy, seed, r)
                c = json.loads(path.read_text()).get("correction") if path.exists() else None
                if c:
                    seconds = c["annotation_seconds"]
                    rows.append({"strategy": strategy, "seed": seed, "round": r, "frames": c["n_frames"],
                                 "pixels_changed": c["pixels_changed"], "pct_changed": 100 * c["fraction_changed"],
                                 "regions_changed": float("nan") if c.get("regions_changed") is None
                                 else c["regions_changed"],
                                 "annotation_s": float("nan") if seconds is None else seconds,
                                 "s_per_frame": float("nan") if seconds is None else seconds / c["n_frames_timed"]})
    return rows


def _mean_by(rows: Sequence[dict[str, Any]], key: str, value: str) -> dict[Any, float]:
    groups: dict[Any, list[float]] = defaultdict(list)
    for r in rows:
        groups[r[key]].append(r[value])
    return {k: float(np.mean(v)) for k, v in groups.items()}


def _method_note(rows: Sequence[dict[str, Any]], baseline: str | None) -> str:
    """How the paired statistics were made, and what this run's number of seeds allows."""
    n = len({r["seed"] for r in rows})
    note = (f"Paired by seed: every strategy of a seed starts from the same initial labeled set and weights, so "
            f"each seed gives one difference to the baseline ({html.escape(baseline or 'none in this run')}). "
            "95% CI: percentile bootstrap over seeds (10,000 resamples, numpy default_rng(0)); it never reaches "
            "beyond the range of the seeds' differences, so with few seeds it is too narrow. p: two-sided "
            f"sign-flip permutation test of the mean difference, exact (all 2^n sign patterns enumerated) up to "
            f"{MAX_EXACT_SIGN_FLIPS} seeds, Monte Carlo beyond. ")
    if n < MIN_SEEDS_FOR_INTERVAL:
        note += f"<b>This run has {n} seed{'s' if n != 1 else ''}: no interval can be given (3 or more are needed).</b> "
    if n <= MAX_EXACT_SIGN_FLIPS:
        smallest = 2 / 2**n
        note += f"With {n} seeds the exact test cannot give p below {smallest:.3g}"
        note += (f", so no difference can reach p &lt; {SIGNIFICANCE_LEVEL} (no ★ is possible)." if smallest >= SIGNIFICANCE_LEVEL
                 else ".")
    return f"<p>{note}</p>"


NOT_EVALUATED = ("Not evaluated: no test frame of this run has a mask, so there is no learning curve, AULC or "
                 "frames-to-target. The rounds trained and selected as usual. To measure the model, ingest with test "
                 "videos held out (e.g. `alges ingest video --fractions 0.8,0,0.2`): a run with people annotating "
                 "then hands off loop.test_frames of them with the first batch.")


def _unevaluated_report(run: Path, cfg: Any, table: list[dict[str, Any]], out: Path, *,
                        predict: Callable[..., list[np.ndarray]] = predict_masks) -> Path:
    """The report of a run without test masks: what was labeled and picked, and why there are no curves."""
    import pyarrow.parquet as pq

    for stale in ("aulc.csv", "frames_to_target.csv", "learning_curves.png", "round_differences.csv"):
        (out / stale).unlink(missing_ok=True)  # from an earlier report of this folder, if any
    atomic_write_text(out / "headline.md", NOT_EVALUATED + "\n")
    atomic_write_text(out / "aulc.md", NOT_EVALUATED + "\n")
    queries = pq.read_table(run / "queries.parquet") if (run / "queries.parquet").exists() else None
    videos = per_video_counts(run, queries, cfg.loop.arms, cfg.loop.seeds) if queries is not None else []
    write_table(videos, out, "per_video")
    sheets = last_batches(run, cfg, queries, out, predict=predict) if queries is not None else []
    counts = [{k: r[k] for k in ("strategy", "round", "n_labeled", "n_seeds")} for r in table]
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>alges report</title></head><body>",
             f"<h1>Active-learning report: {html.escape(run.name)}</h1>", f"<p><b>{html.escape(NOT_EVALUATED)}</b></p>",
             "<h2>Labeled frames per round</h2>" + html_table(counts),
             "<h2>Frames picked per video (all seeds and rounds)</h2>" + html_table(videos)]
    parts += [f"<h3>{html.escape(title)}</h3>{img_tag(path)}" for title, path in sheets]
    effort = correction_table(run, cfg.loop.arms, cfg.loop.seeds, cfg.loop.n_rounds)
    if effort:
        write_csv(effort, out / "correction.csv")
        parts.append("<h2>Correction effort</h2>" + html_table(effort))
    atomic_write_text(out / "report.html", "\n".join([*parts, "</body></html>"]))
    return out / "report.html"


def _effort_section(run: Path, rows: list[dict[str, Any]], metric: str, compared: list[str], baseline: str | None,
                    ref_by_seed: dict[int, float], fractions: Sequence[float], out: Path) -> tuple[list[str], list[str]]:
    """effort.csv, effort_to_target.csv / .md and effort_curves.png; the html parts and the
    headline's effort sentences (none when no round of the run measured its correction effort)."""
    corrections = round_corrections(run, rows)
    for stale in ("effort.csv", "effort_to_target.csv", "effort_to_target.md", "effort_curves.png"):
        (out / stale).unlink(missing_ok=True)  # from an earlier report of this folder, if any
    if not corrections:
        return ["<h2>Annotation effort</h2><p>No round of this run measured its correction effort (no "
                "correction.csv: rounds labeled before it was recorded, or masks imported without "
                "pre-annotations).</p>"], []
    rows = with_effort(rows, corrections)
    measured = measured_rows(rows)
    table = effort_table(rows, metric)
    write_csv(table, out / "effort.csv")
    plot_effort_curves(table, out / "effort_curves.png", metric,
                       reference=float(np.mean(list(ref_by_seed.values()))) if ref_by_seed else None)
    effort = [f for b in compared for f in frames_to_target_table(measured, metric, b, ref_by_seed, fractions,
                                                                   x=EFFORT_X, unit="pixels")]
    write_table(effort, out, "effort_to_target")
    sentences = headline([f for f in effort if f["baseline"] == baseline], baseline, unit="pixels") if baseline else []
    label = html.escape(METRIC_LABELS.get(metric, metric))
    parts = [
        "<h2>Annotation effort</h2><p>What an annotator changes in the picking model's masks (its pre-annotation) "
        "to make each picked frame's label: pixels whose class differs, and regions = connected areas of them "
        "(8-neighbourhood), a proxy for clicks: one stroke or polygon per wrong area, whatever its size. The "
        "simulated oracle measures them against the pool's masks, people's imports against what they were shown. "
        "Round r's effort is that of the picks labeled after round r; the initial set (no model's masks, alike "
        "for every arm) is not counted. Mean and std over seeds.</p>" + html_table(table),
        f"<h3>Effort curve</h3>{img_tag(out / 'effort_curves.png')}",
        f"<h3>Corrected pixels to target ({label})</h3><p>As frames to target, on each seed's curve of {label} "
        "against the cumulative corrected pixels: pixels_mean to reach the target, saved = 1 - mean pixels / "
        "the baseline's, paired by seed (bootstrap interval, sign-flip p).</p>" + html_table(effort)]
    return parts, sentences


def _forecast_section(rows: list[dict[str, Any]], metric: str, budget: int, target: float | None,
                      ref_by_seed: dict[int, float], out: Path) -> list[str]:
    """forecast.csv and its html part: the "when to stop" answer, an extrapolation."""
    reference = float(np.mean(list(ref_by_seed.values()))) if ref_by_seed else None  # the default target
    target = target if target is not None else reference
    table = forecast_table(rows, target, budget, metric)
    write_csv(table, out / "forecast.csv")
    source = ("--target-dice" if target is not None and target != reference else
              "the full-data reference's mean" if target is not None else "none")
    return ["<h2>Forecast: when to stop (an extrapolation)</h2><p><b>A forecast, not a measurement:</b> each "
            "seed's curve is fitted with an inverse power law Dice = a - b·n<sup>-c</sup> (a saturating learning "
            "curve: a its ceiling) and extrapolated, unlike frames-to-target, which never goes beyond the measured "
            f"rounds. frames_forecast: frames to reach the target ({html.escape(source)}), mean over seeds; "
            "dice_next_round: the fitted Dice after one more round of loop.budget frames; low/high: 95% band of a "
            "bootstrap over seeds and fit residuals. Refused, with the reason in note, below "
            f"{MIN_POINTS} rounds, for a flat curve or a fit with R² below {MIN_R2}, or a target at or above the "
            "fitted asymptote.</p>" + html_table(table)]


def write_report(run: Path, metric: str = "dice", baselines: Sequence[str] = (),
                 target_fractions: Sequence[float] = TARGET_FRACTIONS, target_dice: float | None = None, *,
                 predict: Callable[..., list[np.ndarray]] = predict_masks) -> Path:
    """Build ``RUN/report/`` from the run folder alone; returns the report.html path.

    baselines: strategies to compare with besides random (``alges report --baseline``);
    target_fractions: frames-to-target at these fractions of the full-data reference;
    target_dice: the forecast's target (``--target-dice``; default: the full-data reference's).
    predict: :func:`alges_dist.predictions.predict_masks` or a stand-in with its signature (``alges
    run`` runs it on a warm Ray worker: the driver never imports torch, issue 24).
    """
    import pyarrow.parquet as pq

    from alges_dist.config import load_config

    run = Path(run)
    layout = RunLayout(run)
    for needed in ("config.yaml", "results.csv"):
        if not (run / needed).is_file():
            raise FileNotFoundError(f"{run} is not a run folder: {needed} is missing (run `alges run` first)")
    cfg = load_config(run / "config.yaml")
    rows = read_results(run / "results.csv")
    if not rows:
        raise InputError(f"{run / 'results.csv'} has no completed rounds yet")
    compared = check_baselines(rows, baselines)
    baseline = compared[0] if compared else None
    out = run / "report"
    out.mkdir(exist_ok=True)
    table = round_table(rows)
    near_pick_column(table, run, cfg)  # picks near another pick or label of their video (issue 11)
    write_table(table, out, "rounds")
    if all(r[metric] is None for r in rows):
        return _unevaluated_report(run, cfg, table, out, predict=predict)
    areas = aulc_table(rows, metric, compared)
    write_table(areas, out, "aulc")

    reference = read_results(layout.reference_results_path) if layout.reference_results_path.exists() else []
    ref_by_seed = {r["seed"]: r[metric] for r in reference}
    differences = [d for m in METRICS for d in round_differences(rows, m, baseline)] if baseline else []
    write_csv(differences, out / "round_differences.csv")
    frames = [f for b in compared for f in frames_to_target_table(rows, metric, b, ref_by_seed, target_fractions)]
    write_table(frames, out, "frames_to_target")
    sentences = headline([f for f in frames if f["baseline"] == baseline], baseline) if baseline else [
        "No comparison: the run has neither random nor a --baseline strategy."]
    effort_parts, effort_sentences = _effort_section(run, rows, metric, compared, baseline, ref_by_seed,
                                                     target_fractions, out)
    sentences += effort_sentences
    forecast_parts = _forecast_section(rows, metric, cfg.loop.budget, target_dice, ref_by_seed, out)
    atomic_write_text(out / "headline.md", "\n\n".join(sentences) + "\n")
    plot_learning_curves(
        table, out / "learning_curves.png", baseline=baseline,
        significant={m: {(d["strategy"], d["round"]) for d in differences if d["metric"] == m and d["significant"]}
                     for m in METRICS},
        reference={m: (float(np.mean([r[m] for r in reference])), reference[0]["n_labeled"]) for m in METRICS}
        if reference else None)

    per_class_parts = ["<h2>Per class</h2><p>No per-class results in this run folder (its rounds were "
                       "evaluated before Dice per class was recorded).</p>"]
    if layout.results_per_class_path.exists():
        per_class = read_results(layout.results_per_class_path)
        class_table = per_class_round_table(per_class)
        write_csv(class_table, out / "per_class_rounds.csv")
        class_areas = per_class_aulc_table(per_class, compared)
        write_table(class_areas, out, "per_class_aulc")
        class_ref = (_mean_by(read_results(layout.reference_per_class_path), "class_id", "dice")
                     if layout.reference_per_class_path.exists() else None)
        plot_per_class_curves(class_table, out / "per_class_curves.png", reference=class_ref)
        per_class_parts = [
            "<h2>Per class</h2><p>The paper's Dice of each class on the test split (a class absent from an "
            "image's prediction and mask counts 1 there), mean ± std over seeds"
            f"{'; dashed: the full-data reference' if class_ref else ''}.</p>"
            + img_tag(out / "per_class_curves.png"),
            "<h3>Area under each class's Dice curve</h3>" + html_table(class_areas)]

    queries = pq.read_table(run / "queries.parquet") if (run / "queries.parquet").exists() else None
    videos = per_video_counts(run, queries, cfg.loop.arms, cfg.loop.seeds) if queries is not None else []
    write_table(videos, out, "per_video")
    sheets = last_batches(run, cfg, queries, out, predict=predict) if queries is not None else []

    settings = {
        "pool": cfg.data.pool, "model": f"{cfg.model.arch}-{cfg.model.encoder}",
        "image size": "x".join(map(str, cfg.data.image_size)), "epochs": cfg.train.epochs,
        "initial labeled": cfg.loop.initial_labeled, "budget per round": cfg.loop.budget,
        "rounds": cfg.loop.n_rounds, "seeds": ", ".join(map(str, cfg.loop.seeds)),
    }
    label = html.escape(METRIC_LABELS.get(metric, metric))
    reference_note = (f"Full-data reference: {len(reference)} seed{'s' if len(reference) != 1 else ''}, "
                      f"{reference[0]['n_labeled']} labeled frames, mean test {label} "
                      f"{np.mean(list(ref_by_seed.values())):.4f} (dashed line)." if reference else
                      "No full-data reference in this run (set loop.full_data_reference: true): no fraction targets.")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>alges report</title><style>"
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "th{background:#f2f2f2}</style></head><body>",
        f"<h1>Active-learning report: {html.escape(run.name)}</h1>",
        html_table([{"setting": k, "value": v} for k, v in settings.items()]),
        "<h2>Headline: how many annotations does it save?</h2>"
        + "".join(f"<p><b>{html.escape(t)}</b></p>" for t in sentences),
        f"<h2>Learning curves</h2>{img_tag(out / 'learning_curves.png')}<p>{html.escape(reference_note)}</p>",
        f"<h2>Area under the learning curve ({label})</h2>"
        "<p>Trapezoid area over labeled frames divided by their span (the metric averaged over the budget), "
        "mean and std over seeds; vs_B is the mean over seeds of the paired difference to baseline B, with its "
        "95% interval (ci95_low, ci95_high; empty below 3 seeds) and p-value.</p>"
        + _method_note(rows, baseline) + html_table(areas),
        f"<h2>Frames to target ({label})</h2><p>Labeled frames each strategy needs to reach the target, per seed "
        "on its own curve, interpolated linearly between rounds and never beyond its last round (n_not_reached: "
        "seeds that end below the target within within_frames; then no mean is given). saved = 1 - mean "
        "frames / the baseline's mean frames, with a paired bootstrap interval; p: sign-flip test of the paired "
        "frame differences.</p>" + html_table(frames),
        f"<h2>Paired difference to {html.escape(baseline or 'a baseline')} at each round</h2>"
        f"<p>★ on the curves: p &lt; {SIGNIFICANCE_LEVEL}, uncorrected for the number of rounds "
        "(both metrics in round_differences.csv).</p>" + html_table([d for d in differences if d["metric"] == metric]),
        *effort_parts,
        *forecast_parts,
        *per_class_parts,
        "<h2>Per round (mean and std over seeds)</h2>" + html_table(table),
        "<h2>Frames picked per video (all seeds and rounds)</h2>" + html_table(videos),
    ]
    if sheets:
        parts.append("<h2>Last query batch</h2>")
        parts += [f"<h3>{html.escape(title)}</h3>{img_tag(path)}" for title, path in sheets]
    effort = correction_table(run, cfg.loop.arms, cfg.loop.seeds, cfg.loop.n_rounds)
    if effort:
        write_csv(effort, out / "correction.csv")
        parts.append("<h2>Correction effort per run and round</h2><p>Pixels (and connected regions of them) "
                     "changed from the model's pre-annotations, and the annotation time the tool reported (blank: "
                     "not reported; the simulated oracle reports none).</p>" + html_table(effort))
    parts.append("</body></html>")
    atomic_write_text(out / "report.html", "\n".join(parts))
    log.info("report: %s", out / "report.html")
    return out / "report.html"
