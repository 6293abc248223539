"""The frame manifest: one Parquet table per pool, one row per frame (DESIGN: "pool manifest").

Columns (``MANIFEST_SCHEMA``):

- ``frame_id`` (string, unique): stable across runs; sources derive it from file names,
  never from row order or paths that move.
- ``video_id`` (string), ``frame_index`` (int64): which video and where in it, so splits
  can keep near-duplicate neighbours together.
- ``image_uri`` / ``mask_uri`` (string; mask nullable): absolute local paths or
  ``scheme://`` URIs readable through ``pyarrow.fs``.
- ``split`` (string): one of ``pool``, ``val``, ``test``.
- ``labeled_round`` (int32, nullable): the active-learning round that labeled the frame;
  null while unlabeled. Set only through :func:`mark_labeled`, which never re-labels.

The schema metadata carries the :class:`MaskEncoding` (key ``alges.mask_encoding``), so a
manifest says how to turn its own mask files into class ids.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from alges_dist import storage
from alges_dist.data.atomic import atomic_path
from alges_dist.errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_SCHEMA",
    "MASK_ENCODING_KEY",
    "SPLITS",
    "Manifest",
    "MaskEncoding",
    "filter_manifest",
    "make_manifest",
    "mark_labeled",
    "read_encoding",
    "read_manifest",
    "set_uris",
    "validate_manifest",
    "write_manifest",
]

SPLITS: tuple[str, ...] = ("pool", "val", "test")
MASK_ENCODING_KEY = b"alges.mask_encoding"

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("frame_id", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("frame_index", pa.int64(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("mask_uri", pa.string(), nullable=True),
        pa.field("split", pa.string(), nullable=False),
        pa.field("labeled_round", pa.int32(), nullable=True),
    ]
)


# ---------------------------------------------------------------------------- encoding


def _canonical_key(key: Any, mode: str) -> str:
    """One spelling per mask value: "80" for grey, "255,0,0" for colour."""
    if mode == "rgb":
        if isinstance(key, str):
            parts = [p.strip() for p in key.strip("()[] ").split(",")]
        elif isinstance(key, (tuple, list)):
            parts = list(key)
        else:
            raise InputError(f"colour key {key!r} must be 'R,G,B' or a 3-tuple of 0..255")
        try:
            rgb = [int(p) for p in parts]
        except (TypeError, ValueError):
            raise InputError(f"colour key {key!r} must be 'R,G,B' with integers 0..255") from None
        if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
            raise InputError(f"colour key {key!r} must be 3 integers in 0..255")
        return ",".join(str(c) for c in rgb)
    if not isinstance(key, (int, str)) or isinstance(key, bool):
        raise InputError(f"grey key {key!r} must be an integer 0..255")
    try:
        value = int(key)
    except ValueError:
        raise InputError(f"grey key {key!r} must be an integer 0..255") from None
    if not 0 <= value <= 255:
        raise InputError(f"grey key {key!r} is outside 0..255 (masks are 8-bit)")
    return str(value)


class MaskEncoding(BaseModel):
    """How a mask file decodes to class ids in ``0..n_classes-1`` plus ``ignore_index``.

    Modes:

    - ``"lut"``: single-channel (or RGB with equal channels) grey value -> class id via
      ``class_map`` (keys ``"0".."255"``). Palette ("P") PNGs are read as palette indices.
    - ``"rgb"``: colour -> class id via ``class_map`` (keys ``"R,G,B"``).
    - ``"threshold"``: grey value ``> threshold`` -> 1, else 0 (binary masks with
      anti-aliased edges, e.g. CVC-ClinicDB); ``class_names`` has two entries.

    ``ignore_values`` (same key spelling) decode to ``ignore_index``; any value that is
    neither mapped nor ignored is an error naming the file and the value. Keys given as
    ints or tuples are normalised to strings, so the model round-trips through JSON.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["lut", "rgb", "threshold"]
    class_names: list[str]
    class_map: dict[str, int] = {}
    threshold: int | None = None
    ignore_values: list[str] = []
    ignore_index: int = 255

    @field_validator("class_names")
    @classmethod
    def _names_unique(cls, names: list[str]) -> list[str]:
        if not names:
            raise InputError("class_names is empty; give one name per class id")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise InputError(f"class_names repeats {dupes}; each class needs its own name")
        return names

    @model_validator(mode="before")
    @classmethod
    def _canonical_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        mode = data.get("mode")
        if mode not in ("lut", "rgb", "threshold"):
            return data  # the Literal check reports it
        key_mode = "rgb" if mode == "rgb" else "lut"
        out = dict(data)
        if isinstance(out.get("class_map"), dict):
            out["class_map"] = {_canonical_key(k, key_mode): v for k, v in out["class_map"].items()}
        if isinstance(out.get("ignore_values"), (list, tuple)):
            out["ignore_values"] = [_canonical_key(k, key_mode) for k in out["ignore_values"]]
        return out

    @model_validator(mode="after")
    def _consistent(self) -> MaskEncoding:
        n = len(self.class_names)
        if not n <= self.ignore_index <= 255:
            raise InputError(
                f"ignore_index {self.ignore_index} must lie in {n}..255 "
                f"(above the class ids 0..{n - 1}, inside uint8)"
            )
        if self.mode == "threshold":
            if self.threshold is None or not 0 <= self.threshold <= 254:
                raise InputError(f"mode 'threshold' needs threshold in 0..254, got {self.threshold}")
            if n != 2:
                raise InputError(f"mode 'threshold' gives class ids 0 and 1: class_names needs 2 names, got {n}")
            if self.class_map:
                raise InputError("mode 'threshold' takes no class_map; use mode 'lut' for a value table")
        else:
            if self.threshold is not None:
                raise InputError(f"threshold is only used by mode 'threshold', not '{self.mode}'")
            if not self.class_map:
                raise InputError(f"mode '{self.mode}' needs a non-empty class_map")
            bad = {k: v for k, v in self.class_map.items() if not 0 <= v < n}
            if bad:
                raise InputError(f"class_map targets {bad} are outside the class ids 0..{n - 1} of class_names")
        both = sorted(set(self.ignore_values) & set(self.class_map))
        if both:
            raise InputError(f"mask values {both} are both mapped to a class and ignored; pick one")
        return self

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> MaskEncoding:
        return cls.model_validate_json(text)


