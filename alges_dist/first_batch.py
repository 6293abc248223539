"""The stages before round 0: the first batch and the test frames, picked without a model.

Orchestration only, like ``loop``: the picking itself is ``cold_start`` (run on workers),
the hand-off to people is ``people``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alges_dist import people
from alges_dist.data.atomic import atomic_write_text
from alges_dist.data.rounds import count_labeled
from alges_dist.distributed.tasks import on_worker
from alges_dist.handoff import Batch, batch_key, correction_summary
from alges_dist.run_folder import package_versions

STAGES = ("score", "select", "label")


def initial_seed(seed: int) -> int:
    """The selection seed of the first batch (round -1 of ``loop.initial_seed``)."""
    return int(np.random.SeedSequence([seed, 0]).generate_state(1)[0])


class FirstBatch:
    """The stages before round 0: the first batch and the test frames, picked without a model.

    Like a round's: ``score`` (``kcenter`` only: the label-free embedding, by the Ray Data
    scoring job), ``select`` (a worker writes ``RUN/initial/selection.parquet``: pool picks
    when the pool has no labeled frame, test picks when people annotate and test frames lack
    masks; see ``cold_start``), ``label`` (the simulated oracle reveals the pool's masks;
    people get the hand-off and the run stops until ``alges label``). The initial manifest,
    written last, marks them all done; ``RUN/initial/record.json`` says where each ran.
    """

    def __init__(self, exp: Any, initial: str | None = None):
        """initial: the cold-start rule of one of several (``loop.initial_strategies``, its own
        folder ``RUN/initial/RULE``); None: the experiment's one first batch (``RUN/initial``)."""
        self.exp, self.initial = exp, initial
        self.name = "the first batch" if initial is None else f"the {initial} first batch"

    @property
    def folder(self) -> Path:
        return self.exp.initial_dir(self.initial)

    @property
    def manifest_path(self) -> Path:
        return self.folder / "manifest.parquet"

    @property
    def selection_path(self) -> Path:
        return self.folder / "selection.parquet"

    @property
    def record_path(self) -> Path:
        return self.folder / "record.json"

    @property
    def rule(self) -> str:
        return self.initial or self.exp.cfg.loop.first_batch_strategy

    @property
    def people(self) -> bool:
        return self.exp.cfg.loop.oracle != "simulated"

    def batch(self) -> Batch:
        key = "first_batch" if self.initial is None else f"first_batch_{self.initial}"
        return Batch(self.name, self.folder, self.selection_path, None, batch_key(self.exp, key), "")

    def pending(self) -> bool:
        """Handed to people and not labeled yet."""
        return (self.people and self.selection_path.exists() and not self.manifest_path.exists()
                and pq.read_metadata(self.selection_path).num_rows > 0)

    def done(self, stage: str) -> bool:
        if self.manifest_path.exists():
            return True
        if stage == "score":  # only k-center needs an embedding, and only when it picks pool frames
            needs = self.rule == "kcenter" and (self.exp.summary or {}).get("n_labeled", 0) == 0
            return not needs or (self.folder / "scores.json").exists()
        if stage == "select":
            return self.selection_path.exists()
        return False

    def advance(self) -> Path:
        """Run the pending stages; returns the initial manifest (WaitingForLabels while people label)."""
        exp, seed = self.exp, self.exp.cfg.loop.initial_seed
        if not self.manifest_path.exists():
            if exp.summary is None:
                exp.check()
            for stage in STAGES:
                if not self.done(stage):
                    exp._notify("start", stage, self.name.removeprefix("the "), seed, -1, {})
                    info = getattr(self, stage)()
                    exp._notify("done", stage, self.name.removeprefix("the "), seed, -1, info)
        if not self.record_path.exists():
            self.write_record()
        return self.manifest_path

    def score(self) -> dict[str, Any]:
        from alges_dist.distributed.scoring_job import score_pool
        from alges_dist.distributed.training import initial_weights

        exp, cfg = self.exp, self.exp.cfg
        model = self.folder / "embedding_model.pt"  # the model at its initial (ImageNet, where set) weights
        on_worker(initial_weights, exp.cfg_dict, str(model.resolve()), cfg.train.seed + cfg.loop.initial_seed)
        result = score_pool(cfg, exp.pool, model, self.folder, use_gpu=exp.use_gpu)
        return {"n_scored": result.n_scored, "n_errors": result.n_errors, "workers": result.workers,
                "seconds": result.seconds}

    def select(self) -> dict[str, Any]:
        from alges_dist.cold_start import plan_first_batch

        exp, started = self.exp, time.perf_counter()
        scores = self.folder / "scores"
        gpu = exp.use_gpu and self.rule == "kcenter" and exp.cfg.selection.device != "cpu"
        info, where = on_worker(plan_first_batch, exp.cfg_dict, str(exp.pool.resolve()),
                                str(self.selection_path.resolve()), rule=self.rule,
                                seed=initial_seed(exp.cfg.loop.initial_seed),
                                scores_dir=str(scores.resolve()) if scores.is_dir() else None, people=self.people,
                                gpu=gpu, fresh=gpu)
        info = {**info, "where": where.as_dict(), "seconds": round(time.perf_counter() - started, 3)}
        atomic_write_text(self.folder / "selection.json", json.dumps(info, indent=1))
        return info

    def label(self, train: list[str] | None = None, **people_labels: Any) -> dict[str, Any]:
        """The initial manifest: ``train`` labeled in round 0 with people's masks (``mask_uris``,
        ``image_uris``), or, as a stage, the simulated oracle's (the pool's masks) when no person
        is needed; otherwise the hand-off (WaitingForLabels)."""
        from alges_dist.cold_start import write_initial_manifest

        exp, started = self.exp, time.perf_counter()
        args = (str(exp.pool.resolve()), str(self.manifest_path.resolve()))
        if train is not None:  # `alges label`: in-process, like every import of people's labels (no Ray)
            n, where = write_initial_manifest(*args, train, max_pixels=exp.cfg.data.max_pixels, **people_labels), None
        else:
            picks = self.batch().picks()
            if self.people and picks.num_rows:
                people.hand_off(exp, self.batch())
            train = picks.filter(pc.equal(picks["split"], "pool"))["frame_id"].to_pylist()
            n, where = on_worker(write_initial_manifest, *args, train, max_pixels=exp.cfg.data.max_pixels)
        where = where.as_dict() if where is not None else {"node": "alges label (in-process)"}
        atomic_write_text(self.folder / "label.json", json.dumps(
            {"n_labeled": n, "where": where, "seconds": round(time.perf_counter() - started, 3)}))
        self.write_record()
        return {"n_labeled": n}

    def write_record(self) -> None:
        """RUN/initial/record.json: how the first batch was picked and where each stage ran."""
        stages = {}
        for stage, path in (("score", self.folder / "scores.json"), ("select", self.folder / "selection.json"),
                            ("label", self.folder / "label.json")):
            if path.exists():
                d = json.loads(path.read_text())
                stages[stage] = {"where": d.get("where") or d.get("workers"), "seconds": d.get("seconds")}
        selection = json.loads((self.folder / "selection.json").read_text()) if "select" in stages else {}
        record = {"strategy": selection.get("rule"), "n_picks": selection.get("n_picks"),
                  "n_test": selection.get("n_test"), "oracle": self.exp.cfg.loop.oracle,
                  "n_labeled": count_labeled(self.manifest_path), "stages": stages,
                  "config": self.exp.cfg_dict, "versions": package_versions()}
        correction = correction_summary(self.folder)
        if correction is not None:
            record["correction"] = correction
        atomic_write_text(self.record_path, json.dumps(record, indent=1))
