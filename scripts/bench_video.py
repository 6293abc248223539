"""Benchmark video decoding for archive-scale pools (issue 11).

On a synthetic H.264 clip (textured scene panned by a moving camera plus sensor noise,
854x480, 25 fps, x264's default 250-frame keyframe interval, ``veryfast`` crf 23), at
1 fps, frames per CPU-second (one decoder thread, RGB out, full resolution) of

  (a) chunked decode: one seek per chunk of 100 rows, one forward decode (the scoring job);
  (b) one seek per frame (``load_image(VIDEO#t=...)`` for every row);
  (c) PNG decode of the same frames, exported as the hand-off writes them;

the bytes a chunk reads from an S3-compatible store (a local moto server) against the bytes
of its GOPs (target < 2x: ranged reads, not the whole object), then the Ray Data scoring job (1 actor) on the video pool against the same frames as a
PNG pool, and an archive sizing table from the measured chunked rate. Targets: a/b >= 3,
video job / PNG job >= 0.9.

    python scripts/bench_video.py                                  # full size (minutes)
    python scripts/bench_video.py --seconds 20 --width 320 --height 180 --job-seconds 0  # smoke, seconds
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import av  # noqa: E402
import numpy as np  # noqa: E402

# README, "Scoring": score_batch on one H100, Unet-resnet18 224x224 fp32
H100_SCORE_FRAMES_PER_S = 2265.0


def encode_clip(path: Path, *, seconds: int, width: int, height: int, fps: int = 25, gop: int = 250) -> Path:
    """Stream-encode the textured, panning clip (never holds more than one frame)."""
    rng = np.random.default_rng(0)
    cells = rng.integers(40, 215, (height // 8 + 40, width // 8 + 40, 3), dtype=np.uint8)
    texture = np.kron(cells, np.ones((8, 8, 1), np.uint8))  # blocky texture larger than the view
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "g": str(gop)}
        for i in range(seconds * fps):
            y = int(120 + 100 * np.sin(i / 90)) % (texture.shape[0] - height)
            x = int(150 + 140 * np.sin(i / 130 + 1)) % (texture.shape[1] - width)
            view = texture[y:y + height, x:x + width].astype(np.int16) + rng.integers(-6, 7, (height, width, 1))
            frame = av.VideoFrame.from_ndarray(np.clip(view, 0, 255).astype(np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def cpu_rate(fn) -> tuple[float, int]:
    """(frames per CPU-second, frames) of ``fn()``, which returns how many frames it made."""
    start = time.process_time()
    n = fn()
    return n / max(time.process_time() - start, 1e-9), n


def decode_rates(clip: Path, png_dir: Path) -> dict[str, float]:
    from alges_dist.data.frames import load_image
    from alges_dist.data.video import iter_frames, probe_video, read_frame, sample_times
    from alges_dist.data.video_export import export_video_frames
    from alges_dist.distributed.decode_stage import VIDEO_CHUNK_FRAMES

    times = sample_times(probe_video(clip).duration, Fraction(1))

    def chunked() -> int:
        n = 0
        for start in range(0, len(times), VIDEO_CHUNK_FRAMES):
            n += sum(rgb is not None for _, rgb, _ in iter_frames(clip, times[start:start + VIDEO_CHUNK_FRAMES]))
        return n

    def per_frame() -> int:
        return sum(read_frame(clip, t).shape[0] > 0 for t in times)

    pngs = export_video_frames(png_dir, {f"clip_{i:06d}": f"{clip}#t={t}" for i, t in enumerate(times)})

    def png() -> int:
        return sum(load_image(p).shape[0] > 0 for p in pngs.values())

    rates = {}
    for name, fn in (("a", chunked), ("b", per_frame), ("c", png)):
        rates[name], _ = cpu_rate(fn)
    rates["frames"] = len(times)
    return rates


def gop_bytes(clip: Path, first: Fraction, last: Fraction) -> int:
    """Bytes of the packets a decoder needs for targets first..last: from the keyframe at or
    before ``first`` to the end of the GOP holding ``last`` (demux only)."""
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        packets = [(float(p.pts * stream.time_base), p.size, p.is_keyframe)
                   for p in container.demux(stream) if p.pts is not None]
    packets.sort()
    keys = [t for t, _, key in packets if key]
    start = max([k for k in keys if k <= first] or [keys[0]])
    end = min([k for k in keys if k > last] or [float("inf")])
    return sum(size for t, size, _ in packets if start <= t < end)


def store_reads(clip: Path, tmp: Path) -> list[dict[str, float]]:
    """Chunked decode of the clip from an S3-compatible store (a local moto server): bytes the
    decoder pulled per chunk, against the bytes of the chunk's GOPs and the whole object."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import s3_server

    from alges_dist import storage
    from alges_dist.data.video import iter_frames, probe_video, sample_times
    from alges_dist.distributed.decode_stage import VIDEO_CHUNK_FRAMES

    times = sample_times(probe_video(clip).duration, Fraction(1))
    rows = []
    with s3_server.running(tmp / "moto.log") as server:
        server.make_buckets("bench")
        os.environ.update(server.environment({}))
        uri = "s3://bench/archive/clip.mp4"
        storage.write_bytes(uri, clip.read_bytes())
        for start in range(0, len(times), VIDEO_CHUNK_FRAMES):
            chunk = times[start:start + VIDEO_CHUNK_FRAMES]
            with s3_server.counted_reads() as reads:
                decoded = sum(rgb is not None for _, rgb, _ in iter_frames(uri, chunk))
            rows.append({"rows": len(chunk), "decoded": decoded, "read": reads.total,
                         "gops": gop_bytes(clip, chunk[0], chunk[-1]), "file": clip.stat().st_size})
    return rows


