"""Local mode's fixed costs: a Ray Train fit, a Ray Data scoring job, and `make demo` (issue 13).

Fixed cost of a fit = its wall time minus the work of its epochs (each epoch times itself in
the worker). Measured twice per setting in one process on one local Ray instance, alternated
so the ratio is taken under the same load: the baseline is the same training loop the plain
way (TorchTrainer with Ray Train's default settings, as alges did before), against alges's
``train_model`` (no process group for one worker, ``runtime.LOCAL_TRAIN_ENV``). The scoring job's fixed cost is its wall
time minus the same frames through ``score_batch`` in this process. `make demo`'s wall time is
the demo command run as a subprocess (skip with --skip-demo). Last, where the seconds of alges's
fits and of the scoring job went, phase by phase (median; the ``timings`` of train.json and
scores.json: worker start, boot, imports, dataset, model, epochs, hand-back; issue 24).

    python scripts/bench_local.py [--repeats 2] [--skip-demo]

Run it when nothing else runs (the script prints the load average with the table).
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


# where the seconds went, per fit and per scoring job (train.json / scores.json ``timings``)
PHASES: dict[str, list[dict[str, float]]] = {"fit (alges local settings)": [], "scoring job": []}


def _fit(cfg, manifest, init, out: Path) -> tuple[float, float]:
    """alges's fit (``train_model``): wall seconds and the seconds its epochs took."""
    from alges_dist.distributed.training import train_model

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    result = train_model(cfg, manifest, init_weights=init, out_dir=out, use_gpu=False)
    wall = time.perf_counter() - t0
    PHASES["fit (alges local settings)"].append(result.timings)
    return wall, sum(h["seconds"] for h in result.history)


def _baseline_fit(cfg, manifest, init, out: Path) -> tuple[float, float]:
    """The same training loop the plain way: TorchTrainer (a torch process group even for one
    worker) with Ray Train's default settings."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from alges_dist.distributed.training import _train_loop

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"config": cfg.model_dump(mode="json"), "manifest": str(manifest),
                           "init_weights": str(init), "progress": str(out / "progress.json")},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False),
        run_config=RunConfig(name="train", storage_path=str(out / "ray_train"),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    with result.checkpoint.as_directory() as ckpt:
        history = json.loads((Path(ckpt) / "state.json").read_text())["history"]
    return wall, sum(h["seconds"] for h in history)


def _phase_table(rows: list[dict[str, float]]) -> list[str]:
    """Median seconds per phase over the runs of one kind (markdown rows)."""
    return [f"| {k} | {float(np.median([r[k] for r in rows])):.2f} |" for k in rows[0]]


def _scoring(cfg, manifest, model_path: Path, out: Path) -> tuple[float, float, int]:
    import numpy as np

    from alges_dist.data.frames import load_image, normalize_images
    from alges_dist.data.manifest import filter_manifest, read_manifest
    from alges_dist.distributed.scoring_job import score_pool
    from alges_dist.models import load_model
    from alges_dist.scoring import score_batch

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    result = score_pool(cfg, manifest, model_path, out, use_gpu=False)
    wall = time.perf_counter() - t0
    PHASES["scoring job"].append(result.timings)
    table = filter_manifest(read_manifest(manifest).table, split="pool")
    model = load_model(cfg.model.arch, cfg.model.encoder, cfg.data.n_classes, model_path).eval()
    uris = table["image_uri"].to_pylist()
    t0 = time.perf_counter()
    for a in range(0, len(uris), cfg.scoring.batch_size):
        images = np.stack([load_image(u, tuple(cfg.data.image_size)) for u in uris[a:a + cfg.scoring.batch_size]])
        score_batch(model, normalize_images(images, cfg.data.normalize))
    return wall, time.perf_counter() - t0, result.n_scored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="fits per setting (alternated; median reported)")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    import ray
    import torch

    from alges_dist.config import load_config
    from alges_dist.data.demo import demo_pool
    from alges_dist.cold_start import draw_initial_set
    from alges_dist.distributed import runtime
    from alges_dist.distributed.training import initial_weights

    work = Path(tempfile.mkdtemp(prefix="bench_local_"))
    cfg = load_config(None, ["data.image_size=[64, 64]", "train.epochs=1", "train.batch_size=4",
                             "scoring.batch_size=8"])
    pool = demo_pool(work / "cache", seed=0, n_videos=4, frames_per_video=12, size=64)
    manifest = work / "initial.parquet"
    draw_initial_set(str(pool), str(manifest), 8, 0)
    init = initial_weights(cfg, work / "init.pt", seed=0)
    torch.set_num_threads(1)

    settings = {"Ray Train defaults": ({k: None for k in runtime.LOCAL_TRAIN_ENV}, _baseline_fit),
                "alges local settings": (dict(runtime.LOCAL_TRAIN_ENV), _fit)}
    with runtime.RaySession(num_cpus=2):
        fits: dict[str, list[tuple[float, float]]] = {name: [] for name in settings}
        for i in range(args.repeats):
            for name, (env, fit) in settings.items():  # Ray Train reads them from the driver at each fit
                for key, value in env.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
                fits[name].append(fit(cfg, manifest, init, work / f"fit_{i}"))
                print(f"  fit {i} ({name}): {fits[name][-1][0]:.1f} s wall, {fits[name][-1][1]:.1f} s of epochs",
                      flush=True)
        for key, value in runtime.LOCAL_TRAIN_ENV.items():
            os.environ[key] = value
        score_wall, score_work, n_scored = _scoring(cfg, manifest, work / "fit_0" / "model.pt", work / "scores")
        if not ray.is_initialized():
            raise RuntimeError("Ray stopped during the benchmark")

    demo_seconds = None
    if not args.skip_demo:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "alges_dist.cli", "demo", "--out", str(work / "demo")], check=True,
                       cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
        demo_seconds = time.perf_counter() - t0

    load = os.getloadavg()
    base = [w - e for w, e in fits["Ray Train defaults"]]
    ours = [w - e for w, e in fits["alges local settings"]]
    rows = [("fit fixed cost: TorchTrainer, Ray Train's defaults (baseline)", base),
            ("fit fixed cost: alges (`train_model`, local settings)", ours)]
    print(f"\nload average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min), {os.cpu_count()} CPUs\n")
    print("| measurement | seconds (each run, in order) | median | vs baseline |")
    print("|---|---|---:|---:|")
    for name, values in rows:
        median = float(np.median(values))
        print(f"| {name} | {', '.join(f'{v:.1f}' for v in values)} | {median:.1f} | "
              f"{median / float(np.median(base)):.2f} |")
    print(f"| scoring job fixed cost ({n_scored} frames: {score_wall:.1f} s job - {score_work:.1f} s of "
          f"score_batch) | {score_wall - score_work:.1f} | | |")
    if demo_seconds is not None:
        print(f"| `alges demo` (what `make demo` runs once installed) | {demo_seconds:.1f} | | |")
    for kind, rows in PHASES.items():
        if rows:
            print(f"\n| {kind}: phase (median of {len(rows)}) | seconds |\n|---|---:|")
            print("\n".join(_phase_table(rows)))
    if args.json:
        args.json.write_text(json.dumps({"load": load, "fits": fits, "scoring": [score_wall, score_work, n_scored],
                                         "phases": PHASES, "demo_seconds": demo_seconds},
                                        indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
