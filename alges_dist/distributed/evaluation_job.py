"""Evaluation on a worker: the test split through a saved model, the paper's Dice and mIoU.

``evaluate_checkpoint`` runs as a Ray task (one GPU when the run uses GPUs), loading the
model as the scoring actors do; the driver only receives the metrics.
"""

from __future__ import annotations

from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from alges_dist.config import Config
from alges_dist.data.frames import FrameDataset
from alges_dist.data.manifest import MANIFEST_SCHEMA, read_encoding
from alges_dist.distributed.tasks import worker_device


def evaluate_checkpoint(config: dict[str, Any], manifest: str, model_path: str) -> dict[str, Any]:
    """Test-split metrics of the model saved at ``model_path`` (runs on a worker).

    The test frames with masks are evaluated (people annotate a few test frames of an unlabeled
    archive: the others have none); with none, the metrics are None and ``skipped`` says why.
    """
    import torch  # here, not at import: the driver imports this module to send the task (issue 24)

    from alges_dist.evaluation import evaluate
    from alges_dist.models import load_model

    cfg = Config.model_validate(config)
    torch.set_num_threads(max(1, int(cfg.scoring.cpus_per_actor)))
    device = torch.device(worker_device())
    test = pq.read_table(manifest, filters=[("split", "=", "test")]).cast(MANIFEST_SCHEMA)
    test = test.filter(pc.is_valid(test["mask_uri"]))
    if test.num_rows == 0:
        return {"dice": None, "miou": None, "mdice": None, "n_frames": 0,
                "skipped": "no test frames with masks: evaluation skipped"}
    encoding = read_encoding(manifest)
    model = load_model(cfg.model.arch, cfg.model.encoder, cfg.data.n_classes, model_path).to(device)
    loader = torch.utils.data.DataLoader(
        FrameDataset(test, encoding, tuple(cfg.data.image_size), cfg.data.normalize, max_pixels=cfg.data.max_pixels),
        batch_size=cfg.scoring.batch_size,
    )
    return evaluate(model, loader, n_classes=cfg.data.n_classes, dice_classes=cfg.data.dice_classes,
                    ignore_index=encoding.ignore_index, device=device)
