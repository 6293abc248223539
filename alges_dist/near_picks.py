"""Temporal redundancy of query batches (issue 11, item 4).

Consecutive frames of surgical video are near-duplicates, and uncertainty strategies
pick runs of them. This module counts, per (strategy, round), the picks that lie
closer than ``within_s`` seconds to another pick of the same batch or to an already
labeled frame of the same video: the report's per-round table shows it, so a strategy
that wastes annotation on neighbours is visible, and ``selection.min_gap_s`` should
bring it to zero.

Times come from the frames' ``#t=`` URIs: in the run's manifests, and for labeled
frames (whose rows point at exported PNGs) from the ``sources.csv`` written beside
those PNGs. Image rows have no time and are never counted.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from alges_dist.data.video import parse_video_uri
from alges_dist.data.video_export import SOURCES_CSV, read_sources
from alges_dist.errors import InputError
from alges_dist.run_folder import RunLayout

__all__ = ["DEFAULT_NEAR_SECONDS", "count_near_picks", "frame_times", "near_pick_counts", "near_pick_column"]

#: Seconds used by the report when ``selection.min_gap_s`` is not set.
DEFAULT_NEAR_SECONDS = 5.0


def count_near_picks(picks: Sequence[str], labeled: Iterable[str], times: Mapping[str, tuple[str, float]], *,
                     within_s: float) -> int | None:
    """How many ``picks`` lie closer than ``within_s`` seconds (``|dt| < within_s``) to another
    pick or to a ``labeled`` frame of the same video.

    ``times``: frame_id -> (video_id, seconds); frames missing from it (image rows) are
    skipped. Returns None when no pick has a time (nothing to measure).
    """
    if within_s < 0:
        raise InputError(f"within_s must be >= 0, got {within_s}")
    timed = [f for f in picks if f in times]
    if not timed:
        return None
    by_video: dict[str, list[float]] = defaultdict(list)
    for frame_id in [*timed, *(f for f in set(labeled) - set(timed) if f in times)]:
        video, seconds = times[frame_id]
        by_video[video].append(seconds)
    for values in by_video.values():
        values.sort()
    near = 0
    for frame_id in timed:
        video, t = times[frame_id]
        values = by_video[video]
        # others strictly inside (t - within_s, t + within_s); the pick itself is one of them
        inside = bisect.bisect_left(values, t + within_s) - bisect.bisect_right(values, t - within_s)
        near += inside > 1
    return near


def _rows_of_interest(path: Path, picked: Sequence[str]) -> Any:
    """frame_id, video_id, image_uri, labeled_round of the labeled rows and the picked rows of a
    manifest, filtered while reading: never the pool's other rows (archive manifests are big)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    wanted = pc.field("frame_id").isin(pa.array(list(picked), pa.string())) | pc.field("labeled_round").is_valid()
    return pads.dataset(str(path), format="parquet").to_table(
        columns=["frame_id", "video_id", "image_uri", "labeled_round"], filter=wanted)


def frame_times(run: Path, rows: Any) -> dict[str, tuple[str, float]]:
    """frame_id -> (video_id, seconds) of the video frames among ``rows`` (from their ``#t=`` URIs,
    or for frames already written as PNG from the ``sources.csv`` beside them)."""
    video_of: dict[str, str] = {}
    times: dict[str, tuple[str, float]] = {}
    for frame_id, video, uri in zip(rows["frame_id"].to_pylist(), rows["video_id"].to_pylist(),
                                    rows["image_uri"].to_pylist()):
        video_of[frame_id] = video
        target = parse_video_uri(uri)
        if target is not None:
            times[frame_id] = (video, float(target[1]))
    for sources in Path(run).rglob(SOURCES_CSV):  # labeled frames point at PNGs; their source says when
        for row in read_sources(sources.parent):
            target = parse_video_uri(row["source_uri"])
            if target is not None and row["frame_id"] in video_of:
                times[row["frame_id"]] = (video_of[row["frame_id"]], float(target[1]))
    return times


def near_pick_counts(run: Path, queries: Any, strategies: Sequence[str], seeds: Sequence[int], *,
                     within_s: float) -> dict[tuple[str, int], float]:
    """Mean over seeds of :func:`count_near_picks` per (strategy, round) of ``queries``
    (RUN/queries.parquet); labeled = frames labeled up to that round in the run's manifest."""
    layout = RunLayout(run)
    rows = queries.select(["strategy", "seed", "round", "frame_id"]).to_pylist() if queries is not None else []
    picks: dict[tuple[str, int, int], list[str]] = defaultdict(list)
    for row in rows:
        picks[row["strategy"], row["seed"], row["round"]].append(row["frame_id"])
    counts: dict[tuple[str, int], list[int]] = defaultdict(list)
    for strategy in strategies:
        for seed in seeds:
            path = layout.manifest_path(strategy, seed)
            batches = {r: batch for (s, sd, r), batch in picks.items() if (s, sd) == (strategy, seed)}
            if not batches or not path.is_file():
                continue
            table = _rows_of_interest(path, [f for batch in batches.values() for f in batch])
            times = frame_times(run, table)
            rounds = dict(zip(table["frame_id"].to_pylist(), table["labeled_round"].to_pylist()))
            for r, batch in batches.items():
                labeled = [f for f, lr in rounds.items() if lr is not None and lr <= r]
                n = count_near_picks(batch, labeled, times, within_s=within_s)
                if n is not None:
                    counts[strategy, r].append(n)
    return {key: sum(values) / len(values) for key, values in counts.items()}


def near_pick_column(table: list[dict[str, Any]], run: Path, cfg: Any) -> str:
    """Add the per-round column to the report's round table (in place); returns its name.

    Seconds: ``selection.min_gap_s`` when the config has it set (the column then checks
    the gap), else :data:`DEFAULT_NEAR_SECONDS`. Rounds without picks (the last) get NaN.
    """
    import pyarrow.parquet as pq

    path = RunLayout(run).queries_path
    queries = pq.read_table(path) if path.is_file() else None
    within_s = float(getattr(cfg.selection, "min_gap_s", None) or DEFAULT_NEAR_SECONDS)
    name = f"picks_within_{within_s:g}s"
    counts = near_pick_counts(run, queries, cfg.loop.arms, cfg.loop.seeds, within_s=within_s)
    for row in table:
        row[name] = counts.get((row["strategy"], row["round"]), math.nan)
    return name
