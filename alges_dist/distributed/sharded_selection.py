"""A selection pool sharded over Ray actors (one per GPU), for pools larger than one device.

``ShardedPool`` implements ``selection.rules.Pool``, so the k-center and k-means++ loops
drive it unchanged. Each actor runs a ``selection.shard_worker.ShardWorker`` holding one
contiguous block of rows as a ``selection.engine.PoolShard`` (the engine the single-device
path runs). Per pick the pool reduces per-shard candidates: the global argmax for k-center
greedy, an inverse-CDF over per-shard D^2 totals for k-means++ (``split_targets``), both
with the uniforms and tie rules of one device, so the picks equal the single-device ones
(tests/test_sharded_selection.py). Each actor call that changes the chosen set returns the
shard's next candidate and D^2 mass, so a k-center pick costs one round trip to every
actor, a k-means++ pick two to three. This module holds only the Ray side.
"""

from __future__ import annotations

import bisect
import logging
import math
from typing import Any, Sequence

import numpy as np
import ray
import torch

from alges_dist.errors import InputError
from alges_dist.selection import storage
from alges_dist.selection.engine import raise_nonfinite
from alges_dist.selection.shard_worker import ShardWorker, split_targets
from alges_dist.selection.time_gap import TimeGap

log = logging.getLogger(__name__)


