"""The pick rules: per-frame embeddings or scores -> the query batch (DESIGN "Selection").

The pick rules share one signature, ``rule(values, labeled_mask, budget, *, seed, **options)``
(scikit-learn's ``kmeans_plusplus(X, n_clusters, *, random_state)``), and ``PICK_RULES``
names them. k-center greedy takes the farthest row, k-means++ draws proportionally to D^2
(with optional greedy local trials, as scikit-learn); each pick is one pass over the rows.
Their loops are written once, against the ``Pool`` protocol: one device
(``engine.DevicePool``: the loop stays on the device and results move to the
host once) or a pool sharded over Ray actors (``distributed/sharded_selection.ShardedPool``),
with identical picks. ``top_k`` and ``random`` need no distances. Every rule honours a
``TimeGap`` (``selection.min_gap_s``): no two picks of one video closer in time than the gap.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Callable, Iterator, NamedTuple, Protocol

import numpy as np
import torch

from alges_dist.errors import InputError
from alges_dist.selection.engine import (
    DevicePool,
    PoolShard,
    as_rows,
    check_budget,
    check_labeled_mask,
    nonfinite_rows,
    raise_nonfinite,
    resolve_device,
)
from alges_dist.selection.knn import resolve_backend
from alges_dist.selection.storage import (
    StoredRows,
    max_centered_sq_norm,
    resolve_storage_dtype,
    row_sum,
    storage_scale,
    storage_shift,
)
from alges_dist.selection.time_gap import TimeGap

log = logging.getLogger(__name__)


class Selection(NamedTuple):
    """The query batch.

    indices: (B,) int64, pick order, indices into the full pool of N rows.
    radii: (B,) float32, Euclidean distance from the pick to the chosen set (labeled rows
        plus earlier picks) at pick time: the covering-radius curve. inf for a first pick
        made with no labeled rows; NaN for "top-k" and "random".
    n_random_fill: picks made by seeded random fill because every remaining distance was 0.
    backend: "faiss"/"torch" (labeled-set kNN) for distance methods, "" otherwise.
    seconds_prepare, seconds_picks: wall time of validation + storage + labeled kNN, and of
        the greedy loop (for round records and scripts/bench_selection.py).
    """

    indices: np.ndarray
    radii: np.ndarray
    n_random_fill: int = 0
    backend: str = ""
    seconds_prepare: float = 0.0
    seconds_picks: float = 0.0


class Pool(Protocol):
    """What the greedy loops drive: one device (``engine.DevicePool``) or Ray actors
    holding slices (``distributed/sharded_selection.ShardedPool``). Indices and distances are
    device tensors on one device (no host sync per pick) and host numbers when sharded."""

    n: int
    backend: str
    scale: float
    zero_d2: float
    has_labeled: bool

    def start(self, labeled: np.ndarray) -> None: ...
    def vectors(self, budget: int) -> tuple[Any, Any]: ...
    def first_center(self) -> tuple[Any, Any]: ...
    def farthest(self) -> tuple[Any, Any]: ...
    def add(self, i: Any) -> None: ...
    def draw_uniform(self, u: Any) -> Any: ...
    def draw(self, u: Any) -> Any: ...
    def add_best(self, trials: Any) -> tuple[Any, Any]: ...
    def host(self, picks: Any, pick_d2: Any) -> tuple[np.ndarray, np.ndarray, int, bool]: ...


def device_pool(x, *, device="auto", backend: str = "auto", storage_dtype=torch.float32, chunk_size: int = 2048,
                gap: TimeGap | None = None) -> DevicePool:
    """The rows x (N, d) in storage form on one device, ready for selections (``Pool.start``)."""
    rows = as_rows(x)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise InputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    raise_nonfinite(*nonfinite_rows(rows))
    storage_dtype, device = resolve_storage_dtype(storage_dtype), resolve_device(device, rows)
    backend = resolve_backend(backend, device)
    shift = storage_shift(row_sum(rows, chunk_size), rows.shape[0], storage_dtype)
    scale = storage_scale(max_centered_sq_norm(rows, shift, chunk_size) if shift is not None else 0.0,
                          storage_dtype)
    log.info("selection pool: %d rows, dim %d, %s storage (%.1f MB) on %s, labeled kNN: %s",
             rows.shape[0], rows.shape[1], storage_dtype, rows.shape[0] * rows.shape[1] * storage_dtype.itemsize / 1e6,
             device, backend)
    shard = PoolShard(StoredRows(rows, offset=0, device=device, storage_dtype=storage_dtype, shift=shift,
                                 scale=scale, chunk_size=chunk_size))
    return DevicePool(shard, backend, gap)


def _start(x, labeled_mask, budget, options: dict[str, Any]) -> tuple[Pool, np.ndarray, int]:
    """The pool (x itself when it is a Pool), the checked mask and budget, the selection started."""
    if isinstance(x, (np.ndarray, torch.Tensor)):
        pool: Pool = device_pool(x, **options)
    elif options:
        raise InputError(f"options {sorted(options)} are set when the pool is built, not per selection")
    else:
        pool = x
    mask = check_labeled_mask(labeled_mask, pool.n)
    budget = check_budget(budget, int((~mask).sum()))
    pool.start(mask)
    return pool, mask, budget


def finish(picks, pick_d2, scale: float, zero_d2: float, n_fill: int, backend: str,
           seconds: tuple[float, float]) -> Selection:
    """Selection from picks and their squared distances (host arrays, storage units)."""
    pick_d2 = np.where(np.asarray(pick_d2, np.float64) <= zero_d2, 0.0, pick_d2)  # rounding noise is 0
    radii = (np.sqrt(pick_d2) / scale).astype(np.float32)
    return Selection(np.asarray(picks, np.int64), radii, int(n_fill), backend, *seconds)


@contextlib.contextmanager
def _loop_threads(pool: Pool) -> Iterator[None]:
    """One torch thread during a CPU float32/float64 greedy loop on one device, restored after.

    There the pass over the rows is numpy's OpenBLAS (its own threads); torch only runs O(N)
    vector ops, which gain nothing from 2 threads and stall on a core another process holds:
    interleaved on this shared 2-core machine, the median step fell from 1.7x to 1.0x of one
    plain numpy pass (one thread) at 200k x 512.
    """
    shard = getattr(pool, "shard", None)
    if shard is None or shard.device.type != "cpu" or shard.rows.augmented:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _synced_clock(pool: Pool) -> float:
    """perf_counter after the device's queued work (one sync per phase, never per pick)."""
    shard = getattr(pool, "shard", None)
    if shard is not None and shard.device.type == "cuda":
        torch.cuda.synchronize(shard.device)
    return time.perf_counter()


