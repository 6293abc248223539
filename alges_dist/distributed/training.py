"""Training job: Ray Train data-parallel training (DDP) on the manifest's labeled pool frames.

Each worker reads the manifest from shared storage, takes its shard of the labeled rows
(DistributedSampler via ``prepare_data_loader``), trains with cross-entropy and Adam,
and reports validation Dice per epoch with a checkpoint. A killed worker restarts the
group from the last checkpoint (``FailureConfig``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import numpy as np
import pyarrow.compute as pc

from alges_dist.config import Config
from alges_dist.data.atomic import atomic_path, atomic_write_text
from alges_dist.data.manifest import filter_manifest, read_manifest

if TYPE_CHECKING:
    import torch

# torch and smp are imported where a worker needs them, never at this module's import: the driver
# imports it to hand Ray Train the training function and needs neither (4-5 s, issue 24)
log = logging.getLogger(__name__)


def initial_weights(cfg: Config | dict[str, Any], path: Path | str, seed: int) -> Path:
    """Write the model's initial weights once per seed: every round restarts from them."""
    cfg, path = Config.model_validate(cfg) if isinstance(cfg, dict) else cfg, Path(path)
    if not path.exists():
        _write_weights(_seeded_model(cfg, seed), path)
    return path


def _seeded_model(cfg: Config, seed: int) -> torch.nn.Module:
    import torch

    from alges_dist.models import build_model

    with torch.random.fork_rng(devices=[]):  # seed the init without touching global RNG
        torch.manual_seed(seed)
        return build_model(cfg.model.arch, cfg.model.encoder, cfg.data.n_classes, cfg.model.encoder_weights)


def _write_weights(model: torch.nn.Module, path: Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)


def _initial_model(cfg: Config, path: Path, seed: int | None, rank: int) -> torch.nn.Module:
    """The fit's starting weights: ``path``, or, where it does not exist yet and the seed is given,
    the seed's initial model built here (as :func:`initial_weights` builds it) and written by rank 0
    for the later rounds. Built in the fit's own worker, which imports torch and smp anyway, not
    in a task of its own that would import them once more (4 s on the 2-core machine, issue 24)."""
    from alges_dist.models import load_model

    if seed is None or path.exists():
        return load_model(cfg.model.arch, cfg.model.encoder, cfg.data.n_classes, path)
    model = _seeded_model(cfg, seed)
    if rank == 0:
        _write_weights(model, path)
    return model


