"""The Johnson-Lindenstrauss projection of ALGES-img (DESIGN "The math": large K*D)."""

from __future__ import annotations

import math

import torch


def gaussian_projection_matrix(in_dim: int, out_dim: int, *, seed: int) -> torch.Tensor:
    """The Johnson-Lindenstrauss matrix R (in_dim, out_dim), float32, on the CPU.

    R = torch.randn(in_dim, out_dim, generator=torch.Generator("cpu").manual_seed(seed))
        / sqrt(out_dim)
    so E ||x R||^2 = ||x||^2. Drawn on the CPU so that every device projects with the
    same matrix; reproducible from the seed (for a given torch version, which the round
    record stores).
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    matrix = torch.randn(in_dim, out_dim, generator=generator, dtype=torch.float32)
    return matrix.div_(math.sqrt(out_dim))


class ProjectionCache:
    """Projection matrices kept between score_batch calls, one per (seed, dims, device).

    Explicit and owned by the caller (a scoring actor holds one for its lifetime), so
    nothing is global. Without it each call draws R again (milliseconds for K*D x 256).
    """

    def __init__(self) -> None:
        self._matrices: dict[tuple[int, int, int, str], torch.Tensor] = {}

    def matrix(
        self, *, seed: int, in_dim: int, out_dim: int, device: torch.device
    ) -> torch.Tensor:
        key = (seed, in_dim, out_dim, str(device))
        if key not in self._matrices:
            self._matrices[key] = gaussian_projection_matrix(in_dim, out_dim, seed=seed).to(
                device
            )
        return self._matrices[key]
