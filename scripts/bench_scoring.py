"""Throughput of ALGES scoring against plain inference and the released per-image approach.

Issue 3's table, same model, batch, resolution and device, in one process:
  (a) plain forward inference (torch.inference_mode),
  (b) alges_dist.scoring.score_batch with every output (projection included),
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
"""

from __future__ import annotations

import argparse
import contextlib
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
from alges_dist.scoring import ProjectionCache, score_batch


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

    def scored() -> None:
        score_batch(
            model,
            images,
            projection_dim=args.projection_dim,
            autocast_dtype=autocast,
            projection_cache=cache,
        )

    def released() -> None:
        with autocast_context():
            released_per_image(model, images)

    return {"plain": plain, "scored": scored, "released": released}


LABELS = {
    "plain": "(a) plain forward",
    "scored": "(b) score_batch, every output",
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
    del methods  # free the model before the memory runs
    peaks = {method: peak_memory(args, method) for method in LABELS}
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
        f"best of {args.iters} rounds\n"
    )
    cpu = {method: min(times) for method, times in cpu_seconds.items()}
    print("| method | s / batch | frames/s | CPU s / batch | peak memory (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for method, label in LABELS.items():
        print(
            f"| {label} | {best[method]:.3f} | {fps[method]:.2f} | {cpu[method]:.2f} | "
            f"{peaks[method] / 2**20:.0f} |"
        )
    b_over_a = fps["scored"] / fps["plain"]
    b_over_c = fps["scored"] / fps["released"]
    print(f"\nb/a = {b_over_a:.3f} (target >= 0.92)    b/c = {b_over_c:.2f} (target >= 2.6 on CPU)")
    # CPU time (all threads) does not grow when other processes take the cores; with
    # OMP_WAIT_POLICY=PASSIVE it excludes spinning, so these ratios survive a loaded machine
    print(
        f"by CPU time: b/a = {cpu['plain'] / cpu['scored']:.3f}    "
        f"b/c = {cpu['released'] / cpu['scored']:.2f}"
    )


if __name__ == "__main__":
    main()
