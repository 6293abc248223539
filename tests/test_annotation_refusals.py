"""`alges label --from`: every refusal names the frame and the file and leaves the manifest byte-identical.

Each test builds a tool export of the pending batch with one thing wrong (or one rule at
work: cancelled annotations, --pick latest, CVAT's z_order and implicit background,
unpainted pixels as the pool's ignore value) and imports it through the CLI.
"""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from annotation_fixtures import (
    STRATEGY,
    coco_export,
    cvat_export_xml,
    cvat_segmentation_zip,
    edit,
    labelstudio_export,
    manifest_bytes,
    pending_run as make_pending_run,
    picks_of,
    with_ignore_value,
)
from alges_dist.annotation.cvat import label_names
from alges_dist.annotation.labelstudio import brush_results
from alges_dist.cli import main
from alges_dist.data.frames import load_mask
from alges_dist.data.manifest import read_manifest

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _batch(run, fmt):
    """Export the batch for ``fmt``; return the export folder, the picks, their pre-annotations and edits."""
    assert main(["export", "--out", str(run.out), "--strategy", STRATEGY, "--format", fmt]) == 0
    dest = run.round_dir(STRATEGY, 0, 0) / f"export_{fmt}"
    picks = picks_of(run)
    pre = {f: np.array(__import__("PIL.Image").Image.open(run.round_dir(STRATEGY, 0, 0) / "preannotations" /
                                                          f"{f}.png")) for f in picks}
    return dest, picks, pre, edit(pre, 5)


def _label(run, source, *extra):
    return main(["label", "--out", str(run.out), "--strategy", STRATEGY, "--from", str(source), *extra])


def _refused(run, capsys, source, *extra, names):
    """Import fails with exit 2, the message names each of ``names``, and nothing changed."""
    before = manifest_bytes(run)
    capsys.readouterr()
    assert _label(run, source, *extra) == 2
    err = capsys.readouterr().err
    for name in names:
        assert str(name) in err, (name, err)
    assert manifest_bytes(run) == before
    assert not (run.round_dir(STRATEGY, 0, 0) / "labels").exists()
    return err


def _imported(run, picks, expected):
    table, encoding = read_manifest(run.manifest_path(STRATEGY, 0))
    uri = dict(zip(table["frame_id"].to_pylist(), table["mask_uri"].to_pylist()))
    for f in picks:
        np.testing.assert_array_equal(load_mask(uri[f], encoding), expected[f])


def _ls(run, tmp_path):
    dest, picks, pre, edited = _batch(run, "labelstudio")
    path = labelstudio_export(dest / "tasks.json", edited, ["background", "liver", "fat", "gallbladder", "instrument"],
                              tmp_path / "export.json")
    return path, json.loads(path.read_text()), picks, edited


def test_refuses_a_missing_pick(pending_run, tmp_path, capsys):
    path, tasks, picks, _ = _ls(pending_run, tmp_path)
    path.write_text(json.dumps(tasks[:-1]))
    _refused(pending_run, capsys, path, names=[picks[-1], "export.json", "1 of 3 picked frames have no annotation"])


def test_refuses_a_frame_annotated_twice(pending_run, tmp_path, capsys):
    path, tasks, picks, _ = _ls(pending_run, tmp_path)
    path.write_text(json.dumps(tasks + [{**tasks[0], "id": 99}]))
    _refused(pending_run, capsys, path, names=[picks[0], "appears 2 times", "task 1", "task 99"])


def test_refuses_a_frame_outside_the_batch(pending_run, tmp_path, capsys):
    _, picks, _, edited = _batch(pending_run, "cvat")
    stranger = {**edited, "synth00_000999": edited[picks[0]]}
    path = cvat_export_xml(stranger, label_names(["background", "liver", "fat", "gallbladder", "instrument"]),
                           tmp_path / "annotations.xml")
    _refused(pending_run, capsys, path, names=["synth00_000999", "annotations.xml", "not in this query batch"])