def _train_loop(loop_config: dict[str, Any]) -> None:
    """Runs in each Ray Train worker process."""
    entered = time.time()
    import ray.train
    import ray.train.torch
    import torch

    from alges_dist.data.frames import FrameDataset
    from alges_dist.evaluation import evaluate
    from alges_dist.models import build_model  # noqa: F401  (smp, here: the imports phase)

    imports_done = time.time()

    cfg = Config.model_validate(loop_config["config"])
    fault = loop_config.get("fault_injection") or {}
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(cfg.train.cpus_per_worker)
    from alges_dist.distributed.tasks import worker_device

    device = torch.device(worker_device())  # the CPU on a GPU resource without CUDA
    torch.manual_seed(cfg.train.seed + rank)

    table, encoding = read_manifest(loop_config["manifest"])
    size = tuple(cfg.data.image_size)
    train_set = FrameDataset(filter_manifest(table, split="pool", labeled=True), encoding, size,
                             cfg.data.normalize, max_pixels=cfg.data.max_pixels)
    val_rows = filter_manifest(table, split="val")
    val_rows = val_rows.filter(pc.is_valid(val_rows["mask_uri"]))  # people annotate no val frames
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg.train.batch_size, shuffle=True, drop_last=len(train_set) > cfg.train.batch_size
    )
    loader = ray.train.torch.prepare_data_loader(loader, move_to_device=False)

    data_ready = time.time()
    model = _initial_model(cfg, Path(loop_config["init_weights"]), loop_config.get("init_seed"), rank)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # resuming after a worker failure or a crash of the driver
        with checkpoint.as_directory() as ckpt_dir:
            if (Path(ckpt_dir) / "optimizer.pt").exists():  # else it is the final checkpoint: nothing to train
                model.load_state_dict(torch.load(Path(ckpt_dir) / "model.pt", map_location="cpu", weights_only=True))
                optimizer.load_state_dict(torch.load(Path(ckpt_dir) / "optimizer.pt", map_location="cpu",
                                                     weights_only=True))
            state = json.loads((Path(ckpt_dir) / "state.json").read_text())
        start_epoch, history = state["epoch"] + 1, state["history"]
        if start_epoch >= cfg.train.epochs:  # the fit had finished: hand its checkpoint on as its result
            ray.train.report(history[-1], checkpoint=checkpoint)
            return
    model = ray.train.torch.prepare_model(model, move_to_device=device)
    bare = model.module if hasattr(model, "module") else model
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=encoding.ignore_index)

    from alges_dist.distributed.tasks import here, process_started

    where = here(str(device)).as_dict()
    # wall-clock marks of this worker's phases (the driver adds its own: TrainResult.timings)
    marks = {"process_started": process_started(), "loop_entered": entered, "imports_done": imports_done,
             "data_ready": data_ready, "model_ready": time.time()}
    spent = {"train_s": 0.0, "validation_s": 0.0, "checkpoint_s": 0.0}
    progress = Path(loop_config["progress"]) if rank == 0 and loop_config.get("progress") else None
    for epoch in range(start_epoch, cfg.train.epochs):
        epoch_started = time.perf_counter()
        if fault.get("kill_at_epoch") == epoch and rank == 0 and not Path(fault["marker"]).exists():
            Path(fault["marker"]).touch()
            os._exit(1)  # simulated node loss: Ray Train restarts from the last checkpoint
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        # seeded per epoch, not once: a fit resumed from epoch e's checkpoint then shuffles and
        # draws exactly as the uninterrupted fit did (tests/test_faults.py compares the picks)
        torch.manual_seed(int(np.random.SeedSequence([cfg.train.seed, rank, epoch]).generate_state(1)[0]))
        model.train()
        loss_sum, n_batches = 0.0, 0
        for images, masks in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(images.to(device)), masks.to(device))
            loss.backward()
            optimizer.step()
            loss_sum, n_batches = loss_sum + loss.item(), n_batches + 1
        trained = time.perf_counter()
        spent["train_s"] += trained - epoch_started
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / max(n_batches, 1)}
        every = cfg.train.val_every
        validate = epoch == cfg.train.epochs - 1 or (every > 0 and (epoch + 1) % every == 0)
        if rank == 0 and val_rows.num_rows and validate:
            val = evaluate(
                bare,
                torch.utils.data.DataLoader(FrameDataset(val_rows, encoding, size, cfg.data.normalize,
                                                         max_pixels=cfg.data.max_pixels),
                                            batch_size=cfg.train.batch_size),
                n_classes=cfg.data.n_classes,
                dice_classes=cfg.data.dice_classes,
                ignore_index=encoding.ignore_index,
                device=device,
            )
            metrics.update(val_dice=val["dice"], val_miou=val["miou"])
        spent["validation_s"] += time.perf_counter() - trained
        metrics["seconds"] = time.perf_counter() - epoch_started  # the epoch's own work (bench_local: fixed cost)
        history.append({**metrics, "resumed_from_epoch": start_epoch})
        if progress is not None:  # the driver's console reads it (one line per fit, or a bar on a TTY)
            atomic_write_text(progress, json.dumps({"epochs": cfg.train.epochs, **history[-1]}))
        # A checkpoint is the model plus Adam's two moments (3x the weights): on short
        # epochs writing one every epoch costs more than the epoch itself.
        last = epoch == cfg.train.epochs - 1
        save = (epoch + 1) % cfg.train.checkpoint_every == 0 or last
        saving = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0 and save:  # only rank 0 writes; the others report metrics only
                torch.save(bare.state_dict(), Path(tmp) / "model.pt")
                if not last:  # Adam's state only matters to a fit that goes on (2x the weights to write)
                    torch.save(optimizer.state_dict(), Path(tmp) / "optimizer.pt")
                marks["last_checkpoint_started"] = time.time()
                (Path(tmp) / "state.json").write_text(json.dumps({"epoch": epoch, "history": history, "where": where,
                                                                  "marks": marks, "spent": spent}))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        spent["checkpoint_s"] += time.perf_counter() - saving


