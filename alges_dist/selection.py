"""Selection: turn per-frame embeddings or scores into the query batch (DESIGN "Selection").

The pick rules, over one min-distance engine (``selection_engine.PoolShard``):
k-center greedy takes the farthest row, k-means++ draws proportionally to D^2 (with
optional greedy local trials, as scikit-learn); each pick is one pass over the rows.
The greedy loops stay on the device; results move to the host once, at the end.
``top_k`` and ``random`` need no distances. ``select(method, ...)`` is the one entry the
rest of the system calls; ``distributed/sharded_selection.py`` runs the same loops with
one shard per Ray actor.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch

from alges_dist.selection_engine import (
    PoolShard,
    as_rows,
    check_budget,
    check_labeled_mask,
    max_centered_sq_norm,
    nonfinite_rows,
    raise_nonfinite,
    resolve_backend,
    resolve_device,
    resolve_storage_dtype,
    row_sum,
    storage_scale,
    storage_shift,
)

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


def _prepare(x, labeled_mask, budget, *, device, backend, storage_dtype, chunk_size):
    rows = as_rows(x)
    mask = check_labeled_mask(labeled_mask, rows.shape[0])
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    budget = check_budget(budget, int((~mask).sum()))
    raise_nonfinite(*nonfinite_rows(rows))
    storage_dtype, device = resolve_storage_dtype(storage_dtype), resolve_device(device, rows)
    backend = resolve_backend(backend, device)
    shift = storage_shift(row_sum(rows, chunk_size), rows.shape[0], storage_dtype)
    scale = storage_scale(max_centered_sq_norm(rows, shift, chunk_size) if shift is not None else 0.0,
                          storage_dtype)
    log.info("selection pool: %d rows (%d labeled), dim %d, %s storage (%.1f MB) on %s, labeled kNN: %s",
             rows.shape[0], mask.sum(), rows.shape[1], storage_dtype,
             rows.shape[0] * rows.shape[1] * storage_dtype.itemsize / 1e6, device, backend)
    pool = PoolShard(rows, offset=0, device=device, storage_dtype=storage_dtype, shift=shift, scale=scale,
                     chunk_size=chunk_size)
    pool.set_labeled(mask)
    labeled_idx = torch.from_numpy(np.flatnonzero(mask)).to(device)
    pool.init_labeled_distances(pool.plain_rows(labeled_idx), pool.xn[labeled_idx], backend)
    return pool, budget, backend


def finish(picks, pick_d2, scale: float, zero_d2: float, n_fill: int, backend: str,
           seconds: tuple[float, float]) -> Selection:
    """Selection from picks and their squared distances (host arrays, storage units)."""
    pick_d2 = np.where(np.asarray(pick_d2, np.float64) <= zero_d2, 0.0, pick_d2)  # rounding noise is 0
    radii = (np.sqrt(pick_d2) / scale).astype(np.float32)
    return Selection(np.asarray(picks, np.int64), radii, int(n_fill), backend, *seconds)


@contextlib.contextmanager
def _loop_threads(pool: PoolShard) -> Iterator[None]:
    """One torch thread during a CPU float32/float64 greedy loop, restored after.

    There the pass over the rows is numpy's OpenBLAS (its own threads); torch only runs O(N)
    vector ops, which gain nothing from 2 threads and stall on a core another process holds:
    interleaved on this shared 2-core machine, the median step fell from 1.7x to 1.0x of one
    plain numpy pass (one thread) at 200k x 512.
    """
    if pool.device.type != "cpu" or pool.augmented:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _synced_clock(device: torch.device) -> float:
    """perf_counter after the device's queued work (one sync per phase, never per pick)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def kcenter_random_fill(picks: np.ndarray, pick_d2: np.ndarray, labeled: np.ndarray, seed: int,
                        zero_d2: float) -> int:
    """Replace, in place, the k-center picks made after every distance reached 0; returns their count.

    Distances only shrink, so once the farthest remaining row is at distance 0 every later
    pick is too: those picks are a suffix, made here on the host after the loop (no per-pick
    cost) as the remaining rows in a seeded random order (torch.randperm(N, seed)).
    """
    zero = np.flatnonzero(pick_d2 <= zero_d2)
    if zero.size == 0:
        return 0
    t0 = int(zero[0])
    remaining = ~labeled
    remaining[picks[:t0]] = False
    order = torch.randperm(labeled.shape[0], generator=torch.Generator().manual_seed(seed)).numpy()
    picks[t0:] = order[remaining[order]][:picks.shape[0] - t0]
    pick_d2[t0:] = 0
    return picks.shape[0] - t0


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
        raise ValueError(f"local_trials must be None, 'auto' or an integer >= 1, got {local_trials!r}")
    return int(local_trials)


