"""||z_ij||_2 of ALGES-sem (paper Eq. 6): the norm of the head conv's unfolded input at
every output pixel, through the head's upsampling where it has one.

||G_ij||_F = ||p_ij - onehot(y_ij)||_2 * ||z_ij||_2 needs, per output pixel, the norm of
the vector the head weight multiplies there: the kh x kw patch of z (unfold(z)), and for
an upsampling head (FPN, DeepLabV3Plus) the upsampled patch U(unfold(z))_ij. Both come
from inner products of neighbouring z vectors at the conv's resolution; no (n, C, H, W)
tensor is ever formed.

Two formulations of the inner products: `unfolded_inner_products` (one offset, in place
into a scratch buffer: the eager path, tuned on the CPU) and `inner_product_maps` (every
offset over one zero-padded view of z: the compiled path, where the compiler fuses them
into one pass over z). Tests check they agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# (dy, dx, N_dy (H, h), M_dx (W, w)): one term of ||U(x)_ij||^2, see norm_terms
NormTerm = tuple[int, int, torch.Tensor, torch.Tensor]


def norm_terms(up_rows: torch.Tensor, up_cols: torch.Tensor) -> list[NormTerm]:
    """The (dy, dx, N_dy, M_dx) terms of upsampled_unfolded_norms for an upsampling
    U(x) = up_rows x up_cols^T, up_rows (H, h), up_cols (W, w).

    Expanding the square, ||U(x)_ij||^2 = sum_(dy, dx) (N_dy G_(dy, dx) M_dx^T)_ij, where
    G_(dy, dx)[u, v] = <x_uv, x_(u+dy, v+dx)> is a map at the conv's resolution,
    N_dy[i, u] = up_rows[i, u] up_rows[i, u + dy] and M_dx likewise for columns. An
    interpolation mixes only neighbouring pixels, so few offsets have N, M != 0 (dy, dx
    in {-1, 0, 1} for bilinear), and the (-dy, -dx) term equals the (dy, dx) one: half
    the offsets, counted twice (the 2 is folded into N_dy).
    """
    span_rows, span_cols = _band_span(up_rows), _band_span(up_cols)
    terms = []
    for dy in range(span_rows):
        for dx in range(1 - span_cols, span_cols):
            if dy == 0 and dx < 0:
                continue  # the mirror of (0, -dx)
            twice = 1.0 if dy == dx == 0 else 2.0
            rows = _offset_products(up_rows, dy).mul_(twice)  # (H, h)
            terms.append((dy, dx, rows, _offset_products(up_cols, dx)))  # cols (W, w)
    return terms


def upsampled_unfolded_norms(
    z: torch.Tensor,
    kernel_size: tuple[int, int],
    terms: list[NormTerm],
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """||U(unfold(z))_ij||_2 at every output pixel: (n, C, h, w) -> (n, H, W), from the
    terms of norm_terms. scratch: as unfolded_inner_products."""
    squared = 0.0
    for dy, dx, rows, cols in terms:
        inner = unfolded_inner_products(z, kernel_size, dy, dx, scratch)  # (n, h, w)
        squared = squared + rows @ inner @ cols.T  # (n, H, W)
    return squared.clamp_(min=0.0).sqrt_()


def unfolded_inner_products(
    z: torch.Tensor,
    kernel_size: tuple[int, int],
    dy: int,
    dx: int,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """<unfold(z)_uv, unfold(z)_(u+dy, v+dx)> for every (u, v): (n, C, h, w) -> (n, h, w).

    unfold = the kh x kw zero-padded patches of the head conv; pairs reaching outside
    the image count only their inside taps (callers give those pairs weight 0).
    scratch: optional float32 buffer of at least z.numel() elements for the products.
    """
    n, _, height, width = z.shape
    rows = slice(max(0, -dy), height - max(0, dy))
    cols = slice(max(0, -dx), width - max(0, dx))
    here = z[:, :, rows, cols]  # (n, C, h - |dy|, w - |dx|)
    partner = z[:, :, rows.start + dy : rows.stop + dy, cols.start + dx : cols.stop + dx]
    products = None if scratch is None else scratch.view(-1)[: here.numel()].view(here.shape)
    products = torch.mul(here, partner, out=products)
    if dy == dx == 0:
        inner = products.sum(dim=1)  # (n, h, w)
    else:  # 0 where the partner is outside
        inner = z.new_zeros(n, height, width)
        inner[:, rows, cols] = products.sum(dim=1)
    return box_sum(inner, kernel_size)


def inner_product_maps(
    z: torch.Tensor, kernel_size: tuple[int, int], offsets: list[tuple[int, int]]
) -> torch.Tensor:
    """unfolded_inner_products for every (dy, dx) of offsets at once, in float32:
    (n, C, h, w) any float dtype -> (len(offsets), n, h, w).

    For the compiled path: every map reads the same zero-padded view of z over the same
    (n, h, w) range, so the compiler reads z once for all of them (the eager version
    slices per offset, which suits in-place CPU buffers).
    """
    height, width = z.shape[2:]
    reach = max((max(abs(dy), abs(dx)) for dy, dx in offsets), default=0)
    z = z.float()
    padded = F.pad(z, (reach, reach, reach, reach))  # 0 where a partner is outside
    maps = [
        (z * padded[:, :, reach + dy : reach + dy + height, reach + dx : reach + dx + width]).sum(1)
        for dy, dx in offsets
    ]
    return torch.stack([box_sum(inner, kernel_size) for inner in maps])


def box_sum(inner: torch.Tensor, kernel_size: tuple[int, int]) -> torch.Tensor:
    """The zero-padded (kh, kw) box sum of (n, h, w) maps, centred: the sum over the head
    conv's taps (identity for a 1x1 head)."""
    kh, kw = kernel_size
    if kh == kw == 1:
        return inner
    height, width = inner.shape[1:]
    # shifted adds (avg_pool2d takes 1 ms per 224 px map on the CPU here, the adds 0.1 ms)
    padded = F.pad(inner, (kw // 2, kw // 2, kh // 2, kh // 2))  # (n, h + kh - 1, w + kw - 1)
    rows = padded[:, :height].clone()
    for a in range(1, kh):
        rows += padded[:, a : a + height]  # (n, h, w + kw - 1)
    box = rows[:, :, :width].clone()
    for b in range(1, kw):
        box += rows[:, :, b : b + width]
    return box


def _offset_products(matrix: torch.Tensor, offset: int) -> torch.Tensor:
    """P[i, u] = matrix[i, u] * matrix[i, u + offset], 0 where u + offset is outside:
    (n_out, n_in) -> (n_out, n_in)."""
    n_in = matrix.shape[1]
    products = torch.zeros_like(matrix)
    lo, hi = max(0, -offset), min(n_in, n_in - offset)
    products[:, lo:hi] = matrix[:, lo:hi] * matrix[:, lo + offset : hi + offset]
    return products


def _band_span(matrix: torch.Tensor) -> int:
    """Widest run from the first to the last nonzero of a row of (n_out, n_in)."""
    nonzero = matrix != 0
    columns = torch.arange(matrix.shape[1], device=matrix.device)
    first = torch.where(nonzero, columns, matrix.shape[1]).amin(dim=1)
    last = torch.where(nonzero, columns, -1).amax(dim=1)
    return int((last - first).amax().item()) + 1