def test_refuses_an_unknown_class_and_lists_the_allowed_ones(pending_run, tmp_path, capsys):
    path, tasks, picks, _ = _ls(pending_run, tmp_path)
    tasks[1]["annotations"][0]["result"][0]["value"]["brushlabels"] = ["Liver"]
    path.write_text(json.dumps(tasks))
    _refused(pending_run, capsys, path, names=[picks[1], "'Liver'", "export.json",
                                               "allowed: ['background', 'liver', 'fat', 'gallbladder', 'instrument']"])


def test_refuses_a_size_other_than_the_frames(pending_run, tmp_path, capsys):
    dest, picks, _, edited = _batch(pending_run, "coco")
    edited[picks[2]] = np.pad(edited[picks[2]], ((0, 0), (0, 6)))  # 70 px wide, the frame is 64
    path = coco_export(dest / "instances.json", edited, tmp_path / "coco.json")
    _refused(pending_run, capsys, path, names=[picks[2], "coco.json", "70x64 in the annotation but 64x64 on disk"])


def test_refuses_a_rotated_image(pending_run, tmp_path, capsys):
    path, tasks, picks, _ = _ls(pending_run, tmp_path)
    tasks[0]["annotations"][0]["result"][0]["image_rotation"] = 90
    path.write_text(json.dumps(tasks))
    _refused(pending_run, capsys, path, names=["task 1", "image_rotation is 90", "export.json"])


def test_cancelled_annotations_are_ignored(pending_run, tmp_path, capsys):
    path, tasks, picks, edited = _ls(pending_run, tmp_path)
    junk = {"id": 7, "result": [{"type": "brushlabels", "value": {"brushlabels": ["nonsense"]}}], "was_cancelled": True,
            "updated_at": "2026-12-01T00:00:00Z"}
    only_cancelled = [dict(t) for t in tasks]
    only_cancelled[2] = {**tasks[2], "annotations": [junk]}
    path.write_text(json.dumps(only_cancelled))
    _refused(pending_run, capsys, path, names=[picks[2], "no annotation"])  # nothing left for that frame
    tasks[0]["annotations"].append(junk)  # skipped, though newer and with a label that does not exist
    path.write_text(json.dumps(tasks))
    assert _label(pending_run, path) == 0
    _imported(pending_run, picks, edited)


def test_two_annotations_are_refused_unless_pick_latest(pending_run, tmp_path, capsys):
    path, tasks, picks, edited = _ls(pending_run, tmp_path)
    second = edited[picks[1]].copy()
    second[:, :5] = 4
    newer = {**tasks[1]["annotations"][0], "id": 555, "updated_at": "2026-12-24T10:00:00Z",
             "result": brush_results(second, ["background", "liver", "fat", "gallbladder", "instrument"])}
    tasks[1]["annotations"].insert(0, newer)
    path.write_text(json.dumps(tasks))
    _refused(pending_run, capsys, path, names=[picks[1], "2 annotations", "555", "--pick latest"])
    assert _label(pending_run, path, "--pick", "latest") == 0
    _imported(pending_run, picks, {**edited, picks[1]: second})


def test_refuses_overlapping_regions_of_different_classes(pending_run, tmp_path, capsys):
    path, tasks, picks, edited = _ls(pending_run, tmp_path)
    extra = brush_results(np.full_like(edited[picks[0]], 2), ["background", "liver", "fat"], prefix="x")
    tasks[0]["annotations"][0]["result"] += extra  # a whole-frame "fat" region over the others
    path.write_text(json.dumps(tasks))
    _refused(pending_run, capsys, path, names=[picks[0], "overlaps", "'fat'", "export.json"])


