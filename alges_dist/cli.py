"""The ``alges`` command: ingest frames, run active-learning rounds, report.

Every round command takes ``--config FILE``, ``--set key=value`` (repeatable),
``--pool POOL.parquet`` and ``--out RUN``. Without RAY_ADDRESS it runs on a local Ray
runtime; with it (``ray job submit`` sets it) the same command runs on the cluster.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("alges_dist")

ROUND_COMMANDS = {
    "train": "train the model of the next pending round (Ray Train, DDP)",
    "score": "score the pool with the next pending round's model (Ray Data actor pool)",
    "select": "pick the next query batch from the scores (k-center / k-means++ / top-k / random)",
    "round": "complete one round (train, evaluate, score, select, label) of each strategy and seed",
    "run": "run every round of the config; resumes where an earlier run stopped",
    "demo": "run a few rounds on the generated synthetic pool and print the metric table",
}


def _add_round_args(p: argparse.ArgumentParser, *, default_out: str | None = None) -> None:
    p.add_argument("--config", type=Path, help="YAML config (default: the built-in demo config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--pool", help='pool manifest (overrides data.pool; "demo" = generated pool)')
    p.add_argument("--out", type=Path, required=default_out is None, default=default_out,
                   help="run folder; holds every stage's output and results.csv")
    p.add_argument("--no-dashboard", action="store_true", help="local mode: do not start the Ray dashboard")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alges",
        description="Choose which surgical video frames to annotate next (ALGES active learning on Ray).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ingest = sub.add_parser("ingest", help="build a pool manifest (Parquet) from frames and masks",
                            description="Build a pool manifest: one row per frame, written atomically.")
    ingest_sub = ingest.add_subparsers(dest="source", required=True, metavar="SOURCE")
    folder = ingest_sub.add_parser(
        "folder", help="an image folder and a mask folder paired by file stem",
        description="Pair images/STEM.* with masks/STEM.*, decode and check every mask, write the manifest. "
        "Binary 0/255 masks need no flags (> 127 is class 1).")
    folder.add_argument("--images", type=Path, required=True, help="folder of RGB frames")
    folder.add_argument("--masks", type=Path, help="folder of masks with the same stems (omit for an unlabeled pool)")
    folder.add_argument("--out", type=Path, required=True, help="manifest to write (POOL.parquet)")
    folder.add_argument("--class-map", help='mask value -> class id: "0:0,255:1", "0,0,0:0;255,0,0:1", ">127", '
                        "or a JSON/YAML file (see alges_dist.data.sources.parse_class_map)")
    folder.add_argument("--class-names", help="comma-separated class names for --class-map")
    folder.add_argument("--split", choices=["ranges", "video"], default="ranges",
                        help="ranges: contiguous blocks in natural file order; video: whole videos per split")
    folder.add_argument("--fractions", default="0.7,0.15,0.15", help="pool,val,test shares (default 0.7,0.15,0.15)")
    folder.add_argument("--video-pattern", help="regex on the file stem with a named group 'video' "
                        "(and optionally 'index'), e.g. '(?P<video>seq\\d+)_(?P<index>\\d+)'")
    folder.add_argument("--max-pixels", type=int, help="refuse frames above this many pixels (default 40000000)")
    video = ingest_sub.add_parser(
        "video", help="video files sampled at --fps frames per second (headers only: no frame is extracted)",
        description="One row per sampled frame, image_uri = /abs/VIDEO.mp4#t=SECONDS (the frame on screen at that "
        "time), frame_id = VIDEOID_FRAMEINDEX; whole videos per split; writes OUT.videos.parquet beside the manifest.")
    video.add_argument("--videos", required=True, help="folder of videos (searched recursively) or a glob pattern")
    video.add_argument("--fps", default="1", help="frames per second of video to sample (default 1; 'native' = every "
                       "frame)")
    video.add_argument("--out", type=Path, required=True, help="manifest to write (POOL.parquet)")
    video.add_argument("--masks", type=Path,
                       help="folder of masks named FRAME_ID.png (rows without one stay unlabeled)")
    video.add_argument("--class-map", help="mask value -> class id, as for `ingest folder`")
    video.add_argument("--class-names", help="comma-separated class names for --class-map")
    video.add_argument("--split", choices=["video"], default="video", help="whole videos per split (the only choice)")
    video.add_argument("--fractions", default="0.7,0.15,0.15", help="pool,val,test shares of frames (default "
                       "0.7,0.15,0.15)")
    video.add_argument("--skip-bad", action="store_true", help="record unusable files in the sidecar and go on")
    video.add_argument("--max-pixels", type=int, help="refuse videos whose frames have more pixels (default 40000000)")
    chole = ingest_sub.add_parser(
        "cholecseg8k", help="the CholecSeg8k folder layout (13 classes, split by video)",
        description="Read videoNN/videoNN_XXXXX/frame_N_endo.png + frame_N_endo_watershed_mask.png; "
        "watershed grey values map to class ids 0..12, the white border and black pixels to ignore (255).")
    chole.add_argument("--root", type=Path, required=True, help="the CholecSeg8k folder")
    chole.add_argument("--out", type=Path, required=True, help="manifest to write (POOL.parquet)")
    chole.add_argument("--mask-values", choices=["table", "decimal"], default="table",
                       help="how the watershed masks spell the class table: 'table' = grey values of the "
                       "official hex colours (#505050 -> 80), 'decimal' = the hex digits as decimals (50); "
                       "ingest names the other spelling when the values fit it")
    chole.add_argument("--config", type=Path, help="take the video split from data.split_videos of this config "
                       "(default: the recorded paper split, configs/paper_cholecseg8k.yaml)")

    for name, help_text in ROUND_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_round_args(p, default_out="runs/demo" if name == "demo" else None)
    report = sub.add_parser(
        "report", help="learning curves, tables, AULC and the last query batch of a run folder",
        description="Write RUN/report/ (PNG figures, CSV and Markdown tables, report.html that opens offline) "
        "from the run folder alone. `alges run` and `alges demo` do this at the end.")
    report.add_argument("run", type=Path, help="the run folder (--out of alges run)")
    report.add_argument("--metric", choices=["dice", "miou"], default="dice", help="metric of the AULC table")
    label = sub.add_parser(
        "label", help="import people's masks for a run's pending query batch (loop.oracle: human)",
        description="Set mask_uri and labeled_round for the picks of the pending round; every pick needs "
        "MASKS/FRAME_ID.<ext>, decodable with the pool's encoding. Then rerun `alges run`.")
    label.add_argument("--out", type=Path, required=True, help="the run folder")
    label.add_argument("--masks", type=Path, required=True, help="folder of masks named FRAME_ID.png")
    label.add_argument("--strategy", required=True, help="which strategy's batch")
    label.add_argument("--seed", type=int, default=0)
    return parser


def _label(args: argparse.Namespace) -> int:
    from alges_dist.config import load_config
    from alges_dist.loop import Experiment, resolve_pool

    cfg = load_config(args.out / "config.yaml")
    r = Experiment(cfg, args.out, resolve_pool(cfg)).import_labels(args.strategy, args.seed, args.masks)
    print(f"labeled round {r + 1} of {args.strategy}/seed {args.seed}; rerun `alges run` to continue")
    return 0


def _report(args: argparse.Namespace) -> int:
    from alges_dist.report import write_report

    _log_to(args.run, args.argv)
    path = write_report(args.run, metric=args.metric)
    print((args.run / "report" / "aulc.md").read_text())
    print(f"report: {path}")
    return 0


def _log_to(run: Path, argv: list[str]) -> None:
    """Append this command's log to RUN/run.log (the run folder's history); main() detaches it."""
    run.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.info("alges %s", " ".join(argv))


def _ingest(args: argparse.Namespace) -> int:
    if args.source == "folder":
        from alges_dist.data.sources import ingest_folder, parse_class_map

        names = args.class_names.split(",") if args.class_names else None
        encoding = parse_class_map(args.class_map, class_names=names) if args.class_map else None
        fractions = tuple(float(f) for f in args.fractions.split(","))
        pixels = {} if args.max_pixels is None else {"max_pixels": args.max_pixels}
        table = ingest_folder(args.images, args.masks, args.out, encoding=encoding, split=args.split,
                              fractions=fractions, video_pattern=args.video_pattern, **pixels)
    elif args.source == "video":
        from alges_dist.data.sources import parse_class_map
        from alges_dist.data.video_source import ingest_video, sidecar_path

        names = args.class_names.split(",") if args.class_names else None
        encoding = parse_class_map(args.class_map, class_names=names) if args.class_map else None
        fractions = tuple(float(f) for f in args.fractions.split(","))
        pixels = {} if args.max_pixels is None else {"max_pixels": args.max_pixels}
        table = ingest_video(args.videos, args.out, fps=args.fps, masks=args.masks, encoding=encoding,
                             fractions=fractions, skip_bad=args.skip_bad, **pixels)
        print(f"{table.num_rows} frames of {len(set(table['video_id'].to_pylist()))} videos; per-video facts in "
              f"{sidecar_path(args.out)}")
    else:
        from alges_dist.config import load_config
        from alges_dist.data.cholecseg8k import CHOLECSEG8K_ENCODINGS, ingest_cholecseg8k

        split = load_config(args.config).data.split_videos if args.config else None
        table = ingest_cholecseg8k(args.root, args.out, split_videos=split,
                                   encoding=CHOLECSEG8K_ENCODINGS[args.mask_values])
    counts = {s: int(sum(1 for v in table["split"].to_pylist() if v == s)) for s in ("pool", "val", "test")}
    print(f"wrote {args.out}: {table.num_rows} frames ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    return 0


def _rounds(args: argparse.Namespace) -> int:
    from alges_dist.config import load_config
    from alges_dist.distributed.runtime import init_ray
    from alges_dist.loop import Experiment, WaitingForLabels, resolve_pool
    from alges_dist.report import format_results, write_report
    from tqdm import tqdm

    # --pool is an override like any other, so RUN/config.yaml records the pool used
    pool_override = [] if args.pool is None else [f"data.pool={args.pool if args.pool == 'demo' else Path(args.pool).resolve()}"]
    cfg = load_config(args.config, [*args.overrides, *pool_override])
    pool = resolve_pool(cfg)
    exp = Experiment(cfg, args.out, pool)  # validates config against the pool first
    _log_to(args.out, args.argv)
    init_ray(dashboard=not args.no_dashboard)
    until = args.command if args.command in ("train", "score", "select") else None
    rounds = 1 if args.command in ("round", "train", "score", "select") else None
    runs = [(strategy, seed) for seed in cfg.loop.seeds for strategy in cfg.loop.strategies]
    # one tick per finished round; epochs (Ray Train workers) and scoring (Ray Data) have their own bars
    total = len(runs) * (cfg.loop.n_rounds + 1 if rounds is None else 1)
    with tqdm(total=total, desc="rounds", unit="round", dynamic_ncols=True) as bar:
        def on_stage(stage: str, strategy: str, seed: int, r: int) -> None:
            bar.set_postfix_str(f"{strategy} seed {seed} round {r}: {stage} done")
            if stage == exp.stages(r)[-1]:
                bar.update(1)

        try:
            for strategy, seed in runs:
                exp.advance(strategy, seed, rounds=rounds, until=until, on_stage=on_stage)
        except WaitingForLabels as waiting:
            print(waiting)
            return 3
    print(format_results(args.out / "results.csv"))
    if args.command in ("run", "demo"):
        print(f"report: {write_report(args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in RUN/run.log
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        handler = {"ingest": _ingest, "label": _label, "report": _report}.get(args.command, _rounds)
        return handler(args)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        # Bad input: one clear line, not a traceback (-v shows the traceback).
        if args.verbose:
            raise
        print(f"alges {args.command}: error: {exc}", file=sys.stderr)
        log.error("alges %s: %s", args.command, exc)
        return 2
    finally:
        for handler in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
            log.removeHandler(handler)
            handler.close()


if __name__ == "__main__":
    sys.exit(main())