class ShardedPool:
    """Pool rows held by Ray actors, one block each: a ``selection.Pool`` for the pick rules.

    shards: row blocks in pool order: (n_k, d) arrays or tensors, ObjectRefs to them, or
    callables that load them on the actor. The actors keep their blocks in storage form across
    selections; each selection (``start``) takes the round's labeled mask (N,). gap: a
    ``TimeGap`` over all N rows (``selection.min_gap_s``). num_gpus_per_shard: GPUs each actor
    asks Ray for (None: 1 when the cluster has GPUs, else 0). Other options as
    ``selection.device_pool``. Use as a context manager, or call ``close()``.
    """

    def __init__(self, shards: Sequence[Any], *, device="auto", backend: str = "auto",
                 storage_dtype=torch.float32, chunk_size: int = 2048, num_gpus_per_shard: float | None = None,
                 gap: TimeGap | None = None):
        if not shards:
            raise InputError("shards must hold at least one block of rows")
        if num_gpus_per_shard is None:
            num_gpus_per_shard = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        storage_dtype = storage.resolve_storage_dtype(storage_dtype)
        self.gap = gap
        actor_cls = ray.remote(num_cpus=1, num_gpus=num_gpus_per_shard)(ShardWorker)
        self.actors = []
        try:
            offset = 0
            self.ends = []  # exclusive end of each block
            for block in shards:
                self.actors.append(actor_cls.remote(block, offset, chunk_size))
                offset += ray.get(self.actors[-1].n_rows.remote())
                self.ends.append(offset)
            if gap is not None:
                if gap.group.shape[0] != offset:
                    raise InputError(f"gap covers {gap.group.shape[0]} rows, the shards {offset}")
                ray.get([a.set_gap.remote(TimeGap(gap.group[s:e], gap.seconds[s:e], gap.gap_s))
                         for a, s, e in zip(self.actors, [0] + self.ends[:-1], self.ends)])
            self._build(device, backend, storage_dtype)
        except BaseException:
            self.close()
            raise

    def _build(self, device, backend, storage_dtype) -> None:
        n = self.n = self.ends[-1]
        bad = ray.get([a.nonfinite_rows.remote() for a in self.actors])
        raise_nonfinite(sum(c for c, _ in bad), sorted(i for _, f in bad for i in f)[:5])
        shift = storage.storage_shift(sum(ray.get([a.row_sum.remote() for a in self.actors])), n, storage_dtype)
        max_sq = max(ray.get([a.max_centered_sq_norm.remote(shift) for a in self.actors])) if shift is not None else 0
        self.scale = storage.storage_scale(max_sq, storage_dtype)
        built = ray.get([a.build.remote(device=device, storage_dtype=storage_dtype, shift=shift, scale=self.scale,
                                        backend=backend) for a in self.actors])
        # largest input norm, first index among ties: k-center's start without labeled rows
        _, neg_g = max((v, -g) for v, g, _, _ in built)
        self.largest, self.backend = -neg_g, built[0][2]
        tol = 64 * torch.finfo(torch.float64 if storage_dtype == torch.float64 else torch.float32).eps
        self.zero_d2 = storage.zero_threshold(tol, max(m for *_, m in built), storage_dtype)
        ray.get([a.set_zero_d2.remote(self.zero_d2) for a in self.actors])
        log.info("sharded selection pool: %d rows over %d actors, %s storage, labeled kNN: %s",
                 n, len(self.actors), storage_dtype, self.backend)

    def __enter__(self) -> ShardedPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []

    # ---- the Pool protocol --------------------------------------------------------------
    def start(self, labeled: np.ndarray) -> None:
        """Hand each actor its labeled mask, then the labeled rows (in pool order, as on one device)."""
        starts = [0] + self.ends[:-1]
        rows = ray.get([a.labeled_rows.remote(labeled[s:e]) for a, s, e in zip(self.actors, starts, self.ends)])
        ref, ref_sq = ray.put(torch.cat([r for r, _ in rows])), ray.put(torch.cat([s for _, s in rows]))
        near = self.gap.near(np.flatnonzero(labeled)) if self.gap is not None and labeled.any() else None
        self.states = ray.get([a.init_labeled_distances.remote(ref, ref_sq, None if near is None else near[s:e])
                               for a, s, e in zip(self.actors, starts, self.ends)])
        self.has_labeled = bool(labeled.any())
        self.n_fill, self.exhausted = 0, False

    def vectors(self, budget: int) -> tuple[np.ndarray, np.ndarray]:
        return np.empty(budget, np.int64), np.empty(budget, np.float64)

    def first_center(self) -> tuple[float, list[int]]:
        return math.inf, [self.largest]

    def farthest(self) -> tuple[float, list[int]]:
        # global argmax; ties -> the lowest index, as torch.argmax on one device
        d2, g, _, _ = max(self.states, key=lambda s: (s[0], -s[1]))
        return d2, [g]

    def add(self, i: list[int]) -> None:
        self._broadcast("add_center", *self._rows(i[0]), owner_idx=i[0])

    def draw_uniform(self, u: Any) -> list[int]:
        return [g for g, _ in self._draw(np.asarray(u, np.float64), [s[3] for s in self.states], True)]

    def draw(self, u: Any) -> list[tuple[int, float]]:
        masses = [s[2] for s in self.states]
        fill = sum(masses) <= 0
        self.n_fill += fill
        self.exhausted |= sum(s[3] for s in self.states) == 0
        return self._draw(np.asarray(u, np.float64), [s[3] for s in self.states] if fill else masses, fill)

    def add_best(self, trials: list[tuple[int, float]]) -> tuple[float, list[int]]:
        if len(trials) == 1:
            g, d2 = trials[0]
            self.add([g])
            return d2, [g]
        rows = [self._rows(g) for g, _ in trials]
        rows, sq = torch.cat([r for r, _ in rows]), torch.cat([s for _, s in rows])
        pots = np.sum(ray.get([a.trial_potentials.remote(rows, sq) for a in self.actors]), axis=0)
        best = int(np.argmin(pots))  # ties -> the first trial, as torch.argmin on one device
        g, d2 = trials[best]
        self._broadcast("add_trial", best, owner_idx=g)
        return d2, [g]

    def host(self, picks: np.ndarray, pick_d2: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, bool]:
        return picks, pick_d2, int(self.n_fill), bool(self.exhausted)

    # ---- helpers ------------------------------------------------------------------------
    def _owner(self, global_idx: int) -> int:
        return bisect.bisect_right(self.ends, global_idx)

    def _rows(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        return ray.get(self.actors[self._owner(g)].rows_of.remote([g]))

    def _broadcast(self, method: str, *args, owner_idx: int) -> None:
        """Call method on every actor (the owner of owner_idx gets the index, others None) and keep
        each shard's new state; the rows near owner_idx in time leave every shard."""
        owner = self._owner(owner_idx)
        near = None if self.gap is None else (int(self.gap.group[owner_idx]), float(self.gap.seconds[owner_idx]))
        if near is not None and near[0] < 0:
            near = None
        self.states = ray.get([getattr(a, method).remote(*args, owner_idx if k == owner else None, near)
                               for k, a in enumerate(self.actors)])

    def _draw(self, u: np.ndarray, weights: list[float], fill: bool) -> list[tuple[int, float]]:
        """(global index, min_d2) per uniform: shard by inverse-CDF over the per-shard weights,
        then the row inside it by the shard's own inverse-CDF."""
        owners, local = split_targets(u, weights)
        out: list[tuple[int, float] | None] = [None] * len(owners)
        for k in np.unique(owners):
            which = np.flatnonzero(owners == k)
            g, d2 = ray.get(self.actors[k].draw.remote(local[which].tolist(), fill))
            for j, w in enumerate(which):
                out[w] = (g[j], d2[j])
        return out
