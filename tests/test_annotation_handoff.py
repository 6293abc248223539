"""Export a pending batch for Label Studio, CVAT and COCO, edit it as annotators would, import it.

The pre-annotations are checked against the model run by hand on each frame and decoded
with the reference packages; the imported labels against the edits; the next round
trains on them (Ray).
"""

from __future__ import annotations

import csv
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from annotation_fixtures import (
    STRATEGY,
    cvat_export_xml,
    cvat_segmentation_zip,
    coco_export,
    edit,
    labelstudio_export,
    picks_of,
)
from alges_dist.annotation import coco, cvat, labelstudio
from alges_dist.annotation.codecs import brush_decode
from alges_dist.annotation.cvat import label_names
from alges_dist.annotation.pool_encoding import encode_class_ids
from alges_dist.handoff import batch_images, correction_summary
from alges_dist.report import correction_table
from alges_dist.run_folder import RunLayout
from alges_dist.cli import main
from alges_dist.data.frames import decode_mask, load_image, load_mask, normalize_images
from alges_dist.data.manifest import MaskEncoding, read_manifest
from alges_dist.models import load_model

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
FORMATS = ["labelstudio", "cvat", "coco"]


@pytest.fixture
def run(pending_run):
    return pending_run


def _export(run, fmt):
    assert main(["export", "--out", str(run.out), "--strategy", STRATEGY, "--format", fmt]) == 0
    return run.round_dir(STRATEGY, 0, 0) / f"export_{fmt}"


def _model_masks(run, picks):
    """The round-0 model run by hand on each frame (64 px frames, 64 px input: no resizing)."""
    cfg, (table, _) = run.cfg, read_manifest(run.pool)
    uri = dict(zip(table["frame_id"].to_pylist(), table["image_uri"].to_pylist()))
    model = load_model(cfg.model.arch, cfg.model.encoder, cfg.data.n_classes, run.model_path(STRATEGY, 0, 0)).eval()
    with torch.inference_mode():
        return {f: model(normalize_images(load_image(uri[f])[None], cfg.data.normalize)).argmax(1)[0].numpy()
                for f in picks}


def _decoded_preannotations(dest, fmt, shape):
    """Class ids per frame read back from the export, with the reference decoders where they exist."""
    out = {}
    if fmt == "labelstudio":
        for task in json.loads((dest / "tasks.json").read_text()):
            ids = np.full(shape, -1)
            for result in task["predictions"][0]["result"]:
                names = json.loads((dest / "alges_export.json").read_text())["class_names"]
                ids[brush_decode(result["value"]["rle"], *shape) == 255] = names.index(result["value"]["brushlabels"][0])
            out[task["data"]["frame_id"]] = ids
    elif fmt == "cvat":
        from xml.etree import ElementTree as ET

        from cvat_sdk.masks import decode_mask as cvat_decode_mask

        root = ET.parse(dest / "annotations.xml").getroot()
        names = [label.findtext("name") for label in root.iter("label")]
        for image in root.iter("image"):
            ids = np.full(shape, -1)
            for m in image.iter("mask"):
                left, top, w, h = (int(m.attrib[k]) for k in ("left", "top", "width", "height"))
                points = [int(c) for c in m.attrib["rle"].split(",")] + [left, top, left + w - 1, top + h - 1]
                ids[cvat_decode_mask(points, image_width=shape[1], image_height=shape[0])] = names.index(m.attrib["label"])
            out[image.attrib["name"][:-4]] = ids
    else:
        from pycocotools import mask as mask_api

        doc = json.loads((dest / "instances.json").read_text())
        frame = {im["id"]: im["frame_id"] for im in doc["images"]}
        for f in frame.values():
            out[f] = np.full(shape, -1)
        for ann in doc["annotations"]:
            rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
            out[frame[ann["image_id"]]][mask_api.decode(rle).astype(bool)] = ann["category_id"] - 1
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_carries_the_models_masks_frames_and_picks(run, fmt):
    dest = _export(run, fmt)
    picks = picks_of(run)
    expected = _model_masks(run, picks)
    got = _decoded_preannotations(dest, fmt, next(iter(expected.values())).shape)
    assert list(got) == picks  # in pick order
    for f in picks:
        np.testing.assert_array_equal(got[f], expected[f])  # every pixel covered, one region per class
    record = json.loads((dest / "alges_export.json").read_text())
    assert [p["frame_id"] for p in record["picks"]] == picks and [p["pick_rank"] for p in record["picks"]] == [0, 1, 2]
    # the frames people see are the batch's images (video frames: the PNGs written once), named by frame id
    encoding = run.manifest(STRATEGY, 0).encoding
    uri = batch_images(run.round_dir(STRATEGY, 0, 0), picks, run.manifest(STRATEGY, 0))
    for f in picks:
        assert (dest / "images" / f"{f}.png").read_bytes() == open(uri[f], "rb").read()
    readme = (dest / "README.md").read_text()
    assert "alges label" in readme and "--from" in readme
    if fmt == "labelstudio":
        tasks = json.loads((dest / "tasks.json").read_text())
        assert [t["data"]["frame_id"] for t in tasks] == picks
        assert [t["data"]["pick_rank"] for t in tasks] == [0, 1, 2]
        assert all(t["data"]["image"] == f"/data/local-files/?d=export_labelstudio/images/{f}.png"
                   for t, f in zip(tasks, picks))
        config = (dest / "label_config.xml").read_text()
        assert all(f'value="{n}"' in config for n in encoding.class_names)
    elif fmt == "cvat":
        labels = json.loads((dest / "cvat_labels.json").read_text())
        assert [label["name"] for label in labels] == label_names(encoding.class_names)
        assert labels[0]["name"] == "background (class 0)"  # CVAT keeps "background" for unannotated pixels
        assert "#000000" not in {label["color"] for label in labels}
    else:
        doc = json.loads((dest / "instances.json").read_text())
        assert [c["name"] for c in doc["categories"]] == encoding.class_names
        assert [im["file_name"] for im in doc["images"]] == [f"{f}.png" for f in picks]


