"""The three mask RLEs against their reference packages: golden vectors those packages wrote
(committed below as literals) and random round trips against the packages themselves.

Oracles: ``label_studio_sdk.converter.brush`` (in .venv-ls, run as a subprocess: its
dependencies clash with ours), ``cvat_sdk.masks`` and ``pycocotools.mask`` (dev extra).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from alges_dist.annotation.codecs import (
    CvatMask,
    brush_decode,
    brush_decode_values,
    brush_encode,
    coco_decode,
    coco_encode,
    cvat_decode,
    cvat_encode,
)

LS_PYTHON = Path(__file__).resolve().parents[1] / ".venv-ls" / "bin" / "python"

# Hand-made masks: isolated pixels (runs of 1 pixel = 4 RGBA bytes), blocks, a hole, long runs.
M1 = np.zeros((3, 4), bool)
M1[1, 1:3] = True
M2 = np.zeros((6, 7), bool)
M2[1:5, 2:6] = True
M2[0, 0] = M2[5, 6] = True
M2[3, 3] = False
M3 = np.ones((20, 20), bool)
M3[::3, ::5] = False

# label_studio_sdk 2.1.2 converter.brush.mask2rle(mask.astype(uint8) * 255)
LS_GOLDEN = {
    "M1": [0, 0, 0, 48, 57, 27, 254, 19, 0, 159, 255, 9, 128, 0],
    "M2": [0, 0, 0, 168, 57, 27, 252, 127, 248, 124, 2, 255, 253, 176, 11, 255, 246, 192, 35, 255, 140, 2, 127,
           251, 96, 23, 255, 240, 216, 4, 127, 224],
}
# pycocotools 2.0.11 mask.encode(np.asfortranarray(mask.astype(uint8)))["counts"]
COCO_GOLDEN = {"M1": "41202", "M2": "01<3FNOO13004M",
               "M3": "1210000000000_20aM00000000000_20aM00000000000_20aM00000000000_2"}
# cvat-sdk 2.80.0 masks.encode_mask(mask): runs, then x1, y1, x2, y2 (inclusive)
CVAT_GOLDEN = {
    "M1": [0, 2, 1, 1, 2, 1],
    "M2": [0, 1, 8, 4, 3, 4, 3, 1, 1, 2, 3, 4, 7, 1, 0, 0, 6, 5],
    "M3": [1, 4, 1, 4, 1, 4, 1, 44, 1, 4, 1, 4, 1, 4, 1, 44, 1, 4, 1, 4, 1, 4, 1, 44, 1, 4, 1, 4, 1, 4, 1, 44, 1,
           4, 1, 4, 1, 4, 1, 44, 1, 4, 1, 4, 1, 4, 1, 44, 1, 4, 1, 4, 1, 4, 1, 24, 0, 0, 19, 19],
}
MASKS = {"M1": M1, "M2": M2, "M3": M3}
# pycocotools 2.0.11 under numpy 2 warns about __array__(copy=...) inside its own decode
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _random_masks(n: int, seed: int = 0) -> list[np.ndarray]:
    """Noise of every density, blocks touching the borders, full and empty masks, one long run."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(1, 48, 2))
        if i % 3 == 0:
            m = np.zeros((h, w), bool)
            m[rng.integers(0, h):, rng.integers(0, w):] = True
        else:
            m = rng.random((h, w)) < rng.uniform(0, 1)
        out.append(m)
    return out + [np.ones((140, 130), bool), np.zeros((2, 2), bool)]  # 72,800 RGBA bytes: a split repeat


@pytest.mark.parametrize("name", sorted(LS_GOLDEN))
def test_brush_encode_equals_label_studio_golden_vectors(name):
    assert brush_encode(MASKS[name]) == LS_GOLDEN[name]
    np.testing.assert_array_equal(brush_decode(LS_GOLDEN[name], *MASKS[name].shape), MASKS[name] * 255)


@pytest.mark.parametrize("name", sorted(COCO_GOLDEN))
def test_coco_encode_equals_pycocotools_golden_vectors(name):
    assert coco_encode(MASKS[name]) == {"size": list(MASKS[name].shape), "counts": COCO_GOLDEN[name]}
    np.testing.assert_array_equal(coco_decode({"size": list(MASKS[name].shape), "counts": COCO_GOLDEN[name]}),
                                  MASKS[name])


@pytest.mark.parametrize("name", sorted(CVAT_GOLDEN))
def test_cvat_encode_equals_cvat_sdk_golden_vectors(name):
    *runs, x1, y1, x2, y2 = CVAT_GOLDEN[name]
    assert cvat_encode(MASKS[name]) == CvatMask(runs, x1, y1, x2 - x1 + 1, y2 - y1 + 1)
    np.testing.assert_array_equal(cvat_decode(CvatMask(runs, x1, y1, x2 - x1 + 1, y2 - y1 + 1), *MASKS[name].shape),
                                  MASKS[name])