# ---------------------------------------------------------------------------- table checks


def _row_name(table: pa.Table, row: int) -> str:
    frame_ids = table.column("frame_id") if "frame_id" in table.column_names else None
    frame_id = frame_ids[row].as_py() if frame_ids is not None else None
    return f"row {row} (frame_id {frame_id!r})" if frame_id is not None else f"row {row}"


def _first_true(mask: pa.ChunkedArray | pa.Array) -> int | None:
    index = pc.index(pc.fill_null(mask, False), True).as_py()
    return None if index < 0 else index


def validate_manifest(table: pa.Table, *, source: str = "manifest") -> pa.Table:
    """Check ``table`` against the manifest contract; return it cast to ``MANIFEST_SCHEMA``.

    Checks: exactly the schema's columns, castable types (int32 frame_index is widened),
    no nulls in non-nullable columns, unique ``frame_id``, ``split`` in ``SPLITS``,
    ``labeled_round >= 0``. Raises ValueError naming ``source``, the column, and the
    first offending row and frame_id.
    """
    names = table.column_names
    expected = MANIFEST_SCHEMA.names
    missing = [c for c in expected if c not in names]
    extra = [c for c in names if c not in expected]
    if missing or extra:
        raise InputError(
            f"{source}: columns do not match the manifest schema "
            f"(missing {missing}, unexpected {extra}); expected exactly {expected}"
        )
    columns = []
    for field in MANIFEST_SCHEMA:
        column = table.column(field.name)
        if column.type != field.type:
            try:
                column = column.cast(field.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise InputError(
                    f"{source}: column '{field.name}' has type {column.type}, expected {field.type} ({err})"
                ) from None
        if not field.nullable and column.null_count:
            row = _first_true(pc.is_null(column))
            raise InputError(
                f"{source}: column '{field.name}' is null at {_row_name(table, row)}; "
                f"'{field.name}' is required for every frame"
            )
        columns.append(column)
    out = pa.Table.from_arrays(columns, schema=MANIFEST_SCHEMA)

    counts = pc.value_counts(out.column("frame_id"))
    repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(repeated):
        frame_id = repeated[0]["values"].as_py()
        rows = pc.indices_nonzero(pc.equal(out.column("frame_id"), frame_id)).to_pylist()
        raise InputError(
            f"{source}: column 'frame_id' repeats {frame_id!r} at rows {rows[:5]} "
            f"({len(repeated)} repeated ids in all); frame ids must be unique"
        )
    bad_split = pc.invert(pc.is_in(out.column("split"), value_set=pa.array(SPLITS)))
    row = _first_true(bad_split)
    if row is not None:
        value = out.column("split")[row].as_py()
        raise InputError(f"{source}: column 'split' has {value!r} at {_row_name(out, row)}; allowed: {list(SPLITS)}")
    row = _first_true(pc.less(out.column("labeled_round"), 0))
    if row is not None:
        value = out.column("labeled_round")[row].as_py()
        raise InputError(
            f"{source}: column 'labeled_round' is {value} at {_row_name(out, row)}; "
            "rounds count from 0 (null = unlabeled)"
        )
    row = _first_true(pc.equal(out.column("frame_id"), ""))
    if row is not None:
        raise InputError(f"{source}: column 'frame_id' is empty at row {row}; every frame needs an id")
    for name in ("image_uri", "mask_uri"):
        row = _first_true(pc.invert(_is_absolute_uri(out.column(name))))
        if row is not None:
            value = out.column(name)[row].as_py()
            raise InputError(
                f"{source}: column '{name}' is {value!r} at {_row_name(out, row)}; URIs must be absolute "
                "paths or scheme:// URIs (workers on other nodes resolve them, not this folder)"
            )
    row = _first_true(pc.and_(pc.is_valid(out.column("labeled_round")), pc.is_null(out.column("mask_uri"))))
    if row is not None:
        raise InputError(
            f"{source}: {_row_name(out, row)} is labeled (labeled_round "
            f"{out.column('labeled_round')[row].as_py()}) but has no mask_uri; a labeled frame needs its mask"
        )
    return out


def _is_absolute_uri(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """True where a URI is an absolute path or has a scheme; null URIs count as fine."""
    ok = pc.or_(pc.starts_with(column, "/"), pc.match_substring_regex(column, r"^[A-Za-z][A-Za-z0-9+.-]*://"))
    return pc.fill_null(ok, True)


def check_pool_for_run(table: pa.Table, *, needs_pool_masks: bool, source: str, needs_test_masks: bool = True) -> None:
    """Per-row requirements of an experiment, checked before any work: with the simulated
    oracle test frames are evaluated from their masks and every pool frame may be picked and
    labeled from its mask (people annotate test frames and picks instead: neither needs one).
    Raises ValueError naming the first row at fault."""
    needs = pc.equal(table.column("split"), "test")
    if not needs_test_masks:
        needs = pc.and_(needs, False)
    if needs_pool_masks:
        needs = pc.or_(needs, pc.equal(table.column("split"), "pool"))
    row = _first_true(pc.and_(needs, pc.is_null(table.column("mask_uri"))))
    if row is not None:
        split = table.column("split")[row].as_py()
        why = "the simulated oracle evaluates test frames from their masks (people annotate them with loop.oracle: " \
            "human)" if split == "test" else (
            "the simulated oracle labels pool frames from their masks (use loop.oracle: human for unlabeled pools)")
        raise InputError(f"{source}: {_row_name(table, row)} in split {split!r} has no mask_uri; {why}")


def make_manifest(
    *,
    frame_ids: Sequence[str],
    video_ids: Sequence[str],
    frame_indices: Sequence[int],
    image_uris: Sequence[str],
    mask_uris: Sequence[str | None],
    splits: Sequence[str],
    labeled_rounds: Sequence[int | None] | None = None,
) -> pa.Table:
    """Build a validated manifest table from columns (all the same length)."""
    n = len(frame_ids)
    if labeled_rounds is None:
        labeled_rounds = [None] * n
    columns = {
        "frame_id": frame_ids,
        "video_id": video_ids,
        "frame_index": frame_indices,
        "image_uri": image_uris,
        "mask_uri": mask_uris,
        "split": splits,
        "labeled_round": labeled_rounds,
    }
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) != 1:
        raise InputError(f"manifest columns differ in length: {lengths}")
    arrays = [pa.array(list(columns[f.name]), type=f.type) for f in MANIFEST_SCHEMA]
    return validate_manifest(pa.Table.from_arrays(arrays, names=MANIFEST_SCHEMA.names))


# ---------------------------------------------------------------------------- read / write


class Manifest(NamedTuple):
    """A validated manifest table and the encoding of its masks."""

    table: pa.Table
    encoding: MaskEncoding


def write_manifest(table: pa.Table, path: str | os.PathLike[str], encoding: MaskEncoding) -> None:
    """Validate ``table`` and write it to ``path`` atomically, with ``encoding`` in its metadata.

    The file appears complete or not at all: a failed or interrupted write leaves the
    previous file at ``path`` untouched (temp file in the same folder + ``os.replace``).
    """
    if not isinstance(encoding, MaskEncoding):
        raise TypeError(f"encoding must be a MaskEncoding, got {type(encoding).__name__}")
    table = validate_manifest(table, source=f"manifest for {path}")
    table = table.replace_schema_metadata({MASK_ENCODING_KEY: encoding.to_json().encode()})
    if storage.is_uri(path):  # one PUT: the object appears whole or not at all
        filesys, key = storage.filesystem(path)
        pq.write_table(table, key, filesystem=filesys)
    else:
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
    log.info("wrote manifest %s: %d frames (%s)", path, table.num_rows, _split_summary(table))


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate a manifest written by :func:`write_manifest`.

    Raises FileNotFoundError for a missing file and ValueError (naming the file, column,
    row and frame_id) for a table or encoding that breaks the contract.
    """
    encoding = read_encoding(path)
    filesys, key = storage.filesystem(path)
    table = pq.read_table(key, filesystem=filesys)
    return Manifest(validate_manifest(table, source=f"manifest {path}"), encoding)


def read_encoding(path: str | os.PathLike[str]) -> MaskEncoding:
    """The MaskEncoding of a manifest, from its footer alone (no rows read)."""
    if not storage.exists(path):
        raise FileNotFoundError(f"manifest {path} does not exist")
    filesys, key = storage.filesystem(path)
    try:
        metadata = pq.read_schema(key, filesystem=filesys).metadata or {}
    except pa.ArrowInvalid as err:
        raise InputError(f"manifest {path} is not a readable Parquet file ({err})") from None
    if MASK_ENCODING_KEY not in metadata:
        raise InputError(
            f"manifest {path} has no '{MASK_ENCODING_KEY.decode()}' schema metadata; "
            "write manifests with alges_dist.data.write_manifest (or an `alges ingest` command)"
        )
    try:
        return MaskEncoding.from_json(metadata[MASK_ENCODING_KEY])
    except ValidationError as err:
        raise InputError(f"manifest {path}: its mask encoding is invalid: {err}") from None


# ---------------------------------------------------------------------------- row helpers


def filter_manifest(table: pa.Table, *, split: str | None = None, labeled: bool | None = None) -> pa.Table:
    """Rows of one ``split`` and/or labeled state (``labeled=False``: ``labeled_round`` null)."""
    if split is not None and split not in SPLITS:
        raise InputError(f"split {split!r} is not one of {list(SPLITS)}")
    keep = pa.array([True] * table.num_rows)
    if split is not None:
        keep = pc.and_(keep, pc.equal(table.column("split"), split))
    if labeled is not None:
        is_labeled = pc.is_valid(table.column("labeled_round"))
        keep = pc.and_(keep, is_labeled if labeled else pc.invert(is_labeled))
    return table.filter(keep)


def mark_labeled(table: pa.Table, frame_ids: Iterable[str], round_index: int) -> pa.Table:
    """Return ``table`` with ``labeled_round = round_index`` for ``frame_ids``.

    Never re-labels: raises ValueError when an id is unknown, repeated in ``frame_ids``,
    already labeled (naming its round), or not in the ``pool`` split (labeling val/test
    frames would leak them into training).
    """
    ids = list(frame_ids)
    if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 0:
        raise InputError(f"round_index must be an integer >= 0, got {round_index!r}")
    repeated = sorted(i for i, count in Counter(ids).items() if count > 1)
    if repeated:
        raise InputError(f"frame_ids to label repeat {repeated[:5]}; each frame is labeled once")
    # Columnar (no Python object per manifest row): ~0.1 s at 10^6 rows (scripts/bench_scale.py).
    wanted = pa.array(ids, pa.string())
    hit = pc.is_in(table.column("frame_id"), value_set=wanted)
    found = pc.sum(hit).as_py() or 0
    if found != len(ids):
        present = set(table.column("frame_id").filter(hit).to_pylist())
        unknown = [i for i in ids if i not in present]
        raise InputError(f"frame_ids {unknown[:5]} ({len(unknown)} in all) are not in the manifest")
    rows = table.filter(hit)
    labeled = rows.filter(pc.is_valid(rows.column("labeled_round")))
    if labeled.num_rows:
        frame_id, r = labeled.column("frame_id")[0].as_py(), labeled.column("labeled_round")[0].as_py()
        raise InputError(
            f"frame_id {frame_id!r} (row {_row_of(table, frame_id)}) is already labeled in round {r}; "
            "labeled_round is never overwritten"
        )
    not_pool = rows.filter(pc.not_equal(rows.column("split"), "pool"))
    if not_pool.num_rows:
        frame_id, split = not_pool.column("frame_id")[0].as_py(), not_pool.column("split")[0].as_py()
        raise InputError(
            f"frame_id {frame_id!r} (row {_row_of(table, frame_id)}) is in split {split!r}; only pool frames are labeled"
        )
    column = pc.if_else(hit, pa.scalar(round_index, pa.int32()), table.column("labeled_round"))
    index = table.schema.get_field_index("labeled_round")
    return table.set_column(index, MANIFEST_SCHEMA.field("labeled_round"), column)


def set_uris(table: pa.Table, column: str, uris: dict[str, str]) -> pa.Table:
    """``table`` with ``column`` (``mask_uri`` or ``image_uri``) replaced for the frame ids in ``uris``."""
    if column not in ("mask_uri", "image_uri"):
        raise InputError(f"set_uris changes mask_uri or image_uri, not {column!r}")
    if not uris:
        return table
    ids = table.column("frame_id")
    keys = pa.array(list(uris), pa.string())
    position = pc.index_in(ids, value_set=keys)  # row -> index into uris, null elsewhere
    new = pc.take(pa.array(list(uris.values()), pa.string()), position)
    merged = pc.if_else(pc.is_valid(position), new, table.column(column))
    return table.set_column(table.schema.get_field_index(column), MANIFEST_SCHEMA.field(column), merged)


def _row_of(table: pa.Table, frame_id: str) -> int:
    return pc.index(table.column("frame_id"), frame_id).as_py()


def _split_summary(table: pa.Table) -> str:
    counts = {row["values"]: row["counts"] for row in pc.value_counts(table.column("split")).to_pylist()}
    labeled = table.num_rows - table.column("labeled_round").null_count
    return ", ".join(f"{s} {counts.get(s, 0)}" for s in SPLITS) + f", labeled {labeled}"


def video_times(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(video code, time key, timed) per row of a manifest table: seconds from ``#t=`` URIs (video
    frames), else the frame index (image rows: ordered, but with no time a gap cannot apply)."""
    matched = pc.extract_regex(table["image_uri"].combine_chunks(), r"#t=(?P<t>\d+(?:\.\d+)?)$")
    timed = pc.is_valid(matched).to_numpy(zero_copy_only=False)
    seconds = pc.cast(pc.if_else(pc.is_valid(matched), matched.field("t"), "0"), pa.float64())
    seconds = np.array(seconds.to_numpy(zero_copy_only=False), np.float64)
    index = np.array(table["frame_index"].to_numpy(zero_copy_only=False), np.float64)
    codes = pc.dictionary_encode(table["video_id"].combine_chunks()).indices.to_numpy(zero_copy_only=False)
    return codes.astype(np.int64), np.where(timed, seconds, index), timed
