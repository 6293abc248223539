"""Hand-off to people: the query batch out (CSV, contact sheet), their masks in.

Everything between a selection and labels lives here, so the loop only decides *when*
a batch goes out and *which* round its labels belong to:

- :func:`write_batch` writes ``to_annotate.csv`` (rank, frame id, image) and a contact
  sheet beside the selection; picked video frames become PNG files first
  (:func:`batch_images`), and :func:`frames_as_files` points labeled rows at them;
- :func:`collect_masks` matches returned masks to the picks (image suffixes only, one
  candidate per frame), validates every one against its frame and the pool's encoding,
  and copies them into the run folder: nothing is imported unless all of them pass,
  and later changes to the annotators' folder cannot change the labels;
- the contact sheet (:mod:`alges_dist.contact_sheet`) and the model's masks
  (:mod:`alges_dist.predictions`) are shared with the report;
- :func:`export_batch` writes the batch for Label Studio, CVAT or COCO with the model's
  masks as pre-annotations (kept in ``preannotations/`` for the correction effort);
- :func:`labels_from_export` checks a tool's export of the whole batch and turns it into
  masks in the pool's encoding (then ``collect_masks`` imports them as any returned masks);
- :func:`push_to_labelstudio` / :func:`pull_from_labelstudio` do the same through a Label
  Studio server (``loop.oracle: labelstudio``).

The formats themselves live in :mod:`alges_dist.annotation`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alges_dist.data.atomic import atomic_directory, atomic_path, atomic_write_text
from alges_dist.data.manifest import Manifest
from alges_dist.errors import InputError
from alges_dist.contact_sheet import PALETTE, contact_sheet, overlay_mask  # noqa: F401  (overlay_mask: re-exported)
from alges_dist.predictions import predict_masks
from alges_dist.run_folder import RunLayout

log = logging.getLogger(__name__)

# Suffixes a returned mask may have; anything else in the folder (an annotation tool's
# JSON, thumbnails, notes) is not a mask and is ignored.
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")

def csv_cell(value: Any) -> Any:
    """A CSV cell safe to open in a spreadsheet: text starting with = + - @ (or a tab or CR)
    would run as a formula, so it gets a leading apostrophe (OWASP's CSV-injection advice)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def batch_images(round_dir: Path, picks: list[str], manifest: Manifest) -> dict[str, str]:
    """frame_id -> the image file annotators get for each pick (what every export lists).

    A picked video frame (``VIDEO#t=SECONDS``) is written once as a lossless PNG of exactly
    its decoded pixels, ``round_dir/frames/FRAME_ID.png``, and that file is listed.
    """
    from alges_dist.data.video import is_video_uri
    from alges_dist.data.video_export import export_video_frames

    rows = manifest.table.filter(pc.is_in(manifest.table["frame_id"], pa.array(picks, pa.string())))
    uri = dict(zip(rows["frame_id"].to_pylist(), rows["image_uri"].to_pylist()))
    videos = {f: u for f, u in uri.items() if is_video_uri(u)}
    if videos:
        uri.update(export_video_frames(Path(round_dir) / "frames", videos))
    return {f: uri[f] for f in picks}


def frames_as_files(manifest: Manifest, frame_ids: list[str], round_dir: Path) -> Manifest:
    """``manifest`` with the rows of ``frame_ids`` pointing at their files (:func:`batch_images`),
    so training and evaluation on labeled video frames never seek into a video."""
    files = batch_images(round_dir, frame_ids, manifest)
    table = manifest.table
    uris = [files.get(f, u) for f, u in zip(table["frame_id"].to_pylist(), table["image_uri"].to_pylist())]
    column = table.schema.get_field_index("image_uri")
    return Manifest(table.set_column(column, table.schema.field("image_uri"), pa.array(uris, pa.string())),
                    manifest.encoding)


def write_batch(folder: Path, picks: list[str], manifest: Manifest, splits: list[str] | None = None) -> Path:
    """The query batch for annotators: ``to_annotate.csv`` (rank, frame_id, image_uri, split:
    ``test`` frames are annotated to measure the model, never trained on) and ``to_annotate.png``
    (a contact sheet); returns the sheet's path."""
    uri = batch_images(folder, picks, manifest)
    splits = splits or ["pool"] * len(picks)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["pick_rank", "frame_id", "image_uri", "split"])
    writer.writerows((i, csv_cell(f), csv_cell(uri[f]), s) for i, (f, s) in enumerate(zip(picks, splits)))
    base = Path(folder) / "to_annotate"
    atomic_write_text(base.with_suffix(".csv"), buf.getvalue())
    labels = [f if s == "pool" else f"{f} (test)" for f, s in zip(picks, splits)]
    return contact_sheet([uri[f] for f in picks], labels, base.with_suffix(".png"))


