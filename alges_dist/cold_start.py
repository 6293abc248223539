"""Cold start: the first batch and the test frames, picked before any label exists.

A team's archive starts with videos and no masks. Before the first model can be trained
someone must annotate a first batch, and before a learning curve can be drawn someone must
annotate test frames. This module picks both without a model (the loop runs these
functions on a Ray worker; they read and write files only):

- ``random``: uniform over the pool (seeded): what the simulated oracle always did, kept
  as its default so past experiments stay comparable (``min_gap_s`` does not apply to it);
- ``spread``: every pool video gets its share of the budget (in proportion to its frames,
  at least one each while the budget allows), frames evenly spaced in time within a video,
  ``selection.min_gap_s`` kept: the default with people in the loop;
- ``kcenter``: k-center greedy on the pooled encoder feature of the model at its initial
  weights, scored by the Ray Data scoring job like every round. Why that embedding: it
  needs no labels, the scorer already emits it (the ``coreset`` column), and with
  ``model.encoder_weights: imagenet`` it is the ImageNet feature of each frame, which groups
  scenes by appearance; from random initial weights (no hub access) it still reflects colour
  and texture statistics, and it is the same embedding the first model starts from.

Test frames (``loop.test_frames``) are always ``spread`` over the test videos, among test
rows without a mask: evaluation needs frames from every test video, not the most unusual ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alges_dist.data.atomic import atomic_path
from alges_dist.data.manifest import (
    filter_manifest,
    mark_labeled,
    read_manifest,
    set_uris,
    video_times,
    write_manifest,
)
from alges_dist.data.rounds import video_frames_as_files
from alges_dist.errors import InputError

SELECTION_COLUMNS = ("pick_rank", "frame_id", "value", "split")


# ---- the spread rule (pure) -----------------------------------------------------------------------
def spread(groups: np.ndarray, keys: np.ndarray, budget: int, *, timed: np.ndarray | None = None,
           gap_s: float = 0.0, allow_short: bool = False) -> np.ndarray:
    """``budget`` row indices spread over groups (videos) and evenly over ``keys`` (time) in each.

    Seats go one per video first (largest videos first while the budget lasts), then each
    next seat to the video with the most frames per seat (D'Hondt), so shares follow the
    videos' lengths. A video's q frames are the rows nearest to q evenly spaced times over
    its span, at least ``gap_s`` apart where ``timed`` (image rows have no time: no gap).
    A video that cannot take one more frame under the gap gives its seat to the next.
    Raises ValueError naming ``selection.min_gap_s`` when the pool cannot fill the budget,
    unless ``allow_short``. Returns indices ordered by video, then time.
    """
    groups, keys = np.asarray(groups), np.asarray(keys, np.float64)
    timed = np.ones(groups.shape[0], bool) if timed is None else np.asarray(timed, bool)
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    order = np.lexsort((keys, groups))
    _, starts, counts = np.unique(groups[order], return_index=True, return_counts=True)
    rows = [order[s:s + c] for s, c in zip(starts, counts)]
    picks: list[np.ndarray] = [np.empty(0, np.int64)] * len(rows)
    full = np.zeros(len(rows), bool)

    def seat(v: int) -> bool:  # one more frame for video v, re-spread; False when it cannot take one
        gap = gap_s if timed[rows[v][0]] else 0.0
        got = _evenly(keys[rows[v]], picks[v].size + 1, gap)
        if got.size <= picks[v].size:
            full[v] = True
            return False
        picks[v] = rows[v][got]
        return True

    taken = 0
    for v in sorted(range(len(rows)), key=lambda v: (-counts[v], v)):  # one each, largest videos first
        if taken == budget:
            break
        taken += seat(v)
    while taken < budget and not full.all():
        sizes = np.array([p.size for p in picks], np.float64)
        v = int(np.argmax(np.where(full, -1.0, counts / (sizes + 1))))
        taken += seat(v)
    if taken < budget and not allow_short:
        raise InputError(f"only {taken} frames can be picked with selection.min_gap_s={gap_s:g} ({budget - taken} "
                         "short of the budget); lower min_gap_s or the budget")
    return np.concatenate(picks).astype(np.int64) if picks else np.empty(0, np.int64)


def _evenly(keys: np.ndarray, q: int, gap_s: float) -> np.ndarray:
    """Positions (into sorted ``keys``) of q rows nearest to q evenly spaced targets, ``gap_s`` apart."""
    lo, hi = keys[0], keys[-1]
    targets = lo + (np.arange(q) + 0.5) * (hi - lo) / q
    chosen: list[int] = []
    for t in targets:
        for i in np.argsort(np.abs(keys - t), kind="stable"):
            if i not in chosen and all(abs(keys[i] - keys[j]) >= gap_s for j in chosen):
                chosen.append(int(i))
                break
    return np.sort(np.asarray(chosen, np.int64))


# ---- the first batch (files in, files out; run on a worker) ----------------------------------------
def plan_first_batch(config: dict[str, Any], pool: str, out: str, *, rule: str, seed: int,
                     scores_dir: str | None = None, people: bool) -> dict[str, Any]:
    """Write the first batch's picks to ``out`` (``pick_rank, frame_id, value, split``).

    Pool picks (``loop.initial_labeled`` by ``rule``) only when the pool has no labeled frame;
    test picks (``loop.test_frames``, spread) only when ``people`` annotate and test rows lack
    masks. Either may be empty. Returns the counts.
    """
    from alges_dist.config import Config

    cfg = Config.model_validate(config)
    table, _ = read_manifest(pool)
    candidates = filter_manifest(table, split="pool", labeled=False)
    n_labeled = filter_manifest(table, split="pool", labeled=True).num_rows
    ids, values = [], []
    if n_labeled == 0:
        ids, values = _pool_picks(cfg, pool, candidates, rule, seed, scores_dir)
    tests: list[str] = []
    if people:
        test = filter_manifest(table, split="test")
        test = test.filter(pc.is_null(test["mask_uri"]))
        if test.num_rows and cfg.loop.test_frames:
            groups, keys, timed = video_times(test)
            chosen = spread(groups, keys, min(cfg.loop.test_frames, test.num_rows), timed=timed,
                            gap_s=cfg.selection.min_gap_s, allow_short=True)
            tests = test["frame_id"].take(pa.array(chosen)).to_pylist()
    frame_ids = [*ids, *tests]
    picks = pa.table({
        "pick_rank": pa.array(np.arange(len(frame_ids)), pa.int32()),
        "frame_id": pa.array(frame_ids, pa.string()),
        "value": pa.array([*values, *[float("nan")] * len(tests)], pa.float32()),
        "split": pa.array(["pool"] * len(ids) + ["test"] * len(tests), pa.string()),
    })
    with atomic_path(Path(out)) as tmp:
        pq.write_table(picks, tmp)
    return {"rule": rule if ids else None, "n_picks": len(ids), "n_test": len(tests), "n_labeled_in_pool": n_labeled}


def _pool_picks(cfg: Any, pool: str, candidates: pa.Table, rule: str, seed: int,
                scores_dir: str | None) -> tuple[list[str], list[float]]:
    n = cfg.loop.initial_labeled
    if rule == "kcenter":
        from alges_dist.distributed.selection_task import pick_batch

        config = cfg.model_dump(mode="json")
        config["loop"]["budget"] = n  # the first batch's size, with the selection's own settings
        picked = pick_batch(config, "coreset", pool, scores_dir, seed=seed, pool=pool)
        return picked["frame_id"], picked["value"]
    if rule == "spread":
        groups, keys, timed = video_times(candidates)
        chosen = spread(groups, keys, n, timed=timed, gap_s=cfg.selection.min_gap_s)
    elif rule == "random":
        chosen = random_draw(candidates.num_rows, n, seed)
    else:
        raise ValueError(f"unknown loop.initial_strategy {rule!r}; valid: random, spread, kcenter")
    return candidates["frame_id"].take(pa.array(chosen)).to_pylist(), [float("nan")] * len(chosen)


def random_draw(n_candidates: int, n: int, seed: int) -> np.ndarray:
    """Exactly the initial draw experiments always had (``min_gap_s`` never applied to it)."""
    from alges_dist.selection import random

    return random(None, np.zeros(n_candidates, bool), n, seed=seed).indices


def draw_initial_set(pool: str, out: str, n: int, seed: int, *, max_pixels: int | None = None) -> int:
    """The simulated oracle's default first batch in one call (benchmarks, test fixtures): ``n``
    random pool frames labeled from their masks, unless the pool has labeled frames already."""
    table, _ = read_manifest(pool)
    candidates = filter_manifest(table, split="pool", labeled=False)
    picks = []
    if filter_manifest(table, split="pool", labeled=True).num_rows == 0:
        picks = candidates["frame_id"].take(pa.array(random_draw(candidates.num_rows, n, seed))).to_pylist()
    return write_initial_manifest(pool, out, picks, max_pixels=max_pixels)


def write_initial_manifest(pool: str, out: str, picks: list[str], *, mask_uris: dict[str, str] | None = None,
                           image_uris: dict[str, str] | None = None, max_pixels: int | None = None) -> int:
    """The experiment's initial manifest: the pool with ``picks`` labeled in round 0 (people's
    masks and frame files where given; the pool's own masks otherwise) and, through
    ``mask_uris``, the annotated test frames. Labeled and evaluated video frames become PNG
    files beside it (``frames/``). Written atomically: its existence marks the first batch
    done. Returns the labeled count."""
    table, encoding = read_manifest(pool)
    if mask_uris:
        table = set_uris(table, "mask_uri", mask_uris)
    if image_uris:
        table = set_uris(table, "image_uri", image_uris)
    table = mark_labeled(table, picks, 0)
    used = pc.and_(pc.or_(pc.is_valid(table["labeled_round"]), pc.not_equal(table["split"], "pool")),
                   pc.is_valid(table["mask_uri"]))
    table = video_frames_as_files(table, table.filter(used)["frame_id"].to_pylist(), Path(out).parent,
                                  max_pixels=max_pixels)
    missing = filter_manifest(table, split="pool", labeled=True)
    missing = missing.filter(pc.is_null(missing["mask_uri"]))["frame_id"].to_pylist()
    if missing:
        raise InputError(f"{len(missing)} frames of the first batch have no mask: {missing[:5]}")
    write_manifest(table, out, encoding)
    return table.num_rows - table["labeled_round"].null_count
