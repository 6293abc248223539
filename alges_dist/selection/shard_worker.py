"""One block of a selection pool sharded over workers: the plain code each Ray actor runs.

``ShardWorker`` holds rows [offset, offset + n) as a ``PoolShard`` and answers the sharded
pool's per-pick calls with host values; ``split_targets`` spreads D^2 (or uniform) draws over
the shards by inverse CDF. ``distributed/sharded_selection.ShardedPool`` puts one worker in
each Ray actor and reduces their answers; nothing here imports Ray.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from alges_dist.selection.engine import PoolShard, as_rows, nonfinite_rows, resolve_device
from alges_dist.selection.knn import resolve_backend
from alges_dist.selection.storage import StoredRows, max_centered_sq_norm, row_sum
from alges_dist.selection.time_gap import TimeGap


def split_targets(u: np.ndarray, weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(owner shard (T,), target inside it (T,)) for uniforms u (T,) in [0, 1) over shards of
    mass ``weights``: the inverse CDF of one device, shard by shard.

    With no mass left (every weight 0: the time gap took every candidate) the search lands
    past the last shard; it is clamped, and as on one device the loop goes on and the caller
    raises after it.
    """
    cum = np.cumsum(np.asarray(weights, np.float64))
    targets = np.minimum(np.asarray(u, np.float64) * cum[-1], np.nextafter(cum[-1], 0))
    owners = np.minimum(np.searchsorted(cum, targets, side="right"), len(cum) - 1)
    starts = np.concatenate([[0.0], cum[:-1]])
    return owners, targets - starts[owners]


class ShardWorker:
    """One block of rows [offset, offset + n) and its PoolShard; returns host values only.

    The body of one actor of ``distributed/sharded_selection.ShardedPool`` (which wraps it in
    ``ray.remote``); plain code, testable without Ray. rows: an array, or a callable that loads
    them on the actor (a slice of the score shards: no other process ever holds them).
    """

    def __init__(self, rows: Any, offset: int, chunk_size: int):
        self.rows = as_rows(rows() if callable(rows) else rows)
        self.offset, self.chunk_size = offset, chunk_size
        self.pool: PoolShard | None = None
        self.gap: TimeGap | None = None

    def set_gap(self, gap: TimeGap) -> None:
        """This block's rows of the pool's TimeGap (videos and times of rows [offset, offset + n))."""
        self.gap = gap

    def n_rows(self) -> int:
        return self.rows.shape[0]

    def nonfinite_rows(self) -> tuple[int, list[int]]:
        return nonfinite_rows(self.rows, self.offset)

    def row_sum(self) -> torch.Tensor:
        return row_sum(self.rows, self.chunk_size)

    def max_centered_sq_norm(self, shift: torch.Tensor) -> float:
        return max_centered_sq_norm(self.rows, shift, self.chunk_size)

    def build(self, *, device, storage_dtype, shift, scale, backend) -> tuple[float, int, str, float]:
        device = resolve_device(device, self.rows)
        self.backend = resolve_backend(backend, device)
        self.pool = PoolShard(StoredRows(self.rows, offset=self.offset, device=device, storage_dtype=storage_dtype,
                                         shift=shift, scale=scale, chunk_size=self.chunk_size))
        del self.rows  # the storage form is all a selection needs
        if self.gap is not None:
            self.group = torch.from_numpy(self.gap.group).to(device)
            self.seconds = torch.from_numpy(self.gap.seconds).to(device, torch.float64)
        return (*self.pool.rows.largest_input_norm, self.backend, self.pool.rows.max_sq_norm)

    def set_zero_d2(self, zero_d2: float) -> None:
        self.pool.zero_d2 = zero_d2  # pool-wide, as on one device

    def labeled_rows(self, labeled: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Start a selection with this block's labeled mask; returns its labeled rows and norms."""
        self.pool.set_labeled(labeled)
        idx = torch.from_numpy(np.flatnonzero(labeled)).to(self.pool.device)
        return self.pool.rows.plain_rows(idx).cpu(), self.pool.rows.xn[idx].cpu()

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
        rows, sq = self.pool.rows.query_rows(local)
        return rows.cpu(), sq.cpu()

    def add_center(self, rows, sq, global_idx: int | None, near: tuple[int, float] | None) -> tuple:
        """Fold one center in (rows/sq from ``rows_of``); the owner of global_idx marks it chosen."""
        local = None if global_idx is None else torch.tensor([global_idx - self.offset], device=self.pool.device)
        self.pool.add_center(self.pool.rows.distances(rows, sq)[:, 0], local)
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
