"""Active-learning rounds: train -> evaluate -> score -> select -> label, resumable.

Orchestration only: the run folder's layout and writers are ``run_folder``, the
strategy table ``strategies``, the hand-off to people ``handoff``; every heavy stage is
a Ray job of ``distributed``. Outputs are written atomically, so ``alges run`` after a
crash resumes from the last completed stage and never re-selects or re-labels.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import yaml

from alges_dist.config import Config
from alges_dist.data.atomic import atomic_path, atomic_write_text
from alges_dist.data.demo import demo_pool
from alges_dist.data.frames import FrameDataset
from alges_dist.data.manifest import Manifest, filter_manifest, mark_labeled, read_manifest, write_manifest
from alges_dist.distributed.runtime import cluster_has_gpus
from alges_dist.distributed.scoring_job import embedding_matrix, read_scores, score_pool
from alges_dist.distributed.training import initial_weights, train_model
from alges_dist.evaluation import evaluate
from alges_dist.models import load_model
from alges_dist.handoff import collect_masks, frames_as_files, write_batch
from alges_dist.run_folder import RunLayout, package_versions
from alges_dist.selection import select
from alges_dist.strategies import get_strategy, score_column

log = logging.getLogger(__name__)


STAGES = ("train", "evaluate", "score", "select", "label")


def resolve_pool(cfg: Config) -> Path:
    """The pool manifest path of data.pool ("demo" generates the demo pool on first use)."""
    pool = cfg.data.pool
    if pool == "demo":
        return demo_pool(Path(cfg.data.demo_cache) if cfg.data.demo_cache else None, seed=cfg.data.demo_seed)
    path = Path(pool)
    if not path.is_file():
        raise FileNotFoundError(f"pool manifest {path} does not exist (write one with `alges ingest`)")
    return path


def _round_seed(seed: int, round_index: int) -> int:
    """Independent selection seed per (seed, round); round -1 draws the initial set."""
    return int(np.random.SeedSequence([seed, round_index + 1]).generate_state(1)[0])


class Experiment(RunLayout):
    """One run folder: its config, pool and the (strategy, seed) runs inside it."""

    def __init__(self, cfg: Config, out: Path, pool: Path, *, use_gpu: bool | None = None):
        super().__init__(out)
        self.cfg, self.pool = cfg, Path(pool)
        pool_manifest = read_manifest(self.pool)
        n_pool = filter_manifest(pool_manifest.table, split="pool").num_rows
        cfg.check_pool(n_pool, pool_manifest.encoding.n_classes, str(self.pool))
        self._use_gpu = use_gpu
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if cfg.selection.device == "auto" else cfg.selection.device
        )
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        log.info(
            "experiment %s: pool %s (%d pool frames, %d classes), strategies %s, seeds %s, %d rounds of %d",
            self.out, self.pool, n_pool, pool_manifest.encoding.n_classes, cfg.loop.strategies, cfg.loop.seeds,
            cfg.loop.n_rounds, cfg.loop.budget,
        )

    @property
    def use_gpu(self) -> bool:
        if self._use_gpu is None:  # asked of Ray on first use: validation runs before Ray starts
            self._use_gpu = cluster_has_gpus() if self.cfg.train.use_gpu == "auto" else bool(self.cfg.train.use_gpu)
        return self._use_gpu

    # ---- state -------------------------------------------------------------------
    def initial_manifest(self) -> Path:
        """The pool with the experiment's initial labeled set as round 0.

        Drawn once (``loop.initial_seed``) and shared by every strategy and seed, so
        their curves start from the same labels; a pool that already has labeled
        frames keeps them as the initial set. Labeled, val and test video frames become
        PNG files here (``RUN/initial/frames``): training and evaluation read files.
        """
        path = self.initial_manifest_path
        if path.exists():
            return path
        table, encoding = read_manifest(self.pool)
        if filter_manifest(table, split="pool", labeled=True).num_rows == 0:
            ids = filter_manifest(table, split="pool", labeled=False)["frame_id"].to_numpy(zero_copy_only=False)
            picks = select("random", np.zeros(len(ids), bool), self.cfg.loop.initial_labeled,
                           seed=_round_seed(self.cfg.loop.initial_seed, -1))
            table = mark_labeled(table, ids[picks.indices].tolist(), 0)
        needs_file = pc.and_(pc.or_(pc.is_valid(table["labeled_round"]), pc.not_equal(table["split"], "pool")),
                             pc.and_(pc.is_valid(table["mask_uri"]), pc.match_substring(table["image_uri"], "#t=")))
        to_files = table.filter(needs_file)["frame_id"].to_pylist()
        if to_files:
            table = frames_as_files(Manifest(table, encoding), to_files, self.out / "initial").table
        write_manifest(table, path, encoding)
        return path

    def manifest(self, strategy: str, seed: int) -> Manifest:
        path = self.manifest_path(strategy, seed)
        if not path.exists():
            table, encoding = read_manifest(self.initial_manifest())
            write_manifest(table, path, encoding)
        return read_manifest(path)

    def stage_done(self, stage: str, strategy: str, seed: int, r: int) -> bool:
        if stage == "train":
            return self.model_path(strategy, seed, r).exists()
        if stage == "evaluate":
            return self.eval_path(strategy, seed, r).exists()
        if stage == "score":
            return get_strategy(strategy).score is None or self.scores_dir(strategy, seed, r).exists()
        if stage == "select":
            return self.selection_path(strategy, seed, r).exists()
        if stage == "label":
            table = self.manifest(strategy, seed).table
            return pc.any(pc.equal(table["labeled_round"], r + 1)).as_py() is True
        raise KeyError(f"unknown stage {stage!r}; valid: {STAGES}")

    def stages(self, r: int) -> tuple[str, ...]:
        return STAGES[:2] if r == self.cfg.loop.n_rounds else STAGES

    # ---- stages ------------------------------------------------------------------
    def train(self, strategy: str, seed: int, r: int) -> None:
        cfg = self.cfg
        init = initial_weights(cfg, self.init_weights_path(seed), seed=cfg.train.seed + seed)
        if cfg.train.init == "finetune" and r > 0:
            init = self.model_dir(strategy, seed, r - 1) / "model.pt"
        manifest = self.initial_manifest() if r == 0 else self.manifest_path(strategy, seed)
        train_model(cfg, manifest, init_weights=init, out_dir=self.model_dir(strategy, seed, r), use_gpu=self.use_gpu)

    def load_model(self, strategy: str, seed: int, r: int) -> torch.nn.Module:
        cfg = self.cfg
        model = load_model(cfg.model.arch, cfg.model.encoder, cfg.data.n_classes,
                           self.model_path(strategy, seed, r))
        return model.to(self.device)

    def evaluate(self, strategy: str, seed: int, r: int) -> None:
        table, encoding = read_manifest(self.initial_manifest())  # test frames as files, not video seeks
        test = filter_manifest(table, split="test")
        loader = torch.utils.data.DataLoader(
            FrameDataset(test, encoding, tuple(self.cfg.data.image_size), self.cfg.data.normalize), batch_size=self.cfg.scoring.batch_size
        )
        scores = evaluate(
            self.load_model(strategy, seed, r), loader, n_classes=self.cfg.data.n_classes,
            dice_classes=self.cfg.data.dice_classes, ignore_index=encoding.ignore_index, device=self.device,
        )
        atomic_write_text(self.eval_path(strategy, seed, r), json.dumps(scores, indent=1))

    def score(self, strategy: str, seed: int, r: int) -> None:
        # Round 0's model and labels are every strategy's: its scores are shared too.
        manifest = self.initial_manifest() if r == 0 else self.manifest_path(strategy, seed)
        score_pool(self.cfg, manifest, self.model_path(strategy, seed, r), self.model_dir(strategy, seed, r),
                   use_gpu=self.use_gpu)

    def select(self, strategy: str, seed: int, r: int) -> None:
        spec, cfg = get_strategy(strategy), self.cfg
        table = self.manifest(strategy, seed).table
        labeled_ids = filter_manifest(table, split="pool", labeled=True)["frame_id"]
        if spec.score is None:
            candidates = filter_manifest(table, split="pool", labeled=False).select(["frame_id"])
        else:
            scores = read_scores(self.scores_dir(strategy, seed, r))
            candidates = scores.filter(pc.is_null(scores["error"]))  # undecodable frames are never picked
        ids = candidates["frame_id"].to_numpy(zero_copy_only=False)
        labeled = pc.is_in(candidates["frame_id"], value_set=labeled_ids.combine_chunks()).to_numpy(zero_copy_only=False)
        if not spec.labeled_as_centers:  # rank or seed among the unlabeled frames only
            candidates, ids, labeled = candidates.filter(pa.array(~labeled)), ids[~labeled], labeled[~labeled]
        column = score_column(strategy, projection_dim=cfg.scoring.projection_dim)
        values = embedding_matrix(candidates, column) if column else None
        picked = select(
            spec.rule, labeled, cfg.loop.budget,
            x=values if spec.rule in ("kcenter", "kmeans++") else None,
            score=values[:, 0] if spec.rule == "top-k" else None,
            largest=spec.largest, seed=_round_seed(seed, r),
            **self._method_options(spec.rule),
        )
        out = pa.table({
            "pick_rank": pa.array(np.arange(len(picked.indices)), pa.int32()),
            "frame_id": pa.array(ids[picked.indices], pa.string()),
            # distance to the chosen set at pick time; for top-k, the score it ranked by
            "value": pa.array(values[picked.indices, 0] if spec.rule == "top-k" else picked.radii, pa.float32()),
        })
        with atomic_path(self.selection_path(strategy, seed, r)) as tmp:
            pq.write_table(out, tmp)

    def _method_options(self, method: str) -> dict[str, Any]:
        s = self.cfg.selection
        if method == "kcenter":
            return {"device": self.device, "backend": s.backend, "storage_dtype": getattr(torch, s.storage_dtype)}
        if method == "kmeans++":
            return {"device": self.device, "backend": s.backend, "storage_dtype": getattr(torch, s.storage_dtype),
                    "local_trials": s.kmeanspp_local_trials}
        return {}

    def label(self, strategy: str, seed: int, r: int) -> None:
        picks = pq.read_table(self.selection_path(strategy, seed, r))["frame_id"].to_pylist()
        manifest = self.manifest(strategy, seed)
        if self.cfg.loop.oracle == "human":
            sheet = write_batch(self.round_dir(strategy, seed, r), picks, manifest)
            raise WaitingForLabels(
                f"round {r} of {strategy}/seed {seed}: {len(picks)} frames await annotation, listed in "
                f"{sheet.with_suffix('.csv')} (contact sheet {sheet}). Save one mask per frame as "
                f"FRAME_ID.png in a folder, then: alges label --out {self.out} --strategy {strategy} "
                f"--seed {seed} --masks FOLDER, and rerun this command"
            )
        rows = manifest.table.filter(pc.is_in(manifest.table["frame_id"], pa.array(picks)))
        missing = rows.filter(pc.is_null(rows["mask_uri"]))["frame_id"].to_pylist()
        if missing:
            raise ValueError(f"simulated oracle: frames {missing[:5]} have no mask_uri in {self.pool}")
        manifest = frames_as_files(manifest, picks, self.round_dir(strategy, seed, r))
        table = mark_labeled(manifest.table, picks, r + 1)
        write_manifest(table, self.manifest_path(strategy, seed), manifest.encoding)

    def import_labels(self, strategy: str, seed: int, masks: Path) -> int:
        """Label the pending round's picks with people's masks (``masks/FRAME_ID.png``).

        All or nothing (``handoff.collect_masks``): the masks are validated and copied into
        the round folder before the manifest changes. Returns the round.
        """
        pending = [r for r in range(self.cfg.loop.n_rounds)
                   if self.stage_done("select", strategy, seed, r) and not self.stage_done("label", strategy, seed, r)]
        if not pending:
            raise ValueError(f"{strategy}/seed {seed} in {self.out} has no selection waiting for labels")
        r = pending[0]
        picks = pq.read_table(self.selection_path(strategy, seed, r))["frame_id"].to_pylist()
        manifest = frames_as_files(self.manifest(strategy, seed), picks, self.round_dir(strategy, seed, r))
        copies = collect_masks(picks, manifest, masks, self.round_dir(strategy, seed, r) / "labels")
        table = manifest.table
        new_uri = [copies.get(f, u) for f, u in zip(table["frame_id"].to_pylist(), table["mask_uri"].to_pylist())]
        table = table.set_column(table.schema.get_field_index("mask_uri"), table.schema.field("mask_uri"),
                                 pa.array(new_uri, pa.string()))
        write_manifest(mark_labeled(table, picks, r + 1), self.manifest_path(strategy, seed), manifest.encoding)
        return r

    # ---- driving -----------------------------------------------------------------
    def advance(self, strategy: str, seed: int, *, rounds: int | None = None, until: str | None = None,
                on_stage: Callable[[str, str, int, int], None] | None = None) -> bool:
        """Run pending stages in order; stop after ``rounds`` completed rounds or stage ``until``.

        Returns True when this (strategy, seed) has finished every round.
        """
        self.manifest(strategy, seed)  # create the run's manifest from the initial set
        completed = 0
        for r in range(self.cfg.loop.n_rounds + 1):
            pending = [s for s in self.stages(r) if not self.stage_done(s, strategy, seed, r)]
            for stage in pending:
                log.info("%s seed %d round %d: %s", strategy, seed, r, stage)
                getattr(self, stage)(strategy, seed, r)
                if on_stage:
                    on_stage(stage, strategy, seed, r)
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

    def write_record(self, strategy: str, seed: int, r: int) -> None:
        table = self.manifest(strategy, seed).table
        n_labeled = pc.sum(pc.less_equal(table["labeled_round"], r)).as_py() or 0
        record = {
            "strategy": strategy, "seed": seed, "round": r, "n_labeled": n_labeled,
            **json.loads(self.eval_path(strategy, seed, r).read_text()),
            "config": self.cfg.model_dump(mode="json"),
            "selection_seed": _round_seed(seed, r), "projection_seed": self.cfg.scoring.projection_seed,
            "versions": package_versions(),
        }
        atomic_write_text(self.record_path(strategy, seed, r), json.dumps(record, indent=1))

    def write_outputs(self) -> None:
        """Rebuild RUN/results.csv and RUN/queries.parquet from the round folders."""
        loop = self.cfg.loop
        super().write_outputs(loop.strategies, loop.seeds, loop.n_rounds)


class WaitingForLabels(RuntimeError):
    """The human oracle has frames to annotate; the run resumes once they are imported."""