# ---- public pick rules --------------------------------------------------------------------------
@torch.no_grad()
def kcenter_greedy(x, labeled_mask, budget, *, seed: int = 0, device="auto", backend: str = "auto",
                   storage_dtype=torch.float32, chunk_size: int = 2048) -> Selection:
    """k-center greedy (farthest-first traversal; Sener & Savarese 2018, the core-set baseline).

    Each pick is the unlabeled row farthest from the labeled rows and earlier picks. With no
    labeled rows the first pick is the largest-norm row (deterministic, never silently row 0).
    When every remaining distance is 0 (duplicates), picks are seeded random fill.

    x: (N, d) numpy array or torch tensor; labeled_mask: (N,) bool; budget: picks wanted.
    seed: orders the random fill. device: "auto" = x's CUDA device, else cuda if available.
    backend: labeled-set kNN, "auto"/"faiss"/"torch". storage_dtype: float32 (default),
    float64, or bfloat16/float16 (half the bytes read per pick). chunk_size: rows per kNN block.
    Raises ValueError for non-finite rows (named), budget <= 0, bad shapes; warns and returns
    every unlabeled row when budget >= their number.
    """
    t0 = time.perf_counter()
    pool, budget, backend = _prepare(x, labeled_mask, budget, device=device, backend=backend,
                                     storage_dtype=storage_dtype, chunk_size=chunk_size)
    start = torch.tensor(pool.largest_input_norm[1], device=pool.device)
    t1 = _synced_clock(pool.device)
    with _loop_threads(pool):
        picks, pick_d2 = _kcenter_loop(pool, budget, start)
    picks, pick_d2 = picks.cpu().numpy(), pick_d2.cpu().numpy()  # the one host transfer
    n_fill = kcenter_random_fill(picks, pick_d2, check_labeled_mask(labeled_mask), seed, pool.zero_d2)
    t2 = time.perf_counter()
    log.info("k-center greedy: %d picks in %.1f s (%.1f ms per pick) after %.1f s of preparation",
             budget, t2 - t1, (t2 - t1) / max(budget, 1) * 1e3, t1 - t0)
    return finish(picks, pick_d2, pool.scale, pool.zero_d2, n_fill, backend, (t1 - t0, t2 - t1))


