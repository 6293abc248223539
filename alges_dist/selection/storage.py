"""Pool rows in storage form on one device: the one pass over the rows each pick costs.

``StoredRows`` holds a block of rows as float32/float64 (as given), or centered and
power-of-two-scaled bfloat16/float16 with norm-augmented columns, so one half-precision
matrix-vector product yields squared distances. The min-distance state that the pick rules
drive lives in ``engine.PoolShard``; the functions below prepare the storage form of a
pool held on one device or split over shards (shift, scale, rounding threshold).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from alges_dist.errors import InputError

STORAGE_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                  "float16": torch.float16}
HALF_DTYPES = (torch.bfloat16, torch.float16)
_N_AUG = 6  # half storage: three terms of ||x||^2 and three ones columns appended to each row


def resolve_storage_dtype(storage_dtype: Any) -> torch.dtype:
    dtype = STORAGE_DTYPES.get(storage_dtype, storage_dtype) if isinstance(storage_dtype, str) else storage_dtype
    if dtype not in STORAGE_DTYPES.values():
        raise InputError(f"storage_dtype must be one of {list(STORAGE_DTYPES)}, got {storage_dtype!r}")
    return dtype


class StoredRows:
    """Rows [offset, offset + n) of the pool on one device, in storage form, with their squared norms.

    float32/float64 storage keeps the rows as given (no copy for a contiguous float32 array
    on the device) and computes ||x||^2 - 2 x.c + ||c||^2 with one matrix-vector product per pick.
    Half storage (bfloat16/float16) holds x' = (x - shift) * scale, |x'| <= 1, with ||x'||^2
    appended as three half terms (hi, mid, lo) and three ones columns, so one native half mv
    returns ||x' - c'||^2 itself: the output rounding is relative to the distance, not to the
    norms, and no float32 copy of the rows is made per pick (half the bytes of float32).
    Squared distances at or below ``zero_d2`` = 2 tol max||x||^2 (+ a float16 floor), the
    expansion's rounding error, count as 0: duplicates are at distance 0.
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
        self.zero_d2 = zero_threshold(self.tol, self.max_sq_norm, storage_dtype)  # sharded: the pool-wide value

    def plain_rows(self, local_idx: torch.Tensor) -> torch.Tensor:
        """(L, d) rows in compute dtype and storage coordinates (centered, scaled for half)."""
        return self.x.index_select(0, local_idx.to(self.device))[:, :self.d].to(self.compute_dtype)

    def query_rows(self, local_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows (T, d_store) in storage dtype, squared norms (T,)) of the rows local_idx."""
        return self.x.index_select(0, local_idx), self.xn.index_select(0, local_idx)

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


# ---- preparing the storage form of a pool (one device or shards) ------------------------------
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