def find_masks(folder: Path, picks: list[str]) -> dict[str, Path]:
    """``FRAME_ID.<image suffix>`` in ``folder`` for every pick.

    Raises FileNotFoundError listing the picks without a mask, ValueError naming both files
    when a frame has two candidates (``f4.png`` and ``f4.bmp``: which one is meant?).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"mask folder {folder} does not exist")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in MASK_SUFFIXES:
            continue
        if path.stem in found:
            raise InputError(f"frame {path.stem!r} has two masks in {folder}: {found[path.stem].name} and "
                             f"{path.name}; keep one")
        found[path.stem] = path
    missing = [f for f in picks if f not in found]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(picks)} picked frames have no mask in {folder}: "
                                f"{missing[:5]} (expected files named FRAME_ID.png)")
    return {f: found[f] for f in picks}


def collect_masks(picks: list[str], manifest: Manifest, masks: Path, dest: Path) -> dict[str, str]:
    """Validate people's masks for ``picks`` and copy them into ``dest``; returns frame_id -> copy.

    All or nothing: every pick needs a mask that decodes with the pool's encoding and
    matches its frame's size, else nothing is copied and the error names the file.
    """
    from alges_dist.data.frames import validate_frame

    found = find_masks(masks, picks)
    rows = manifest.table.filter(pc.is_in(manifest.table["frame_id"], pa.array(picks, pa.string())))
    for frame_id, image_uri in zip(rows["frame_id"].to_pylist(), rows["image_uri"].to_pylist()):
        validate_frame(image_uri, str(found[frame_id]), manifest.encoding)  # raises naming the file
    dest = Path(dest)
    staging = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for frame_id, src in found.items():
        shutil.copyfile(src, staging / f"{frame_id}{src.suffix.lower()}")
    shutil.rmtree(dest, ignore_errors=True)  # an earlier import that never reached the manifest
    staging.rename(dest)
    return {f: str((dest / f"{f}{src.suffix.lower()}").resolve()) for f, src in found.items()}


# ---- annotation tools: export with pre-annotations, import of their exports ---------------------------
PREANNOTATIONS = "preannotations"  # round folder: the model's class ids per pick, native size (PNG)
CORRECTION_CSV = "correction.csv"  # round folder: per labeled frame, pixels (and regions) changed from the model's masks
CORRECTION_COLUMNS = ["frame_id", "n_pixels", "pixels_changed", "fraction_changed", "annotation_seconds",
                      "regions_changed"]
LABELSTUDIO_RECORD = "labelstudio.json"  # round folder: where the batch was pushed (never the token)


class Batch(NamedTuple):
    """A query batch people label: a round's picks, or the first batch of a cold start."""

    name: str  # for messages: "round 2 of random/seed 0", "the first batch"
    folder: Path  # where its hand-off files live (the round folder, RUN/initial)
    selection: Path  # its picks: pick_rank, frame_id, value (and split, on a cold start)
    model: Path | None  # the model that picked it, whose masks are pre-annotations (None: no model yet)
    key: str  # its name in annotation tools
    label_args: str  # how `alges label` names it: " --strategy S --seed N", or "" for the first batch
    strategy: str | None = None  # which run and round it belongs to (None: the first batch)
    seed: int | None = None
    round: int | None = None

    def picks(self) -> pa.Table:
        """pick_rank, frame_id, value, split (``pool`` where the selection has no split column)."""
        import pyarrow.parquet as pq

        table = pq.read_table(self.selection).sort_by("pick_rank")
        if "split" not in table.column_names:
            table = table.append_column("split", pa.array(["pool"] * table.num_rows, pa.string()))
        return table


def batch_key(layout: RunLayout, name: str) -> str:
    """A batch's name in tools: run folder name + a hash of its path, then the batch within the run."""
    run = layout.out.resolve()
    return f"{run.name}-{hashlib.sha1(str(run).encode()).hexdigest()[:8]}/{name}"


def preannotations(cfg: Any, batch: Batch, images: dict[str, str]) -> dict[str, np.ndarray | None]:
    """The model's class ids ``(H, W)`` uint8 at each frame's native size, predicted once by the
    model that picked the batch and kept in its folder (the correction effort compares to them);
    None per frame when no model picked it (a cold start)."""
    from PIL import Image

    if batch.model is None:
        return dict.fromkeys(images)
    folder = batch.folder / PREANNOTATIONS
    missing = [f for f in images if not (folder / f"{f}.png").is_file()]
    if missing:
        for frame_id, ids in zip(missing, predict_masks(batch.model, cfg, [images[f] for f in missing], None)):
            with atomic_path(folder / f"{frame_id}.png") as tmp:
                Image.fromarray(ids.astype(np.uint8)).save(tmp, format="PNG")
    return {f: np.array(Image.open(folder / f"{f}.png")) for f in images}


