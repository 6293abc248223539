"""Throughput of ALGES scoring against plain inference and the released per-image approach.

Issue 3's table, same model, batch, resolution and device, in one process:
  (a) plain forward inference (torch.inference_mode),
  (b) alges_dist.scoring.score_batch with every output (projection included), one row
      per --math-paths entry (eager: the in-place CPU-tuned math; compiled: torch.compile),
  (c) the released ALGES approach: per image forward, pseudo-label cross-entropy,
      backward through the whole network, read the head weight's gradient, zero grads
      (in eval mode, as score_batch).
The three are timed in interleaved rounds (so a change in machine load hits all of
them) and each reports its best round. Peak memory: on CUDA the peak allocated above
the model and images; on the CPU the peak resident set size above the level before the
call, sampled every millisecond from /proc (tracemalloc does not see torch's
allocations), each method in a fresh process so that one does not reuse another's
freed memory.

On a CPU shared with other busy processes, torch's OpenMP threads spin at every op's
barrier while their partner waits for a core, which slows code made of many ops (the
scoring math) far more than a few big convolutions: run on an idle machine, or set
OMP_WAIT_POLICY=PASSIVE, and read the CPU-time ratios printed last.

    python scripts/bench_scoring.py                       # Unet-resnet18 224x224 b16, CPU
    OMP_WAIT_POLICY=PASSIVE python scripts/bench_scoring.py --iters 5   # a shared CPU
    python scripts/bench_scoring.py --device cuda --batch 64 --autocast bf16
    python scripts/bench_scoring.py --device cuda --batch 32 --math-paths eager compiled --profile
--json FILE also writes the numbers (scripts/gpu_report.py turns such files into the README
tables); --profile prints the kernels that take the device's time in one score_batch call.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from alges_dist.models import build_model, head_layer
from alges_dist.scoring import MATH_PATHS, ProjectionCache, resolve_math_path, score_batch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="unet")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--classes", type=int, default=13)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224, help="square input side, px")
    parser.add_argument("--iters", type=int, default=3, help="timed rounds after a warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--projection-dim", type=int, default=256)
    parser.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--math-paths", nargs="+", default=["auto"], choices=list(MATH_PATHS),
                        help="score_batch math_path values to time, each as its own (b) row")
    parser.add_argument("--skip-memory", action="store_true", help="no peak-memory runs")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark = True for every method (autotuned convolutions)")
    parser.add_argument("--profile", action="store_true",
                        help="print the top kernels of one score_batch call per math path")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # child: one method's peak
    return parser.parse_args()


class PeakMemory:
    """Peak memory of the block above the level at its start, in bytes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = self._peak = _rss_bytes()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._running = False
        self._thread.join()
        self.peak_bytes = max(self._peak, _rss_bytes()) - self._start


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the high-water mark, which only shows new peaks
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def released_per_image(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The released code's loop, with its bugs fixed (eval mode, grads zeroed)."""
    head = head_layer(model)
    embeddings = []
    for image in images:
        logits = model(image.unsqueeze(0))  # (1, K, H, W)
        loss = F.cross_entropy(logits, logits.argmax(dim=1))
        loss.backward()
        embeddings.append(head.weight.grad.flatten().clone())
        model.zero_grad(set_to_none=True)
    return torch.stack(embeddings)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    """The model, a batch, and the three methods as no-argument callables."""
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = torch.device(args.device)
    autocast = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(args.arch, args.encoder, args.classes, encoder_weights=None)
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=generator).to(device)
    cache = ProjectionCache()

    def autocast_context():
        if autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast)

    def plain() -> None:
        with torch.inference_mode(), autocast_context():
            model(images)

    def scored(math_path: str) -> Callable[[], None]:
        def run() -> None:
            score_batch(
                model,
                images,
                projection_dim=args.projection_dim,
                autocast_dtype=autocast,
                projection_cache=cache,
                math_path=math_path,
            )

        return run

    def released() -> None:
        with autocast_context():
            released_per_image(model, images)

    return {
        "plain": plain,
        **{f"scored:{path}": scored(path) for path in args.math_paths},
        "released": released,
    }


