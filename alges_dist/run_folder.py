"""The run folder: where every output of an experiment lives, its result columns and writers.

The loop writes through this module and the report reads through it, so neither
imports the other and a copied run folder renders anywhere::

    RUN/config.yaml                      resolved config of the run
    RUN/run.log                          the log of every command run on this folder
    RUN/initial/manifest.parquet         the initial labeled set: one per experiment,
                                         shared by every strategy and seed (as the paper)
    RUN/initial/seed_S/init.pt           initial weights of seed S (every retrain starts here)
    RUN/initial/seed_S/round_00/         round-0 model, eval and scores of seed S, shared by
                                         all strategies (same labels, same weights)
    RUN/STRATEGY/seed_S/manifest.parquet this run's labels (labeled_round per frame)
    RUN/STRATEGY/seed_S/round_RR/        model.pt, eval.json, scores/, errors.parquet (RR > 0),
                                         selection.parquet, hand-off files, record.json
    RUN/results.csv                      one row per (strategy, seed, round)
    RUN/queries.parquet                  one row per picked frame
    RUN/report/                          alges report: curves, tables, report.html
"""

from __future__ import annotations

import csv
import io
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from alges_dist.data.atomic import atomic_path, atomic_write_text

RESULT_COLUMNS = ["strategy", "seed", "round", "n_labeled", "dice", "miou", "mdice"]
QUERY_COLUMNS = ["strategy", "seed", "round", "pick_rank", "frame_id", "value"]


class RunLayout:
    """Where each output of a run folder lives."""

    def __init__(self, out: Path):
        self.out = Path(out)

    @property
    def config_path(self) -> Path:
        return self.out / "config.yaml"

    @property
    def results_path(self) -> Path:
        return self.out / "results.csv"

    @property
    def queries_path(self) -> Path:
        return self.out / "queries.parquet"

    @property
    def report_dir(self) -> Path:
        return self.out / "report"

    @property
    def initial_manifest_path(self) -> Path:
        return self.out / "initial" / "manifest.parquet"

    def init_weights_path(self, seed: int) -> Path:
        return self.out / "initial" / f"seed_{seed}" / "init.pt"

    def run_dir(self, strategy: str, seed: int) -> Path:
        return self.out / strategy / f"seed_{seed}"

    def round_dir(self, strategy: str, seed: int, r: int) -> Path:
        return self.run_dir(strategy, seed) / f"round_{r:02d}"

    def model_dir(self, strategy: str, seed: int, r: int) -> Path:
        # Round 0 trains on the same initial set from the same weights for every
        # strategy: train, evaluate and score it once per seed.
        if r == 0:
            return self.out / "initial" / f"seed_{seed}" / "round_00"
        return self.round_dir(strategy, seed, r)

    def model_path(self, strategy: str, seed: int, r: int) -> Path:
        return self.model_dir(strategy, seed, r) / "model.pt"

    def eval_path(self, strategy: str, seed: int, r: int) -> Path:
        return self.model_dir(strategy, seed, r) / "eval.json"

    def scores_dir(self, strategy: str, seed: int, r: int) -> Path:
        return self.model_dir(strategy, seed, r) / "scores"

    def selection_path(self, strategy: str, seed: int, r: int) -> Path:
        return self.round_dir(strategy, seed, r) / "selection.parquet"

    def record_path(self, strategy: str, seed: int, r: int) -> Path:
        return self.round_dir(strategy, seed, r) / "record.json"

    def manifest_path(self, strategy: str, seed: int) -> Path:
        return self.run_dir(strategy, seed) / "manifest.parquet"

    # ---- writers -------------------------------------------------------------------------
    def write_outputs(self, strategies: list[str], seeds: list[int], n_rounds: int) -> None:
        """Rebuild RUN/results.csv and RUN/queries.parquet from the round folders."""
        rows, queries = [], []
        for strategy in strategies:
            for seed in seeds:
                for r in range(n_rounds + 1):
                    record = self.record_path(strategy, seed, r)
                    if record.exists():
                        d = json.loads(record.read_text())
                        rows.append({k: d[k] for k in RESULT_COLUMNS})
                    selection = self.selection_path(strategy, seed, r)
                    if selection.exists():
                        t = pq.read_table(selection)
                        n = t.num_rows
                        queries.append(pa.table({
                            "strategy": [strategy] * n, "seed": pa.array([seed] * n, pa.int32()),
                            "round": pa.array([r] * n, pa.int32()), "pick_rank": t["pick_rank"],
                            "frame_id": t["frame_id"], "value": t["value"],
                        }))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.results_path, buf.getvalue())
        if queries:
            with atomic_path(self.queries_path) as tmp:
                pq.write_table(pa.concat_tables(queries), tmp)


def read_results(results_csv: Path) -> list[dict[str, Any]]:
    """results.csv rows with numbers as numbers."""
    with open(results_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    ints, floats = ("seed", "round", "n_labeled"), ("dice", "miou", "mdice")
    return [{k: int(v) if k in ints else float(v) if k in floats else v for k, v in r.items()} for r in rows]


def package_versions() -> dict[str, str]:
    """Versions recorded in every round record."""
    out = {"python": platform.python_version()}
    for name in ("torch", "ray", "segmentation-models-pytorch", "numpy", "pyarrow", "faiss-cpu", "faiss-gpu"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
