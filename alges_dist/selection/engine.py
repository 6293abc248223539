"""The min-distance engine under k-center greedy and k-means++ (DESIGN "Selection").

A ``PoolShard`` keeps, for one block of pool rows held in storage form on a device
(``storage.StoredRows``), the min squared distance from each row to the chosen set and which
rows are still candidates. It starts as the distance to the labeled set (chunked kNN, k=1:
faiss.knn / knn_gpu, or torch; ``knn.py``) and each new center costs one pass over the rows
plus O(N) vector work: never an N x N or N x labeled matrix. ``DevicePool`` is the whole
pool as one shard, what the pick rules of ``rules.py`` drive on one device;
``distributed/sharded_selection.py`` runs one ``shard_worker.ShardWorker`` per Ray actor.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from alges_dist.errors import InputError
from alges_dist.selection.knn import nearest_distances
from alges_dist.selection.storage import StoredRows
from alges_dist.selection.time_gap import TimeGap


# ---- validation ------------------------------------------------------------------------
def as_rows(x: Any) -> torch.Tensor:
    """x as a 2-D floating torch tensor without copying (numpy arrays are wrapped)."""
    if isinstance(x, np.ndarray):
        with warnings.catch_warnings():  # read-only memmaps are fine: rows are never written
            warnings.filterwarnings("ignore", message=".*not writable.*")
            x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise InputError(f"x must be a numpy array or torch tensor of shape (N, d), got {type(x).__name__}")
    if x.ndim != 2 or not x.is_floating_point():
        raise InputError(f"x must be a floating (N, d) array, got shape {tuple(x.shape)} and dtype {x.dtype}")
    return x


def check_labeled_mask(labeled_mask: Any, n: int | None = None) -> np.ndarray:
    """labeled_mask as a numpy bool (N,) array; n: the pool size it must match (None: any)."""
    mask = labeled_mask.cpu().numpy() if isinstance(labeled_mask, torch.Tensor) else np.asarray(labeled_mask)
    if mask.dtype != np.bool_ or mask.ndim != 1 or (n is not None and mask.shape[0] != n):
        raise InputError(f"labeled_mask must be a boolean array of shape ({n if n is not None else 'N'},), "
                         f"got dtype {mask.dtype} and shape {mask.shape}")
    return mask


def check_budget(budget: Any, n_unlabeled: int) -> int:
    """The number of picks to make: budget, or all unlabeled rows (with a warning) when fewer."""
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise InputError(f"budget must be a positive integer, got {budget!r}")
    if budget >= n_unlabeled:
        warnings.warn(f"budget {budget} >= the {n_unlabeled} unlabeled rows: selecting all of them", stacklevel=3)
        return n_unlabeled
    return int(budget)


def nonfinite_rows(rows: torch.Tensor, offset: int = 0) -> tuple[int, list[int]]:
    """(count, first five global indices) of rows holding NaN or inf.

    One reduction pass (row sums, no (N, d) temporary; isfinite over all of x costs ~40x more
    here); only rows whose sum is not finite (NaN/inf, or overflow) are checked element-wise.
    """
    flagged = torch.nonzero(~torch.isfinite(rows.sum(1))).flatten()
    if flagged.numel():
        flagged = flagged[~torch.isfinite(rows[flagged]).all(dim=1)]
    return flagged.numel(), (flagged[:5] + offset).tolist()


def raise_nonfinite(count: int, first: list[int]) -> None:
    if count:
        raise InputError(f"x has NaN or inf in {count} rows (first: {first}); "
                         "drop or re-embed those frames before selection")


def resolve_device(device: Any, x: torch.Tensor | None = None) -> torch.device:
    if device == "auto":
        if x is not None and x.is_cuda:
            return x.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---- the engine: min distances over one block of stored rows ----------------------------------
class PoolShard:
    """Which rows of one ``StoredRows`` block are still candidates, and each row's min squared
    distance to the chosen set (labeled rows and picks): what the pick rules drive.

    It starts as the distance to the labeled set (chunked kNN, k=1) and each new center
    costs one pass over the rows (``StoredRows.distances``) plus O(N) vector work. The test
    against ``zero_d2`` (the storage's rounding of 0; sharded: the pool-wide value) is applied
    where it matters (D^2 weights, the fill rule, reported radii), not per pick to all N rows.
    """

    def __init__(self, rows: StoredRows):
        self.rows = rows
        self.n, self.offset, self.device = rows.n, rows.offset, rows.device
        self.compute_dtype, self.chunk_size, self.zero_d2 = rows.compute_dtype, rows.chunk_size, rows.zero_d2
        self.set_labeled(np.zeros(rows.n, bool))

    def set_labeled(self, labeled: np.ndarray) -> None:
        """Start a selection: labeled rows (n,) are centers (distance 0), the rest candidates at
        distance inf until ``init_labeled_distances``."""
        self.candidate = torch.from_numpy(~labeled).to(self.device)  # (n,) unlabeled and not yet picked
        self.has_labeled = bool(labeled.any())
        self.min_d2 = torch.where(self.candidate, math.inf, 0.0).to(self.compute_dtype)  # (n,)
        self._cached_d2: torch.Tensor | None = None
        self._weights: torch.Tensor | None = None
        self._start = (self.min_d2.clone(), self.candidate.clone())

    def reset(self) -> None:
        """Back to the state after ``init_labeled_distances``: no picks yet."""
        self.min_d2.copy_(self._start[0])
        self.candidate.copy_(self._start[1])
        self._cached_d2 = self._weights = None

    # -- distances ----------------------------------------------------------------------
    def init_labeled_distances(self, ref: torch.Tensor, ref_sq: torch.Tensor, backend: str) -> None:
        """min_d2 of the unlabeled rows := squared distance to the nearest row of ref (L, d)."""
        if ref.shape[0] == 0:
            return
        ref, ref_sq = ref.to(self.device, self.compute_dtype), ref_sq.to(self.device, self.compute_dtype)
        cs = self.chunk_size
        for a in range(0, self.n, cs):
            b = min(a + cs, self.n)
            d2 = nearest_distances(self.rows.x[a:b, :self.rows.d].to(self.compute_dtype), self.rows.xn[a:b], ref, ref_sq, cs,
                                   backend=backend)
            self.min_d2[a:b] = torch.where(self.candidate[a:b], d2.to(self.compute_dtype), self.min_d2[a:b])
        self._start = (self.min_d2.clone(), self.candidate.clone())

    def add_center(self, d2: torch.Tensor, local_idx: torch.Tensor | None) -> None:
        """Fold one center's distances (n,) in; local_idx: the center, if this shard holds it."""
        torch.minimum(self.min_d2, d2, out=self.min_d2)
        if local_idx is not None:
            self.min_d2.index_fill_(0, local_idx, 0)
            self.candidate.index_fill_(0, local_idx, False)

    def exclude(self, rows: torch.Tensor) -> None:
        """Rows (n,) bool leave the candidates as if chosen (distance 0), without being centers:
        frames too close in time to a chosen one (``selection.min_gap_s``)."""
        self.min_d2.masked_fill_(rows, 0)
        self.candidate.masked_fill_(rows, False)

    def trial_potentials(self, rows: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
        """(T,) float64 k-means potential sum_i min(min_d2_i, d2(i, trial)); keeps the columns."""
        d2 = self.rows.distances(rows, sq_norms)
        torch.minimum(d2, self.min_d2[:, None], out=d2)
        self._cached_d2 = d2
        return torch.where(d2 > self.zero_d2, d2, 0).sum(0, dtype=torch.float64)

    def add_trial(self, best: torch.Tensor | int, local_idx: torch.Tensor | None) -> None:
        self.add_center(self._cached_d2.index_select(1, torch.as_tensor(best, device=self.device).view(1))[:, 0],
                        local_idx)
        self._cached_d2 = None

    # -- pick rules -----------------------------------------------------------------------
    def farthest(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(min_d2, local index) of the farthest row; ties -> lowest index."""
        i = torch.argmax(self.min_d2).view(1)  # (1,): 0-d tensor indexing would sync the host
        return self.min_d2.index_select(0, i)[0], i[0]

    def d2_mass(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(D^2 mass in float64, number of candidates) of this shard; keeps the D^2 weights
        (min_d2, 0 at or below zero_d2) for the next ``draw``."""
        self._weights = torch.where(self.min_d2 > self.zero_d2, self.min_d2, 0).to(torch.float64)
        return self._weights.sum(), self.candidate.sum()

    def draw(self, targets: torch.Tensor, fill: torch.Tensor | bool) -> torch.Tensor:
        """Local indices (T,) at cumulative D^2 mass targets (T,) in [0, mass).

        fill: draw uniformly among candidates instead (every remaining distance is 0).
        Searching side=right past a clamp below the total never lands on a zero-weight row.
        """
        if isinstance(fill, bool):  # decided on the host (first pick, sharded driver)
            w = self.candidate.to(torch.float64) if fill else self._weights
        else:
            w = torch.where(fill, self.candidate.to(torch.float64), self._weights)
        cum = torch.cumsum(w, 0)  # (n,)
        top = torch.nextafter(cum[-1], cum.new_zeros(()))
        targets = torch.minimum(targets.to(self.device, torch.float64).clamp_min(0), top)
        # clamped: with no candidate left (the time gap took them) the caller raises afterwards
        return torch.searchsorted(cum, targets, right=True).clamp_max(self.n - 1)


# ---- the pool protocol on one device ----------------------------------------------------------
class DevicePool:
    """The whole pool as one ``PoolShard`` on one device: what the greedy loops of
    ``rules.py`` drive (``distributed/sharded_selection.ShardedPool`` is the same
    protocol over Ray actors). Indices are (1,) device tensors and nothing here waits for
    the device: the loops never sync the host per pick.
    """

    def __init__(self, shard: PoolShard, backend: str, gap: TimeGap | None = None):
        self.shard, self.backend, self.n = shard, backend, shard.n
        self.scale, self.zero_d2 = shard.rows.scale, shard.zero_d2
        self.gap = gap
        if gap is not None:
            self._group = torch.from_numpy(gap.group).to(shard.device)
            self._seconds = torch.from_numpy(gap.seconds).to(shard.device, torch.float64)

    def start(self, labeled: np.ndarray) -> None:
        """A new selection: labeled rows are centers; rows near them in time are out (``gap``)."""
        shard = self.shard
        shard.set_labeled(labeled)
        labeled_idx = torch.from_numpy(np.flatnonzero(labeled)).to(shard.device)
        shard.init_labeled_distances(shard.rows.plain_rows(labeled_idx), shard.rows.xn[labeled_idx], self.backend)
        if self.gap is not None and labeled.any():
            shard.exclude(torch.from_numpy(self.gap.near(np.flatnonzero(labeled))).to(shard.device))
        self.has_labeled = bool(labeled.any())
        self.n_fill = torch.zeros((), dtype=torch.int64, device=shard.device)
        self.exhausted = torch.zeros((), dtype=torch.bool, device=shard.device)

    def vectors(self, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty (picks, their min_d2) of length budget, where the loop writes."""
        device = self.shard.device
        return (torch.empty(budget, dtype=torch.int64, device=device),
                torch.empty(budget, dtype=self.shard.compute_dtype, device=device))

    def first_center(self) -> tuple[torch.Tensor, torch.Tensor]:
        """k-center's start without labeled rows: the largest-norm row, at distance inf."""
        i = torch.tensor([self.shard.rows.largest_input_norm[1]], device=self.shard.device)
        return torch.full((), math.inf, dtype=self.shard.compute_dtype, device=self.shard.device), i

    def farthest(self) -> tuple[torch.Tensor, torch.Tensor]:
        d2, i = self.shard.farthest()
        return d2, i.view(1)

    def add(self, i: torch.Tensor) -> None:
        """Row i (1,) joins the chosen set: its distances are folded in, it and its neighbours
        in time leave the candidates."""
        shard = self.shard
        shard.add_center(shard.rows.distances(*shard.rows.query_rows(i))[:, 0], i)
        self._exclude_near(i)

    def draw_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """(1,) a candidate drawn uniformly (k-means++'s first center without labeled rows)."""
        return self.shard.draw(u * self.shard.n, True)

    def draw(self, u: torch.Tensor) -> torch.Tensor:
        """(T,) rows drawn with probability proportional to D^2 at uniforms u (T,); when every
        distance is 0, uniformly among candidates (counted in n_fill)."""
        mass, n_cand = self.shard.d2_mass()
        fill = mass <= 0
        self.n_fill += fill
        self.exhausted |= n_cand == 0
        return self.shard.draw(u * torch.where(fill, n_cand.to(mass.dtype), mass), fill)

    def add_best(self, trials: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the trial (of T) that lowers the potential sum(D^2) most; returns (its min_d2, (1,) index)."""
        shard = self.shard
        if trials.shape[0] == 1:
            d2 = shard.min_d2.index_select(0, trials)[0]
            self.add(trials)
            return d2, trials
        best = torch.argmin(shard.trial_potentials(*shard.rows.query_rows(trials)))
        i = trials.index_select(0, best.view(1))
        d2 = shard.min_d2.index_select(0, i)[0]
        shard.add_trial(best, i)
        self._exclude_near(i)
        return d2, i

    def _exclude_near(self, i: torch.Tensor) -> None:
        if self.gap is not None:
            g, t = self._group.index_select(0, i), self._seconds.index_select(0, i)
            self.shard.exclude((self._group == g) & (g >= 0) & ((self._seconds - t).abs() < self.gap.gap_s))

    def host(self, picks: torch.Tensor, pick_d2: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int, bool]:
        """The one host transfer: (picks, min_d2 at pick time, random-fill count, ran out of candidates)."""
        return picks.cpu().numpy(), pick_d2.cpu().numpy(), int(self.n_fill), bool(self.exhausted)
