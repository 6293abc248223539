"""The README's GPU tables from the JSON files that scripts/gpu_checks.sh collects.

    python scripts/gpu_report.py DIR [--out results.json]

DIR holds scoring_*.json (scripts/bench_scoring.py --json) and selection_archive.json
(scripts/bench_selection_archive.py --json); --out merges them into one file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ARCH_NAMES = {"unet": "Unet", "deeplabv3plus": "DeepLabV3Plus", "fpn": "FPN"}
AUTOCAST_NAMES = {"none": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}


def scoring_table(records: list[dict]) -> str:
    """One row per (model, precision): frames/s of (a), (b) per math path, (c), and ratios."""
    paths = sorted({path for r in records for path in r["math_paths"]}, key=["compiled", "eager", "auto"].index)
    head = ["model", "(a) plain forward frames/s"]
    head += [f"(b) `score_batch` {path} frames/s" for path in paths]
    head += ["(c) per-image backward frames/s", *[f"b/a {path}" for path in paths], *[f"b/c {path}" for path in paths]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in records:
        fps = r["fps"]
        scored = [fps.get(f"scored:{path}") for path in paths]
        model = f"{ARCH_NAMES.get(r['arch'], r['arch'])}-{r['encoder']}, {AUTOCAST_NAMES[r['autocast']]}"
        cells = [model + (", cudnn.benchmark" if r.get("cudnn_benchmark") else ""),
                 f"{fps['plain']:.0f}", *[_number(v, "{:.0f}") for v in scored], f"{fps['released']:.0f}",
                 *[_number(None if v is None else v / fps["plain"], "{:.2f}") for v in scored],
                 *[_number(None if v is None else v / fps["released"], "{:.1f}") for v in scored]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def selection_table(record: dict) -> str:
    args, floor = record["args"], record["floor_s"]
    lines = ["| rule | labeled-set backend | total s | start s (storage + labeled kNN) | picks s | per pick ms | "
             "x floor | GPU peak MB | "
             "covering radius (cdist) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in record["results"]:
        per_pick = r["picks_s"] / args["budget"]
        lines.append(f"| {r['rule']} | {r['backend']} | {r['total_s']:.1f} | {r['prepare_s']:.1f} | "
                     f"{r['picks_s']:.1f} | {per_pick * 1e3:.2f} | {per_pick / floor:.2f} | "
                     f"{_number(r.get('gpu_peak_mb'), '{:.0f}')} | {_number(r.get('covering_radius'), '{:.4f}')} |")
    return "\n".join(lines)


def _number(value: float | None, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, help="write every record into this one JSON file")
    args = parser.parse_args()
    scoring = [json.loads(p.read_text()) for p in args.folder.glob("scoring_*.json")]
    scoring.sort(key=lambda r: (list(ARCH_NAMES).index(r["arch"]) if r["arch"] in ARCH_NAMES else len(ARCH_NAMES),
                                r["arch"], list(AUTOCAST_NAMES).index(r["autocast"]), bool(r.get("cudnn_benchmark"))))
    selection_file = args.folder / "selection_archive.json"
    selection = json.loads(selection_file.read_text()) if selection_file.exists() else None
    if scoring:
        r = scoring[0]
        print(f"\n### Scoring on {r['device']} (torch {r['torch']}, batch {r['batch']}, "
              f"{r['size']}x{r['size']}, `scripts/gpu_checks.sh`)\n")
        print(scoring_table(scoring))
    if selection:
        a = selection["args"]
        print(f"\n### Selection on {selection['device']} (torch {selection['torch']}): N = {a['n']:,} x "
              f"d = {a['d']}, {a['storage_dtype']} storage, {a['labeled']:,} labeled, {a['budget']:,} picks, "
              f"input on {a['input']}; floor {selection['floor_s'] * 1e3:.2f} ms per pass\n")
        print(selection_table(selection))
    if not scoring and not selection:
        raise SystemExit(f"no scoring_*.json or selection_archive.json in {args.folder}")
    if args.out:
        args.out.write_text(json.dumps({"scoring": scoring, "selection": selection}, indent=1))


if __name__ == "__main__":
    main()