def kcenter_random_fill(picks: np.ndarray, pick_d2: np.ndarray, labeled: np.ndarray, seed: int,
                        zero_d2: float, gap: TimeGap | None = None) -> int:
    """Replace, in place, the k-center picks made after every distance reached 0; returns their count.

    Distances only shrink, so once the farthest remaining row is at distance 0 every later
    pick is too: those picks are a suffix, made here on the host after the loop (no per-pick
    cost) as the remaining rows in a seeded random order (torch.randperm(N, seed)), skipping
    rows within ``gap`` of a chosen or labeled row.
    """
    zero = np.flatnonzero(pick_d2 <= zero_d2)
    if zero.size == 0:
        return 0
    t0 = int(zero[0])
    order = torch.randperm(labeled.shape[0], generator=torch.Generator().manual_seed(seed)).numpy()
    fill = _first_eligible(order, ~labeled, picks[:t0], labeled, gap, picks.shape[0] - t0)
    picks[t0:] = fill
    pick_d2[t0:] = 0
    return picks.shape[0] - t0


def _first_eligible(order: np.ndarray, allowed: np.ndarray, chosen: np.ndarray, labeled: np.ndarray,
                    gap: TimeGap | None, count: int) -> np.ndarray:
    """The first ``count`` rows of ``order`` that are allowed, not chosen and (with ``gap``)
    not within gap of a labeled row or of a row chosen before them."""
    allowed = allowed.copy()
    allowed[chosen] = False
    if gap is None:
        out = order[allowed[order]][:count]
    else:
        allowed &= ~gap.near(np.concatenate([np.flatnonzero(labeled), chosen]).astype(np.int64))
        out = []
        for i in order[allowed[order]]:
            if allowed[i]:
                out.append(i)
                if len(out) == count:
                    break
                allowed &= ~gap.near(np.array([i]))
        out = np.asarray(out, np.int64)
    if out.shape[0] < count:
        raise InputError(f"only {len(chosen) + out.shape[0]} frames can be picked with selection.min_gap_s="
                         f"{gap.gap_s if gap else 0} ({count - out.shape[0]} short of the budget); lower "
                         "min_gap_s or the budget")
    return out