def test_cvat_z_order_decides_overlaps_and_equal_z_is_refused(pending_run, tmp_path, capsys):
    _, picks, _, edited = _batch(pending_run, "cvat")
    names = label_names(["background", "liver", "fat", "gallbladder", "instrument"])
    over = {f: ids.copy() for f, ids in edited.items()}
    for ids in over.values():
        ids[:] = 4  # an "instrument" mask over the whole frame...
    path = cvat_export_xml([(edited, 1), (over, 0)], names, tmp_path / "annotations.xml")  # ...below the others
    assert _label(pending_run, path) == 0
    _imported(pending_run, picks, edited)  # the higher z_order won everywhere

    again = make_pending_run(pending_run.pool, tmp_path / "run2")
    path = cvat_export_xml([(edited, 0), (over, 0)], names, tmp_path / "annotations.xml")
    _refused(again, capsys, path, names=[picks[0], "overlaps", "'instrument'", "annotations.xml"])


def test_cvat_implicit_background_is_unlabeled(demo_manifest, tmp_path, capsys):
    run = make_pending_run(demo_manifest, tmp_path / "run")
    dest, picks, _, edited = _batch(run, "cvat")
    colours = [tuple(int(c["color"][i:i + 2], 16) for i in (1, 3, 5))
               for c in json.loads((dest / "cvat_labels.json").read_text())]
    holes = {picks[0]: np.zeros(edited[picks[0]].shape, bool)}
    holes[picks[0]][:4, :4] = True  # never painted: CVAT writes its implicit background (0, 0, 0) there
    path = cvat_segmentation_zip(edited, label_names(["background", "liver", "fat", "gallbladder", "instrument"]),
                                 colours, tmp_path / "mask.zip", unannotated=holes)
    assert "background (class 0)" in zipfile.ZipFile(path).read("labelmap.txt").decode()
    # the demo pool cannot store unlabeled pixels: refused, and asking to ignore them says why
    _refused(run, capsys, path, names=[picks[0], "16 unpainted px", "mask.zip"])
    _refused(run, capsys, path, "--unpainted", "ignore", names=["has no ignore value"])
    # a pool with an ignore value gets them as ignored pixels (value 255 in its mask files)
    ignoring = make_pending_run(with_ignore_value(demo_manifest, tmp_path / "ignoring.parquet"), tmp_path / "run2")
    assert _label(ignoring, path) == 0
    expected = {f: ids.copy() for f, ids in edited.items()}
    expected[picks[0]][holes[picks[0]]] = 255
    _imported(ignoring, picks, expected)


def test_unpainted_pixels_refused_when_asked_even_with_an_ignore_value(demo_manifest, tmp_path, capsys):
    run = make_pending_run(with_ignore_value(demo_manifest, tmp_path / "ignoring.parquet"), tmp_path / "run")
    dest, picks, _, edited = _batch(run, "labelstudio")
    edited[picks[1]][10:12, 10:12] = 255  # erased in the editor: no region there
    path = labelstudio_export(dest / "tasks.json", edited, ["background", "liver", "fat", "gallbladder", "instrument"],
                              tmp_path / "export.json")
    _refused(run, capsys, path, "--unpainted", "refuse", names=[picks[1], "4 unpainted px", "export.json"])
    assert _label(run, path) == 0  # default with an ignore value: ignored
    _imported(run, picks, edited)


@pytest.mark.parametrize("fmt,file", [("labelstudio", "tasks.json"), ("cvat", "annotations.xml"),
                                      ("coco", "instances.json")])
def test_predictions_are_never_read_as_labels(pending_run, tmp_path, capsys, fmt, file):
    dest, picks, _, _ = _batch(pending_run, fmt)
    _refused(pending_run, capsys, dest / file, names=[file, "pre-annotations"])
    moved = tmp_path / file  # the same file outside the export folder
    moved.write_bytes((dest / file).read_bytes())
    if fmt == "labelstudio":  # tasks that hold only predictions: no annotation for any pick
        _refused(pending_run, capsys, moved, names=["3 of 3 picked frames have no annotation", *picks])
    else:
        _refused(pending_run, capsys, moved, names=["pre-annotations", file])


def test_an_export_of_unknown_format_is_refused(pending_run, tmp_path, capsys):
    path = tmp_path / "labels.txt"
    path.write_text("frame,label\n")
    _refused(pending_run, capsys, path, names=["cannot tell the format", "labels.txt", "--format"])