def _import_edited(run, fmt, tmp_path):
    """Export, edit the pre-annotations, write the tool's export, `alges label --from` it."""
    tool = "cvat" if fmt.startswith("cvat") else fmt
    dest = _export(run, tool)
    picks = picks_of(run)
    encoding = read_manifest(run.pool).encoding
    pre = {f: load_mask(str(run.round_dir(STRATEGY, 0, 0) / "preannotations" / f"{f}.png"),
                        MaskEncoding(mode="lut", class_map={i: i for i in range(5)}, class_names=list("abcde")))
           for f in picks}
    edited = edit(pre, encoding.n_classes)
    names = encoding.class_names
    if fmt == "labelstudio":
        source = labelstudio_export(dest / "tasks.json", edited, names, tmp_path / "project-1-at-2026.json")
    elif fmt == "cvat":
        source = cvat_export_xml(edited, label_names(names), tmp_path / "annotations.xml")
    elif fmt == "cvat-zip":  # "CVAT for images 1.1" as CVAT downloads it: annotations.xml in a zip
        xml = cvat_export_xml(edited, label_names(names), tmp_path / "annotations.xml")
        with zipfile.ZipFile(tmp_path / "task_1-cvat.zip", "w") as archive:
            archive.write(xml, "annotations.xml")
        source = tmp_path / "task_1-cvat.zip"
    elif fmt == "cvat-segmentation-mask":
        colours = [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5))
                   for c in (label["color"] for label in json.loads((dest / "cvat_labels.json").read_text()))]
        source = cvat_segmentation_zip(edited, label_names(names), colours, tmp_path / "task_1-mask.zip")
    else:
        source = coco_export(dest / "instances.json", edited, tmp_path / "instances_default.json")
    assert main(["label", "--out", str(run.out), "--strategy", STRATEGY, "--from", str(source)]) == 0
    return picks, pre, edited


