"""Training job: Ray Train TorchTrainer (DDP) on the manifest's labeled pool frames.

Each worker reads the manifest from shared storage, takes its shard of the labeled rows
(DistributedSampler via ``prepare_data_loader``), trains with cross-entropy and Adam,
and reports validation Dice per epoch with a checkpoint. A killed worker restarts the
group from the last checkpoint (``FailureConfig``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch

from alges_dist.config import Config
from alges_dist.data.atomic import atomic_path
from alges_dist.data.frames import FrameDataset
from alges_dist.data.manifest import filter_manifest, read_manifest
from alges_dist.evaluation import evaluate
from alges_dist.models import build_model, load_model

log = logging.getLogger(__name__)


class TrainResult(NamedTuple):
    model_path: Path
    history: list[dict[str, Any]]  # one entry per epoch: epoch, train_loss, val_dice, val_miou


def initial_weights(cfg: Config, path: Path, seed: int) -> Path:
    """Write the model's initial weights once per seed: every round restarts from them."""
    if not path.exists():
        with torch.random.fork_rng(devices=[]):  # seed the init without touching global RNG
            torch.manual_seed(seed)
            model = build_model(cfg.model.arch, cfg.model.encoder, cfg.data.n_classes, cfg.model.encoder_weights)
        with atomic_path(path) as tmp:
            torch.save(model.state_dict(), tmp)
    return path


def _train_loop(loop_config: dict[str, Any]) -> None:
    """Runs in each Ray Train worker process."""
    import ray.train
    import ray.train.torch

    cfg = Config.model_validate(loop_config["config"])
    fault = loop_config.get("fault_injection") or {}
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(cfg.train.cpus_per_worker)
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed + rank)

    table, encoding = read_manifest(loop_config["manifest"])
    size = tuple(cfg.data.image_size)
    train_set = FrameDataset(filter_manifest(table, split="pool", labeled=True), encoding, size,
                             cfg.data.normalize)
    val_rows = filter_manifest(table, split="val")
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg.train.batch_size, shuffle=True, drop_last=len(train_set) > cfg.train.batch_size
    )
    loader = ray.train.torch.prepare_data_loader(loader)

    model = load_model(cfg.model.arch, cfg.model.encoder, cfg.data.n_classes, loop_config["init_weights"])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # resuming after a worker failure
        with checkpoint.as_directory() as ckpt_dir:
            model.load_state_dict(torch.load(Path(ckpt_dir) / "model.pt", map_location="cpu"))
            optimizer.load_state_dict(torch.load(Path(ckpt_dir) / "optimizer.pt", map_location="cpu"))
            state = json.loads((Path(ckpt_dir) / "state.json").read_text())
        start_epoch, history = state["epoch"] + 1, state["history"]
    model = ray.train.torch.prepare_model(model)
    bare = model.module if hasattr(model, "module") else model
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=encoding.ignore_index)

    # rank 0's epoch bar is drawn by the driver (tqdm_ray), under the driver's round bar
    from ray.experimental.tqdm_ray import tqdm as ray_tqdm

    epochs = range(start_epoch, cfg.train.epochs)
    bar = ray_tqdm(total=len(epochs), desc="epochs", unit="epoch") if rank == 0 else None
    for epoch in epochs:
        if fault.get("kill_at_epoch") == epoch and rank == 0 and not Path(fault["marker"]).exists():
            Path(fault["marker"]).touch()
            os._exit(1)  # simulated node loss: Ray Train restarts from the last checkpoint
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        model.train()
        loss_sum, n_batches = 0.0, 0
        for images, masks in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(images), masks)
            loss.backward()
            optimizer.step()
            loss_sum, n_batches = loss_sum + loss.item(), n_batches + 1
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / max(n_batches, 1)}
        if rank == 0 and val_rows.num_rows:
            val = evaluate(
                bare,
                torch.utils.data.DataLoader(FrameDataset(val_rows, encoding, size, cfg.data.normalize), batch_size=cfg.train.batch_size),
                n_classes=cfg.data.n_classes,
                dice_classes=cfg.data.dice_classes,
                ignore_index=encoding.ignore_index,
                device=device,
            )
            metrics.update(val_dice=val["dice"], val_miou=val["miou"])
        history.append({**metrics, "resumed_from_epoch": start_epoch})
        # A checkpoint is the model plus Adam's two moments (3x the weights): on short
        # epochs writing one every epoch costs more than the epoch itself.
        save = (epoch + 1) % cfg.train.checkpoint_every == 0 or epoch == cfg.train.epochs - 1
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0 and save:  # only rank 0 writes; the others report metrics only
                torch.save(bare.state_dict(), Path(tmp) / "model.pt")
                torch.save(optimizer.state_dict(), Path(tmp) / "optimizer.pt")
                (Path(tmp) / "state.json").write_text(json.dumps({"epoch": epoch, "history": history}))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


def train_model(
    cfg: Config,
    manifest: Path,
    *,
    init_weights: Path,
    out_dir: Path,
    use_gpu: bool,
    fault_injection: dict[str, Any] | None = None,
) -> TrainResult:
    """Fit on the manifest's labeled pool rows; write ``out_dir/model.pt`` and ``train.json``.

    fault_injection: for tests, ``{"kill_at_epoch": e, "marker": path}`` makes rank 0
    exit abruptly once at epoch e, as a lost node would.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out_dir.mkdir(parents=True, exist_ok=True)
    storage = (out_dir / "ray_train").resolve()
    shutil.rmtree(storage, ignore_errors=True)  # a half-finished earlier attempt restarts clean
    log.info(
        "training %s/%s on %s: %d workers, gpu=%s, %d epochs",
        cfg.model.arch, cfg.model.encoder, manifest, cfg.train.num_workers, use_gpu, cfg.train.epochs,
    )
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "manifest": str(Path(manifest).resolve()),
            "init_weights": str(Path(init_weights).resolve()),
            "fault_injection": fault_injection,
        },
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(
            name="train",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training under {storage} finished without a checkpoint: {result.error!r}")
    with result.checkpoint.as_directory() as ckpt_dir:
        history = json.loads((Path(ckpt_dir) / "state.json").read_text())["history"]
        with atomic_path(out_dir / "model.pt") as tmp:
            shutil.copyfile(Path(ckpt_dir) / "model.pt", tmp)
    with atomic_path(out_dir / "train.json") as tmp:
        Path(tmp).write_text(json.dumps(history, indent=1))
    shutil.rmtree(storage, ignore_errors=True)  # the model is kept; Ray's copies are not needed
    return TrainResult(out_dir / "model.pt", history)
