"""Temporal redundancy of query batches on the demo videos (issue 11, item 4).

Runs ``alges run`` on the generated demo pool (H.264 videos, one row per second) and
prints, per strategy and round, how many picks lie closer than ``--within`` seconds to
another pick of the batch or to a labeled frame of the same video (mean over seeds).
Gap off, then on once the selection engine has ``selection.min_gap_s``::

    python scripts/measure_near_picks.py --out runs/near_gap_off
    python scripts/measure_near_picks.py --out runs/near_gap_on --set selection.min_gap_s=5

Smoke test (minutes on 2 cores): ``--set data.image_size=[64,64] --set train.epochs=1
--strategies random,entropy``. A finished run folder is reused (``alges run`` resumes).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub weights offline: asking retries for 20-50 s

import pyarrow.parquet as pq
import yaml

from alges_dist.near_picks import near_pick_counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/near_picks"), help="run folder")
    parser.add_argument("--within", type=float, default=5.0, help="seconds (default 5)")
    parser.add_argument("--strategies", default="random,entropy,margin,coreset,alges-img-kcenter")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to alges run (repeatable), e.g. selection.min_gap_s=5")
    args = parser.parse_args()
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    sets = [f"loop.strategies=[{', '.join(strategies)}]", f"loop.seeds=[{', '.join(map(str, seeds))}]",
            *args.overrides]
    command = [sys.executable, "-m", "alges_dist.cli", "run", "--pool", "demo", "--out", str(args.out),
               "--no-dashboard", *[a for s in sets for a in ("--set", s)]]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)

    cfg = yaml.safe_load((args.out / "config.yaml").read_text())
    queries = pq.read_table(args.out / "queries.parquet")
    counts = near_pick_counts(args.out, queries, strategies, seeds, within_s=args.within)
    gap = cfg["selection"].get("min_gap_s", "not in this config")
    print(f"\npicks closer than {args.within:g} s to another pick or a labeled frame of the same video "
          f"(mean over seeds {seeds}); budget {cfg['loop']['budget']} per round; selection.min_gap_s: {gap}\n")
    print("| strategy | " + " | ".join(f"round {r}" for r in range(cfg["loop"]["n_rounds"])) + " | total | share |")
    print("|---|" + "---|" * (cfg["loop"]["n_rounds"] + 2))
    for strategy in strategies:
        per_round = [counts.get((strategy, r), float("nan")) for r in range(cfg["loop"]["n_rounds"])]
        total = sum(per_round)
        share = total / (cfg["loop"]["budget"] * cfg["loop"]["n_rounds"])
        print(f"| {strategy} | " + " | ".join(f"{c:.1f}" for c in per_round) + f" | {total:.1f} | {share:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