def kmeanspp_uniforms(budget: int, n_trials: int, seed: int) -> torch.Tensor:
    """(budget, n_trials) float64 uniforms, drawn on the CPU up front: the same stream for
    CPU, CUDA and sharded runs, and no generator calls inside the loop."""
    return torch.rand(budget, n_trials, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def resolve_local_trials(local_trials: int | str | None, budget: int) -> int:
    """None: plain D^2 sampling (1 trial); "auto": scikit-learn's 2 + int(log(budget))."""
    if local_trials is None:
        return 1
    if local_trials == "auto":
        return 2 + int(math.log(budget))
    if isinstance(local_trials, bool) or not isinstance(local_trials, (int, np.integer)) or local_trials < 1:
        raise InputError(f"local_trials must be None, 'auto' or an integer >= 1, got {local_trials!r}")
    return int(local_trials)


# ---- public pick rules: rule(values, labeled_mask, budget, *, seed, **options) -------------------
@torch.no_grad()
def kcenter_greedy(x, labeled_mask, budget, *, seed: int = 0, **options) -> Selection:
    """k-center greedy (farthest-first traversal; Sener & Savarese 2018, the core-set baseline).

    Each pick is the unlabeled row farthest from the labeled rows and earlier picks. With no
    labeled rows the first pick is the largest-norm row (deterministic, never silently row 0).
    When every remaining distance is 0 (duplicates), picks are seeded random fill.

    x: (N, d) numpy array or torch tensor, or a built ``Pool`` (one device or sharded);
    labeled_mask: (N,) bool; budget: picks wanted; seed: orders the random fill.
    options (when x is an array), see ``device_pool``: device ("auto" = x's CUDA device, else
    cuda if available), backend (labeled-set kNN: "auto"/"faiss"/"torch"), storage_dtype
    (float32, float64, or bfloat16/float16: half the bytes read per pick), chunk_size, gap.
    Raises ValueError for non-finite rows (named), budget <= 0, bad shapes; warns and returns
    every unlabeled row when budget >= their number.
    """
    t0 = time.perf_counter()
    pool, mask, budget = _start(x, labeled_mask, budget, options)
    t1 = _synced_clock(pool)
    with _loop_threads(pool):
        picks, pick_d2 = _kcenter_loop(pool, budget)
    picks, pick_d2, _, _ = pool.host(picks, pick_d2)
    n_fill = kcenter_random_fill(picks, pick_d2, mask, seed, pool.zero_d2, getattr(pool, "gap", None))
    t2 = time.perf_counter()
    log.info("k-center greedy: %d picks in %.1f s (%.1f ms per pick) after %.1f s of preparation",
             budget, t2 - t1, (t2 - t1) / max(budget, 1) * 1e3, t1 - t0)
    return finish(picks, pick_d2, pool.scale, pool.zero_d2, n_fill, pool.backend, (t1 - t0, t2 - t1))


def _kcenter_loop(pool: Pool, budget: int) -> tuple[Any, Any]:
    """(picks (B,), their min_d2 (B,)): one pass over the rows per pick, no host sync on one device."""
    picks, pick_d2 = pool.vectors(budget)
    for t in range(budget):
        d2, i = pool.first_center() if t == 0 and not pool.has_labeled else pool.farthest()
        picks[t], pick_d2[t] = i[0], d2
        pool.add(i)
    return picks, pick_d2


@torch.no_grad()
def kmeanspp(x, labeled_mask, budget, *, seed: int = 0, local_trials: int | str | None = None,
             **options) -> Selection:
    """k-means++ seeding (Arthur & Vassilvitskii 2007; BADGE and the ALGES paper): each pick is
    drawn with probability proportional to D^2, the squared distance to the chosen set.

    local_trials: None = plain D^2 sampling; an integer or "auto" (2 + int(log(budget))) =
    greedy k-means++ as scikit-learn's ``kmeans_plusplus``: draw that many candidates and keep
    the one that lowers the potential sum(D^2) most. The labeled rows are the initial centers;
    with none, the first pick is a seeded uniform draw. All uniforms come from one CPU
    generator seeded by ``seed`` (so CPU, CUDA and sharded runs pick the same rows).
    Other arguments and errors as ``kcenter_greedy``.
    """
    n_trials = resolve_local_trials(local_trials, budget if isinstance(budget, int) and budget > 0 else 1)
    t0 = time.perf_counter()
    pool, _, budget = _start(x, labeled_mask, budget, options)
    u = kmeanspp_uniforms(budget, n_trials, seed)
    shard = getattr(pool, "shard", None)
    if shard is not None:
        u = u.to(shard.device)
    t1 = _synced_clock(pool)
    with _loop_threads(pool):
        picks, pick_d2 = _kmeanspp_loop(pool, budget, u)
    picks, pick_d2, n_fill, exhausted = pool.host(picks, pick_d2)
    if exhausted:
        gap = getattr(pool, "gap", None)
        raise InputError(f"k-means++ ran out of candidates after the labeled rows and selection.min_gap_s="
                         f"{gap.gap_s if gap else 0}; lower min_gap_s or the budget")
    t2 = time.perf_counter()
    log.info("k-means++ (%d trials): %d picks in %.1f s (%.1f ms per pick) after %.1f s of preparation",
             n_trials, budget, t2 - t1, (t2 - t1) / max(budget, 1) * 1e3, t1 - t0)
    return finish(picks, pick_d2, pool.scale, pool.zero_d2, n_fill, pool.backend, (t1 - t0, t2 - t1))


def _kmeanspp_loop(pool: Pool, budget: int, u: torch.Tensor) -> tuple[Any, Any]:
    """(picks (B,), their min_d2 (B,)); u: (B, T) uniforms. No host sync on one device."""
    picks, pick_d2 = pool.vectors(budget)
    for t in range(budget):
        if t == 0 and not pool.has_labeled:  # uniform first center; its radius is inf
            i = pool.draw_uniform(u[0, :1])
            d2 = math.inf
            pool.add(i)
        else:
            d2, i = pool.add_best(pool.draw(u[t]))
        picks[t], pick_d2[t] = i[0], d2
    return picks, pick_d2


def _checked_scores(score, labeled_mask, budget) -> tuple[np.ndarray, np.ndarray, int]:
    s = score.detach().cpu().numpy() if isinstance(score, torch.Tensor) else np.asarray(score)
    if s.ndim == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if s.ndim != 1 or not np.issubdtype(s.dtype, np.number):
        raise InputError(f"score must be a numeric (N,) array, got shape {s.shape} and dtype {s.dtype}")
    mask = check_labeled_mask(labeled_mask, s.shape[0])
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        raise InputError(f"score has NaN or inf in {bad.size} rows (first: {bad[:5].tolist()})")
    return s, mask, check_budget(budget, int((~mask).sum()))


def top_k(score, labeled_mask, budget, *, seed: int = 0, largest: bool = True, gap: TimeGap | None = None
          ) -> Selection:
    """The budget unlabeled rows with the largest (or smallest) score; ties -> lower index.

    score: (N,) finite; uncertainty baselines (entropy, margin, ...) rank by it. seed: unused
    (the rule is deterministic; kept for the common signature). gap: skip rows within
    ``gap.gap_s`` of a labeled row or a higher-ranked pick of the same video.
    """
    s, mask, budget = _checked_scores(score, labeled_mask, budget)
    cand = np.flatnonzero(~mask)
    order = cand[np.argsort(-s[cand] if largest else s[cand], kind="stable")]
    picks = _first_eligible(order, ~mask, np.empty(0, np.int64), mask, gap, budget)
    return Selection(picks.astype(np.int64), np.full(budget, np.nan, np.float32))


def random(values, labeled_mask, budget, *, seed: int = 0, gap: TimeGap | None = None) -> Selection:
    """budget unlabeled rows uniformly at random, from a generator seeded by ``seed``.

    values: unused (None or the pool's rows; kept for the common signature).
    """
    mask = check_labeled_mask(labeled_mask)
    budget = check_budget(budget, int((~mask).sum()))
    cand = np.flatnonzero(~mask)
    order = cand[torch.randperm(cand.size, generator=torch.Generator().manual_seed(seed)).numpy()]
    picks = _first_eligible(order, ~mask, np.empty(0, np.int64), mask, gap, budget)
    return Selection(picks.astype(np.int64), np.full(budget, np.nan, np.float32))


PICK_RULES: dict[str, Callable[..., Selection]] = {
    "kcenter": kcenter_greedy,
    "kmeans++": kmeanspp,
    "top-k": top_k,
    "random": random,
}


def select(rule: str, values, labeled_mask, budget, *, seed: int = 0, **options) -> Selection:
    """The one entry the selection task calls: ``PICK_RULES[rule](values, labeled_mask, budget, seed=, ...)``.

    values: (N, d) rows for k-center / k-means++, (N,) scores for top-k, ignored by random.
    options go to the rule (device, backend, storage_dtype, chunk_size, local_trials, largest, gap).
    """
    if rule not in PICK_RULES:
        raise InputError(f"unknown pick rule {rule!r}; valid: {list(PICK_RULES)}")
    if values is None and rule != "random":
        raise InputError(f"pick rule {rule!r} needs values (embeddings or scores)")
    try:
        return PICK_RULES[rule](values, labeled_mask, budget, seed=seed, **options)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise InputError(f"pick rule {rule!r} does not take option(s) {sorted(options)}: {e}") from e
        raise
