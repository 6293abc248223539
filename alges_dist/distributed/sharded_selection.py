"""A selection pool sharded over Ray actors (one per GPU), for pools larger than one device.

``ShardedPool`` implements ``selection.Pool``, so the k-center and k-means++ loops of
``selection.py`` drive it unchanged. Each actor holds one contiguous block of rows as a
``selection_engine.PoolShard`` (the engine the single-device path runs). Per pick the pool
reduces per-shard candidates: the global argmax for k-center greedy, an inverse-CDF over
per-shard D^2 totals for k-means++, both with the uniforms and tie rules of one device, so
the picks equal the single-device ones (tests/test_sharded_selection.py). Each actor call
that changes the chosen set returns the shard's next candidate and D^2 mass, so a k-center
pick costs one round trip to every actor, a k-means++ pick two to three.
"""

from __future__ import annotations

import bisect
import logging
import math
from typing import Any, Sequence

import numpy as np
import ray
import torch

from alges_dist import selection_engine as engine
from alges_dist.errors import InputError

log = logging.getLogger(__name__)


class _ShardActor:
    """One block of rows [offset, offset + n) and its PoolShard; returns host values only.

    rows: an array, or a callable that loads them on the actor (a slice of the score shards:
    no other process ever holds them).
    """

    def __init__(self, rows: Any, offset: int, chunk_size: int):
        self.rows = engine.as_rows(rows() if callable(rows) else rows)
        self.offset, self.chunk_size = offset, chunk_size
        self.pool: engine.PoolShard | None = None
        self.gap: engine.TimeGap | None = None

    def set_gap(self, gap: engine.TimeGap) -> None:
        """This block's rows of the pool's TimeGap (videos and times of rows [offset, offset + n))."""
        self.gap = gap

    def n_rows(self) -> int:
        return self.rows.shape[0]

    def nonfinite_rows(self) -> tuple[int, list[int]]:
        return engine.nonfinite_rows(self.rows, self.offset)

    def row_sum(self) -> torch.Tensor:
        return engine.row_sum(self.rows, self.chunk_size)

    def max_centered_sq_norm(self, shift: torch.Tensor) -> float:
        return engine.max_centered_sq_norm(self.rows, shift, self.chunk_size)

    def build(self, *, device, storage_dtype, shift, scale, backend) -> tuple[float, int, str, float]:
        device = engine.resolve_device(device, self.rows)
        self.backend = engine.resolve_backend(backend, device)
        self.pool = engine.PoolShard(self.rows, offset=self.offset, device=device, storage_dtype=storage_dtype,
                                     shift=shift, scale=scale, chunk_size=self.chunk_size)
        del self.rows  # the storage form is all a selection needs
        if self.gap is not None:
            self.group = torch.from_numpy(self.gap.group).to(device)
            self.seconds = torch.from_numpy(self.gap.seconds).to(device, torch.float64)
        return (*self.pool.largest_input_norm, self.backend, self.pool.max_sq_norm)

    def set_zero_d2(self, zero_d2: float) -> None:
        self.pool.zero_d2 = zero_d2  # pool-wide, as on one device

    def labeled_rows(self, labeled: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Start a selection with this block's labeled mask; returns its labeled rows and norms."""
        self.pool.set_labeled(labeled)
        idx = torch.from_numpy(np.flatnonzero(labeled)).to(self.pool.device)
        return self.pool.plain_rows(idx).cpu(), self.pool.xn[idx].cpu()

    def init_labeled_distances(self, ref: torch.Tensor, ref_sq: torch.Tensor, near: np.ndarray | None) -> tuple:
        self.pool.init_labeled_distances(ref, ref_sq, self.backend)
        if near is not None:
            self.pool.exclude(torch.from_numpy(near).to(self.pool.device))
        return self.state()

    def state(self) -> tuple[float, int, float, int]:
        """(farthest min_d2, its global index, D^2 mass, candidates) of this shard."""
        d2, i = self.pool.farthest()
        mass, n_cand = self.pool.d2_mass()
        return float(d2), self.offset + int(i), float(mass), int(n_cand)

    def rows_of(self, global_idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        local = torch.as_tensor(np.asarray(global_idx, np.int64) - self.offset, device=self.pool.device)
        rows, sq = self.pool.query_rows(local)
        return rows.cpu(), sq.cpu()

    def add_center(self, rows, sq, global_idx: int | None, near: tuple[int, float] | None) -> tuple:
        """Fold one center in (rows/sq from ``rows_of``); the owner of global_idx marks it chosen."""
        local = None if global_idx is None else torch.tensor([global_idx - self.offset], device=self.pool.device)
        self.pool.add_center(self.pool.distances(rows, sq)[:, 0], local)
        self._exclude(near)
        return self.state()

    def draw(self, targets: list[float], fill: bool) -> tuple[list[int], list[float]]:
        """Global indices and their min_d2 at local D^2 mass targets."""
        local = self.pool.draw(torch.tensor(targets, dtype=torch.float64), fill)
        return (local + self.offset).tolist(), self.pool.min_d2.index_select(0, local).tolist()

    def trial_potentials(self, rows, sq) -> np.ndarray:
        return self.pool.trial_potentials(rows, sq).cpu().numpy()

    def add_trial(self, best: int, global_idx: int | None, near: tuple[int, float] | None) -> tuple:
        self.pool.add_trial(best, None if global_idx is None else
                            torch.tensor([global_idx - self.offset], device=self.pool.device))
        self._exclude(near)
        return self.state()

    def _exclude(self, near: tuple[int, float] | None) -> None:
        if near is not None:
            group, seconds = near
            self.pool.exclude((self.group == group) & ((self.seconds - seconds).abs() < self.gap.gap_s))


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
                 gap: engine.TimeGap | None = None):
        if not shards:
            raise InputError("shards must hold at least one block of rows")
        if num_gpus_per_shard is None:
            num_gpus_per_shard = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        storage_dtype = engine.resolve_storage_dtype(storage_dtype)
        self.gap = gap
        actor_cls = ray.remote(num_cpus=1, num_gpus=num_gpus_per_shard)(_ShardActor)
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
                ray.get([a.set_gap.remote(engine.TimeGap(gap.group[s:e], gap.seconds[s:e], gap.gap_s))
                         for a, s, e in zip(self.actors, [0] + self.ends[:-1], self.ends)])
            self._build(device, backend, storage_dtype)
        except BaseException:
            self.close()
            raise

    def _build(self, device, backend, storage_dtype) -> None:
        n = self.n = self.ends[-1]
        bad = ray.get([a.nonfinite_rows.remote() for a in self.actors])
        engine.raise_nonfinite(sum(c for c, _ in bad), sorted(i for _, f in bad for i in f)[:5])
        shift = engine.storage_shift(sum(ray.get([a.row_sum.remote() for a in self.actors])), n, storage_dtype)
        max_sq = max(ray.get([a.max_centered_sq_norm.remote(shift) for a in self.actors])) if shift is not None else 0
        self.scale = engine.storage_scale(max_sq, storage_dtype)
        built = ray.get([a.build.remote(device=device, storage_dtype=storage_dtype, shift=shift, scale=self.scale,
                                        backend=backend) for a in self.actors])
        # largest input norm, first index among ties: k-center's start without labeled rows
        _, neg_g = max((v, -g) for v, g, _, _ in built)
        self.largest, self.backend = -neg_g, built[0][2]
        tol = 64 * torch.finfo(torch.float64 if storage_dtype == torch.float64 else torch.float32).eps
        self.zero_d2 = engine.zero_threshold(tol, max(m for *_, m in built), storage_dtype)
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
        cum = np.cumsum(np.asarray(weights, np.float64))
        targets = np.minimum(u * cum[-1], np.nextafter(cum[-1], 0))
        # clamped: with no candidate left (the time gap took them) every weight is 0 and the search
        # lands past the last shard; as on one device the loop goes on and the caller raises after it
        owners = np.minimum(np.searchsorted(cum, targets, side="right"), len(self.actors) - 1)
        out: list[tuple[int, float] | None] = [None] * len(targets)
        for k in np.unique(owners):
            which = np.flatnonzero(owners == k)
            local = (targets[which] - (cum[k - 1] if k > 0 else 0.0)).tolist()
            g, d2 = ray.get(self.actors[k].draw.remote(local, fill))
            for j, w in enumerate(which):
                out[w] = (g[j], d2[j])
        return out
