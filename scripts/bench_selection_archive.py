"""Selection at archive size on one GPU (issue 15): k-center greedy and k-means++ seeding
over N = 10^7 embeddings of d = 256 in bfloat16 storage, 10,000 picks each.

Targets: k-center < 30 s in total on one H100/H200-class GPU, the labeled-set start (the
distances from every row to the labeled rows) included; k-means++ (plain D^2 sampling, the
paper's rule and the config default) within 1.5x of k-center. The bandwidth floor is one
pass over the stored rows per pick (N x 264 bfloat16 = 5.3 GB: ~1.3 ms at ~4 TB/s).

Both rules run through the public functions (`alges_dist.selection.kcenter_greedy`,
`kmeanspp`) on the same pool: seeded Gaussian float32 rows made on the device (or copied
to host memory with --input host, as rows read from score shards would be), a random
labeled set. Printed: the labeled-set backend that ran (faiss-gpu where the `gpu` extra
is installed, else torch), total / start / per-pick seconds, per pick over the floor,
GPU peak memory, and (--verify) the covering radius after the picks recomputed in float32
with torch.cdist, against the last pick's radius (k-center: not larger, up to the rounding
of half storage, ~1e-3 relative).

    python scripts/bench_selection_archive.py                    # the issue's size, CUDA
    python scripts/bench_selection_archive.py --device cpu --n 20000 --d 32 --budget 50 --labeled 100
"""

from __future__ import annotations

import argparse
import os
import json
import math
import sys
import time

import numpy as np
import torch

from alges_dist.selection import kcenter_greedy, kmeanspp

RULES = ("kcenter", "kmeans++")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000_000, help="pool rows")
    p.add_argument("--d", type=int, default=256, help="embedding dimension")
    p.add_argument("--budget", type=int, default=10_000, help="picks per rule")
    p.add_argument("--labeled", type=int, default=10_000, help="labeled rows (the start's reference set)")
    p.add_argument("--storage-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--backend", default="auto", choices=["auto", "faiss", "torch"], help="labeled-set kNN")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--input", default="device", choices=["device", "host"],
                   help="float32 rows handed over on the device, or in host memory")
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    p.add_argument("--verify", action="store_true", help="recompute the covering radius (torch.cdist)")
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args(argv)


