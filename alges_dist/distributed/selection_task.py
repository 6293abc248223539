"""The selection stage on a worker: read one score column, pick the query batch, return it.

``pick_batch`` runs as a Ray task (one GPU when the run uses GPUs); the driver gets back
``budget`` frame ids and values, never the embeddings. The task reads from the score shards
only ``frame_id``, ``error`` and the one column the strategy uses, and puts the rows in
``frame_id`` order: selection is a function of the scores as a set and the seed, whatever
order Ray Data wrote the shards in. With ``n_shards > 1`` the rows are split over that many
actors (``ShardedPool``), each loading its own slice of the shards, and the same greedy
loop drives them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from alges_dist.config import Config, check_selection_shards
from alges_dist.data.manifest import video_times
from alges_dist.errors import InputError
from alges_dist.selection import DISTANCE_RULES, get_strategy, score_column

log = logging.getLogger(__name__)

HEADROOM = 1.5  # device memory per byte of the column: storage, distance vectors, kNN blocks


def _score_files(scores_dir: str | Path) -> list[str]:
    return sorted(str(p) for p in Path(scores_dir).glob("*.parquet"))


def column_shape(scores_dir: str | Path, column: str) -> tuple[int, int]:
    """(rows, values per row) of the column, from the shards' footers (no data read)."""
    rows, dim = 0, 1
    for path in _score_files(scores_dir):
        meta = pq.ParquetFile(path)
        rows += meta.metadata.num_rows
        kind = meta.schema_arrow.field(column).type
        dim = kind.list_size if pa.types.is_fixed_size_list(kind) else 1
    return rows, dim


def column_bytes(scores_dir: str | Path, column: str, storage_itemsize: int) -> int:
    """Bytes the column takes in storage form, from the shards' footers (no data read)."""
    rows, dim = column_shape(scores_dir, column)
    return rows * dim * storage_itemsize


def selection_bytes(scores_dir: str | Path, column: str, storage_dtype: str, device: str) -> int:
    """Peak bytes a one-device selection of ``column`` takes on ``device`` ("cpu" or "cuda"),
    from the shards' footers, for ``selection.shards: auto``.

    The task first loads the column as float32 on the host (``ScoreRows``), then the engine
    builds its storage form from it (``selection.storage.StoredRows``): float32 rows are used
    as loaded, half rows are a second array of d + 6 norm terms padded to 8 columns. On the
    CPU both live in host memory at once: 4 + 2 bytes per value for half storage, 3x the
    storage alone; on CUDA the device holds only the storage form.
    """
    rows, dim = column_shape(scores_dir, column)
    loaded = rows * dim * 4  # the float32 copy
    if storage_dtype == "float32":  # used as loaded
        return loaded
    half = rows * (-(-(dim + 6) // 8) * 8) * 2  # PoolShard's norm-augmented rows, padded to 16 bytes
    return half + (loaded if device == "cpu" else 0)


def device_memory() -> dict[str, Any]:
    """Free memory of the device a selection task gets here (GPU when assigned one, else host RAM)."""
    import ray

    if ray.get_gpu_ids():
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            return {"device": "cuda", "free": int(free), "total": int(total)}
    import psutil

    vm = psutil.virtual_memory()
    return {"device": "cpu", "free": int(vm.available), "total": int(vm.total)}


def shards_needed(n_bytes: int, free: int) -> int:
    """One device when the column fits with headroom, else enough to split it."""
    return max(1, math.ceil(n_bytes * HEADROOM / max(free, 1)))


def _sorted_candidates(scores_dir: str, column: str | None, pool_ids: pa.Array) -> pa.Array:
    """frame_id of every scored (error-free) frame, sorted; or the pool's ids when nothing is scored."""
    if column is None:
        return pool_ids.take(pc.sort_indices(pool_ids))
    table = pads.dataset(_score_files(scores_dir), format="parquet").to_table(
        columns=["frame_id"], filter=pc.is_null(pc.field("error")))  # undecodable frames are never picked
    ids = table["frame_id"].combine_chunks()
    return ids.take(pc.sort_indices(ids))


class ScoreRows:
    """Loads rows of one score column for the sorted ids ``ids`` into an (n, d) float32 array,
    a record batch at a time (peak: the array plus one batch), wherever it is called: in the
    selection task, or in each actor of a sharded pool for its own slice."""

    # rows per read: Arrow's list reader holds ~8x a batch's bytes while decoding it (measured)
    BATCH_ROWS = 4096

    def __init__(self, scores_dir: str, column: str, ids: pa.Array):
        self.scores_dir, self.column, self.ids = scores_dir, column, ids

    def __call__(self) -> np.ndarray:
        out: np.ndarray | None = None
        filled = 0
        for path in _score_files(self.scores_dir):
            # each row's place in ids, one hash lookup per file (per batch would rebuild the set)
            where = pc.index_in(pq.read_table(path, columns=["frame_id"])["frame_id"], value_set=self.ids)
            if where.null_count == len(where):
                continue
            where = where.combine_chunks()
            # streamed reads: a whole row group is not buffered at once (shards are one group each)
            reader = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 22)
            start = 0
            for batch in reader.iter_batches(self.BATCH_ROWS, columns=[self.column]):
                arr, pos = batch.column(0), where.slice(start, batch.num_rows)
                start += batch.num_rows
                if pos.null_count:
                    keep = pc.is_valid(pos)
                    arr, pos = arr.filter(keep), pos.filter(keep)
                if not len(pos):
                    continue
                if pa.types.is_fixed_size_list(arr.type):  # the values buffer as is: no copy
                    rows = arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)
                else:
                    rows = arr.to_numpy(zero_copy_only=False).reshape(-1, 1)
                if out is None:
                    out = np.empty((len(self.ids), rows.shape[1]), np.float32)
                out[pos.to_numpy()] = rows
                filled += len(pos)
            pa.default_memory_pool().release_unused()  # Arrow keeps freed batches for reuse otherwise
        if out is None or filled != len(self.ids):
            raise InputError(f"{self.scores_dir}: column {self.column!r} covers {filled} of the {len(self.ids)} "
                             "frames to select from; rescore the round")
        return out


