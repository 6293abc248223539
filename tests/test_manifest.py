"""The frame manifest: schema, validation errors, atomic writes, labeling, mask encodings."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alges_dist.data import atomic, manifest
from alges_dist.data.atomic import atomic_directory, atomic_write_bytes
from alges_dist.data.manifest import (
    MANIFEST_SCHEMA,
    MASK_ENCODING_KEY,
    MaskEncoding,
    filter_manifest,
    make_manifest,
    mark_labeled,
    read_manifest,
    validate_manifest,
    write_manifest,
)

GREY = MaskEncoding(mode="lut", class_map={0: 0, 128: 1, 255: 2}, ignore_values=[7], class_names=["a", "b", "c"])


def small_table(n: int = 5, splits: list[str] | None = None) -> pa.Table:
    splits = splits or ["pool", "pool", "pool", "val", "test"][:n]
    return make_manifest(
        frame_ids=[f"v1_{i:06d}" for i in range(n)],
        video_ids=["v1"] * n,
        frame_indices=list(range(n)),
        image_uris=[f"/data/img/{i}.png" for i in range(n)],
        mask_uris=[f"/data/mask/{i}.png" if i != 2 else None for i in range(n)],
        splits=splits,
    )


def raw_columns(**overrides) -> dict[str, list]:
    columns = {
        "frame_id": ["a", "b", "c", "d"],
        "video_id": ["v"] * 4,
        "frame_index": [0, 1, 2, 3],
        "image_uri": ["/i/a", "/i/b", "/i/c", "/i/d"],
        "mask_uri": [None, "/m/b", None, None],
        "split": ["pool", "pool", "val", "test"],
        "labeled_round": [None, 0, None, None],
    }
    columns.update(overrides)
    return columns


def test_manifest_round_trip_keeps_rows_schema_and_encoding(tmp_path):
    table = mark_labeled(small_table(), ["v1_000001"], 0)
    path = tmp_path / "pool.parquet"
    write_manifest(table, path, GREY)

    loaded = read_manifest(path)
    assert loaded.table.schema == MANIFEST_SCHEMA
    assert loaded.table.to_pylist() == table.to_pylist()
    assert loaded.table.column("labeled_round").to_pylist() == [None, 0, None, None, None]
    assert loaded.table.column("mask_uri").to_pylist()[2] is None
    assert loaded.encoding == GREY
    table_read, encoding_read = read_manifest(path)  # also a plain (table, encoding) tuple
    assert encoding_read.class_map == {"0": 0, "128": 1, "255": 2}
    stored = json.loads(pq.read_schema(path).metadata[MASK_ENCODING_KEY])
    assert stored["ignore_values"] == ["7"] and stored["class_names"] == ["a", "b", "c"]


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()], ids=["oserror", "interrupt"])
def test_failed_write_leaves_previous_manifest_intact_and_no_temp_file(tmp_path, monkeypatch, failure):
    path = tmp_path / "pool.parquet"
    old = small_table()
    write_manifest(old, path, GREY)
    old_bytes = path.read_bytes()

    def write_half_then_fail(table, where, **kwargs):
        with open(where, "wb") as fh:
            fh.write(b"PAR1 half a file")
        raise failure

    monkeypatch.setattr(manifest.pq, "write_table", write_half_then_fail)
    with pytest.raises(type(failure)):
        write_manifest(mark_labeled(old, ["v1_000000"], 3), path, GREY)

    assert path.read_bytes() == old_bytes
    assert read_manifest(path).table.to_pylist() == old.to_pylist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.parquet"]


def test_failed_write_to_new_path_creates_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest.pq, "write_table", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        write_manifest(small_table(), tmp_path / "sub" / "new.parquet", GREY)
    assert list((tmp_path / "sub").iterdir()) == []


def test_atomic_write_bytes_replaces_whole_file_or_nothing(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    atomic_write_bytes(path, b'{"round": 1}')
    assert path.read_bytes() == b'{"round": 1}'
    monkeypatch.setattr(atomic.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("rename failed")))
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_bytes(path, b'{"round": 2}')
    assert path.read_bytes() == b'{"round": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_atomic_directory_appears_complete_or_not_at_all(tmp_path):
    target = tmp_path / "pool"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "half.png").write_bytes(b"x")
            raise RuntimeError("crash while generating")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert (target / "done.txt").read_text() == "ok"
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_directory(target):
            pass


def test_validate_names_repeated_frame_id_and_its_rows():
    table = pa.table(raw_columns(frame_id=["a", "b", "c", "b"]))
    with pytest.raises(ValueError, match=r"column 'frame_id' repeats 'b' at rows \[1, 3\]"):
        validate_manifest(table)


def test_validate_names_bad_split_value_row_and_frame_id():
    table = pa.table(raw_columns(split=["pool", "pool", "train", "test"]))
    message = r"column 'split' has 'train' at row 2 \(frame_id 'c'\); allowed: \['pool', 'val', 'test'\]"
    with pytest.raises(ValueError, match=message):
        validate_manifest(table)


def test_validate_names_null_in_required_column():
    table = pa.table(raw_columns(image_uri=["/i/a", "/i/b", None, "/i/d"]))
    with pytest.raises(ValueError, match=r"column 'image_uri' is null at row 2 \(frame_id 'c'\)"):
        validate_manifest(table)


def test_validate_names_negative_labeled_round():
    table = pa.table(raw_columns(labeled_round=[None, -1, None, None]))
    with pytest.raises(ValueError, match=r"column 'labeled_round' is -1 at row 1 \(frame_id 'b'\)"):
        validate_manifest(table)


def test_validate_names_missing_and_unexpected_columns():
    columns = raw_columns()
    del columns["split"]
    columns["spilt"] = ["pool"] * 4
    with pytest.raises(ValueError, match=r"missing \['split'\], unexpected \['spilt'\]"):
        validate_manifest(pa.table(columns))


def test_validate_names_uncastable_column_type():
    table = pa.table(raw_columns(frame_index=["0", "1", "x", "3"]))
    with pytest.raises(ValueError, match=r"column 'frame_index' has type string, expected int64"):
        validate_manifest(table)


def test_validate_widens_int32_frame_index_to_schema():
    table = pa.table(raw_columns()).set_column(2, "frame_index", pa.array([0, 1, 2, 3], pa.int32()))
    assert validate_manifest(table).schema == MANIFEST_SCHEMA


def test_read_manifest_names_file_for_invalid_rows(tmp_path):
    path = tmp_path / "bad.parquet"
    table = pa.table(raw_columns(frame_id=["a", "a", "c", "d"]))
    table = table.replace_schema_metadata({MASK_ENCODING_KEY: GREY.to_json().encode()})
    pq.write_table(table, path)
    with pytest.raises(ValueError, match=rf"manifest {path}: column 'frame_id' repeats 'a'"):
        read_manifest(path)


def test_read_manifest_without_encoding_metadata_says_how_to_write_one(tmp_path):
    path = tmp_path / "plain.parquet"
    pq.write_table(small_table(), path)
    with pytest.raises(ValueError, match="alges.mask_encoding.*write_manifest"):
        read_manifest(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_manifest(tmp_path / "missing.parquet")


def test_mark_labeled_sets_round_and_never_relabels():
    table = small_table()
    labeled = mark_labeled(table, ["v1_000002", "v1_000000"], 0)
    assert labeled.column("labeled_round").to_pylist() == [0, None, 0, None, None]
    assert table.column("labeled_round").null_count == 5  # input untouched
    again = mark_labeled(labeled, ["v1_000001"], 1)
    assert again.column("labeled_round").to_pylist() == [0, 1, 0, None, None]
    assert again.schema == MANIFEST_SCHEMA

    with pytest.raises(ValueError, match=r"'v1_000002' \(row 2\) is already labeled in round 0"):
        mark_labeled(again, ["v1_000002"], 2)
    with pytest.raises(ValueError, match=r"\['nope'\].*not in the manifest"):
        mark_labeled(again, ["nope"], 2)
    with pytest.raises(ValueError, match=r"'v1_000003' \(row 3\) is in split 'val'"):
        mark_labeled(again, ["v1_000003"], 2)
    with pytest.raises(ValueError, match=r"repeat \['v1_000001'\]"):
        mark_labeled(table, ["v1_000001", "v1_000001"], 0)
    with pytest.raises(ValueError, match="round_index must be an integer >= 0"):
        mark_labeled(table, ["v1_000001"], -1)


def test_filter_manifest_selects_split_and_labeled_state():
    table = mark_labeled(small_table(), ["v1_000001"], 0)
    assert filter_manifest(table, split="pool", labeled=False).column("frame_id").to_pylist() == [
        "v1_000000",
        "v1_000002",
    ]
    assert filter_manifest(table, labeled=True).column("frame_id").to_pylist() == ["v1_000001"]
    assert filter_manifest(table, split="test").column("frame_id").to_pylist() == ["v1_000004"]
    with pytest.raises(ValueError, match="split 'train' is not one of"):
        filter_manifest(table, split="train")


def test_mask_encoding_normalises_keys_and_round_trips_json():
    rgb = MaskEncoding(
        mode="rgb", class_map={(255, 0, 0): 1, "0, 0, 0": 0}, ignore_values=[[1, 2, 3]], class_names=["bg", "tool"]
    )
    assert rgb.class_map == {"255,0,0": 1, "0,0,0": 0}
    assert rgb.ignore_values == ["1,2,3"]
    assert MaskEncoding.from_json(rgb.to_json()) == rgb
    assert GREY.n_classes == 3 and GREY.ignore_index == 255
    with pytest.raises(Exception, match="frozen"):
        GREY.ignore_index = 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(mode="lut", class_map={0: 0, 9: 5}, class_names=["a", "b"]), r"\{'9': 5\} are outside the class ids 0..1"),
        (dict(mode="lut", class_map={300: 0}, class_names=["a"]), "outside 0..255"),
        (dict(mode="lut", class_map={}, class_names=["a"]), "needs a non-empty class_map"),
        (dict(mode="threshold", threshold=127, class_names=["a", "b", "c"]), "needs 2 names"),
        (dict(mode="threshold", class_names=["a", "b"]), "needs threshold"),
        (dict(mode="lut", class_map={0: 0}, ignore_values=[0], class_names=["a"]), r"\['0'\] are both mapped"),
        (dict(mode="lut", class_map={0: 0}, class_names=["a", "b"], ignore_index=1), "ignore_index 1 must lie in 2"),
        (dict(mode="lut", class_map={0: 0}, class_names=["a", "a"]), "repeats"),
        (dict(mode="rgb", class_map={"1,2": 0}, class_names=["a"]), "3 integers"),
        (dict(mode="lut", class_map={0: 0}, class_names=["a"], colours=1), "Extra inputs"),
    ],
)
def test_mask_encoding_rejects_inconsistent_maps(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskEncoding(**kwargs)