@pytest.mark.parametrize("fmt", ["labelstudio", "cvat", "cvat-zip", "cvat-segmentation-mask", "coco"])
def test_edited_export_imports_the_edited_masks_and_the_correction_effort(run, fmt, tmp_path):
    picks, pre, edited = _import_edited(run, fmt, tmp_path)
    table, encoding = read_manifest(run.manifest_path(STRATEGY, 0))
    rows = {f: (r, m) for f, r, m in zip(table["frame_id"].to_pylist(), table["labeled_round"].to_pylist(),
                                          table["mask_uri"].to_pylist())}
    for f in picks:
        assert rows[f][0] == 1 and rows[f][1].startswith(str(run.round_dir(STRATEGY, 0, 0) / "labels"))
        np.testing.assert_array_equal(load_mask(rows[f][1], encoding), edited[f])  # what training reads
    with open(run.round_dir(STRATEGY, 0, 0) / "correction.csv", newline="") as fh:
        effort = {r["frame_id"]: r for r in csv.DictReader(fh)}
    for i, f in enumerate(picks):
        assert int(effort[f]["pixels_changed"]) == int(np.count_nonzero(edited[f] != pre[f]))
        assert int(effort[f]["n_pixels"]) == edited[f].size
        assert effort[f]["annotation_seconds"] == (f"{20.0 + i + 1}" if fmt == "labelstudio" else "")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["labelstudio", "cvat", "coco"])
def test_next_round_trains_on_the_imported_labels(ray_local, run, fmt, tmp_path):
    picks, pre, edited = _import_edited(run, fmt, tmp_path)
    assert main(["run", "--config", str(run.out / "config.yaml"), "--out", str(run.out), "--no-dashboard"]) == 0
    assert run.model_path(STRATEGY, 0, 1).is_file()  # round 1 trained on the initial set + the edited batch
    record = json.loads(run.record_path(STRATEGY, 0, 0).read_text())
    changed = sum(int(np.count_nonzero(edited[f] != pre[f])) for f in picks)
    assert record["correction"]["pixels_changed"] == changed and record["correction"]["n_frames"] == len(picks)
    assert record["correction"]["annotation_seconds"] == (pytest.approx(21 + 22 + 23) if fmt == "labelstudio" else None)
    report = (run.out / "report" / "report.html").read_text()
    assert "Correction effort" in report and str(changed) in report


@pytest.mark.parametrize("mode", ["lut", "rgb", "threshold"])
def test_pool_encoding_inverse_decodes_back_to_the_class_ids(mode, seed):
    rng = np.random.default_rng(seed)
    if mode == "lut":  # several values per class: the inverse picks one, decoding gives the class back
        encoding = MaskEncoding(mode="lut", class_map={0: 0, 7: 1, 9: 1, 80: 2}, class_names=["a", "b", "c"],
                                ignore_values=[255, 254])
    elif mode == "rgb":
        encoding = MaskEncoding(mode="rgb", class_map={"0,0,0": 0, "255,0,0": 1, "0,0,255": 2, "9,9,9": 2},
                                class_names=["a", "b", "c"], ignore_values=["255,255,255"])
    else:
        encoding = MaskEncoding(mode="threshold", threshold=int(rng.integers(0, 255)), class_names=["bg", "fg"],
                                ignore_values=[] if seed else [])
    ids = rng.integers(0, encoding.n_classes, (9, 11)).astype(np.uint8)
    if encoding.ignore_values:
        ids[rng.random(ids.shape) < 0.2] = encoding.ignore_index
    np.testing.assert_array_equal(decode_mask(encode_class_ids(ids, encoding), encoding), ids)
    if not encoding.ignore_values:
        ids[0, 0] = encoding.ignore_index
        with pytest.raises(ValueError, match="ignored pixels"):
            encode_class_ids(ids, encoding)