class TrainResult(NamedTuple):
    model_path: Path
    history: list[dict[str, Any]]  # one entry per epoch: epoch, train_loss, val_dice, val_miou
    where: dict[str, Any]  # rank 0's node and device
    seconds: float
    timings: dict[str, float]  # where the fit's seconds went, phase by phase (fit_phases)


# (phase, the mark that ends it), in the order a fit goes through them; each phase starts at the
# previous mark (marks before the fit began, e.g. a module imported by an earlier task in the same
# process, count as no time)
_PHASES = (
    ("prepare_s", "fit_called"),  # the trainer built in the driver
    ("worker_start_s", "process_started"),  # the controller, the placement group, the worker's process
    ("worker_boot_s", "loop_entered"),  # Python and Ray in the new process, Ray Train's worker set-up
    ("imports_s", "imports_done"),  # torch, smp and the training modules
    ("dataset_s", "data_ready"),  # the manifest, the datasets and the loader
    ("model_s", "model_ready"),  # the initial weights, the optimizer, resuming a checkpoint
    ("epochs_s", "last_checkpoint_started"),  # train + validation + checkpoints before the last
    ("hand_back_s", "fit_returned"),  # the final checkpoint persisted and reported, the group shut down
    ("save_s", "saved"),  # model.pt renamed into the round, train.json
)


def fit_phases(marks: dict[str, float], spent: dict[str, float]) -> dict[str, float]:
    """Seconds per phase of a fit from wall-clock marks (``called``, ``fit_called``, the worker's marks and the
    driver's ``fit_returned`` / ``saved``), plus the epochs' split into train, validation and
    checkpoint seconds. Marks of rank 0 and the driver are on different hosts on a cluster: there
    the start and hand-back phases are as good as the clocks' agreement."""
    out, previous = {}, marks["called"]
    for phase, mark in _PHASES:
        at = max(marks.get(mark, previous), previous)
        out[phase], previous = round(at - previous, 3), at
    out.update({k: round(v, 3) for k, v in spent.items()})
    out["fixed_s"] = round(out_total(out) - out["train_s"] - out["validation_s"], 3)
    return out


def out_total(phases: dict[str, float]) -> float:
    return sum(phases[p] for p, _ in _PHASES)


def _local_trainer_class():
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    class LocalTrainer(DataParallelTrainer):
        """Ray Train for a local instance: without the placement-group cleaner, an actor (a
        process) per fit that frees a crashed controller's placement group; a local instance
        ends with its command, and its groups with it."""

        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks()
                    if not isinstance(c, PlacementGroupCleanerCallback)]

    return LocalTrainer