def make_pool(n: int, d: int, n_labeled: int, device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """(n, d) float32 standard Gaussian rows made on device (seed 0), and a labeled mask."""
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.empty(n, d, dtype=torch.float32, device=device)
    for a in range(0, n, 1 << 20):  # blocks: randn's temporaries stay small
        x[a:a + (1 << 20)] = torch.randn(min(1 << 20, n - a), d, generator=generator, device=device)
    labeled = np.zeros(n, bool)
    labeled[np.random.default_rng(0).choice(n, n_labeled, replace=False)] = True
    return x, labeled


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def storage_pass_seconds(n: int, d: int, storage_dtype: str, device: torch.device, reps: int = 20) -> float:
    """Median seconds of one torch.mv over an (n, d + 8) array in storage dtype: the floor
    of one pick (half storage appends 6 norm/ones columns, padded to 8)."""
    dtype = getattr(torch, storage_dtype)
    width = d if dtype == torch.float32 else -(-(d + 6) // 8) * 8
    rows = torch.empty(n, width, dtype=dtype, device=device).uniform_(-1, 1)
    q = rows[0].clone()
    torch.mv(rows, q)
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        torch.mv(rows, q)
        synchronize(device)
        times.append(time.perf_counter() - start)
    del rows
    return float(np.median(times))


def covering_radius(x: torch.Tensor, labeled: np.ndarray, picks: np.ndarray, device: torch.device) -> float:
    """max over rows of the distance to the nearest labeled row or pick (float32 cdist, blocks)."""
    centers = torch.from_numpy(np.r_[np.flatnonzero(labeled), picks].astype(np.int64))
    centers = x[centers.to(x.device)].to(device)
    worst = torch.zeros((), device=device)
    for a in range(0, x.shape[0], 8192):  # (8192, L + B) distances per block
        nearest = torch.cdist(x[a:a + 8192].to(device), centers).amin(dim=1)
        worst = torch.maximum(worst, nearest.max())
    return float(worst)


def run_rule(rule: str, x, labeled: np.ndarray, args, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    synchronize(device)
    start = time.perf_counter()
    options = dict(device=str(device), backend=args.backend, storage_dtype=args.storage_dtype)
    if rule == "kcenter":
        selection = kcenter_greedy(x, labeled, args.budget, **options)
    else:
        selection = kmeanspp(x, labeled, args.budget, 0, **options)
    synchronize(device)
    total = time.perf_counter() - start
    prepare = float(getattr(selection, "seconds_prepare", math.nan))
    result = {
        "rule": rule, "total_s": total, "prepare_s": prepare,
        "picks_s": float(getattr(selection, "seconds_picks", total - prepare)),
        "backend": (f"{selection.backend}-gpu" if selection.backend == "faiss" and device.type == "cuda"
                    else selection.backend),
        "last_radius": float(selection.radii[-1]), "n_random_fill": int(selection.n_random_fill),
        "picks": selection.indices,
    }
    if device.type == "cuda":
        result["gpu_peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device (use --device cpu for a smoke test)")
    made = time.perf_counter()
    x, labeled = make_pool(args.n, args.d, args.labeled, device)
    if args.input == "host":
        x = x.cpu()
    synchronize(device)
    print(f"pool: {args.n:,} x {args.d} float32 ({x.numel() * 4 / 1e9:.1f} GB, on {args.input}), "
          f"{args.labeled:,} labeled, made in {time.perf_counter() - made:.1f} s", file=sys.stderr, flush=True)
    floor = storage_pass_seconds(args.n, args.d, args.storage_dtype, device)
    # one-off library start-up (cuBLAS handles, kernel loading) out of the first rule's time
    warm = min(args.n, 1 << 16)
    for rule in args.rules:
        run_rule(rule, x[:warm], labeled[:warm], argparse.Namespace(**{**vars(args), "budget": 5}), device)
    results = []
    for rule in args.rules:
        result = run_rule(rule, x, labeled, args, device)
        if args.verify:
            result["covering_radius"] = covering_radius(x, labeled, result["picks"], device)
        print(f"  {rule}: {result['total_s']:.1f} s", file=sys.stderr, flush=True)
        results.append(result)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\nSelection at archive size: N = {args.n:,} x d = {args.d}, {args.storage_dtype} storage, "
          f"{args.labeled:,} labeled, {args.budget:,} picks, input on {args.input}; {where}, "
          f"torch {torch.__version__}; floor = one torch.mv over the stored rows, {floor * 1e3:.2f} ms; "
          f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}\n")
    print("| rule | labeled-set backend | total s | start s | picks s | per pick ms | x floor | "
          "GPU peak MB | last pick radius | covering radius after (cdist) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        per_pick = r["picks_s"] / args.budget
        print(f"| {r['rule']} | {r['backend']} | {r['total_s']:.1f} | {r['prepare_s']:.1f} | {r['picks_s']:.1f} | "
              f"{per_pick * 1e3:.2f} | {per_pick / floor:.2f} | {r.get('gpu_peak_mb', math.nan):.0f} | "
              f"{r['last_radius']:.4f} | {r.get('covering_radius', math.nan):.4f} |")
    by_rule = {r["rule"]: r for r in results}
    if set(RULES) <= set(by_rule):
        ratio = by_rule["kmeans++"]["total_s"] / by_rule["kcenter"]["total_s"]
        print(f"\nk-center total {by_rule['kcenter']['total_s']:.1f} s (target < 30 s); "
              f"k-means++ / k-center = {ratio:.2f} (target <= 1.5)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "device": where, "torch": torch.__version__, "floor_s": floor,
                       "results": [{k: v for k, v in r.items() if k != "picks"} for r in results]}, out, indent=1)


if __name__ == "__main__":
    main()
