"""The strategy table: what each strategy scores and how it picks (one place).

A strategy is a score column of the scoring job (or none) and a pick rule of
``selection.PICK_RULES``. The config validates ``loop.strategies`` against this table,
the loop asks it which column to score and read, and the selection task asks it which
rule to call. Pure data: importing it pulls in neither torch nor Ray.
"""

from __future__ import annotations

from typing import NamedTuple

from alges_dist.errors import UnknownName


DISTANCE_RULES = frozenset({"kcenter", "kmeans++"})  # the rules that read (N, d) rows: the only ones sharded


class Strategy(NamedTuple):
    """How a strategy name turns scores into picks."""

    score: str | None  # the score_batch output it ranks or clusters; None: needs no scoring
    rule: str  # a pick rule name (selection.PICK_RULES)
    largest: bool = True  # top-k: pick the largest scores
    labeled_as_centers: bool = False  # k-center: the labeled set counts as chosen centers
    description: str = ""


STRATEGIES: dict[str, Strategy] = {
    "random": Strategy(None, "random", description="uniformly at random (seeded)"),
    "entropy": Strategy("entropy", "top-k", description="highest mean pixel entropy"),
    "margin": Strategy("margin", "top-k", largest=False,  # small p1 - p2 = uncertain
                       description="smallest mean top-2 margin"),
    "least-confidence": Strategy("least_confidence", "top-k", description="lowest mean max-probability"),
    "coreset": Strategy("feature", "kcenter", labeled_as_centers=True,
                        description="k-center greedy on the pooled encoder feature (Sener & Savarese)"),
    # The paper: k-means++ seeding over the unlabeled frames' embeddings (as BADGE).
    "alges-img": Strategy("alges_img", "kmeans++", description="k-means++ on the ALGES-img gradient embedding"),
    "alges-img-kcenter": Strategy("alges_img", "kcenter", labeled_as_centers=True,
                                  description="k-center greedy on the ALGES-img embedding (the default at scale)"),
    "alges-sem": Strategy("alges_sem", "kmeans++", description="k-means++ on the ALGES-sem class-gradient norms"),
}


def get_strategy(name: str) -> Strategy:
    """The table entry of ``name``; an unknown name raises listing the valid ones."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UnknownName(f"unknown strategy {name!r}; valid: {list(STRATEGIES)}") from None


def score_column(name: str, *, projection_dim: int | None) -> str | None:
    """The score-shard column the strategy's pick rule reads (None: it needs no scores).

    ALGES-img is read through its random projection when the scoring job computes one.
    """
    column = get_strategy(name).score
    if column == "alges_img" and projection_dim:
        return "alges_img_proj"
    return column
