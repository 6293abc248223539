"""The simulated oracle's annotation effort: what an annotator would change in the picking
model's pre-annotation of each picked frame, measured against the pool's own masks.

The simulated oracle knows the truth of every pool frame, so the effort a strategy's picks
would cost is measurable without people: per pick, the pixels whose class differs between
the model's prediction (at the frame's own size, as an annotation tool shows it) and the
mask, and the connected regions of them (the click proxy, ``regions.changed_regions``).
People's imports measure the same against the pre-annotation they saw
(``handoff.labels_from_export``), so simulated and production runs fill one table.
Runs on a Ray worker (``loop`` calls it through ``on_worker``): the model runs there.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from alges_dist.annotation.regions import correction_effort
from alges_dist.errors import InputError


def simulated_correction(config: dict[str, Any], manifest: str, model: str, picks: list[str]) -> list[dict[str, Any]]:
    """Per pick (in ``picks`` order): ``CorrectionEffort`` fields of correcting ``model``'s
    predicted mask into the pool's mask; truth pixels of the encoding's ignore value count
    for nobody. Raises InputError naming a pick that is not in ``manifest`` or has no mask."""
    from alges_dist.config import Config
    from alges_dist.data.frames import load_mask
    from alges_dist.data.manifest import read_manifest
    from alges_dist.predictions import predict_masks

    cfg = Config.model_validate(config)
    table, encoding = read_manifest(manifest)
    rows = table.filter(pc.is_in(table["frame_id"], pa.array(picks, pa.string())))
    image = dict(zip(rows["frame_id"].to_pylist(), rows["image_uri"].to_pylist()))
    mask = dict(zip(rows["frame_id"].to_pylist(), rows["mask_uri"].to_pylist()))
    missing = [f for f in picks if not mask.get(f)]
    if missing:
        raise InputError(f"{manifest}: picks {missing[:5]} have no mask_uri; the simulated oracle needs the pool's masks")
    predicted = predict_masks(model, cfg, [image[f] for f in picks], None)  # (H, W) each, the frame's own size
    return [correction_effort(f, load_mask(mask[f], encoding), p, ignore_index=encoding.ignore_index)._asdict()
            for f, p in zip(picks, predicted)]