def time_gap(manifest: str, ids: pa.Array, gap_s: float):
    """The ``TimeGap`` of the rows ``ids``: videos from ``video_id``, times from ``#t=`` URIs
    (rows without a time, image files, are never near another). ``manifest``: the pool's, whose
    URIs keep their times (a run's labeled video frames point at their exported PNGs)."""
    from alges_dist.selection import TimeGap

    table = pq.read_table(manifest, columns=["frame_id", "video_id", "frame_index", "image_uri"])
    table = table.take(pc.index_in(ids, value_set=table["frame_id"].combine_chunks()))
    codes, seconds, timed = video_times(table)
    return TimeGap(np.where(timed, codes, -1), np.where(timed, seconds, 0.0), float(gap_s))


def check_batch_size(strategy: str, n_candidates: int, budget: int, *, n_unlabeled: int, n_unscored: int,
                     n_near: int, min_gap_s: float, scores_dir: str | None) -> None:
    """Every round labels ``loop.budget`` frames or fails naming why (README, "Reliability").

    A short batch would label fewer frames than the learning curve's x axis says, and the
    run would go on as if nothing happened. Frames that failed to decode (listed in the
    round's errors.parquet) and, for rules that pick among unlabeled frames only, frames
    within ``selection.min_gap_s`` of a labeled one are no candidates.
    """
    if n_candidates >= budget:
        return
    why = [f"{n_unlabeled} pool frames are unlabeled"]
    if n_unscored:
        why.append(f"{n_unscored} of them failed to decode (listed in {Path(scores_dir).parent / 'errors.parquet'})")
    if n_near:
        why.append(f"{n_near} are within selection.min_gap_s={min_gap_s:g} of a labeled frame")
    raise InputError(f"{strategy}: {n_candidates} frames can be picked, fewer than loop.budget={budget} ("
                     f"{'; '.join(why)}); lower loop.budget or loop.n_rounds"
                     f"{', or selection.min_gap_s' if n_near else ''}, or add frames to the pool")


def pick_batch(config: dict[str, Any], strategy: str, manifest: str, scores_dir: str | None, *, seed: int,
               n_shards: int = 1, pool: str | None = None) -> dict[str, Any]:
    """The round's query batch: ``{"frame_id": [...], "value": [...], "seconds": ...}`` in pick order.

    manifest: the run's (labels); pool: the pool manifest it was made from, whose URIs give
    ``selection.min_gap_s`` each video frame's time (default: ``manifest``).

    value: the distance to the chosen set at pick time (k-center / k-means++), the ranked
    score (top-k), NaN (random).
    """
    import alges_dist.selection.rules  # noqa: F401  (torch: imports are not the stage's memory)

    with PeakRSS() as rss:
        picked = _pick(config, strategy, manifest, scores_dir, seed=seed, n_shards=n_shards, pool=pool or manifest)
    # this worker's memory after imports, and its peak during the stage (scripts/bench_scale.py)
    return {**picked, "rss_start_mb": rss.start / 2**20, "peak_rss_mb": rss.peak / 2**20}


