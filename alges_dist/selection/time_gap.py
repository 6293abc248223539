"""``selection.min_gap_s``: no two frames of one video closer in time than the gap in one batch.

Pure numpy: the selection task builds a ``TimeGap`` from the pool manifest's ``#t=`` URIs and
every pick rule honours it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


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
