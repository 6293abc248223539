"""The arms of an experiment: which cold start and which round strategy a run of it is.

An experiment's runs are its strategies, each after the one first batch; a cold-start
comparison (``loop.initial_strategies``) runs every strategy after every cold-start rule,
and names each such run (arm) ``RULE+STRATEGY``. The name is the one key of a run
everywhere (folders, results.csv, the report), so it is made and read here only.
"""

from __future__ import annotations

#: Joins a cold-start rule and a round strategy into an arm's name ("kcenter+alges-img-kcenter"):
#: safe in paths and object-store keys, and in no strategy's name.
ARM_SEPARATOR = "+"


def arm_name(initial: str | None, strategy: str) -> str:
    """The name of the run of ``strategy`` rounds after the ``initial`` cold start (None: the
    experiment's one cold start, the strategy's own name, as runs were always named)."""
    return strategy if initial is None else f"{initial}{ARM_SEPARATOR}{strategy}"


def split_arm(arm: str) -> tuple[str | None, str]:
    """(cold-start rule or None, round strategy) of an arm's name."""
    initial, sep, strategy = arm.rpartition(ARM_SEPARATOR)
    return (initial, strategy) if sep else (None, arm)
