"""Active-learning rounds: train -> evaluate -> score -> select -> label, resumable.

Orchestration only. The run folder's layout and writers are ``run_folder``, the strategy
table ``strategies``, the stages before round 0 (the first batch and test frames, picked
without a model) ``first_batch``, which batches wait for people and how they go out and
come back ``people`` (the files and formats: ``handoff``); every stage that touches the
pool's rows, a model or the embeddings runs on Ray workers (``distributed``): Ray Train
for fits, Ray Data for scoring, Ray tasks for evaluation, selection and manifest steps.
The driver holds ids of one query batch at most, never an N x d matrix, and needs no CUDA.

A stage counts as done when its output exists, and each output is written last, after its
checks (atomic files; the score shards' ``scores.json`` marker after the rename), so
``alges run`` after a crash resumes from the last completed stage and never re-selects or
re-labels.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from alges_dist import people, storage
from alges_dist.arms import split_arm
from alges_dist.config import RESUMABLE_KEYS, Config
from alges_dist.data.atomic import atomic_path, atomic_write_text
from alges_dist.data.demo import demo_pool
from alges_dist.data.manifest import read_manifest
from alges_dist.data.rounds import (
    count_labeled,
    full_data_manifest,
    label_frames,
    labeled_in_round,
    pool_summary,
)
from alges_dist.distributed.runtime import cluster_has_gpus
from alges_dist.distributed.tasks import on_worker
from alges_dist.first_batch import FirstBatch
from alges_dist.handoff import CORRECTION_CSV, correction_summary, write_correction
from alges_dist.people import WaitingForLabels  # noqa: F401  (the loop's stop signal; cli catches it here)
from alges_dist.run_folder import (
    RunLayout,
    check_settings,
    fingerprint,
    forced_changes,
    package_versions,
)
from alges_dist.selection import get_strategy, score_column

log = logging.getLogger(__name__)

STAGES = ("train", "evaluate", "score", "select", "label")


def resolve_pool(cfg: Config) -> Path | storage.ObjectPath:
    """The pool manifest of data.pool, a path or an object-store URI ("demo" generates the demo
    pool on first use)."""
    pool = cfg.data.pool
    if pool == "demo":
        return demo_pool(Path(cfg.data.demo_cache) if cfg.data.demo_cache else None, seed=cfg.data.demo_seed)
    path = storage.as_path(pool)
    if not storage.exists(path) or storage.is_dir(path):
        raise FileNotFoundError(f"pool manifest {path} does not exist (write one with `alges ingest`)")
    return path


def _round_seed(seed: int, round_index: int) -> int:
    """Independent selection seed per (seed, round); round -1 draws the initial set."""
    return int(np.random.SeedSequence([seed, round_index + 1]).generate_state(1)[0])


class Experiment(RunLayout):
    """One run folder: its config, pool and the (strategy, seed) runs inside it.

    ``check`` validates the pool against the config on a worker; ``prepare`` records the
    settings on a new folder (or refuses other settings on an existing one). Both run
    before any stage. on_stage(event, stage, strategy, seed, r, info) is told of each
    stage's "start" and "done" (info: its outputs' summary), on_progress of a fit's epochs.
    """

    def __init__(self, cfg: Config, out: Path, pool: Path, *, use_gpu: bool | None = None):
        super().__init__(out)
        self.cfg, self.pool = cfg, storage.as_path(pool)
        self._use_gpu = use_gpu
        self.summary: dict[str, Any] | None = None
        self.on_stage: Callable[..., None] | None = None
        self.on_progress: Callable[[dict[str, Any]], None] | None = None
        self.first_batch = FirstBatch(self)  # the one first batch (people hand it off); see first_batch_of
        self._cold_starts = {None: self.first_batch} | {i: FirstBatch(self, i) for i in cfg.loop.initial_strategies or ()}

    @property
    def cfg_dict(self) -> dict[str, Any]:
        return self.cfg.model_dump(mode="json")

    @property
    def use_gpu(self) -> bool:
        if self._use_gpu is None:  # asked of Ray on first use: validation runs before Ray starts
            self._use_gpu = cluster_has_gpus() if self.cfg.train.use_gpu == "auto" else bool(self.cfg.train.use_gpu)
        return self._use_gpu

    def check(self) -> dict[str, Any]:
        """Validate the pool (rows, URIs, masks the run needs) and the config against it and
        the cluster; runs on a worker: the driver never reads the pool's rows."""
        import ray

        cfg = self.cfg
        simulated = cfg.loop.oracle == "simulated"  # people annotate the first batch and test frames
        self.summary, _ = on_worker(pool_summary, str(self.pool.resolve()), needs_pool_masks=simulated,
                                    needs_test_masks=simulated)
        cfg.check_pool(self.summary["n_pool"], self.summary["n_classes"], str(self.pool), self.summary["n_labeled"])
        cfg.check_resources(ray.cluster_resources(), use_gpu=self.use_gpu)
        log.info("experiment %s: pool %s (%d pool frames, %d labeled, %d test, %d classes), runs %s, "
                 "seeds %s, %d rounds of %d, gpu=%s", self.out, self.pool, self.summary["n_pool"],
                 self.summary["n_labeled"], self.summary["n_test"], self.summary["n_classes"], cfg.loop.arms,
                 cfg.loop.seeds, cfg.loop.n_rounds, cfg.loop.budget, self.use_gpu)
        return self.summary

    def prepare(self, *, force_config: bool = False) -> list[str]:
        """Record the run's settings (config.yaml, fingerprint.json) or, resuming, refuse other
        settings unless ``force_config``; returns the accepted changes (logged to run.log)."""
        if self.summary is None:
            self.check()
        new = fingerprint(self.cfg_dict, self.summary["sha256"], ignore=RESUMABLE_KEYS)
        changes = check_settings(self, new, force=force_config)
        for change in changes:
            log.warning("--force-config: %s", change)
        atomic_write_text(self.config_path, yaml.safe_dump(self.cfg_dict, sort_keys=False))
        return changes

    # ---- state -------------------------------------------------------------------
    def first_batch_of(self, arm: str | None = None) -> FirstBatch:
        """The first batch an arm starts from (None: the experiment's first, ``loop.arms[0]``'s)."""
        return self._cold_starts[split_arm(arm or self.cfg.loop.arms[0])[0]]

    def initial_manifest(self, arm: str | None = None) -> Path:
        """The pool with the arm's initial labeled set as round 0 (``RUN/initial``, or
        ``RUN/initial/RULE`` in a cold-start comparison), made by the first batch's stages
        (:class:`FirstBatch`) on first use; raises WaitingForLabels while people annotate it."""
        return self.first_batch_of(arm).advance()

    def manifest_file(self, strategy: str, seed: int) -> Path:
        """This run's manifest, a copy of the initial one on first use."""
        path = self.manifest_path(strategy, seed)
        if not path.exists():
            initial = self.initial_manifest(strategy)  # the first batch's stages, before anything of this run is written
            with atomic_path(path) as tmp:
                shutil.copyfile(initial, tmp)
        return path

    def manifest(self, strategy: str, seed: int):
        """This run's manifest, read whole: for the hand-off to people (a batch at a time), not the stages."""
        return read_manifest(self.manifest_file(strategy, seed))

    def stage_done(self, stage: str, strategy: str, seed: int, r: int) -> bool:
        if stage == "train":
            return self.model_path(strategy, seed, r).exists()
        if stage == "evaluate":
            return self.eval_path(strategy, seed, r).exists()
        if stage == "score":  # the marker is written after the shards passed their checks
            return get_strategy(split_arm(strategy)[1]).score is None or (self.model_dir(strategy, seed, r) / "scores.json").exists()
        if stage == "select":
            return self.selection_path(strategy, seed, r).exists()
        if stage == "label":
            return labeled_in_round(self.manifest_file(strategy, seed), r + 1)
        raise KeyError(f"unknown stage {stage!r}; valid: {STAGES}")

    def stages(self, r: int) -> tuple[str, ...]:
        return STAGES[:2] if r == self.cfg.loop.n_rounds else STAGES

    def _labels_of(self, strategy: str, seed: int, r: int) -> Path:
        # Round 0's model and labels are every strategy's: trained, evaluated and scored once.
        return self.initial_manifest(strategy) if r == 0 else self.manifest_file(strategy, seed)

    # ---- stages ------------------------------------------------------------------
    def train(self, strategy: str, seed: int, r: int) -> dict[str, Any]:
        from alges_dist.distributed.training import train_model

        cfg = self.cfg
        init, init_seed = self.init_weights_path(seed), cfg.train.seed + seed  # the fit writes init on first use
        if cfg.train.init == "finetune" and r > 0:
            init, init_seed = self.model_path(strategy, seed, r - 1), None
        result = train_model(cfg, self._labels_of(strategy, seed, r), init_weights=init, init_seed=init_seed,
                             out_dir=self.model_dir(strategy, seed, r), use_gpu=self.use_gpu,
                             on_progress=self.on_progress)
        last = result.history[-1] if result.history else {}
        return {"where": result.where, "seconds": result.seconds, "fixed_s": result.timings["fixed_s"],
                **{k: last[k] for k in ("train_loss", "val_dice") if k in last}}

    def evaluate(self, strategy: str, seed: int, r: int) -> dict[str, Any]:
        from alges_dist.distributed.evaluation_job import evaluate_checkpoint

        # the initial manifest: its test frames are files (video frames written once), never video seeks
        scores, where = on_worker(evaluate_checkpoint, self.cfg_dict, str(self.initial_manifest(strategy).resolve()),
                                  str(self.model_path(strategy, seed, r).resolve()), gpu=self.use_gpu,
                                  cpus=self.cfg.scoring.cpus_per_actor)
        atomic_write_text(self.eval_path(strategy, seed, r), json.dumps({**scores, "where": where.as_dict()}, indent=1))
        if scores["dice"] is None:
            return {"skipped": "no test frames with masks", "where": where.as_dict()}
        return {"dice": scores["dice"], "miou": scores["miou"], "where": where.as_dict()}

    def reference(self, seed: int) -> None:
        """The full-data reference of ``seed`` (``loop.full_data_reference``): train on every pool
        frame with a mask, with the rounds' recipe and initial weights, and evaluate on the test
        split, both on workers. Resumable like the stages: the record, then the model, mark what is done."""
        from alges_dist.distributed.evaluation_job import evaluate_checkpoint
        from alges_dist.distributed.training import train_model

        cfg = self.cfg
        if self.reference_record_path(seed).exists():
            return
        if not self.reference_manifest_path.exists():
            on_worker(full_data_manifest, str(self.pool.resolve()), str(self.reference_manifest_path.resolve()),
                      max_pixels=self.cfg.data.max_pixels)
        if not self.reference_model_path(seed).exists():
            self._notify("start", "train", "full-data reference", seed, 0, {})
            result = train_model(cfg, self.reference_manifest_path, init_weights=self.init_weights_path(seed),
                                 init_seed=cfg.train.seed + seed, out_dir=self.reference_dir(seed),
                                 use_gpu=self.use_gpu, on_progress=self.on_progress)
            self._notify("done", "train", "full-data reference", seed, 0, {"seconds": result.seconds})
        # the initial manifest: its test frames are files (video frames written once), never video seeks
        scores, where = on_worker(evaluate_checkpoint, self.cfg_dict, str(self.initial_manifest().resolve()),
                                  str(self.reference_model_path(seed).resolve()), gpu=self.use_gpu,
                                  cpus=cfg.scoring.cpus_per_actor)
        record = {"seed": seed, "n_labeled": count_labeled(self.reference_manifest_path), **scores,
                  "where": where.as_dict(), "config": self.cfg_dict, "versions": package_versions()}
        atomic_write_text(self.reference_record_path(seed), json.dumps(record, indent=1))

    def score(self, strategy: str, seed: int, r: int) -> dict[str, Any]:
        from alges_dist.distributed.scoring_job import score_pool

        result = score_pool(self.cfg, self._labels_of(strategy, seed, r), self.model_path(strategy, seed, r),
                            self.model_dir(strategy, seed, r), use_gpu=self.use_gpu)
        return {"n_scored": result.n_scored, "n_errors": result.n_errors, "workers": result.workers,
                "seconds": result.seconds, "fixed_s": round(result.seconds - result.timings["stream_s"], 3)}

    def select(self, strategy: str, seed: int, r: int) -> dict[str, Any]:
        """Pick the batch on a worker (one GPU when the run uses GPUs; sharded over actors when
        ``selection.shards`` says so) and write ``selection.parquet`` (the commit, last)."""
        from alges_dist.distributed.selection_task import pick_batch

        rule = split_arm(strategy)[1]  # the round strategy of the arm
        column = score_column(rule, projection_dim=self.cfg.scoring.projection_dim)
        scores = str(self.scores_dir(strategy, seed, r).resolve()) if column else None
        n_shards = self._selection_shards(scores, column)
        gpu = self.use_gpu and n_shards == 1 and column is not None and self.cfg.selection.device != "cpu"
        # on a GPU, a process of its own: the device memory goes back to the scorers when it ends
        # (on the CPU a warm worker saves the 2-3 s of a new process and its imports)
        picked, where = on_worker(pick_batch, self.cfg_dict, rule, str(self.manifest_file(strategy, seed).resolve()),
                                  scores, seed=_round_seed(seed, r), n_shards=n_shards, pool=str(self.pool.resolve()),
                                  gpu=gpu, fresh=gpu)
        info = {k: v for k, v in picked.items() if k not in ("frame_id", "value")} | {"where": where.as_dict()}
        atomic_write_text(self.round_dir(strategy, seed, r) / "selection.json", json.dumps(info, indent=1))
        out = pa.table({
            "pick_rank": pa.array(np.arange(len(picked["frame_id"])), pa.int32()),
            "frame_id": pa.array(picked["frame_id"], pa.string()),
            # distance to the chosen set at pick time; for top-k, the score it ranked by
            "value": pa.array(picked["value"], pa.float32()),
        })
        with atomic_path(self.selection_path(strategy, seed, r)) as tmp:
            pq.write_table(out, tmp)
        return info

    def _selection_shards(self, scores: str | None, column: str | None) -> int:
        """selection.shards, resolved: "auto" asks a worker of the selection's kind how much
        memory its device has and compares it with the selection's peak bytes on that device
        (from the shard footers: on the CPU a half-storage selection also holds the float32 copy)."""
        from alges_dist.distributed.selection_task import device_memory, selection_bytes, shards_needed

        shards = self.cfg.selection.shards
        if shards != "auto" or column is None:
            return 1 if column is None else int(shards)
        memory, _ = on_worker(device_memory, gpu=self.use_gpu and self.cfg.selection.device != "cpu")
        peak = selection_bytes(scores, column, self.cfg.selection.storage_dtype, memory["device"])
        return shards_needed(peak, memory["free"])

    def label(self, strategy: str, seed: int, r: int) -> dict[str, Any]:
        if self.cfg.loop.oracle != "simulated":
            people.hand_off(self, people.round_batch(self, strategy, seed, r))  # raises WaitingForLabels
        # simulated oracle: the pool's own masks (checked to exist before the run started)
        picks = pq.read_table(self.selection_path(strategy, seed, r))["frame_id"].to_pylist()
        self.simulated_effort(strategy, seed, r, picks)
        n_labeled, _ = on_worker(label_frames, str(self.manifest_file(strategy, seed).resolve()), picks, r + 1,
                                 frames_dir=str(self.round_dir(strategy, seed, r).resolve()),
                                 max_pixels=self.cfg.data.max_pixels)
        return {"n_labeled": n_labeled}

    def simulated_effort(self, strategy: str, seed: int, r: int, picks: list[str]) -> None:
        """``ROUND/correction.csv`` of the simulated oracle: per pick, the pixels and regions an
        annotator would change in the picking model's masks (on a worker, before the picks are
        labeled: their rows still address the pool's frames). Written once; a resume keeps it."""
        from alges_dist.annotation.regions import CorrectionEffort
        from alges_dist.simulated_oracle import simulated_correction

        round_dir = self.round_dir(strategy, seed, r)
        if not picks or (round_dir / CORRECTION_CSV).exists():
            return
        effort, _ = on_worker(simulated_correction, self.cfg_dict, str(self.manifest_file(strategy, seed).resolve()),
                              str(self.model_path(strategy, seed, r).resolve()), picks,
                              cpus=self.cfg.scoring.cpus_per_actor)
        write_correction(round_dir, [CorrectionEffort(**e) for e in effort])

    # ---- driving -----------------------------------------------------------------
    def advance(self, strategy: str, seed: int, *, rounds: int | None = None, until: str | None = None) -> bool:
        """Run pending stages in order; stop after ``rounds`` completed rounds or stage ``until``.

        Returns True when this (strategy, seed) has finished every round.
        """
        self.manifest_file(strategy, seed)  # create the run's manifest from the initial set
        if self.cfg.loop.full_data_reference and until is None:
            self.reference(seed)  # once per seed, shared by its strategies
        completed = 0
        for r in range(self.cfg.loop.n_rounds + 1):
            pending = [s for s in self.stages(r) if not self.stage_done(s, strategy, seed, r)]
            for stage in pending:
                if until is not None and STAGES.index(stage) > STAGES.index(until):
                    self.write_outputs()  # e.g. `alges train` where the round's model exists (round 0 is
                    return False  # shared): the stages after it wait for their own command
                log.info("%s seed %d round %d: %s", strategy, seed, r, stage)
                self._notify("start", stage, strategy, seed, r, {})
                info = getattr(self, stage)(strategy, seed, r)
                self._notify("done", stage, strategy, seed, r, info)
                if stage == until:
                    self.write_outputs()
                    return False
            if not self.record_path(strategy, seed, r).exists():
                self.write_record(strategy, seed, r)  # also after a stop between label and record
            if pending:
                completed += 1
                if rounds is not None and completed >= rounds:
                    self.write_outputs()
                    return r == self.cfg.loop.n_rounds
        self.write_outputs()
        return True

    def _notify(self, event: str, stage: str, strategy: str, seed: int, r: int, info: dict[str, Any]) -> None:
        if self.on_stage is not None:
            self.on_stage(event, stage, strategy, seed, r, info)

    def write_record(self, strategy: str, seed: int, r: int) -> None:
        """record.json of a finished round: results, where each stage ran, settings, versions."""
        evaluation = json.loads(self.eval_path(strategy, seed, r).read_text())
        stages = {"evaluate": {"where": evaluation.pop("where", None)}}
        for stage, path in (("train", self.model_dir(strategy, seed, r) / "train.json"),
                            ("score", self.model_dir(strategy, seed, r) / "scores.json"),
                            ("select", self.round_dir(strategy, seed, r) / "selection.json")):
            if path.exists():
                d = json.loads(path.read_text())
                stages[stage] = {"where": d.get("where") or d.get("workers"), "seconds": d.get("seconds")}
                if "timings" in d:  # where the stage's seconds went (issue 24)
                    stages[stage]["timings"] = d["timings"]
        record = {
            "strategy": strategy, "seed": seed, "round": r,
            "n_labeled": count_labeled(self.manifest_file(strategy, seed), up_to_round=r),
            **evaluation, "stages": stages,
            "config": self.cfg_dict, "forced_config_changes": forced_changes(self),
            "selection_seed": _round_seed(seed, r), "projection_seed": self.cfg.scoring.projection_seed,
            "versions": package_versions(),
        }
        correction = correction_summary(self.round_dir(strategy, seed, r))
        if correction is not None:  # people corrected the model's pre-annotations this round
            record["correction"] = correction
        atomic_write_text(self.record_path(strategy, seed, r), json.dumps(record, indent=1))

    def write_outputs(self) -> None:
        """Rebuild RUN/results.csv and RUN/queries.parquet from the round folders."""
        loop = self.cfg.loop
        super().write_outputs(loop.arms, loop.seeds, loop.n_rounds)