def labels(args: argparse.Namespace) -> dict[str, str]:
    device = torch.device(args.device)
    return {
        "plain": "(a) plain forward",
        **{
            f"scored:{path}": f"(b) score_batch, every output, {resolve_math_path(path, device)} math"
            for path in args.math_paths
        },
        "released": "(c) released: per-image backward",
    }


def peak_memory(args: argparse.Namespace, method: str) -> int:
    """Peak bytes of one call of `method`; on the CPU measured in a fresh process."""
    device = torch.device(args.device)
    if device.type == "cuda":
        run = setup(args)[method]
        run()  # warm-up: cuDNN workspaces, autotuning
        with PeakMemory(device) as peak:
            run()
        return peak.peak_bytes
    child = [sys.executable, __file__, *sys.argv[1:], "--memory-of", method]
    result = subprocess.run(child, capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.memory_of:  # child process of peak_memory
        run = setup(args)[args.memory_of]
        with PeakMemory(device) as peak:
            run()
        print(peak.peak_bytes)
        return
    methods = setup(args)
    for run in methods.values():  # warm-up
        run()
    seconds = {method: [] for method in methods}
    cpu_seconds = {method: [] for method in methods}
    for _ in range(args.iters):
        for method, run in methods.items():
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            synchronize(device)
            seconds[method].append(time.perf_counter() - start)
            cpu_seconds[method].append(time.process_time() - start_cpu)

    load_after_timing = os.getloadavg()[0]
    if args.profile:
        for method, run in methods.items():
            if method.startswith("scored:"):
                print_profile(run, device, labels(args)[method])
    del methods  # free the model before the memory runs
    names = labels(args)
    peaks = {method: None if args.skip_memory else peak_memory(args, method) for method in names}
    best = {method: min(times) for method, times in seconds.items()}
    fps = {method: args.batch / best[method] for method in best}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU, {args.threads} threads, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}, 1-min load average "
        f"{load_after_timing:.1f} after timing"
    )
    print(
        f"{args.arch}-{args.encoder}, {args.classes} classes, {args.size}x{args.size}, "
        f"batch {args.batch}, {where}, autocast {args.autocast}, torch {torch.__version__}, "
        f"cudnn.benchmark {args.cudnn_benchmark}, best of {args.iters} rounds; "
        f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}\n"
    )
    cpu = {method: min(times) for method, times in cpu_seconds.items()}
    print("| method | s / batch | frames/s | CPU s / batch | peak memory (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for method, label in names.items():
        peak = "" if peaks[method] is None else f"{peaks[method] / 2**20:.0f}"
        print(f"| {label} | {best[method]:.4f} | {fps[method]:.2f} | {cpu[method]:.2f} | {peak} |")
    print()
    for path in args.math_paths:
        scored = f"scored:{path}"
        print(
            f"{resolve_math_path(path, device)} math: b/a = {fps[scored] / fps['plain']:.3f} "
            f"(target >= 0.92 CPU, >= 0.85 CUDA)    b/c = {fps[scored] / fps['released']:.2f} "
            "(target >= 2.6 on CPU)"
        )
        # CPU time (all threads) does not grow when other processes take the cores; with
        # OMP_WAIT_POLICY=PASSIVE it excludes spinning, so these ratios survive a loaded machine
        print(
            f"  by CPU time: b/a = {cpu['plain'] / cpu[scored]:.3f}    "
            f"b/c = {cpu['released'] / cpu[scored]:.2f}"
        )
    if args.json:
        record = {
            "arch": args.arch, "encoder": args.encoder, "batch": args.batch, "size": args.size,
            "autocast": args.autocast, "cudnn_benchmark": args.cudnn_benchmark, "device": where,
            "torch": torch.__version__,
            "labels": names,
            "math_paths": {path: resolve_math_path(path, device) for path in args.math_paths},
            "fps": fps, "peak_mib": {m: None if p is None else p / 2**20 for m, p in peaks.items()},
        }
        with open(args.json, "w") as out:
            json.dump(record, out, indent=1)


def print_profile(run: Callable[[], None], device: torch.device, label: str, top: int = 15) -> None:
    """The kernels (or CPU ops) that take one call's time, heaviest first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        run()
        synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of one call, {label}:")
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60))


if __name__ == "__main__":
    main()
