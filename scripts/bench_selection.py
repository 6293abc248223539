"""Benchmark k-center greedy selection (issue 4): our engine vs public implementations.

Contenders, each in a fresh subprocess so its peak RSS is its own:
  floor          one plain pass over the (N, d) float32 array per pick (numpy X @ c and
                 X.sum(0); the faster is the memory-bandwidth floor)
  ours-torch     selection.kcenter_greedy, float32, labeled kNN by torch
  ours-faiss     same, labeled kNN by faiss
  ours-bf16/f16  same, bfloat16/float16 storage (half the bytes per pick)
  numpy-loop     X @ c + minimum + argmax per pick in numpy (the simplest exact loop)
  skactiveml     scikit-activeml's CoreSet.query (peer)
  pairwise       scikit-learn pairwise_distances greedy as google/active-learning's kcenter_greedy (peer)
Data: seeded float32 Gaussian rows (N, d), `--labeled` random labeled rows, `--budget` picks.
Peers run at --peers-n (the largest N they finish in ~5 minutes here), and ours again at that N.

    .venv/bin/python scripts/bench_selection.py                      # N=200k, d=512, 1k labeled, 1k picks
    .venv/bin/python scripts/bench_selection.py --n 20000 --budget 100 --peers-n 20000   # quick
    python scripts/bench_selection.py --device cuda --n 2000000 --skip-peers     # GPU: data on the device
    python scripts/bench_selection.py --device cuda --n 2000000 --skip-peers --input host
On CUDA the pool is on the GPU before the clock starts (--input device) or in host memory
(--input host: the engine copies it to its device storage in blocks); the floor is one
torch.mv over it on the GPU, and memory is the peak allocated on the GPU
(torch.cuda.max_memory_allocated) next to the float32 embedding bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from alges_dist.run_folder import peak_rss_mb  # VmHWM: this process's own peak

OURS = {"ours-torch": ("float32", "torch"), "ours-faiss": ("float32", "faiss"),
        "ours-bf16": ("bfloat16", "torch"), "ours-f16": ("float16", "torch")}
PEERS = ("skactiveml", "pairwise")


def make_pool(n: int, d: int, n_labeled: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)  # (N, d), no float64 temporary
    labeled = np.zeros(n, bool)
    labeled[rng.choice(n, n_labeled, replace=False)] = True
    return x, labeled


# ---- contenders (run inside the worker subprocess) -------------------------------------------------
def run_floor(x, labeled, budget):
    import torch

    reps = min(budget, 100)
    per = {}
    if isinstance(x, torch.Tensor):  # CUDA: the data already lives on the device
        c = x[0].clone()
        passes = (("torch mv (cuda)", lambda: torch.mv(x, c)), ("torch sum(0) (cuda)", lambda: x.sum(0)))
    else:
        c = x[0].copy()
        passes = (("numpy X@c", lambda: x @ c), ("numpy X.sum(0)", lambda: x.sum(0)),
                  ("torch mv", lambda: torch.mv(torch.from_numpy(x), torch.from_numpy(c))))
    for name, one_pass in passes:
        one_pass()
        times = []
        for _ in range(reps):
            sync(x)
            t = time.perf_counter()
            one_pass()
            sync(x)
            times.append(time.perf_counter() - t)
        per[name] = float(np.median(times))
    best = min(per, key=per.get)
    return {"picks": [], "seconds_prepare": 0.0, "seconds_picks": per[best] * budget, "passes": per,
            "note": f"fastest: {best}"}


def sync(x) -> None:
    if getattr(x, "is_cuda", False):
        import torch

        torch.cuda.synchronize()


def run_ours(x, labeled, budget, storage_dtype, backend, device="cpu"):
    from alges_dist.selection import kcenter_greedy

    got = kcenter_greedy(x, labeled, budget, storage_dtype=storage_dtype, backend=backend, device=device)
    return {"picks": got.indices.tolist(), "seconds_prepare": got.seconds_prepare,
            "seconds_picks": got.seconds_picks, "last_radius": float(got.radii[-1])}


def run_numpy_loop(x, labeled, budget):
    t0 = time.perf_counter()
    xn = np.einsum("ij,ij->i", x, x)  # (N,)
    lab = np.flatnonzero(labeled)
    min_d2 = np.full(x.shape[0], np.inf, np.float32)
    for a in range(0, x.shape[0], 4096):  # (4096, L) blocks
        block = xn[a:a + 4096, None] - 2 * x[a:a + 4096] @ x[lab].T + xn[lab]
        min_d2[a:a + 4096] = block.min(1)
    min_d2[lab] = 0
    t1 = time.perf_counter()
    picks = []
    for _ in range(budget):
        i = int(np.argmax(min_d2))
        picks.append(i)
        np.minimum(min_d2, xn - 2 * (x @ x[i]) + xn[i], out=min_d2)
        min_d2[i] = 0
    return {"picks": picks, "seconds_prepare": t1 - t0, "seconds_picks": time.perf_counter() - t1}


def run_skactiveml(x, labeled, budget):
    from skactiveml.pool import CoreSet

    y = np.full(x.shape[0], np.nan)
    y[labeled] = 0
    t = time.perf_counter()
    picks = CoreSet(random_state=0).query(x, y, batch_size=budget)
    return {"picks": np.asarray(picks).tolist(), "seconds_prepare": 0.0, "seconds_picks": time.perf_counter() - t,
            "note": "CoreSet.query: setup not separable"}


def run_pairwise(x, labeled, budget):
    """google/active-learning sampling_methods/kcenter_greedy.py: min over pairwise_distances
    to all labeled rows at once (an N x L matrix), then one pairwise_distances column per pick."""
    from sklearn.metrics import pairwise_distances

    t0 = time.perf_counter()
    min_distances = np.min(pairwise_distances(x, x[labeled], metric="euclidean"), axis=1).reshape(-1, 1)
    t1 = time.perf_counter()
    picks = []
    for _ in range(budget):
        ind = int(np.argmax(min_distances))
        picks.append(ind)
        min_distances = np.minimum(min_distances, pairwise_distances(x, x[[ind]], metric="euclidean"))
    return {"picks": picks, "seconds_prepare": t1 - t0, "seconds_picks": time.perf_counter() - t1}


IMPORTS = {"floor": ["torch"],
           **{k: ["torch", *(["faiss"] if b == "faiss" else []), "alges_dist.selection.rules"] for k, (_, b) in OURS.items()},
           "numpy-loop": [], "skactiveml": ["skactiveml.pool"], "pairwise": ["sklearn.metrics"]}


def worker(name: str, n: int, d: int, n_labeled: int, budget: int, device: str = "cpu",
           where: str = "device") -> dict:
    if name not in IMPORTS:
        raise ValueError(f"unknown contender {name!r}; valid: {list(IMPORTS)}")
    for module in IMPORTS[name]:  # libraries first: their RSS is the baseline, not the method's
        __import__(module)
    base_mb = peak_rss_mb()
    x, labeled = make_pool(n, d, n_labeled)
    data_mb = x.nbytes / 2**20
    gpu = {}
    if device == "cuda":
        import torch

        if where == "device" or name == "floor":  # the floor is a pass over rows on the GPU
            x = torch.from_numpy(x).cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu["gpu_base_mb"] = torch.cuda.memory_allocated() / 2**20
    if name == "floor":
        out = run_floor(x, labeled, budget)
    elif name in OURS:
        out = run_ours(x, labeled, budget, *OURS[name], device=device)
    elif name == "numpy-loop":
        out = run_numpy_loop(x, labeled, budget)
    elif name == "skactiveml":
        out = run_skactiveml(x, labeled, budget)
    else:
        out = run_pairwise(x, labeled, budget)
    if device == "cuda":
        gpu["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return {**out, **gpu, "name": name, "n": n, "peak_rss_mb": peak_rss_mb(), "import_rss_mb": base_mb,
            "data_mb": data_mb}


# ---- driver ------------------------------------------------------------------------------------------------
def run_contender(name: str, n: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--n", str(n), "--d", str(args.d),
           "--labeled", str(args.labeled), "--budget", str(args.budget), "--device", args.device,
           "--input", args.input]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        return {"name": name, "n": n, "error": proc.stderr.strip().splitlines()[-1:] or ["?"]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t
    print(f"  {name} at N={n}: {out['seconds_prepare'] + out['seconds_picks']:.1f} s, "
          f"peak {out['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    return out


def covering_radius(n: int, args, picks: list[int]) -> float:
    """max_i min over labeled + picks of ||x_i - x_c|| (torch.cdist in blocks, independent of ours)."""
    import torch

    x, labeled = make_pool(n, args.d, args.labeled)
    dev = torch.device(args.device)
    centers = torch.from_numpy(x[np.r_[np.flatnonzero(labeled), picks].astype(np.int64)]).to(dev)
    worst = 0.0
    for a in range(0, n, 4096):
        block = torch.cdist(torch.from_numpy(x[a:a + 4096]).to(dev), centers)  # (4096, L + B)
        worst = max(worst, float(block.amin(1).max()))
    return worst


def table(results: list[dict], args) -> str:
    floor = {r["n"]: r["seconds_picks"] / args.budget for r in results if r["name"] == "floor" and "error" not in r}
    ref = {r["n"]: r["picks"] for r in results if r["name"] == "ours-torch" and "error" not in r}
    peers = {(r["name"], r["n"]): r["seconds_prepare"] + r["seconds_picks"] for r in results
             if r["name"] in PEERS and "error" not in r}
    lines = ["| contender | N | total s | setup s | per pick ms | x floor | peak RSS MB | above imports MB | "
             "RSS target MB | covering radius | same picks as ours-torch | speed-up vs CoreSet / pairwise |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['n']} | failed: {r['error'][0][:80]} |" + " |" * 9)
            continue
        n, total, per_pick = r["n"], r["seconds_prepare"] + r["seconds_picks"], r["seconds_picks"] / args.budget
        target = 1.3 * r["data_mb"] + 300
        same = "" if not r["picks"] or n not in ref else \
            f"{int(np.argmax(np.r_[np.asarray(r['picks']) != np.asarray(ref[n]), True]))}/{args.budget}"
        speedup = " / ".join(f"{peers[(p, n)] / total:.1f}x" if (p, n) in peers else "-" for p in PEERS)
        radius = f"{r['radius']:.4f}" if "radius" in r else ""
        ratio = f"{per_pick / floor[n]:.2f}" if n in floor else ""
        lines.append(f"| {r['name']} | {n:,} | {total:.1f} | {r['seconds_prepare']:.1f} | {per_pick * 1e3:.1f} | "
                     f"{ratio} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['import_rss_mb']:.0f} | "
                     f"{target:.0f} | {radius} | {same} | "
                     f"{speedup if r['name'] not in PEERS else ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000, help="pool rows for our engine and the floor")
    p.add_argument("--d", type=int, default=512, help="embedding dimension")
    p.add_argument("--budget", type=int, default=1000, help="picks")
    p.add_argument("--labeled", type=int, default=1000, help="labeled rows")
    p.add_argument("--peers-n", type=int, default=200_000, help="pool rows for the peers (and ours again)")
    p.add_argument("--skip-peers", action="store_true", help="only the floor, ours and the numpy loop")
    p.add_argument("--only", nargs="*", help="run only these contenders")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per contender")
    p.add_argument("--repeat", type=int, default=2, help="runs of the floor and ours (best kept)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: the pool on the GPU, ours with the torch backend (the peers stay CPU-only)")
    p.add_argument("--input", choices=["device", "host"], default="device",
                   help="cuda: embeddings handed over on the GPU, or in host memory (as read from the "
                   "score shards; the GPU then holds only the engine's storage)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.d, args.labeled, args.budget, args.device, args.input)))
        return
    plan = [(name, args.n) for name in ("floor", *OURS, "numpy-loop")]
    if args.device == "cuda":  # numpy and the peers have no GPU path; faiss only with faiss-gpu
        from alges_dist.selection.knn import faiss_has_gpu

        plan = [(name, n) for name, n in plan if name not in ("numpy-loop", "ours-faiss") or
                (name == "ours-faiss" and faiss_has_gpu())]
        args.skip_peers = True
    if not args.skip_peers:
        plan += [(name, args.peers_n) for name in PEERS]
        if args.peers_n != args.n:
            plan += [(name, args.peers_n) for name in ("floor", "ours-torch", "ours-bf16")]
    if args.only:
        plan = [(name, n) for name, n in plan if name in args.only]
    results = []
    for name, n in plan:  # ours and the floor: best of --repeat (the 2-core machine is shared)
        runs = [run_contender(name, n, args) for _ in range(1 if name in PEERS else args.repeat)]
        ok = [r for r in runs if "error" not in r]
        results.append(min(ok, key=lambda r: r["seconds_prepare"] + r["seconds_picks"]) if ok else runs[0])
    for r in results:
        if "error" not in r and r["picks"]:
            r["radius"] = covering_radius(r["n"], args, r["picks"])
    print(f"\nload average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}, "
          f"{os.cpu_count()} CPUs")
    print(f"\nk-center greedy, d={args.d}, float32 data, {args.labeled} labeled, {args.budget} picks; "
          f"`python {' '.join(sys.argv)}`\n")
    print(table(results, args))
    for r in results:
        if "gpu_peak_mb" in r:
            print(f"\n{r['name']} at N={r['n']:,}: GPU peak allocated {r['gpu_peak_mb']:.0f} MB = "
                  f"{r['gpu_peak_mb'] / r['data_mb']:.2f}x the {r['data_mb']:.0f} MB of float32 embeddings "
                  f"(target <= 1.3x + 300 MB = {1.3 * r['data_mb'] + 300:.0f} MB)", end="")
    floors = [r for r in results if r["name"] == "floor" and "error" not in r]
    for r in floors:
        print(f"\nfloor at N={r['n']:,}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in r["passes"].items()))


if __name__ == "__main__":
    main()