def export_batch(cfg: Any, layout: RunLayout, batch: Batch, manifest: Manifest, fmt: str, dest: Path | None = None,
                 *, document_root: Path | None = None) -> Path:
    """Write ``batch`` for an annotation tool (``fmt``: labelstudio, cvat, coco)."""
    from alges_dist.annotation.formats import (
        ExportFrame,
        check_format,
        class_colours,
        write_export,
    )

    check_format(fmt)
    table = batch.picks()
    picks = table["frame_id"].to_pylist()
    images = batch_images(batch.folder, picks, manifest)
    predicted = preannotations(cfg, batch, images)
    frames = [ExportFrame(f, int(rank), None if value is None or math.isnan(value) else float(value),
                          Path(images[f]), predicted[f], split)
              for f, rank, value, split in zip(picks, table["pick_rank"].to_pylist(), table["value"].to_pylist(),
                                               table["split"].to_pylist())]
    enc = manifest.encoding
    dest = Path(dest) if dest is not None else batch.folder / f"export_{fmt}"
    out = write_export(frames, fmt, dest, class_names=enc.class_names,
                       colours=class_colours(enc.mode, enc.class_map, enc.n_classes, PALETTE),
                       model_version=f"alges {batch.name}", batch=batch.key, document_root=document_root,
                       label_args=batch.label_args)
    log.info("exported %d frames of %s for %s: %s", len(frames), batch.name, fmt, out)
    return out


class ConvertedLabels(NamedTuple):
    """A tool's labels as masks in the pool's encoding, and how much they differ from the pre-annotations."""

    folder: Path  # FRAME_ID.png per pick, for collect_masks
    effort: list[Any]  # regions.CorrectionEffort per pick; empty when the batch had no pre-annotations


def labels_from_export(batch: Batch, manifest: Manifest, source: Path, *, fmt: str | None = None,
                       pick_latest: bool = False, unpainted: str | None = None) -> ConvertedLabels:
    """Check a tool's export of ``batch`` and write its labels as masks in the pool's encoding
    (``BATCH/annotations/FRAME_ID.png``), ready for ``collect_masks``.

    Everything is checked before anything is written; errors name the frame and the file.
    ``unpainted``: "ignore" (pixels nobody painted get the pool's ignore value) or
    "refuse"; default: "ignore" when the pool's encoding has an ignore value.
    """
    from PIL import Image

    from alges_dist.annotation.formats import read_annotations
    from alges_dist.annotation.pool_encoding import encode_class_ids, ignore_value
    from alges_dist.annotation.regions import correction_effort, resolve_labels

    enc = manifest.encoding
    if unpainted not in (None, "ignore", "refuse"):
        raise InputError(f"unpainted must be 'ignore' or 'refuse', got {unpainted!r}")
    if unpainted == "ignore" and ignore_value(enc) is None:
        raise InputError("unpainted pixels cannot be ignored: the pool's mask encoding has no ignore value")
    policy = unpainted or ("ignore" if ignore_value(enc) is not None else "refuse")
    picks = batch.picks()["frame_id"].to_pylist()
    round_dir = batch.folder
    images = batch_images(round_dir, picks, manifest)
    sizes = {f: Image.open(images[f]).size[::-1] for f in picks}  # (height, width) of what people saw
    tool = read_annotations(Path(source), fmt, enc.class_names, pick_latest=pick_latest)
    labels = resolve_labels(tool.annotations, picks, sizes, tool.class_of, unlabeled=tool.unlabeled,
                            unpainted=policy, ignore_index=enc.ignore_index, problems=tool.problems,
                            source=str(source))
    encoded = {f: encode_class_ids(ids, enc) for f, ids in labels.items()}  # raises before any write
    dest = round_dir / "annotations"
    shutil.rmtree(dest, ignore_errors=True)  # an earlier import that never reached the manifest
    with atomic_directory(dest) as tmp:
        for frame_id, values in encoded.items():
            with atomic_path(tmp / f"{frame_id}.png") as part:
                Image.fromarray(values).save(part, format="PNG")
    pre, effort = round_dir / PREANNOTATIONS, []
    if all((pre / f"{f}.png").is_file() for f in picks):
        seconds = {a.frame_id: a.seconds for a in tool.annotations}
        effort = [correction_effort(f, labels[f], np.array(Image.open(pre / f"{f}.png")), seconds.get(f))
                  for f in picks]
    return ConvertedLabels(dest, effort)


def effort_of_masks(round_dir: Path, mask_uris: dict[str, str], manifest: Manifest) -> list[Any]:
    """Correction effort of masks imported with ``--masks`` (pixels only: a folder reports no time);
    empty when the batch was never exported with pre-annotations."""
    from PIL import Image

    from alges_dist.annotation.regions import correction_effort
    from alges_dist.data.frames import load_mask

    pre = Path(round_dir) / PREANNOTATIONS
    if not all((pre / f"{f}.png").is_file() for f in mask_uris):
        return []
    return [correction_effort(f, load_mask(uri, manifest.encoding), np.array(Image.open(pre / f"{f}.png")))
            for f, uri in mask_uris.items()]