def _rectangle_regions(fmt):
    """A 20 x 10 px rectangle (x 4..23, y 6..15, outline included) drawn as each tool writes polygons."""
    x0, y0, x1, y1, h, w = 4, 6, 23, 15, 32, 40
    if fmt == "labelstudio":
        points = [[100 * x / w, 100 * y / h] for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]
        task = [{"id": 1, "data": {"frame_id": "f"}, "annotations": [{"id": 2, "result": [{
            "id": "p", "type": "polygonlabels", "from_name": "poly", "to_name": "image", "original_width": w,
            "original_height": h, "image_rotation": 0, "value": {"points": points, "polygonlabels": ["fat"]}}]}]}]
        found, problems = labelstudio.read_export(task, "export.json")
    elif fmt == "cvat":
        found, problems = cvat.read_xml(
            f'<annotations><image id="0" name="f.png" width="{w}" height="{h}"><polygon label="fat" '
            f'points="{x0},{y0};{x1},{y0};{x1},{y1};{x0},{y1}" z_order="0"/></image></annotations>', "a.xml")
    else:
        found, problems = coco.read_instances({
            "images": [{"id": 3, "file_name": "f.jpg", "width": w, "height": h}],
            "categories": [{"id": 3, "name": "fat"}],
            "annotations": [{"id": 1, "image_id": 3, "category_id": 3, "iscrowd": 0,
                             "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]}]}, "c.json")
    expected = np.zeros((h, w), bool)
    expected[y0:y1 + 1, x0:x1 + 1] = True
    return found, problems, expected


@pytest.mark.parametrize("fmt", FORMATS)
def test_polygons_are_rasterized_with_their_outline(fmt):
    found, problems, expected = _rectangle_regions(fmt)
    assert problems == [] and [a.frame_id for a in found] == ["f"]
    (region,) = found[0].regions
    assert region.label == "fat"
    np.testing.assert_array_equal(region.mask, expected)


def test_correction_effort_is_summed_per_round_and_tabled_per_run(tmp_path):
    layout = RunLayout(tmp_path)
    round_dir = layout.round_dir("alges-img", 1, 2)
    round_dir.mkdir(parents=True)
    (round_dir / "correction.csv").write_text(
        "frame_id,n_pixels,pixels_changed,fraction_changed,annotation_seconds\n"
        "a,100,10,0.1,12.5\nb,300,60,0.2,\nc,100,0,0.0,7.5\n")
    summary = correction_summary(round_dir)
    assert summary == {"n_frames": 3, "n_pixels": 500, "pixels_changed": 70, "fraction_changed": 70 / 500,
                       "regions_changed": None,  # a correction.csv written before regions were recorded
                       "annotation_seconds": 20.0, "n_frames_timed": 2}
    assert correction_summary(layout.round_dir("alges-img", 1, 0)) is None  # no pre-annotated import there
    layout.record_path("alges-img", 1, 2).write_text(json.dumps({"correction": summary}))
    layout.record_path("alges-img", 1, 1).parent.mkdir(parents=True)
    layout.record_path("alges-img", 1, 1).write_text(json.dumps({"dice": 0.5}))  # simulated oracle: no effort
    (row,) = correction_table(tmp_path, ["random", "alges-img"], [0, 1], 3)
    assert row == {"strategy": "alges-img", "seed": 1, "round": 2, "frames": 3, "pixels_changed": 70,
                   "pct_changed": pytest.approx(14.0), "regions_changed": pytest.approx(float("nan"), nan_ok=True),
                   "annotation_s": 20.0, "s_per_frame": 10.0}


def test_cli_lists_the_registered_formats():
    from alges_dist import cli
    from alges_dist.annotation.formats import FORMATS

    assert cli.FORMAT_NAMES == FORMATS


def test_masks_returned_as_files_after_an_export_also_record_the_correction_effort(run, tmp_path):
    _export(run, "coco")
    picks = picks_of(run)
    pre = {f: np.array(Image.open(run.round_dir(STRATEGY, 0, 0) / "preannotations" / f"{f}.png")) for f in picks}
    edited = edit(pre, 5)
    (tmp_path / "masks").mkdir()
    for f in picks:  # the demo pool's encoding is the identity: class ids are the mask values
        Image.fromarray(edited[f]).save(tmp_path / "masks" / f"{f}.png")
    assert main(["label", "--out", str(run.out), "--strategy", STRATEGY, "--masks", str(tmp_path / "masks")]) == 0
    with open(run.round_dir(STRATEGY, 0, 0) / "correction.csv", newline="") as fh:
        effort = {r["frame_id"]: r for r in csv.DictReader(fh)}
    assert {f: int(effort[f]["pixels_changed"]) for f in picks} == {
        f: int(np.count_nonzero(edited[f] != pre[f])) for f in picks}
    assert all(effort[f]["annotation_seconds"] == "" for f in picks)  # a folder reports no time
