"""The min-distance engine under k-center greedy and k-means++ (DESIGN "Selection").

A ``PoolShard`` holds one block of pool rows on a device (float32, or centered and
power-of-two-scaled bfloat16/float16 with norm-augmented columns, so one half-precision
matrix-vector product yields squared distances) and the vector of min squared distances
from each row to the chosen set. It starts as the distance to the labeled set (chunked
kNN, k=1: faiss.knn / knn_gpu, or torch) and each new center costs one pass over the
rows plus O(N) vector work: never an N x N or N x labeled matrix. The pick rules that
drive it live in ``selection.py``; ``distributed/sharded_selection.py`` runs one shard
per Ray actor.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import numpy as np
import torch

from alges_dist.errors import InputError
from alges_dist.selection_knn import BACKENDS, faiss_has_gpu, nearest_distances, resolve_backend  # noqa: F401

STORAGE_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                  "float16": torch.float16}
HALF_DTYPES = (torch.bfloat16, torch.float16)
_N_AUG = 6  # half storage: three terms of ||x||^2 and three ones columns appended to each row


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


def resolve_storage_dtype(storage_dtype: Any) -> torch.dtype:
    dtype = STORAGE_DTYPES.get(storage_dtype, storage_dtype) if isinstance(storage_dtype, str) else storage_dtype
    if dtype not in STORAGE_DTYPES.values():
        raise InputError(f"storage_dtype must be one of {list(STORAGE_DTYPES)}, got {storage_dtype!r}")
    return dtype


def resolve_device(device: Any, x: torch.Tensor | None = None) -> torch.device:
    if device == "auto":
        if x is not None and x.is_cuda:
            return x.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---- the engine: one block of rows on one device ------------------------------------------
class PoolShard:
    """Rows [offset, offset + n) of the pool on one device, in storage form, with their min
    squared distance to the chosen set.

    float32/float64 storage keeps the rows as given (no copy for a contiguous float32 array
    on the device) and computes ||x||^2 - 2 x.c + ||c||^2 with one matrix-vector product per pick.
    Half storage (bfloat16/float16) holds x' = (x - shift) * scale, |x'| <= 1, with ||x'||^2
    appended as three half terms (hi, mid, lo) and three ones columns, so one native half mv
    returns ||x' - c'||^2 itself: the output rounding is relative to the distance, not to the
    norms, and no float32 copy of the rows is made per pick (half the bytes of float32).
    Squared distances at or below ``zero_d2`` = 2 tol max||x||^2 (+ a float16 floor), the
    expansion's rounding error, count as 0: duplicates are at distance 0. The test is applied
    where it matters (D^2 weights, the fill rule, reported radii), not per pick to all N rows.
    """

    def __init__(self, rows: torch.Tensor, *, offset: int, device: torch.device,
                 storage_dtype: torch.dtype, shift: torch.Tensor | None, scale: float, chunk_size: int):
        n, d = rows.shape
        self.n, self.d, self.offset, self.device, self.chunk_size = n, d, offset, device, chunk_size
        self.storage_dtype, self.scale, self.augmented = storage_dtype, scale, storage_dtype in HALF_DTYPES
        self.compute_dtype = torch.float64 if storage_dtype == torch.float64 else torch.float32
        self.tol = 64 * torch.finfo(self.compute_dtype).eps
        if self.augmented:
            d_store = -(-(d + _N_AUG) // 8) * 8  # rows padded to 16 bytes
            self.x = torch.zeros(n, d_store, dtype=storage_dtype, device=device)
            shift, input_sq = shift.to(device, torch.float32), torch.empty(n, dtype=torch.float64, device=device)
            # one reused float32 block, in-place ops: per-block temporaries fragment the heap and
            # raised peak RSS by 2-3x the storage at N=200k (measured)
            buf = torch.empty(min(chunk_size, n), d, dtype=torch.float32, device=device)
            for a in range(0, n, chunk_size):
                b = min(a + chunk_size, n)
                xc = buf[:b - a]
                xc.copy_(rows[a:b])
                input_sq[a:b] = torch.linalg.vector_norm(xc, dim=1).square()
                self.x[a:b, :d].copy_(xc.sub_(shift).mul_(scale))
                sq = xc.copy_(self.x[a:b, :d]).square_().sum(1, dtype=torch.float64)  # of the rounded rows
                for j in range(3):
                    self.x[a:b, d + j] = sq
                    sq -= self.x[a:b, d + j]
                self.x[a:b, d + 3:d + 6] = 1
            perm = list(range(d)) + [d + 3, d + 4, d + 5, d, d + 1, d + 2] + list(range(d + 6, d_store))
            self._q_perm = torch.tensor(perm, device=device)  # query: (-2 x', 1, 1, 1, ||x'||^2 terms, 0)
            self._q_mul = torch.tensor([-2.0] * d + [1.0] * _N_AUG + [0.0] * (d_store - d - _N_AUG),
                                       dtype=storage_dtype, device=device)
        else:
            self.x = rows.to(device, storage_dtype).contiguous()  # no copy when already in place
        if self.augmented:  # (n,) squared norms of the stored (rounded) rows, as the appended terms
            xn = self.x[:, d:d + 3].double().sum(1)
        else:  # one fused reduction over x, no (N, d) temporary
            xn = torch.linalg.vector_norm(self.x, dim=1).double().square()
        input_sq = input_sq if self.augmented else xn
        i = int(torch.argmax(input_sq)) if n else 0
        # (squared norm, global index) of the largest-norm input row: k-center's start without labels
        self.largest_input_norm = (float(input_sq[i]) if n else -math.inf, offset + i)
        self.xn = xn.to(self.compute_dtype)
        if not bool(torch.isfinite(self.xn).all()):
            raise InputError("squared row norms overflow; rescale x (e.g. divide by its largest absolute value)")
        self.max_sq_norm = float(self.xn.max()) if n else 0.0
        self.zero_d2 = zero_threshold(self.tol, self.max_sq_norm, storage_dtype)  # sharded: pool-wide value
        self.set_labeled(np.zeros(n, bool))

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

    # -- rows ---------------------------------------------------------------------------
    def plain_rows(self, local_idx: torch.Tensor) -> torch.Tensor:
        """(L, d) rows in compute dtype and storage coordinates (centered, scaled for half)."""
        return self.x.index_select(0, local_idx.to(self.device))[:, :self.d].to(self.compute_dtype)

    def query_rows(self, local_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows (T, d_store) in storage dtype, squared norms (T,)) of the rows local_idx."""
        return self.x.index_select(0, local_idx), self.xn.index_select(0, local_idx)


    # -- distances ----------------------------------------------------------------------
    def init_labeled_distances(self, ref: torch.Tensor, ref_sq: torch.Tensor, backend: str) -> None:
        """min_d2 of the unlabeled rows := squared distance to the nearest row of ref (L, d)."""
        if ref.shape[0] == 0:
            return
        ref, ref_sq = ref.to(self.device, self.compute_dtype), ref_sq.to(self.device, self.compute_dtype)
        cs = self.chunk_size
        for a in range(0, self.n, cs):
            b = min(a + cs, self.n)
            d2 = nearest_distances(self.x[a:b, :self.d].to(self.compute_dtype), self.xn[a:b], ref, ref_sq, cs,
                                   backend=backend)
            self.min_d2[a:b] = torch.where(self.candidate[a:b], d2.to(self.compute_dtype), self.min_d2[a:b])
        self._start = (self.min_d2.clone(), self.candidate.clone())

    def distances(self, rows: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
        """(n, T) squared distances from every row to the T query rows (from ``query_rows``);
        values within rounding of 0 (<= zero_d2, possibly negative) are not cleaned here."""
        rows, sq_norms = rows.to(self.device), sq_norms.to(self.device)
        if self.augmented:  # the rows carry their norms: x_aug . q = ||x' - c'||^2
            q = rows[:, self._q_perm] * self._q_mul  # (T, d_store)
            return self._dot(q).to(self.compute_dtype)
        return torch.add(self.xn[:, None], self._dot(rows), alpha=-2).add_(sq_norms)  # (n, T)

    def _dot(self, q: torch.Tensor) -> torch.Tensor:
        """(n, T) x @ q.T: the one pass over the rows per pick.

        float32/float64 rows on the CPU go through numpy's OpenBLAS: torch's MKL gemv runs
        ~1.7x slower on this project's AMD CPU (scripts/bench_selection.py floor row: numpy
        X @ c 19.6 ms vs torch.mv 32.6 ms at 200k x 512; addmv slower still). Half rows use
        torch's native half mv (OpenBLAS has none); CUDA uses torch (cuBLAS).
        """
        if self.device.type == "cpu" and not self.augmented:
            x = self.x.numpy()
            return torch.from_numpy(np.dot(x, q[0].numpy())[:, None] if q.shape[0] == 1 else np.dot(x, q.numpy().T))
        return torch.mv(self.x, q[0])[:, None] if q.shape[0] == 1 else self.x @ q.T

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
        d2 = self.distances(rows, sq_norms)
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


# ---- single-device preparation ----------------------------------------------------------------
def storage_shift(row_sum: torch.Tensor, n: int, storage_dtype: torch.dtype) -> torch.Tensor | None:
    """Half storage stores rows centered on the pool mean (distances are translation-invariant)."""
    # rounded to bfloat16: the mean need not be exact, and then float64 summation order
    # (one device vs shards) cannot change the stored rows
    return (row_sum / max(n, 1)).to(torch.bfloat16).float() if storage_dtype in HALF_DTYPES else None


def row_sum(rows: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(d,) float64 sum of the rows (for the half-storage mean), on the host."""
    total = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
    for a in range(0, rows.shape[0], chunk_size):
        total += rows[a:a + chunk_size].sum(0, dtype=torch.float64)
    return total.cpu()


def max_centered_sq_norm(rows: torch.Tensor, shift: torch.Tensor, chunk_size: int) -> float:
    """Largest squared norm of rows - shift; one host sync in all (not one per block: ~5,000 at
    10^7 rows on a GPU, each waiting for the queue to drain)."""
    shift = shift.to(rows.device, torch.float32)
    best = torch.zeros((), dtype=torch.float32, device=rows.device)
    for a in range(0, rows.shape[0], chunk_size):
        best = torch.maximum(best, torch.linalg.vector_norm(rows[a:a + chunk_size].float() - shift, dim=1).max())
    return float(best) ** 2


def zero_threshold(tol: float, max_sq_norm: float, storage_dtype: torch.dtype) -> float:
    """Squared distances at or below this are 0 within the rounding of ||x||^2 - 2 x.c + ||c||^2
    (2 tol max||x||^2); half storage adds float16's subnormal floor (rows scaled to norm <= 1)."""
    return 2 * tol * max_sq_norm + (2.0**-20 if storage_dtype in HALF_DTYPES else 0.0)


def storage_scale(max_sq_norm: float, storage_dtype: torch.dtype) -> float:
    """Half storage scales rows to norm <= 1 (float16's range) by a power of two: exact, and
    last-bit differences in max_sq_norm (one device vs shards) do not change it; 1.0 otherwise."""
    if storage_dtype not in HALF_DTYPES or max_sq_norm <= 0:
        return 1.0
    return 2.0 ** -math.ceil(0.5 * math.log2(max_sq_norm))


# ---- the pool protocol on one device ----------------------------------------------------------
class TimeGap(NamedTuple):
    """Rows of one video closer than ``gap_s`` in time never end up in one batch (``selection.min_gap_s``).

    group: (N,) int64 video code per row (-1: no time, the row is never near another);
    seconds: (N,) float64 time of each row in its video.
    """

    group: np.ndarray
    seconds: np.ndarray
    gap_s: float

    def near(self, rows: np.ndarray) -> np.ndarray:
        """(N,) bool: rows within gap_s of any of ``rows`` (indices) in the same video."""
        hit = np.zeros(self.group.shape[0], bool)
        for video in np.unique(self.group[rows]):
            if video < 0:
                continue
            mine = np.flatnonzero(self.group == video)
            t = np.sort(self.seconds[rows[self.group[rows] == video]])
            pos = np.searchsorted(t, self.seconds[mine])  # nearest chosen time on each side
            left = np.abs(self.seconds[mine] - t[np.maximum(pos - 1, 0)])
            right = np.abs(t[np.minimum(pos, t.size - 1)] - self.seconds[mine])
            hit[mine] = np.minimum(left, right) < self.gap_s
        return hit


class DevicePool:
    """The whole pool as one ``PoolShard`` on one device: what the greedy loops of
    ``selection.py`` drive (``distributed/sharded_selection.ShardedPool`` is the same
    protocol over Ray actors). Indices are (1,) device tensors and nothing here waits for
    the device: the loops never sync the host per pick.
    """

    def __init__(self, shard: PoolShard, backend: str, gap: TimeGap | None = None):
        self.shard, self.backend, self.n = shard, backend, shard.n
        self.scale, self.zero_d2 = shard.scale, shard.zero_d2
        self.gap = gap
        if gap is not None:
            self._group = torch.from_numpy(gap.group).to(shard.device)
            self._seconds = torch.from_numpy(gap.seconds).to(shard.device, torch.float64)

    def start(self, labeled: np.ndarray) -> None:
        """A new selection: labeled rows are centers; rows near them in time are out (``gap``)."""
        shard = self.shard
        shard.set_labeled(labeled)
        labeled_idx = torch.from_numpy(np.flatnonzero(labeled)).to(shard.device)
        shard.init_labeled_distances(shard.plain_rows(labeled_idx), shard.xn[labeled_idx], self.backend)
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
        i = torch.tensor([self.shard.largest_input_norm[1]], device=self.shard.device)
        return torch.full((), math.inf, dtype=self.shard.compute_dtype, device=self.shard.device), i

    def farthest(self) -> tuple[torch.Tensor, torch.Tensor]:
        d2, i = self.shard.farthest()
        return d2, i.view(1)

    def add(self, i: torch.Tensor) -> None:
        """Row i (1,) joins the chosen set: its distances are folded in, it and its neighbours
        in time leave the candidates."""
        shard = self.shard
        shard.add_center(shard.distances(*shard.query_rows(i))[:, 0], i)
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
        best = torch.argmin(shard.trial_potentials(*shard.query_rows(trials)))
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
