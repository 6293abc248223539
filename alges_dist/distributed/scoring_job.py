"""Scoring job: Ray Data streams the pool's frames through an actor pool of scorers.

read_parquet(manifest) -> pool rows -> decode + resize (CPU tasks; image files per row,
video frames per chunk of one video: ``decode_stage``) -> Scorer actors
(one model load per actor, ``num_gpus=1`` each where GPUs exist) -> score shards
(Parquet: frame_id, error, every ``score_batch`` output; vectors as fixed-size lists).

A frame that fails to decode keeps its row with ``error`` set and null scores; after the
job the errors go to ``errors.parquet`` and the job fails only past
``scoring.max_error_rate``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from alges_dist.config import Config
from alges_dist.data.atomic import atomic_path, atomic_write_text
from alges_dist.data.frames import normalize_images
from alges_dist.distributed.decode_stage import decoded_pool
from alges_dist.distributed.tasks import here, on_worker, process_started, worker_device
from alges_dist.errors import AlgesError, InputError

log = logging.getLogger(__name__)

ROWS_PER_BLOCK_IN_BATCHES = 8
_AUTOCAST = {"none": None, "bf16": "bfloat16", "fp16": "float16"}  # torch dtypes by name


def scores_schema(dims: dict[str, int]) -> pa.Schema:
    # worker: "node id/ip/device" of the actor that scored the row (dictionary-encoded in Parquet:
    # a few bytes per file), so the round records where scoring ran
    fields = [pa.field("frame_id", pa.string(), nullable=False), pa.field("error", pa.string()),
              pa.field("worker", pa.string())]
    for name, d in dims.items():
        fields.append(pa.field(name, pa.float32() if d == 1 else pa.list_(pa.float32(), d)))
    return pa.schema(fields)


class Scorer:
    """Ray Data actor: loads the checkpoint once, scores every batch in one forward pass."""

    def __init__(self, config: dict[str, Any], checkpoint: str, fault_injection: dict[str, Any] | None = None,
                 timings_dir: str | None = None):
        self.marks = {"process_started": process_started(), "init_started": time.time()}
        # torch, smp and the scoring math here, not at this module's import: the driver imports
        # the module to declare the job and needs none of them (issue 24)
        import torch

        from alges_dist.models import load_model
        from alges_dist.scoring import ProjectionCache, score_batch, score_dims

        self.marks["imports_done"] = time.time()
        self._torch, self._score_batch = torch, score_batch
        cfg = Config.model_validate(config)
        self.opts, self.normalize = cfg.scoring, cfg.data.normalize
        torch.set_num_threads(max(1, int(cfg.scoring.cpus_per_actor)))
        self.device = torch.device(worker_device())
        self.model = load_model(cfg.model.arch, cfg.model.encoder, cfg.data.n_classes, checkpoint)
        self.model.to(self.device).eval()
        self.dims = score_dims(self.model, feature_grid=self.opts.feature_grid, projection_dim=self.opts.projection_dim)
        self.schema = scores_schema(self.dims)
        self.projections = ProjectionCache()  # the JL matrix is drawn once per actor
        self.fault = fault_injection or {}
        self.worker = here(str(self.device)).label()
        self.marks["model_ready"] = time.time()
        # this actor's phase marks, read by the driver after the job (ScoreResult.timings)
        self.timings_path = Path(timings_dir) / f"{uuid.uuid4().hex}.json" if timings_dir else None

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if self.fault and not Path(self.fault["marker"]).exists():
            Path(self.fault["marker"]).touch()
            os._exit(1)  # simulated actor loss, for the exactly-once test
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        columns: dict[str, pa.Array] = {
            "frame_id": pa.array(batch["frame_id"].tolist(), pa.string()),
            "error": pa.array([None if good else e for good, e in zip(ok, batch["error"])], pa.string()),
            "worker": pa.array([self.worker] * len(ok), pa.string()),
        }
        scores: dict[str, np.ndarray] = {}
        if ok.any():
            images = normalize_images(batch["image"][ok], self.normalize).to(self.device)
            autocast = _AUTOCAST[self.opts.autocast]
            out = self._score_batch(
                self.model,
                images,
                feature_grid=self.opts.feature_grid,
                projection_dim=self.opts.projection_dim,
                projection_seed=self.opts.projection_seed,
                autocast_dtype=None if autocast is None else getattr(self._torch, autocast),
                projection_cache=self.projections,
                math_path=self.opts.math_path,
            )
            scores = {k: v.float().cpu().numpy() for k, v in out.items()}
        for name, d in self.dims.items():
            full = np.zeros((len(ok), d), dtype=np.float32)
            if ok.any():
                full[ok] = scores[name].reshape(int(ok.sum()), d)
            if d == 1:
                columns[name] = pa.array(full[:, 0], pa.float32(), mask=~ok)
            else:
                columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), d, mask=pa.array(~ok))
        if self.timings_path is not None and "first_batch_done" not in self.marks:
            self.marks["first_batch_done"] = time.time()
            atomic_write_text(self.timings_path, json.dumps(self.marks))
        return pa.Table.from_pydict(columns, schema=self.schema)


class ScoreResult(NamedTuple):
    scores_dir: Path
    n_scored: int
    n_errors: int
    workers: list[str]  # "node id/ip/device" of the actors that scored
    seconds: float
    timings: dict[str, float]  # where the job's seconds went (job_phases)


# (phase, the mark that ends it), in order; the scorer's marks are the first actor's (the first to
# score a batch). As for fits (training.fit_phases), marks before the job began count as no time.
_JOB_PHASES = (
    ("plan_s", "plan_built"),  # the manifest read, the decode stage and the actor stage declared
    ("worker_start_s", "process_started"),  # execution starts, the actor's process is spawned
    ("worker_boot_s", "init_started"),  # Python and Ray in the new process, Ray Data's actor set-up
    ("imports_s", "imports_done"),  # torch, smp and the scoring modules
    ("model_load_s", "model_ready"),  # the checkpoint loaded, the score dims probed
    ("first_batch_s", "first_batch_done"),  # the first decoded batch arrives and is scored
    ("stream_s", "written"),  # the remaining batches, the shards written
    ("check_s", "checked"),  # every pool frame exactly once (a task), errors.parquet
    ("commit_s", "done"),  # the rename and scores.json
)


def job_phases(marks: dict[str, float]) -> dict[str, float]:
    """Seconds per phase of a scoring job from wall-clock marks (driver's and its first actor's)."""
    out, previous = {}, marks["called"]
    for phase, mark in _JOB_PHASES:
        at = max(marks.get(mark, previous), previous)
        out[phase], previous = round(at - previous, 3), at
    return out


def score_pool(
    cfg: Config,
    manifest: Path,
    checkpoint: Path,
    out_dir: Path,
    *,
    use_gpu: bool,
    fault_injection: dict[str, Any] | None = None,
) -> ScoreResult:
    """Score every pool frame of the manifest into ``out_dir/scores`` (written atomically).

    Labeled pool frames are scored too: k-center starts from distances to the labeled
    set, measured in the current model's embedding.
    """
    import ray.data

    t0, marks = time.perf_counter(), {"called": time.time()}
    final = out_dir / "scores"
    (out_dir / "scores.json").unlink(missing_ok=True)
    tmp = out_dir / f".scores-{uuid.uuid4().hex[:8]}"
    timings_dir = out_dir / f".timings-{uuid.uuid4().hex[:8]}"
    timings_dir.mkdir(parents=True)
    size = tuple(cfg.data.image_size)
    ds = decoded_pool(manifest, size=size, batch_size=cfg.scoring.batch_size, min_blocks=cfg.scoring.num_actors,
                      rows_per_block=cfg.scoring.batch_size * ROWS_PER_BLOCK_IN_BATCHES,
                      max_pixels=cfg.data.max_pixels)
    scorer_kwargs = {
        "config": cfg.model_dump(mode="json"),
        "checkpoint": str(Path(checkpoint).resolve()),
        "fault_injection": fault_injection,
        "timings_dir": str(timings_dir.resolve()),
    }
    ds = ds.map_batches(
        Scorer,
        fn_constructor_kwargs=scorer_kwargs,
        compute=ray.data.ActorPoolStrategy(size=cfg.scoring.num_actors),
        batch_size=cfg.scoring.batch_size,
        num_gpus=cfg.scoring.gpus_per_actor if use_gpu else 0,
        num_cpus=cfg.scoring.cpus_per_actor,
    )  # Ray Data restarts a lost actor and retries its unfinished batches (tested)
    log.info("scoring pool of %s with %d actors (gpu=%s)", manifest, cfg.scoring.num_actors, use_gpu)
    marks["plan_built"] = time.time()
    try:
        ds.write_parquet(str(tmp.resolve()))
        marks["written"] = time.time()
        # checked before it counts: every pool frame exactly once, errors under the rate
        summary, _ = on_worker(check_score_shards, str(tmp.resolve()), str(Path(manifest).resolve()),
                               str((out_dir / "errors.parquet").resolve()))
        if summary["error_rate"] > cfg.scoring.max_error_rate:
            raise StageFailed(
                f"{summary['n_errors']} of {summary['n_rows']} frames ({summary['error_rate']:.1%}) failed to "
                f"decode, more than scoring.max_error_rate={cfg.scoring.max_error_rate:.1%}; first: "
                f"{summary['first_error']} (all listed in {out_dir / 'errors.parquet'})")
        marks["checked"] = time.time()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(timings_dir, ignore_errors=True)
        raise
    if summary["n_errors"]:
        log.warning("%d of %d frames failed to decode; see %s", summary["n_errors"], summary["n_rows"],
                    out_dir / "errors.parquet")
    if final.exists():  # an earlier attempt renamed its shards but did not record them
        shutil.rmtree(final)
    os.replace(tmp, final)
    actors = sorted((json.loads(p.read_text()) for p in timings_dir.glob("*.json")),
                    key=lambda m: m["first_batch_done"])
    shutil.rmtree(timings_dir, ignore_errors=True)
    timings = job_phases({**(actors[0] if actors else {}), **marks, "done": time.time()})
    seconds = time.perf_counter() - t0
    record = {**summary, "seconds": seconds, "timings": timings}
    atomic_write_text(out_dir / "scores.json", json.dumps(record, indent=1))  # the commit marker, last
    log.info("scoring job of %s in %.1f s: %s", out_dir, seconds, ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    return ScoreResult(final, summary["n_rows"] - summary["n_errors"], summary["n_errors"], summary["workers"], seconds,
                       timings)


class StageFailed(AlgesError, RuntimeError):
    """A stage ran but its output failed its checks; nothing of it counts as done."""


def check_score_shards(scores_dir: str, manifest: str, errors_path: str) -> dict[str, Any]:
    """Check a scoring job's shards against the manifest (runs on a worker) and write the
    undecodable frames to ``errors_path``. Raises ValueError when a pool frame is missing,
    repeated, or a scored frame is not in the pool."""
    table = pads.dataset(scores_dir, format="parquet").to_table(columns=["frame_id", "error", "worker"])
    pool = pq.read_table(manifest, columns=["frame_id", "split"], filters=[("split", "=", "pool")])["frame_id"]
    counts = pc.value_counts(table["frame_id"])
    repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1)).field("values")
    if len(repeated):
        raise InputError(f"{scores_dir}: frames {repeated[:5].to_pylist()} were scored more than once "
                         f"({len(repeated)} in all)")
    missing = pc.filter(pool, pc.invert(pc.is_in(pool, value_set=table["frame_id"].combine_chunks())))
    extra = table.filter(pc.invert(pc.is_in(table["frame_id"], value_set=pool.combine_chunks())))
    if len(missing) or extra.num_rows:
        raise InputError(f"{scores_dir}: the shards do not cover the pool exactly once: {len(missing)} pool frames "
                         f"missing (first {missing[:3].to_pylist()}), {extra.num_rows} not in the pool (first "
                         f"{extra['frame_id'][:3].to_pylist()})")
    failed = table.filter(pc.is_valid(table["error"])).select(["frame_id", "error"])
    with atomic_path(errors_path) as path:
        pq.write_table(failed, path)
    return {
        "n_rows": table.num_rows, "n_errors": failed.num_rows,
        "error_rate": failed.num_rows / max(table.num_rows, 1),
        "first_error": failed["error"][0].as_py() if failed.num_rows else None,
        "workers": sorted(w for w in pc.unique(table["worker"]).to_pylist() if w),
    }


def read_scores(scores_dir: Path, columns: list[str] | None = None) -> pa.Table:
    """All shards of a scoring job as one table."""
    return pads.dataset(str(scores_dir), format="parquet").to_table(columns=columns)


def embedding_matrix(table: pa.Table, column: str) -> np.ndarray:
    """A fixed-size-list (or scalar) score column as a float32 (N, d) array, zero-copy."""
    arr = table[column].combine_chunks()
    if arr.null_count:
        raise InputError(f"column {column!r} has {arr.null_count} null rows: drop undecodable frames first")
    if pa.types.is_fixed_size_list(arr.type):
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)
    return arr.to_numpy(zero_copy_only=False).reshape(-1, 1)