def train_model(
    cfg: Config,
    manifest: Path,
    *,
    init_weights: Path,
    out_dir: Path,
    use_gpu: bool,
    init_seed: int | None = None,
    fault_injection: dict[str, Any] | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Fit on the manifest's labeled pool rows; write ``out_dir/model.pt`` and ``train.json``.

    Ray Train keeps its checkpoints under ``out_dir/ray_train`` until the model is saved, so a
    fit interrupted by a crash of the driver resumes from its last checkpoint when rerun with
    the same settings (the run folder's fingerprint guarantees that). init_seed: where
    ``init_weights`` does not exist yet, the fit builds it from this seed (``initial_weights``)
    and writes it. on_progress: called in
    the driver with rank 0's latest epoch entry while the fit runs.

    fault_injection: for tests, ``{"kill_at_epoch": e, "marker": path}`` makes rank 0
    exit abruptly once at epoch e, as a lost node would.
    """
    from ray.train import BackendConfig, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from alges_dist.distributed.runtime import in_local_instance
    from alges_dist.distributed.tasks import on_worker, warming_a_worker

    t0, called = time.perf_counter(), time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = (out_dir / "ray_train").resolve()
    progress = out_dir / "progress.json"
    progress.unlink(missing_ok=True)
    log.info(
        "training %s/%s on %s: %d workers, gpu=%s, %d epochs%s",
        cfg.model.arch, cfg.model.encoder, manifest, cfg.train.num_workers, use_gpu, cfg.train.epochs,
        " (resuming from its checkpoint)" if storage.exists() else "",
    )
    if cfg.train.num_workers > 1:  # DDP: a torch process group (nccl needs CUDA on the workers)
        from ray.train.torch import TorchConfig  # imports torch: only where a process group is needed

        backend = TorchConfig(backend="nccl" if use_gpu and on_worker(_has_cuda, gpu=True)[0] else "gloo")
    else:
        # One worker needs no process group: without TorchConfig the controller never imports
        # torch either, 2-3 s less per fit here (scripts/bench_local.py)
        backend = BackendConfig()
    local = in_local_instance()
    trainer_class = _local_trainer_class() if local else DataParallelTrainer
    trainer = trainer_class(
        _train_loop,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "manifest": str(Path(manifest).resolve()),
            "init_weights": str(Path(init_weights).resolve()),
            "init_seed": init_seed,
            "fault_injection": fault_injection,
            "progress": str(progress.resolve()),
        },
        backend_config=backend,
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(
            name="train",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    fit_called = time.time()
    # a local fit that leaves a CPU free: a task worker warms up there for the stages after it
    import ray

    free = ray.cluster_resources().get("CPU", 0) - cfg.train.num_workers * cfg.train.cpus_per_worker
    with warming_a_worker() if local and free >= 1 else contextlib.nullcontext():
        result = _fit_interruptibly(trainer, progress, on_progress)
    fit_returned = time.time()
    if result.checkpoint is None:
        raise RuntimeError(f"training under {storage} finished without a checkpoint: {result.error!r}")
    with result.checkpoint.as_directory() as ckpt_dir:
        state = json.loads((Path(ckpt_dir) / "state.json").read_text())
        source = Path(ckpt_dir) / "model.pt"
        if source.resolve().is_relative_to(storage):  # on this file system: a rename, not a 50 MB copy
            with open(source, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(source, out_dir / "model.pt")
        else:
            with atomic_path(out_dir / "model.pt") as tmp:
                shutil.copyfile(source, tmp)
    timings = fit_phases({**state.get("marks", {}), "called": called, "fit_called": fit_called, "fit_returned": fit_returned,
                          "saved": time.time()}, state.get("spent", {"train_s": 0.0, "validation_s": 0.0,
                                                                     "checkpoint_s": 0.0}))
    seconds = time.perf_counter() - t0
    record = {"history": state["history"], "where": state.get("where", {}), "seconds": seconds, "timings": timings}
    atomic_write_text(out_dir / "train.json", json.dumps(record, indent=1))
    shutil.rmtree(storage, ignore_errors=True)  # the model is kept; Ray's copies are not needed
    progress.unlink(missing_ok=True)
    log.info("fit of %s in %.1f s: %s", out_dir, seconds, ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    return TrainResult(out_dir / "model.pt", state["history"], record["where"], seconds, timings)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _fit_interruptibly(trainer: Any, progress: Path, on_progress: Callable[[dict[str, Any]], None] | None) -> Any:
    """``trainer.fit()`` in a helper thread while this (main) thread waits and reports progress.

    Ray Train installs a SIGINT handler of its own when fit() runs on the main thread, which
    turns Ctrl-C into a quiet abort and the run carried on (issue 17). From a helper thread it
    does not, so Ctrl-C raises KeyboardInterrupt here, and the command's cleanup ends the fit
    (shutting Ray down ends the controller and its workers).
    """
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised in the main thread
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    seen = None
    while thread.is_alive():
        thread.join(timeout=0.2)  # returns at once when the fit ends; progress is polled this often
        if on_progress is not None and progress.exists():
            try:
                entry = json.loads(progress.read_text())
            except (OSError, ValueError):
                continue
            if entry != seen:
                seen = entry
                on_progress(entry)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
