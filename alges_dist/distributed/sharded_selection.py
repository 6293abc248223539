"""Sharded selection: pool rows split over Ray actors (one per GPU), for pools larger than one device.

Each actor holds one contiguous block of rows as a ``selection.PoolShard`` (the same engine
the single-device path runs). Per pick the driver reduces per-shard candidates: the global
argmax for k-center greedy, an inverse-CDF over per-shard D^2 totals for k-means++, both with
the uniforms and tie rules of ``selection.py``, so the picks equal the single-device ones.
Cost per pick: one round trip to every actor (k-center) or two to three (k-means++).
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from typing import Any, Sequence

import numpy as np
import ray
import torch

from alges_dist import selection as sel
from alges_dist import selection_engine as engine
from alges_dist.selection import Selection

log = logging.getLogger(__name__)


class _ShardActor:
    """One block of rows [offset, offset + n) and its PoolShard; returns host values only."""

    def __init__(self, rows: Any, offset: int, chunk_size: int):
        self.rows, self.offset, self.chunk_size = engine.as_rows(rows), offset, chunk_size
        self.pool: engine.PoolShard | None = None

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
        return (*self.pool.largest_input_norm, self.backend, self.pool.max_sq_norm)

    def set_zero_d2(self, zero_d2: float) -> None:
        self.pool.zero_d2 = zero_d2  # pool-wide, as on one device

    def labeled_rows(self, labeled: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Start a selection with this block's labeled mask; returns its labeled rows and norms."""
        self.pool.set_labeled(labeled)
        idx = torch.from_numpy(np.flatnonzero(labeled)).to(self.pool.device)
        return self.pool.plain_rows(idx).cpu(), self.pool.xn[idx].cpu()

    def init_labeled_distances(self, ref: torch.Tensor, ref_sq: torch.Tensor) -> tuple[float, int]:
        self.pool.init_labeled_distances(ref, ref_sq, self.backend)
        return self.d2_mass()

    def _local(self, global_idx: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(np.asarray(global_idx, np.int64) - self.offset, device=self.pool.device)

    def rows_of(self, global_idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows, sq = self.pool.query_rows(self._local(global_idx))
        return rows.cpu(), sq.cpu()

    def farthest(self) -> tuple[float, int, torch.Tensor, torch.Tensor]:
        """(min_d2, global index, row, squared norm) of this shard's farthest row."""
        d2, i = self.pool.farthest()
        rows, sq = self.pool.query_rows(i.view(1))
        return float(d2), self.offset + int(i), rows.cpu(), sq.cpu()

    def add_center(self, rows, sq, global_idx: int | None) -> tuple[float, int]:
        local = None if global_idx is None else self._local([global_idx])
        self.pool.add_center(self.pool.distances(rows, sq)[:, 0], local)
        return self.d2_mass()

    def kcenter_step(self, rows, sq, global_idx: int | None) -> tuple[float, int, torch.Tensor, torch.Tensor]:
        self.add_center(rows, sq, global_idx)
        return self.farthest()

    def d2_mass(self) -> tuple[float, int]:
        mass, n_cand = self.pool.d2_mass()
        return float(mass), int(n_cand)

    def draw(self, targets: list[float], fill: bool) -> tuple[list[int], list[float], torch.Tensor, torch.Tensor]:
        """Global indices, their min_d2, rows and squared norms at local D^2 mass targets."""
        local = self.pool.draw(torch.tensor(targets, dtype=torch.float64), fill)
        rows, sq = self.pool.query_rows(local)
        d2 = self.pool.min_d2.index_select(0, local)
        return (local + self.offset).tolist(), d2.tolist(), rows.cpu(), sq.cpu()

    def trial_potentials(self, rows, sq) -> np.ndarray:
        return self.pool.trial_potentials(rows, sq).cpu().numpy()

    def add_trial(self, best: int, global_idx: int | None) -> tuple[float, int]:
        self.pool.add_trial(best, None if global_idx is None else self._local([global_idx]))
        return self.d2_mass()


class ShardedSelector:
    """Pool rows held by Ray actors, one block each; k-center greedy and k-means++ over all of them.

    shards: row blocks in pool order, (n_k, d) numpy arrays or torch tensors, or ObjectRefs to
    them; the actors keep them (and their storage form) across selections, each selection
    takes the round's labeled mask (N,) over the concatenated blocks. num_gpus_per_shard: GPUs
    each actor asks Ray for (None: 1 when the cluster has GPUs, else 0). Other options as
    ``selection.kcenter_greedy``. Use as a context manager, or call ``close()``.
    """

    def __init__(self, shards: Sequence[Any], *, device="auto", backend: str = "auto",
                 storage_dtype=torch.float32, chunk_size: int = 2048, num_gpus_per_shard: float | None = None):
        if not shards:
            raise ValueError("shards must hold at least one block of rows")
        if num_gpus_per_shard is None:
            num_gpus_per_shard = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        storage_dtype = engine.resolve_storage_dtype(storage_dtype)
        actor_cls = ray.remote(num_cpus=1, num_gpus=num_gpus_per_shard)(_ShardActor)
        self.actors = [actor_cls.remote(block, 0, chunk_size) for block in shards[:1]]
        try:
            self._build(shards[1:], actor_cls, device, backend, storage_dtype, chunk_size)
        except BaseException:
            self.close()
            raise

    def _build(self, more_shards, actor_cls, device, backend, storage_dtype, chunk_size) -> None:
        self.ends = [ray.get(self.actors[0].n_rows.remote())]  # exclusive end of each block
        for block in more_shards:
            self.actors.append(actor_cls.remote(block, self.ends[-1], chunk_size))
            self.ends.append(self.ends[-1] + ray.get(self.actors[-1].n_rows.remote()))
        n = self.ends[-1]
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

    def _start(self, labeled_mask, budget) -> tuple[int, list[tuple[float, int]]]:
        """Validate, hand each actor its labeled mask and the labeled rows (in pool order, as on
        one device); returns the budget and per-shard (sum of min_d2, candidates)."""
        self.labeled = engine.check_labeled_mask(labeled_mask, self.ends[-1])
        budget = engine.check_budget(budget, int((~self.labeled).sum()))
        starts = [0] + self.ends[:-1]
        labeled = ray.get([a.labeled_rows.remote(self.labeled[s:e])
                           for a, s, e in zip(self.actors, starts, self.ends)])
        ref, ref_sq = ray.put(torch.cat([r for r, _ in labeled])), ray.put(torch.cat([s for _, s in labeled]))
        return budget, ray.get([a.init_labeled_distances.remote(ref, ref_sq) for a in self.actors])

    def __enter__(self) -> ShardedSelector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def _owner(self, global_idx: int) -> int:
        return bisect.bisect_right(self.ends, global_idx)

    def _broadcast(self, method: str, *args, owner_idx: int) -> list:
        """Call method on every actor; the owner of owner_idx gets it as last argument, others None."""
        owner = self._owner(owner_idx)
        return ray.get([getattr(a, method).remote(*args, owner_idx if k == owner else None)
                        for k, a in enumerate(self.actors)])

    def kcenter_greedy(self, labeled_mask, budget: int, *, seed: int = 0) -> Selection:
        """``selection.kcenter_greedy`` over the shards: same picks, radii and random fill."""
        t0 = time.perf_counter()
        budget, _ = self._start(labeled_mask, budget)
        t1 = time.perf_counter()
        picks, pick_d2 = np.empty(budget, np.int64), np.empty(budget, np.float64)
        candidates = ray.get([a.farthest.remote() for a in self.actors])
        for t in range(budget):
            if t == 0 and not self.labeled.any():
                d2, g = math.inf, self.largest
                rows, sq = ray.get(self.actors[self._owner(g)].rows_of.remote([g]))
            else:  # global argmax; ties -> the lowest index, as torch.argmax on one device
                d2, g, rows, sq = max(candidates, key=lambda c: (c[0], -c[1]))
            picks[t], pick_d2[t] = g, d2
            candidates = self._broadcast("kcenter_step", rows, sq, owner_idx=g)
        n_fill = sel.kcenter_random_fill(picks, pick_d2, self.labeled, seed, self.zero_d2)
        return sel.finish(picks, pick_d2, self.scale, self.zero_d2, n_fill, self.backend,
                          (t1 - t0, time.perf_counter() - t1))

    def kmeanspp(self, labeled_mask, budget: int, seed: int, *, local_trials: int | str | None = None) -> Selection:
        """``selection.kmeanspp`` over the shards: the same uniforms, inverse-CDF over per-shard totals."""
        n_trials = sel.resolve_local_trials(local_trials, budget if isinstance(budget, int) and budget > 0 else 1)
        t0 = time.perf_counter()
        budget, masses = self._start(labeled_mask, budget)  # (sum of min_d2, candidates) per shard
        t1 = time.perf_counter()
        u = sel.kmeanspp_uniforms(budget, n_trials, seed).numpy()
        picks, pick_d2, n_fill = np.empty(budget, np.int64), np.empty(budget, np.float64), 0
        for t in range(budget):
            if t == 0 and not self.labeled.any():  # uniform first center; its radius is inf
                g, _, rows, sq = self._draw(u[0, :1], [n for _, n in masses], True)[0]
                picks[0], pick_d2[0] = g, math.inf
                masses = self._broadcast("add_center", rows, sq, owner_idx=g)
                continue
            fill = sum(m for m, _ in masses) <= 0
            n_fill += fill
            trials = self._draw(u[t], [n if fill else m for m, n in masses], fill)
            if n_trials == 1:
                g, d2, rows, sq = trials[0]
                masses = self._broadcast("add_center", rows, sq, owner_idx=g)
            else:
                rows, sq = torch.cat([r for _, _, r, _ in trials]), torch.cat([s for _, _, _, s in trials])
                pots = np.sum(ray.get([a.trial_potentials.remote(rows, sq) for a in self.actors]), axis=0)
                best = int(np.argmin(pots))  # ties -> the first trial, as torch.argmin on one device
                g, d2 = trials[best][:2]
                masses = self._broadcast("add_trial", best, owner_idx=g)
            picks[t], pick_d2[t] = g, d2
        return sel.finish(picks, pick_d2, self.scale, self.zero_d2, n_fill, self.backend,
                          (t1 - t0, time.perf_counter() - t1))

    def _draw(self, u: np.ndarray, weights: list[float], fill: bool) -> list[tuple]:
        """(global index, min_d2, row, squared norm) per uniform: shard by inverse-CDF over the
        per-shard weights, then the row inside it by the shard's own inverse-CDF."""
        cum = np.cumsum(np.asarray(weights, np.float64))
        targets = np.minimum(u * cum[-1], np.nextafter(cum[-1], 0))
        owners = np.searchsorted(cum, targets, side="right")
        out: list[tuple | None] = [None] * len(targets)
        for k in np.unique(owners):
            which = np.flatnonzero(owners == k)
            local = (targets[which] - (cum[k - 1] if k > 0 else 0.0)).tolist()
            g, d2, rows, sq = ray.get(self.actors[k].draw.remote(local, fill))
            for j, w in enumerate(which):
                out[w] = (g[j], d2[j], rows[j:j + 1], sq[j:j + 1])
        return out