def _kcenter_loop(pool: PoolShard, budget: int, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(picks (B,), their min_d2 (B,)) on the device; no host sync inside."""
    picks = torch.empty(budget, dtype=torch.int64, device=pool.device)
    pick_d2 = torch.empty(budget, dtype=pool.compute_dtype, device=pool.device)
    for t in range(budget):
        d2, i = pool.farthest()
        if t == 0 and not pool.has_labeled:
            d2, i = torch.full_like(d2, math.inf), start
        picks[t], pick_d2[t] = i, d2
        i = i.view(1)
        pool.add_center(pool.distances(*pool.query_rows(i))[:, 0], i)
    return picks, pick_d2


@torch.no_grad()
def kmeanspp(x, labeled_mask, budget, seed: int, *, local_trials: int | str | None = None, device="auto",
             backend: str = "auto", storage_dtype=torch.float32, chunk_size: int = 2048) -> Selection:
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
    pool, budget, backend = _prepare(x, labeled_mask, budget, device=device, backend=backend,
                                     storage_dtype=storage_dtype, chunk_size=chunk_size)
    u = kmeanspp_uniforms(budget, n_trials, seed).to(pool.device)
    t1 = _synced_clock(pool.device)
    with _loop_threads(pool):
        picks, pick_d2, n_fill = _kmeanspp_loop(pool, budget, u)
    picks, pick_d2, n_fill = picks.cpu().numpy(), pick_d2.cpu().numpy(), int(n_fill)  # the one host transfer
    t2 = time.perf_counter()
    log.info("k-means++ (%d trials): %d picks in %.1f s (%.1f ms per pick) after %.1f s of preparation",
             n_trials, budget, t2 - t1, (t2 - t1) / max(budget, 1) * 1e3, t1 - t0)
    return finish(picks, pick_d2, pool.scale, pool.zero_d2, n_fill, backend, (t1 - t0, t2 - t1))


def _kmeanspp_loop(pool: PoolShard, budget: int, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(picks (B,), their min_d2 (B,), random-fill count) on the device; u: (B, T) uniforms."""
    n_trials = u.shape[1]
    picks = torch.empty(budget, dtype=torch.int64, device=pool.device)
    pick_d2 = torch.empty(budget, dtype=pool.compute_dtype, device=pool.device)
    n_fill = torch.zeros((), dtype=torch.int64, device=pool.device)
    for t in range(budget):
        if t == 0 and not pool.has_labeled:  # uniform first center; its radius is inf
            i = pool.draw(u[0, :1] * pool.n, True)
            picks[0], pick_d2[0] = i[0], math.inf
            pool.add_center(pool.distances(*pool.query_rows(i))[:, 0], i)
            continue
        mass, n_cand = pool.d2_mass()
        fill = mass <= 0
        n_fill += fill
        trials = pool.draw(u[t] * torch.where(fill, n_cand.to(mass.dtype), mass), fill)  # (T,)
        if n_trials == 1:
            i = trials
            pick_d2[t] = pool.min_d2.index_select(0, i)[0]
            pool.add_center(pool.distances(*pool.query_rows(i))[:, 0], i)
        else:
            best = torch.argmin(pool.trial_potentials(*pool.query_rows(trials)))
            i = trials.index_select(0, best.view(1))
            pick_d2[t] = pool.min_d2.index_select(0, i)[0]
            pool.add_trial(best, i)
        picks[t] = i[0]
    return picks, pick_d2, n_fill


def top_k(score, labeled_mask, budget, largest: bool = True) -> Selection:
    """The budget unlabeled rows with the largest (or smallest) score; ties -> lower index.

    score: (N,) finite; uncertainty baselines (entropy, margin, ...) rank by it.
    """
    s = score.detach().cpu().numpy() if isinstance(score, torch.Tensor) else np.asarray(score)
    if s.ndim != 1 or not np.issubdtype(s.dtype, np.number):
        raise ValueError(f"score must be a numeric (N,) array, got shape {s.shape} and dtype {s.dtype}")
    mask = check_labeled_mask(labeled_mask, s.shape[0])
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        raise ValueError(f"score has NaN or inf in {bad.size} rows (first: {bad[:5].tolist()})")
    budget = check_budget(budget, int((~mask).sum()))
    cand = np.flatnonzero(~mask)
    order = np.argsort(-s[cand] if largest else s[cand], kind="stable")[:budget]
    return Selection(cand[order].astype(np.int64), np.full(budget, np.nan, np.float32))


def random(labeled_mask, budget, seed: int) -> Selection:
    """budget unlabeled rows uniformly at random, from a generator seeded by ``seed``."""
    mask = check_labeled_mask(labeled_mask)
    budget = check_budget(budget, int((~mask).sum()))
    cand = np.flatnonzero(~mask)
    order = torch.randperm(cand.size, generator=torch.Generator().manual_seed(seed))[:budget].numpy()
    return Selection(cand[order].astype(np.int64), np.full(budget, np.nan, np.float32))


def _needs(name: str, value: Any, method: str) -> None:
    if value is None:
        raise ValueError(f"method {method!r} needs {name}=...")


def _run_kcenter(labeled_mask, budget, *, x, score, largest, seed, **options):
    _needs("x", x, "kcenter")
    return kcenter_greedy(x, labeled_mask, budget, seed=seed, **options)


def _run_kmeanspp(labeled_mask, budget, *, x, score, largest, seed, **options):
    _needs("x", x, "kmeans++")
    return kmeanspp(x, labeled_mask, budget, seed, **options)


def _run_top_k(labeled_mask, budget, *, x, score, largest, seed, **options):
    _needs("score", score, "top-k")
    return top_k(score, labeled_mask, budget, largest=largest, **options)


def _run_random(labeled_mask, budget, *, x, score, largest, seed, **options):
    return random(labeled_mask, budget, seed, **options)


SELECTION_METHODS: dict[str, Callable[..., Selection]] = {
    "kcenter": _run_kcenter,
    "kmeans++": _run_kmeanspp,
    "top-k": _run_top_k,
    "random": _run_random,
}


def select(method: str, labeled_mask, budget, *, x=None, score=None, largest: bool = True, seed: int = 0,
           **options) -> Selection:
    """The one entry the round loop calls: ``SELECTION_METHODS[method]`` with its inputs.

    options go to the method (device, backend, storage_dtype, chunk_size, local_trials).
    """
    if method not in SELECTION_METHODS:
        raise ValueError(f"unknown selection method {method!r}; valid: {list(SELECTION_METHODS)}")
    try:
        return SELECTION_METHODS[method](labeled_mask, budget, x=x, score=score, largest=largest, seed=seed,
                                         **options)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise ValueError(f"method {method!r} does not take option(s) {sorted(options)}: {e}") from e
        raise
