"""Benchmark the Ray Data scoring job against the in-process score_batch loop.

Prints a markdown table: frames/s of (a) an in-process loop (decode + normalize +
score_batch, same model, batch, threads) and (b) ``score_pool`` on a local Ray runtime
with one scorer actor holding the same threads; their ratio; and the peak RSS of the
whole job (driver + every Ray process) with the pool x1 and x10. Each measurement runs
in a fresh subprocess so peaks do not leak between rows.

    python scripts/bench_pipeline.py                # 200-frame demo pool, x1 and x10
    python scripts/bench_pipeline.py --size 224 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _tree_rss_bytes() -> int:
    import psutil

    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakRSS:
    """Samples the RSS of this process and all its descendants (Ray's, in local mode)."""

    def __init__(self, interval_s: float = 0.2):
        self.peak, self._stop, self._interval = 0, threading.Event(), interval_s
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_bytes())
            self._stop.wait(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _tree_rss_bytes())


def replicate_pool(manifest: Path, times: int, out: Path) -> Path:
    """The pool rows repeated ``times`` times under new frame ids (same images)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from alges_dist.data.manifest import read_manifest, write_manifest

    table, encoding = read_manifest(manifest)
    pool = table.filter(pc.equal(table["split"], "pool"))
    copies = []
    for k in range(times):
        ids = pc.binary_join_element_wise(pool["frame_id"], pa.scalar(f"x{k}"), "_")
        copies.append(pool.set_column(0, "frame_id", ids))
    write_manifest(pa.concat_tables(copies), out, encoding)
    return out


def _cfg(args):
    from alges_dist.config import load_config

    return load_config(None, [
        f"data.image_size=[{args.size}, {args.size}]", f"scoring.batch_size={args.batch}",
        "scoring.num_actors=1", f"scoring.cpus_per_actor={args.threads}",
    ])


def child_in_process(args) -> dict:
    import numpy as np
    import pyarrow.compute as pc
    import torch

    from alges_dist.data.frames import load_image, normalize_images
    from alges_dist.data.manifest import read_manifest
    from alges_dist.models import build_model
    from alges_dist.scoring import score_batch

    cfg = _cfg(args)
    torch.set_num_threads(args.threads)
    table, _ = read_manifest(args.manifest)
    uris = table.filter(pc.equal(table["split"], "pool"))["image_uri"].to_pylist()
    model = build_model(cfg.model.arch, cfg.model.encoder, cfg.data.n_classes)
    model.load_state_dict(torch.load(args.checkpoint, weights_only=True))
    with PeakRSS() as rss:
        start = time.perf_counter()
        for i in range(0, len(uris), args.batch):
            images = np.stack([load_image(u, (args.size, args.size)) for u in uris[i:i + args.batch]])
            score_batch(model, normalize_images(images))
        seconds = time.perf_counter() - start
    return {"frames": len(uris), "seconds": seconds, "peak_rss": rss.peak}


def child_ray(args) -> dict:
    import ray

    from alges_dist.distributed.scoring_job import score_pool

    cfg = _cfg(args)
    with PeakRSS() as rss:
        ray.init(num_cpus=args.threads + 1, include_dashboard=False, log_to_driver=False)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            result = score_pool(cfg, Path(args.manifest), Path(args.checkpoint), Path(tmp), use_gpu=False)
        seconds = time.perf_counter() - start
        ray.shutdown()
    return {"frames": result.n_scored, "seconds": seconds, "peak_rss": rss.peak}


def run_child(mode: str, manifest: Path, checkpoint: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--manifest", str(manifest), "--checkpoint", str(checkpoint),
           "--size", str(args.size), "--batch", str(args.batch), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{mode} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="frame side in px (default: the demo's 128)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, in-process and in the actor")
    parser.add_argument("--scale", type=int, default=10, help="the larger pool is this many copies")
    parser.add_argument("--child", choices=["in-process", "ray"], help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        fn = child_in_process if args.child == "in-process" else child_ray
        print(json.dumps(fn(args)))
        return

    from alges_dist.data.demo import demo_pool
    from alges_dist.distributed.training import initial_weights

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pool = demo_pool(tmp / "cache", seed=0, size=args.size)
        x1 = replicate_pool(pool, 1, tmp / "x1.parquet")
        xn = replicate_pool(pool, args.scale, tmp / f"x{args.scale}.parquet")
        ckpt = initial_weights(_cfg(args), tmp / "model.pt", seed=0)
        rows = [
            ("in-process score_batch loop", "x1", run_child("in-process", x1, ckpt, args)),
            ("Ray Data job, 1 actor", "x1", run_child("ray", x1, ckpt, args)),
            ("Ray Data job, 1 actor", f"x{args.scale}", run_child("ray", xn, ckpt, args)),
        ]
    base_fps = rows[0][2]["frames"] / rows[0][2]["seconds"]
    ray_x1_rss = rows[1][2]["peak_rss"]
    print(f"\nUnet-resnet18, {args.size}x{args.size}, batch {args.batch}, {args.threads} torch threads, CPU "
          f"({os.cpu_count()} cores); load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
          f"{os.getloadavg()[2]:.2f}\n")
    print("| run | pool | frames | seconds | frames/s | vs in-process | peak RSS (GB) | RSS vs x1 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, scale, r in rows:
        fps = r["frames"] / r["seconds"]
        rss_ratio = f"{r['peak_rss'] / ray_x1_rss:.2f}" if name.startswith("Ray") else "-"
        print(f"| {name} | {scale} | {r['frames']} | {r['seconds']:.1f} | {fps:.1f} | {fps / base_fps:.2f} "
              f"| {r['peak_rss'] / 1e9:.2f} | {rss_ratio} |")


if __name__ == "__main__":
    main()
