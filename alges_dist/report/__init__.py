"""The report: what a run folder says, for people. Its face is :func:`write_report` (``RUN/report/``).

Reads only the run folder (through ``run_folder``), never the loop or the hand-off:

- ``statistics``: paired statistics over seeds (bootstrap interval, sign-flip test,
  frames to a target), pure numpy;
- ``comparisons``: the tables built from them (AULC, round differences, frames and effort
  to a target, the headline);
- ``effort``: annotation effort per round (``correction.csv`` of each round) and its curves;
- ``forecast``: an inverse power law fitted per seed, extrapolated to a target Dice;
- ``figures``: the learning and effort curves;
- ``tables``: CSV, Markdown and the html pieces; ``writer``: the files of ``RUN/report/`` and ``report.html``.
"""

from alges_dist.report.statistics import aulc
from alges_dist.report.tables import markdown_table
from alges_dist.report.writer import (
    TARGET_FRACTIONS,
    aulc_table,
    common_rounds,
    correction_table,
    format_results,
    plot_learning_curves,
    round_table,
    write_report,
)

__all__ = ["TARGET_FRACTIONS", "aulc", "aulc_table", "common_rounds", "correction_table", "format_results",
           "markdown_table", "plot_learning_curves", "round_table", "write_report"]