def test_coco_round_trips_against_pycocotools():
    mask_api = pytest.importorskip("pycocotools.mask", reason="pycocotools (dev extra) is the COCO oracle")
    for m in _random_masks(40):
        theirs = mask_api.encode(np.asfortranarray(m.astype(np.uint8)))
        ours = coco_encode(m)
        assert ours["counts"] == theirs["counts"].decode("ascii") and ours["size"] == list(theirs["size"])
        np.testing.assert_array_equal(coco_decode(ours), m)
        np.testing.assert_array_equal(mask_api.decode({"size": ours["size"], "counts": ours["counts"].encode()}), m)
        # uncompressed counts (legal COCO, written by some tools) decode the same
        uncompressed = mask_api.frPyObjects({"size": list(m.shape), "counts": _column_runs(m)}, *m.shape)
        np.testing.assert_array_equal(coco_decode({"size": list(m.shape), "counts": _column_runs(m)}),
                                      mask_api.decode(uncompressed).astype(bool))


def _column_runs(m: np.ndarray) -> list[int]:
    flat = m.ravel(order="F")
    runs, current, n = [], False, 0
    for v in flat.tolist():
        if v != current:
            runs.append(n)
            current, n = v, 0
        n += 1
    return runs + [n]


def test_cvat_round_trips_against_cvat_sdk():
    masks_api = pytest.importorskip("cvat_sdk.masks", reason="cvat-sdk (dev extra) is the CVAT oracle")
    for m in _random_masks(40, seed=1):
        if not m.any():
            with pytest.raises(ValueError, match="empty mask"):
                cvat_encode(m)
            continue
        ours = cvat_encode(m)
        theirs = masks_api.encode_mask(m)
        assert ours.counts == theirs[:-4]
        assert [ours.left, ours.top, ours.left + ours.width - 1, ours.top + ours.height - 1] == theirs[-4:]
        np.testing.assert_array_equal(cvat_decode(ours, *m.shape), m)
        np.testing.assert_array_equal(masks_api.decode_mask(theirs, image_width=m.shape[1], image_height=m.shape[0]),
                                      cvat_decode(ours, *m.shape))


def _literal_stream(values: list[int], chunk: int) -> list[int]:
    """An rle-pack stream of literal chunks only, as Label Studio's editor writes for soft strokes
    (the SDK's encoder never writes chunks longer than one value)."""
    bits = f"{len(values):032b}{7:05b}" + "".join(f"{s - 1:04b}" for s in (3, 4, 8, 16))
    for start in range(0, len(values), chunk):
        part = values[start:start + chunk]
        bits += f"0{3:02b}{len(part) - 1:016b}" + "".join(f"{v:08b}" for v in part)
    bits += "0" * (-len(bits) % 8)
    return [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]


def test_brush_decoder_reads_literal_chunks_with_known_values():
    values = [10, 20, 30, 255, 40, 50, 60, 0, 1, 2, 3, 128]  # 3 RGBA pixels
    stream = _literal_stream(values, chunk=5)
    np.testing.assert_array_equal(brush_decode_values(stream), values)
    np.testing.assert_array_equal(brush_decode(stream, 1, 3), [[255, 0, 128]])


def test_brush_errors_name_the_problem():
    with pytest.raises(ValueError, match="holds 48 values.*4x4 RGBA image has 64"):
        brush_decode(brush_encode(np.zeros((3, 4), bool)), 4, 4)
    with pytest.raises(ValueError, match="ends early"):
        brush_decode(LS_GOLDEN["M1"][:-3], 3, 4)
    with pytest.raises(ValueError, match="shorter than its 53-bit header"):
        brush_decode([0, 0, 0], 1, 1)


def test_cvat_and_coco_errors_name_the_problem():
    with pytest.raises(ValueError, match="sum to 5, expected 6"):
        cvat_decode(CvatMask([2, 3], 0, 0, 3, 2), 4, 4)
    with pytest.raises(ValueError, match="does not fit"):
        cvat_decode(CvatMask([0, 6], 2, 2, 3, 2), 3, 4)
    with pytest.raises(ValueError, match="sum to 11, expected 12"):
        coco_decode({"size": [3, 4], "counts": [4, 2, 5]})


def test_brush_round_trips_against_label_studio_sdk():
    if not LS_PYTHON.exists():
        pytest.skip(f"{LS_PYTHON} is absent (`make label-studio` builds it; see .venv-ls.log for why it failed)")
    masks = _random_masks(30, seed=2)
    literal = _literal_stream(list(np.random.default_rng(3).integers(0, 256, 4 * 35).tolist()), chunk=9)
    code = (
        "import sys, json, numpy as np\n"
        "from label_studio_sdk.converter.brush import mask2rle, decode_rle\n"
        "doc = json.load(sys.stdin)\n"
        "enc = [mask2rle(np.array(m, dtype=np.uint8) * 255) for m in doc['masks']]\n"
        "dec = [decode_rle(r).tolist() for r in doc['streams']]\n"
        "print(json.dumps({'encoded': enc, 'decoded': dec}))\n"
    )
    ours = [brush_encode(m) for m in masks]
    doc = {"masks": [m.astype(int).tolist() for m in masks], "streams": ours + [literal]}
    res = subprocess.run([str(LS_PYTHON), "-c", code], input=json.dumps(doc), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    theirs = json.loads(res.stdout)
    assert theirs["encoded"] == ours  # byte for byte, both directions below
    for m, decoded in zip(masks, theirs["decoded"]):
        np.testing.assert_array_equal(np.array(decoded).reshape(*m.shape, 4)[:, :, 3], m * 255)
    np.testing.assert_array_equal(brush_decode_values(literal), theirs["decoded"][-1])
