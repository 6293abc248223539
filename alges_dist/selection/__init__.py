"""Selection: per-frame embeddings or scores -> the query batch (DESIGN "Selection").

The public face::

    from alges_dist.selection import kcenter_greedy, kmeanspp, top_k, random, select, Selection
    from alges_dist.selection import TimeGap, get_strategy, score_column

Inside, one concept per module: ``strategies`` (the table: what each strategy scores and
which pick rule it uses; pure data), ``time_gap`` (``selection.min_gap_s``; numpy),
``rules`` (the pick rules, their greedy loops written once against a ``Pool``), ``engine``
(``PoolShard``: min distances to the chosen set; ``DevicePool``: one device), ``storage``
(``StoredRows``: rows in storage form, the one pass per pick), ``knn`` (the labeled-set
start), ``shard_worker`` (one block of a pool sharded over Ray actors, which
``distributed/sharded_selection.py`` runs). Nothing here imports Ray, reads config files or
writes files. The torch parts load on first use: the config and the CLI read the strategy
table without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from alges_dist.selection.strategies import DISTANCE_RULES, STRATEGIES, Strategy, get_strategy, score_column
from alges_dist.selection.time_gap import TimeGap

_FROM_RULES = ("Pool", "PICK_RULES", "Selection", "device_pool", "kcenter_greedy", "kmeanspp", "random", "select",
               "top_k")

__all__ = ["DISTANCE_RULES", "STRATEGIES", "Strategy", "TimeGap", "get_strategy", "score_column", *_FROM_RULES]


def __getattr__(name: str) -> Any:  # PEP 562: torch is imported when a pick rule is first asked for
    if name in _FROM_RULES:
        return getattr(importlib.import_module("alges_dist.selection.rules"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