def job_rates(clip: Path, seconds: int, size: int, tmp: Path) -> dict[str, float]:
    """Ray Data scoring job, 1 actor, on the clip's 1 fps rows and on the same frames as PNG files."""
    import ray

    from alges_dist.config import load_config
    from alges_dist.data.demo import DEMO_ENCODING
    from alges_dist.data.manifest import make_manifest, write_manifest
    from alges_dist.data.video import sample_times
    from alges_dist.data.video_export import export_video_frames
    from alges_dist.distributed.scoring_job import score_pool
    from alges_dist.distributed.training import initial_weights

    times = sample_times(Fraction(seconds), Fraction(1))
    ids = [f"clip_{int(t):06d}" for t in times]
    video_uris = [f"{clip}#t={t}" for t in times]
    png_uris = export_video_frames(tmp / "job_png", dict(zip(ids, video_uris)))
    cfg = load_config(None, [f"data.image_size=[{size}, {size}]", "scoring.num_actors=1", "scoring.batch_size=16",
                             f"scoring.cpus_per_actor={max(1, (os.cpu_count() or 2) - 1)}"])
    checkpoint = initial_weights(cfg, tmp / "model.pt", seed=0)
    manifests = {}
    for kind, uris in (("video", video_uris), ("png", [png_uris[f] for f in ids])):
        table = make_manifest(frame_ids=ids, video_ids=["clip"] * len(ids), frame_indices=list(range(len(ids))),
                              image_uris=uris, mask_uris=[None] * len(ids), splits=["pool"] * len(ids))
        manifests[kind] = tmp / f"{kind}.parquet"
        write_manifest(table, manifests[kind], DEMO_ENCODING)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    rates: dict[str, list[float]] = {"video": [], "png": []}
    for attempt in range(2):  # alternate, so machine load hits both alike
        for kind in ("png", "video") if attempt == 0 else ("video", "png"):
            start = time.perf_counter()
            result = score_pool(cfg, manifests[kind], checkpoint, tmp / f"{kind}_{attempt}", use_gpu=False)
            rates[kind].append(result.n_scored / (time.perf_counter() - start))
    ray.shutdown()
    return {kind: max(values) for kind, values in rates.items()} | {"frames": len(ids), "size": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=300, help="clip length for the decode rates (default 300)")
    parser.add_argument("--width", type=int, default=854)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--job-seconds", type=int, default=300, help="rows of the scoring-job pools (1 fps); 0: skip")
    parser.add_argument("--job-size", type=int, default=224, help="model input side in px for the job")
    parser.add_argument("--gpu-frames-per-s", type=float, default=H100_SCORE_FRAMES_PER_S,
                        help="scoring rate for the sizing table (default: README's H100 score_batch rate)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clips = {}
        for seconds in sorted({args.seconds, args.job_seconds} - {0}):
            start = time.perf_counter()
            clips[seconds] = encode_clip(tmp / f"clip_{seconds}.mp4", seconds=seconds, width=args.width,
                                         height=args.height)
            print(f"encoded {seconds} s of {args.width}x{args.height} H.264 (GOP 250) in "
                  f"{time.perf_counter() - start:.0f} s, {clips[seconds].stat().st_size / 1e6:.1f} MB", flush=True)
        rates = decode_rates(clips[args.seconds], tmp / "png")
        reads = store_reads(clips[args.seconds], tmp)
        job = job_rates(clips[args.job_seconds], args.job_seconds, args.job_size, tmp) if args.job_seconds else None

    print(f"\n{args.width}x{args.height} H.264, 25 fps, GOP 250, {rates['frames']} rows at 1 fps, "
          f"{os.cpu_count()} cores, one decoder thread, per CPU-second; "
          f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}\n")
    print("| decode | frames / CPU-s | CPU-ms / frame |")
    print("|---|---:|---:|")
    for key, name in (("a", "(a) chunked: one seek per 100 rows"), ("b", "(b) one seek per frame"),
                      ("c", "(c) PNG files of the same frames")):
        print(f"| {name} | {rates[key]:.1f} | {1000 / rates[key]:.1f} |")
    print(f"\na/b = {rates['a'] / rates['b']:.2f} (target >= 3), a/c = {rates['a'] / rates['c']:.2f}")
    print(f"\nChunked decode from an S3-compatible store (moto on 127.0.0.1, ranged GETs through "
          f"alges_dist.storage), {reads[0]['file'] / 1e6:.1f} MB object; target: read / GOP bytes < 2\n")
    print("| chunk | rows | decoded | bytes read | bytes of its GOPs | read / GOPs | read / object |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(reads):
        print(f"| {i} | {r['rows']} | {r['decoded']} | {r['read']:,} | {r['gops']:,} | {r['read'] / r['gops']:.2f} "
              f"| {r['read'] / r['file']:.2f} |")
    if job:
        print(f"\nRay Data scoring job, 1 actor, Unet-resnet18 {job['size']}x{job['size']}, {job['frames']} frames "
              f"(best of 2, alternated): video pool {job['video']:.2f} frames/s, PNG pool {job['png']:.2f} frames/s, "
              f"video/PNG = {job['video'] / job['png']:.2f} (target >= 0.9)")
    print(f"\nArchive sizing at 1 fps (decode: rate (a); scoring: {args.gpu_frames_per_s:.0f} frames/s per GPU)\n")
    print("| hours of video | manifest rows | decode CPU-hours (a) | decode CPU-hours (b) | scoring GPU-hours |")
    print("|---:|---:|---:|---:|---:|")
    for hours in (1, 50, 1000, 10000):
        rows = hours * 3600
        print(f"| {hours:,} | {rows:,} | {rows / rates['a'] / 3600:,.1f} | {rows / rates['b'] / 3600:,.1f} "
              f"| {rows / args.gpu_frames_per_s / 3600:,.2f} |")


if __name__ == "__main__":
    main()