class PeakRSS:
    """The resident memory of this process at the start of a block and its peak inside it,
    sampled every 5 ms by a thread (a reused worker's lifetime maximum would count earlier tasks)."""

    def __enter__(self) -> PeakRSS:
        import psutil

        self._process = psutil.Process()
        self.start = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def _pick(config: dict[str, Any], strategy: str, manifest: str, scores_dir: str | None, *, seed: int,
          n_shards: int, pool: str) -> dict[str, Any]:
    from alges_dist.selection import select

    t0 = time.perf_counter()
    cfg = Config.model_validate(config)
    spec, opts = get_strategy(strategy), cfg.selection
    if n_shards > 1 and spec.rule not in DISTANCE_RULES:
        # a ranking or random rule reads one scalar per frame: one device holds any pool
        log.info("%s: selection.shards=%s applies to k-center and k-means++ only; ranking on one device",
                 strategy, opts.shards)
        n_shards = 1
    column = score_column(strategy, projection_dim=cfg.scoring.projection_dim)
    table = pq.read_table(manifest, columns=["frame_id", "split", "labeled_round"],
                          filters=[("split", "=", "pool")])
    pool_ids = table["frame_id"].combine_chunks()
    labeled_ids = table.filter(pc.is_valid(table["labeled_round"]))["frame_id"].combine_chunks()
    ids = _sorted_candidates(scores_dir, column, pool_ids)
    labeled = pc.is_in(ids, value_set=labeled_ids).to_numpy(zero_copy_only=False)
    n_unlabeled = len(pool_ids) - len(labeled_ids)
    n_unscored = n_unlabeled - int((~labeled).sum())  # failed to decode: never candidates
    n_near = 0
    gap = time_gap(pool, ids, opts.min_gap_s) if opts.min_gap_s > 0 else None
    if not spec.labeled_as_centers:  # rank or seed among the unlabeled frames only
        keep = ~labeled
        if gap is not None and labeled.any():  # and, with a gap, away from the labeled frames
            keep &= ~gap.near(np.flatnonzero(labeled))
            n_near = int((~labeled).sum() - keep.sum())
        ids, labeled = ids.filter(pa.array(keep)), labeled[keep]
        if gap is not None:
            gap = gap._replace(group=gap.group[keep], seconds=gap.seconds[keep])
    check_batch_size(strategy, int((~labeled).sum()), cfg.loop.budget, n_unlabeled=n_unlabeled,
                     n_unscored=n_unscored, n_near=n_near, min_gap_s=opts.min_gap_s, scores_dir=scores_dir)
    del table, pool_ids, labeled_ids
    pa.default_memory_pool().release_unused()  # the manifest's pages, before the column is loaded
    options: dict[str, Any] = {"gap": gap}
    if spec.rule in DISTANCE_RULES:
        from alges_dist.distributed.tasks import worker_device

        # one device: this task's (a GPU resource without CUDA: the CPU); sharded: each actor's own
        device = worker_device() if opts.device == "auto" and n_shards == 1 else opts.device
        options.update(device=device, backend=opts.backend, storage_dtype=opts.storage_dtype)
        if spec.rule == "kmeans++":
            options["local_trials"] = opts.kmeanspp_local_trials
    if spec.rule == "top-k":
        options["largest"] = spec.largest
    pool = values = None
    if column is not None and n_shards > 1:
        import ray

        from alges_dist.distributed.sharded_selection import ShardedPool

        # before any actor: one the cluster cannot place would be waited for forever
        how = (f"selection.shards=auto resolved to {n_shards} for the {column!r} column" if opts.shards == "auto"
               else f"selection.shards={n_shards}")
        check_selection_shards(n_shards, ray.cluster_resources(), setting=how)

        cuts = np.linspace(0, len(ids), n_shards + 1).astype(int)
        pool = ShardedPool([ScoreRows(scores_dir, column, ids.slice(a, b - a)) for a, b in zip(cuts, cuts[1:])],
                           device=options.pop("device"), backend=options.pop("backend"),
                           storage_dtype=options.pop("storage_dtype"), gap=options.pop("gap"))
        values = pool
    elif column is not None:
        values = ScoreRows(scores_dir, column, ids)()
        if spec.rule == "top-k":
            values = values[:, 0]
    try:
        picked = select(spec.rule, values, labeled, cfg.loop.budget, seed=seed, **options)
    finally:
        if pool is not None:
            pool.close()
    if len(picked.indices) != cfg.loop.budget:  # check_batch_size let it through: a defect of ours
        raise RuntimeError(f"{strategy}: {len(picked.indices)} picks for loop.budget={cfg.loop.budget}")
    picked_values = values[picked.indices] if spec.rule == "top-k" else picked.radii
    log.info("%s: picked %d of %d frames in %.1f s", strategy, len(picked.indices), len(ids), time.perf_counter() - t0)
    return {
        "frame_id": ids.take(pa.array(picked.indices)).to_pylist(),
        "value": np.asarray(picked_values, np.float32).tolist(),
        "n_candidates": len(ids),
        "n_random_fill": picked.n_random_fill,
        "backend": picked.backend,
        "n_shards": n_shards,
        "seconds": time.perf_counter() - t0,
        "column_mb": 0 if values is None or pool is not None else values.nbytes / 2**20,
    }
