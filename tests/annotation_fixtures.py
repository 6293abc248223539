"""Run folders waiting for labels, and annotation-tool exports as the tools write them (test helpers).

``pending_run`` builds, without Ray, the state `alges run` leaves with a human oracle:
the run's config and manifests, round 0's model (the seed's initial weights: an untrained
net, which is all a pre-annotation needs) and a random selection. The ``*_export``
helpers write what Label Studio, CVAT and COCO tools export after people corrected the
frames, using the reference packages' encoders (cvat-sdk, pycocotools) where they exist.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

from alges_dist.annotation.labelstudio import brush_results
from alges_dist.config import load_config
from alges_dist.data.atomic import atomic_write_text
from alges_dist.data.manifest import read_manifest, write_manifest
from alges_dist.cold_start import draw_initial_set
from alges_dist.distributed.selection_task import pick_batch
from alges_dist.distributed.training import initial_weights
from alges_dist.loop import Experiment

STRATEGY = "random"
FAST = ["data.image_size=[64, 64]", "train.epochs=1", "train.batch_size=4", "loop.initial_labeled=4",
        "loop.budget=3", "loop.n_rounds=1", "scoring.batch_size=8", f"loop.strategies=[{STRATEGY}]",
        "loop.oracle=human"]


def pending_run(pool: Path, out: Path, *overrides: str) -> Experiment:
    """A run folder whose round-0 batch waits for labels, built in-process without Ray (the
    stage functions the loop runs on workers, called here directly; random picks need no scores)."""
    cfg = load_config(None, [*FAST, f"data.pool={Path(pool).resolve()}", *overrides])
    exp = Experiment(cfg, out, Path(pool))
    atomic_write_text(exp.config_path, yaml.safe_dump(exp.cfg_dict, sort_keys=False))
    draw_initial_set(str(pool), str(exp.initial_manifest_path), cfg.loop.initial_labeled, 0)
    manifest = exp.manifest_file(STRATEGY, 0)
    init = initial_weights(cfg, exp.init_weights_path(0), seed=cfg.train.seed)
    exp.model_path(STRATEGY, 0, 0).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(init, exp.model_path(STRATEGY, 0, 0))
    picked = pick_batch(exp.cfg_dict, STRATEGY, str(manifest), None, seed=0)
    exp.round_dir(STRATEGY, 0, 0).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"pick_rank": pa.array(range(len(picked["frame_id"])), pa.int32()),
                             "frame_id": pa.array(picked["frame_id"], pa.string()),
                             "value": pa.array(picked["value"], pa.float32())}), exp.selection_path(STRATEGY, 0, 0))
    return exp


def reopen(out: Path) -> Experiment:
    cfg = load_config(out / "config.yaml")
    return Experiment(cfg, out, Path(cfg.data.pool))


def picks_of(exp: Experiment) -> list[str]:
    return pq.read_table(exp.selection_path(STRATEGY, 0, 0)).sort_by("pick_rank")["frame_id"].to_pylist()


def with_ignore_value(pool: Path, out: Path) -> Path:
    """The same pool with mask value 255 declared as ignored (the demo encoding has no ignore value)."""
    table, encoding = read_manifest(pool)
    ignoring = encoding.model_copy(update={"ignore_values": ["255"]})
    write_manifest(table, out, type(encoding).model_validate(ignoring.model_dump()))
    return out


def edit(predicted: dict[str, np.ndarray], n_classes: int) -> dict[str, np.ndarray]:
    """What an annotator does to the pre-annotation: repaint a block and a stripe with other classes."""
    edited = {}
    for i, (frame_id, ids) in enumerate(predicted.items()):
        out = ids.copy()
        out[8:24, 10:30] = (i + 1) % n_classes
        out[40:44, :] = (i + 3) % n_classes
        edited[frame_id] = out
    return edited


def labelstudio_export(tasks_json: Path, labels: dict[str, np.ndarray], class_names: list[str],
                       out: Path, *, seconds: float = 20.0) -> Path:
    """Label Studio's JSON export of the imported tasks, each with one annotation made from ``labels``
    (the prediction stays in the export, as Label Studio keeps it)."""
    tasks = json.loads(tasks_json.read_text())
    exported = []
    for task_id, task in enumerate(tasks, 1):
        frame_id = task["data"]["frame_id"]
        annotation = {"id": 100 + task_id, "completed_by": 1, "result": brush_results(labels[frame_id], class_names),
                      "was_cancelled": False, "ground_truth": False, "lead_time": seconds + task_id,
                      "created_at": f"2026-11-30T10:00:{task_id:02d}Z", "updated_at": f"2026-11-30T10:00:{task_id:02d}Z",
                      "prediction": {"id": task_id, "result": task["predictions"][0]["result"]}}
        exported.append({"id": task_id, "data": task["data"], "annotations": [annotation], "predictions": [task_id],
                         "drafts": [], "cancelled_annotations": 0, "total_annotations": 1, "meta": {}})
    out.write_text(json.dumps(exported))
    return out


def cvat_export_xml(labels: dict[str, np.ndarray] | list[tuple[dict[str, np.ndarray], int]], label_names: list[str],
                    out: Path) -> Path:
    """CVAT for images 1.1 annotations.xml with one mask per class present (cvat-sdk encodes them);
    ``labels`` may be layers ``[(labels, z_order), ...]``, each adding its masks at its z_order."""
    from cvat_sdk.masks import encode_mask

    layers = [(labels, 0)] if isinstance(labels, dict) else labels
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    for i, frame_id in enumerate(layers[0][0]):
        ids = layers[0][0][frame_id]
        image = ET.SubElement(root, "image", id=str(i), name=f"{frame_id}.png", width=str(ids.shape[1]),
                              height=str(ids.shape[0]))
        for layer, z_order in layers:
            for class_id in np.unique(layer[frame_id]).tolist():
                if class_id >= len(label_names):
                    continue
                *runs, x1, y1, x2, y2 = encode_mask(layer[frame_id] == class_id)
                ET.SubElement(image, "mask", label=label_names[class_id], source="manual", occluded="0",
                              z_order=str(z_order), rle=", ".join(map(str, runs)), left=str(x1), top=str(y1),
                              width=str(x2 - x1 + 1), height=str(y2 - y1 + 1))
    out.write_text('<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode"))
    return out


def cvat_segmentation_zip(labels: dict[str, np.ndarray], label_names: list[str], colours: list[tuple], out: Path,
                          *, unannotated: dict[str, np.ndarray] | None = None) -> Path:
    """CVAT's "Segmentation mask 1.1" zip: labelmap.txt with the implicit background at (0, 0, 0), and
    SegmentationClass PNGs coloured per label (``unannotated`` pixels black)."""
    lines = ["# label:color_rgb:parts:actions", "background:0,0,0::"]
    lines += [f"{n}:{','.join(map(str, c))}::" for n, c in zip(label_names, colours)]
    palette = np.array(colours, np.uint8)
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("labelmap.txt", "\n".join(lines) + "\n")
        archive.writestr("ImageSets/Segmentation/default.txt", "\n".join(labels) + "\n")
        for frame_id, ids in labels.items():
            rgb = palette[ids]
            if unannotated is not None and frame_id in unannotated:
                rgb[unannotated[frame_id]] = 0
            buf = Path(out).with_suffix(".tmp.png")
            Image.fromarray(rgb).save(buf)
            archive.write(buf, f"SegmentationClass/{frame_id}.png")
            buf.unlink()
    return out


def coco_export(instances_json: Path, labels: dict[str, np.ndarray], out: Path, *, iscrowd: int = 1) -> Path:
    """A COCO instances export of ``labels`` (pycocotools encodes the masks), images renumbered as a tool would."""
    from pycocotools import mask as mask_api

    doc = json.loads(instances_json.read_text())
    images, annotations = [], []
    for image_id, (frame_id, ids) in enumerate(labels.items(), 7):
        images.append({"id": image_id, "file_name": f"{frame_id}.png", "width": ids.shape[1], "height": ids.shape[0]})
        for class_id in np.unique(ids).tolist():
            rle = mask_api.encode(np.asfortranarray((ids == class_id).astype(np.uint8)))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": class_id + 1,
                                "iscrowd": iscrowd, "area": int(mask_api.area(rle)),
                                "bbox": mask_api.toBbox(rle).tolist(),
                                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    out.write_text(json.dumps({"info": {"description": "exported by a COCO tool"}, "images": images,
                               "categories": doc["categories"], "annotations": annotations}))
    return out


def manifest_bytes(exp: Experiment) -> bytes:
    return exp.manifest_path(STRATEGY, 0).read_bytes()