def write_correction(round_dir: Path, effort: list[Any]) -> None:
    """``ROUND/correction.csv``, once the labels are in the manifest (so it never describes a failed import)."""
    if not effort:
        return
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CORRECTION_COLUMNS)
    writer.writerows((csv_cell(e.frame_id), e.n_pixels, e.pixels_changed, f"{e.fraction_changed:.6f}",
                      "" if e.annotation_seconds is None else e.annotation_seconds,
                      "" if e.regions_changed is None else e.regions_changed) for e in effort)
    atomic_write_text(Path(round_dir) / CORRECTION_CSV, buf.getvalue())


def correction_summary(round_dir: Path) -> dict[str, Any] | None:
    """The round's correction effort summed over its frames (None: no pre-annotated labels).

    ``regions_changed`` (the click proxy) is None where a frame's count was not recorded
    (a correction.csv written before it was)."""
    path = Path(round_dir) / CORRECTION_CSV
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    timed = [float(r["annotation_seconds"]) for r in rows if r["annotation_seconds"]]
    regions = [r.get("regions_changed") or "" for r in rows]
    n_pixels = sum(int(r["n_pixels"]) for r in rows)
    changed = sum(int(r["pixels_changed"]) for r in rows)
    return {"n_frames": len(rows), "n_pixels": n_pixels, "pixels_changed": changed,
            "fraction_changed": changed / n_pixels if n_pixels else 0.0,
            "regions_changed": sum(int(v) for v in regions) if rows and all(regions) else None,
            "annotation_seconds": sum(timed) if timed else None, "n_frames_timed": len(timed)}


def push_to_labelstudio(cfg: Any, layout: RunLayout, batch: Batch, manifest: Manifest, client: Any) -> dict[str, Any]:
    """Put ``batch`` into the Label Studio project of ``cfg.labelstudio`` (once).

    The frames and tasks are exported under ``labelstudio.document_root`` (the server's
    local-files root), a local-files storage is added for them, and the tasks are imported
    with the model's masks as predictions (none on a cold start). Returns the record kept
    in the batch's folder.
    """
    from alges_dist.annotation.labelstudio import label_names_of_config

    record_path = batch.folder / LABELSTUDIO_RECORD
    if record_path.is_file():
        return json.loads(record_path.read_text())
    settings = cfg.labelstudio
    root = Path(settings.document_root)
    dest = export_batch(cfg, layout, batch, manifest, "labelstudio", root / "alges" / batch.key, document_root=root)
    config = (dest / "label_config.xml").read_text()
    project_id = client.project_id(settings.project, config)
    theirs = label_names_of_config(client.label_config(project_id))
    if theirs != label_names_of_config(config):
        raise InputError(f"Label Studio project {settings.project!r} labels {sorted(theirs)}, the pool's classes are "
                         f"{sorted(label_names_of_config(config))}; set labelstudio.project to another project")
    client.ensure_local_storage(project_id, str((dest / "images").resolve()), title=f"alges {batch.key}")
    there = [t for t in client.export_tasks(project_id) if (t.get("data") or {}).get("alges_batch") == batch.key]
    if not there:  # a push cut short after the import must not add the tasks twice
        client.import_tasks(project_id, json.loads((dest / "tasks.json").read_text()))
    record = {"url": client.url, "project": settings.project, "project_id": project_id, "batch": batch.key,
              "n_tasks": len(json.loads((dest / "tasks.json").read_text())), "export": str(dest)}
    atomic_write_text(record_path, json.dumps(record, indent=1))
    log.info("pushed %d frames to Label Studio project %r (id %d) at %s", record["n_tasks"], settings.project,
             project_id, client.url)
    return record


def pull_from_labelstudio(batch: Batch, client: Any) -> Path:
    """Download the Label Studio export of ``batch``'s tasks into its folder; returns the file."""
    record_path = batch.folder / LABELSTUDIO_RECORD
    if not record_path.is_file():
        raise FileNotFoundError(f"{record_path} does not exist: {batch.name} was not pushed to Label Studio "
                                "(run `alges run` with loop.oracle: labelstudio first)")
    record = json.loads(record_path.read_text())
    tasks = [t for t in client.export_tasks(record["project_id"])
             if (t.get("data") or {}).get("alges_batch") == record["batch"]]
    path = batch.folder / "labelstudio_export.json"
    atomic_write_text(path, json.dumps(tasks))
    log.info("pulled %d tasks of %s from Label Studio project %r", len(tasks), record["batch"], record["project"])
    return path
