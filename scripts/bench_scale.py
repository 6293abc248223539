"""Archive scale (issue 12): the manifest stages, the driver and the selection task at 10^5 and
10^6 frames, and the scoring job for real on 10^5 frames at a small image size.

For each pool size N a synthetic pool manifest is written (100 videos; image and mask URIs
cycle through a few real PNG files), then:

1. the manifest stages in this process: read (with validation), filter, draw the initial
   set (read, label, write), label a batch (read, label, write);
2. `alges select` as a subprocess on a run folder whose round 0 is done (model, eval, and
   synthesised score shards of N x d float32 embeddings): the driver's peak RSS (from
   RUN/commands.jsonl) and the selection task's (from selection.json: after its imports and
   at its peak, against the bytes of the column it reads);
3. on the --score-n pool only, `alges score` for real: a Ray Data job over every frame at
   --image-px, its seconds and the driver's peak RSS.

    python scripts/bench_scale.py [--sizes 100000 1000000] [--dim 256] [--budget 100] [--score-n 100000]

Ends with an extrapolation to 3.6 and 36 million frames from the measured rates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
STRATEGY = "alges-img-kcenter"


def synthetic_pool(folder: Path, n: int, px: int, *, n_files: int = 64) -> Path:
    """A pool manifest of n rows over 100 videos; URIs cycle through n_files real PNGs."""
    from PIL import Image

    from alges_dist.data.demo import DEMO_ENCODING
    from alges_dist.data.manifest import write_manifest

    rng = np.random.default_rng(0)
    files = folder / "files"
    files.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        Image.fromarray(rng.integers(0, 255, (px, px, 3), np.uint8)).save(files / f"img{i}.png")
        Image.fromarray(rng.integers(0, DEMO_ENCODING.n_classes, (px, px)).astype(np.uint8)).save(files / f"m{i}.png")
    idx = np.arange(n)
    video = idx % 100
    ids = pa.array([f"v{v:03d}_{i:08d}" for v, i in zip(video, idx)])
    split = np.where(idx % 100 == 98, "val", np.where(idx % 100 == 99, "test", "pool"))
    table = pa.table({
        "frame_id": ids, "video_id": pa.array([f"v{v:03d}" for v in video]), "frame_index": idx,
        "image_uri": pa.array([str(files / f"img{i % n_files}.png") for i in idx]),
        "mask_uri": pa.array([str(files / f"m{i % n_files}.png") for i in idx]),
        "split": pa.array(split), "labeled_round": pa.nulls(n, pa.int32()),
    })
    path = folder / "pool.parquet"
    write_manifest(table, path, DEMO_ENCODING)
    return path


def manifest_stages(pool: Path, work: Path, budget: int) -> dict[str, float]:
    from alges_dist.cold_start import draw_initial_set
    from alges_dist.data.manifest import filter_manifest, read_manifest
    from alges_dist.data.rounds import label_frames

    times = {}
    t = time.perf_counter()
    table, _ = read_manifest(pool)
    times["read + validate"] = time.perf_counter() - t
    t = time.perf_counter()
    unlabeled = filter_manifest(table, split="pool", labeled=False)
    times["filter (pool, unlabeled)"] = time.perf_counter() - t
    t = time.perf_counter()
    draw_initial_set(str(pool), str(work / "initial.parquet"), budget, 0)
    times["initial set: read, label, write"] = time.perf_counter() - t
    picks = unlabeled["frame_id"].slice(unlabeled.num_rows // 2, budget).to_pylist()
    t = time.perf_counter()
    label_frames(str(work / "initial.parquet"), picks, 1)
    times["label a batch: read, label, write"] = time.perf_counter() - t
    return times


def ready_to_select(pool: Path, out: Path, dim: int, budget: int, sets: list[str]) -> None:
    """A run folder whose round 0 is trained, evaluated and scored (the score shards synthesised)."""
    import yaml

    from alges_dist.config import load_config
    from alges_dist.data.atomic import atomic_write_text
    from alges_dist.cold_start import draw_initial_set
    from alges_dist.distributed.training import initial_weights
    from alges_dist.run_folder import RunLayout

    cfg = load_config(None, sets)
    layout = RunLayout(out)
    atomic_write_text(layout.config_path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    draw_initial_set(str(pool), str(layout.initial_manifest_path), budget, 0)
    model_dir = layout.model_dir(STRATEGY, 0, 0)
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(initial_weights(cfg, layout.init_weights_path(0), seed=0), model_dir / "model.pt")
    atomic_write_text(layout.eval_path(STRATEGY, 0, 0), json.dumps({"dice": 0.0, "miou": 0.0, "mdice": 0.0}))
    ids = pq.read_table(pool, columns=["frame_id", "split"], filters=[("split", "=", "pool")])["frame_id"]
    scores = layout.scores_dir(STRATEGY, 0, 0)
    scores.mkdir()
    rng = np.random.default_rng(1)
    step = 200_000
    for k, a in enumerate(range(0, len(ids), step)):  # shards written as Ray Data would: a slice each
        part = ids.slice(a, step)
        x = rng.standard_normal((len(part), dim), dtype=np.float32)
        pq.write_table(pa.table({"frame_id": part, "error": pa.nulls(len(part), pa.string()),
                                 "alges_img": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)}),
                       scores / f"shard-{k:04d}.parquet")
    atomic_write_text(model_dir / "scores.json", json.dumps({"n_rows": len(ids), "n_errors": 0}))


def alges(command: str, out: Path, pool: Path, sets: list[str]) -> dict:
    """Run `alges COMMAND` in a subprocess; return its commands.jsonl line and wall seconds."""
    t = time.perf_counter()
    args = [sys.executable, "-m", "alges_dist.cli", command, "--pool", str(pool), "--out", str(out), "--num-cpus", "2"]
    for s in sets:
        args += ["--set", s]
    res = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if res.returncode != 0:
        raise RuntimeError(f"alges {command} failed: {res.stderr[-3000:]}")
    entry = json.loads((out / "commands.jsonl").read_text().splitlines()[-1])
    return {**entry, "wall": time.perf_counter() - t}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension of the synthesised column")
    parser.add_argument("--budget", type=int, default=100, help="picks per selection")
    parser.add_argument("--score-n", type=int, default=100_000, help="pool size scored for real (0: skip)")
    parser.add_argument("--image-px", type=int, default=32)
    parser.add_argument("--work", type=Path, help="folder for the pools and runs (default: a temp folder)")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    sets = [f"data.image_size=[{args.image_px}, {args.image_px}]", "data.n_classes=5", f"loop.budget={args.budget}",
            f"loop.initial_labeled={args.budget}", "loop.n_rounds=1", f"loop.strategies=[{STRATEGY}]",
            "scoring.batch_size=64", "train.epochs=1"]
    rows, selects, scoring = {}, {}, None
    for n in sorted(set(args.sizes) | ({args.score_n} if args.score_n else set())):
        folder = work / f"n{n}"
        t = time.perf_counter()
        pool = synthetic_pool(folder, n, args.image_px)
        print(f"N={n}: pool written in {time.perf_counter() - t:.1f} s", flush=True)
        if n in args.sizes:
            rows[n] = manifest_stages(pool, folder, args.budget)
            ready_to_select(pool, folder / "run", args.dim, args.budget, [*sets, f"data.pool={pool}"])
            selects[n] = alges("select", folder / "run", pool, sets)
            selects[n]["task"] = json.loads((folder / "run" / STRATEGY / "seed_0" / "round_00" / "selection.json")
                                            .read_text())
            print(f"N={n}: select done in {selects[n]['wall']:.1f} s", flush=True)
        if n == args.score_n:
            run = folder / "score_run"
            ready_to_select(pool, run, args.dim, args.budget, [*sets, f"data.pool={pool}"])
            model_dir = run / "initial" / "seed_0" / "round_00"
            shutil.rmtree(model_dir / "scores")
            (model_dir / "scores.json").unlink()
            scoring = {"n": n, **alges("score", run, pool, sets),
                       **json.loads((model_dir / "scores.json").read_text())}
            print(f"N={n}: scored in {scoring['seconds']:.1f} s", flush=True)

    load = os.getloadavg()
    print(f"\nload average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs; d={args.dim}, "
          f"budget {args.budget}\n")
    sizes = sorted(rows)
    print("| manifest stage | " + " | ".join(f"N={n:,}" for n in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    for stage in rows[sizes[0]]:
        print(f"| {stage} | " + " | ".join(f"{rows[n][stage]:.2f} s" for n in sizes) + " |")
    print("\n| N | `alges select` wall s | driver peak RSS MB | selection task: column MB | after imports MB "
          "| peak MB | peak above imports / column |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        s, task = selects[n], selects[n]["task"]
        above = task["peak_rss_mb"] - task["rss_start_mb"]
        print(f"| {n:,} | {s['wall']:.1f} | {s['driver_peak_rss_mb']:.0f} | {task['column_mb']:.0f} | "
              f"{task['rss_start_mb']:.0f} | {task['peak_rss_mb']:.0f} | {above / max(task['column_mb'], 1e-9):.2f} |")
    if len(sizes) > 1:
        a, b = selects[sizes[0]], selects[sizes[-1]]
        print(f"\ndriver peak RSS x{b['driver_peak_rss_mb'] / a['driver_peak_rss_mb']:.3f} from N={sizes[0]:,} "
              f"to N={sizes[-1]:,} (target <= 1.1)")
    if scoring:
        rate = scoring["n_rows"] / scoring["seconds"]
        print(f"\nscoring job for real, N={scoring['n']:,} at {args.image_px} px: {scoring['seconds']:.1f} s "
              f"({rate:.0f} frames/s), driver peak RSS {scoring['driver_peak_rss_mb']:.0f} MB")
    big = sizes[-1]
    per_row = {k: v / big for k, v in rows[big].items()}
    pick_s = selects[big]["task"]["seconds"] / args.budget
    print("\n| extrapolated (linear in N) | 3.6 M frames | 36 M frames |\n|---|---:|---:|")
    for stage, sec in per_row.items():
        print(f"| {stage} | {sec * 3.6e6:.1f} s | {sec * 3.6e7:.0f} s |")
    print(f"| selection, {args.budget} picks on this CPU (one pass over N x d per pick) | "
          f"{pick_s * 3.6e6 / big * args.budget:.0f} s | {pick_s * 3.6e7 / big * args.budget:.0f} s |")
    print(f"| column bytes at d={args.dim} float32 (bf16 halves it) | {3.6e6 * args.dim * 4 / 2**30:.1f} GiB | "
          f"{3.6e7 * args.dim * 4 / 2**30:.1f} GiB |")
    if scoring:
        print(f"| scoring at {args.image_px} px on this CPU ({rate:.0f} frames/s) | {3.6e6 / rate / 3600:.1f} h | "
              f"{3.6e7 / rate / 3600:.0f} h |")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
