"""The ``alges`` command: ingest frames, run active-learning rounds, report.

Every round command takes ``--config FILE``, ``--set key=value`` (repeatable),
``--pool POOL.parquet`` and ``--out RUN``. Without RAY_ADDRESS it runs on a local Ray
runtime; with it (``ray job submit`` sets it) the same command runs on the cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from alges_dist.errors import AlgesError, InputError  # stdlib only: help stays fast
from alges_dist.storage import as_path, is_uri  # stdlib only (pyarrow on use)

log = logging.getLogger("alges_dist")


def run_folder_path(text: str) -> Path:
    """argparse ``type=`` of a run folder: local or a shared POSIX mount (``Path("s3://b/x")``
    would quietly make a local folder named ``s3:``)."""
    if is_uri(text):
        raise argparse.ArgumentTypeError(f"{text}: a run folder in an object store is not supported yet; give a "
                                         "local or shared folder (pools, videos and masks may be s3:// URIs)")
    return Path(text)
FORMAT_NAMES = ("labelstudio", "cvat", "coco")  # alges_dist.annotation.formats.FORMATS (not imported: help stays fast)

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
    p.add_argument("--out", type=run_folder_path, required=default_out is None, default=default_out,
                   help="run folder; holds every stage's output and results.csv")
    p.add_argument("--num-cpus", type=int, metavar="N",
                   help="local mode: CPUs this command's Ray instance uses (default: all); run several "
                   "experiments side by side with a share each")
    p.add_argument("--dashboard", action="store_true", help="local mode: start the Ray dashboard (127.0.0.1)")
    p.add_argument("--no-dashboard", action="store_true", help=argparse.SUPPRESS)  # the default; kept for scripts
    p.add_argument("--keep-ray-logs", action="store_true",
                   help="local mode: keep the Ray instance's session folder (logs) after the command")
    p.add_argument("--force-config", action="store_true",
                   help="resume a run folder with settings that differ from the ones it was made with "
                   "(the change is recorded in run.log and record.json)")


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
    folder.add_argument("--images", type=as_path, required=True, help="folder of RGB frames")
    folder.add_argument("--masks", type=as_path, help="folder of masks with the same stems (omit for an unlabeled pool)")
    folder.add_argument("--out", type=as_path, required=True, help="manifest to write (POOL.parquet)")
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
    video.add_argument("--out", type=as_path, required=True, help="manifest to write (POOL.parquet)")
    video.add_argument("--masks", type=as_path,
                       help="folder of masks named FRAME_ID.png (rows without one stay unlabeled)")
    video.add_argument("--class-map", help="mask value -> class id, as for `ingest folder`")
    video.add_argument("--class-names", help="comma-separated class names for --class-map")
    video.add_argument("--split", choices=["video"], default="video", help="whole videos per split (the only choice)")
    video.add_argument("--fractions", help="pool,val,test shares of frames, whole videos per split (default: "
                       "0.7,0.15,0.15 with --masks; without masks every frame is in the pool, 1,0,0: an unlabeled "
                       "archive; give e.g. 0.8,0,0.2 to hold out test videos whose frames people annotate)")
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
    report.add_argument("run", type=run_folder_path, help="the run folder (--out of alges run)")
    report.add_argument("--metric", choices=["dice", "miou"], default="dice", help="metric of the AULC table")
    report.add_argument("--baseline", action="append", default=[], metavar="STRATEGY",
                        help="compare every strategy with this one too, paired by seed (random always; repeatable)")
    report.add_argument("--target-fractions", type=_fractions, default=None, metavar="F,F",
                        help="frames-to-target at these fractions of the full-data reference's metric "
                        "(default 0.9,0.95; needs loop.full_data_reference: true)")
    report.add_argument("--target-dice", type=_dice, default=None, metavar="D",
                        help="the forecast's target: frames each strategy is expected to need to reach Dice D "
                        "(an extrapolation; default: the full-data reference's Dice where the run has one)")
    label = sub.add_parser(
        "label", help="import people's labels for a run's pending query batch (loop.oracle: human/labelstudio)",
        description="Label the batch that waits for people (the first batch and its test frames, or a round's "
        "picks), all or nothing: from "
        "a folder of masks (MASKS/FRAME_ID.<ext>, in the pool's encoding) or from an annotation tool's export "
        "(Label Studio JSON, CVAT XML/zip incl. Segmentation mask 1.1, COCO JSON; `labelstudio` pulls the "
        "batch from the configured server). Then rerun `alges run`.")
    label.add_argument("--out", type=run_folder_path, required=True, help="the run folder")
    source = label.add_mutually_exclusive_group(required=True)
    source.add_argument("--masks", type=Path, help="folder of masks named FRAME_ID.png")
    source.add_argument("--from", dest="source", metavar="EXPORT",
                        help="an annotation tool's export of the batch, or `labelstudio` (loop.oracle: labelstudio)")
    label.add_argument("--strategy", help="which strategy's batch (needed only when several batches wait)")
    label.add_argument("--seed", type=int, help="which seed's batch (needed only when several batches wait)")
    label.add_argument("--format", choices=FORMAT_NAMES, help="the export's format (default: detected)")
    label.add_argument("--pick", choices=["only", "latest"], default="only",
                       help="frames with several annotations: refuse (only, default) or take the latest")
    label.add_argument("--unpainted", choices=["ignore", "refuse"],
                       help="pixels nobody painted: the pool's ignore value, or refuse the import "
                       "(default: ignore when the pool's encoding has an ignore value)")
    export = sub.add_parser(
        "export", help="write the pending query batch for Label Studio, CVAT or COCO, with predicted masks",
        description="Write the pending batch's frames, the masks predicted by the model that picked it (as "
        "pre-annotations) and the class names/colours for an annotation tool, with a README on how to load it. "
        "Bring the labels back with `alges label --from`.")
    export.add_argument("--out", type=run_folder_path, required=True, help="the run folder")
    export.add_argument("--strategy", help="which strategy's batch (needed only when several batches wait)")
    export.add_argument("--seed", type=int, help="which seed's batch (needed only when several batches wait)")
    export.add_argument("--format", choices=FORMAT_NAMES, required=True)
    export.add_argument("--dest", type=Path, help="folder to write (default: RUN/STRATEGY/seed_S/round_RR/export_FORMAT)")
    export.add_argument("--document-root", type=Path,
                        help="labelstudio: the server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (default: the "
                        "folder above --dest); image URLs are relative to it")
    return parser


@contextlib.contextmanager
def _existing_run(args: argparse.Namespace):
    """(config, Experiment) of the run folder ``args.out``, its lock held (label, export)."""
    from alges_dist.config import load_config
    from alges_dist.loop import Experiment, resolve_pool
    from alges_dist.run_folder import RunFolderLock

    if not (args.out / "config.yaml").is_file():
        raise FileNotFoundError(f"{args.out} is not a run folder: config.yaml is missing")
    with RunFolderLock(args.out, " ".join(args.argv)):
        _log_to(args.out, args.argv)
        cfg = load_config(args.out / "config.yaml")
        yield cfg, Experiment(cfg, args.out, resolve_pool(cfg))


def _label(args: argparse.Namespace) -> int:
    from alges_dist import handoff, people

    with _existing_run(args) as (cfg, exp):
        batch = people.pending_batch(exp, args.strategy, args.seed)
        if args.source is None:
            copies = people.import_labels(exp, batch, args.masks)
            handoff.write_correction(batch.folder, handoff.effort_of_masks(batch.folder, copies,
                                                                           people.batch_manifest(exp, batch)))
        else:  # an annotation tool's export: checked whole, re-encoded into the pool's encoding, then imported
            _check_unpainted(args.unpainted, people.batch_manifest(exp, batch).encoding)
            source, fmt = Path(args.source), args.format
            if args.source == "labelstudio":
                from alges_dist.annotation.labelstudio_api import client_from_env

                client = client_from_env(cfg.labelstudio.url, cfg.labelstudio.token_env)
                source, fmt = handoff.pull_from_labelstudio(batch, client), "labelstudio"
            converted = handoff.labels_from_export(batch, people.batch_manifest(exp, batch), source, fmt=fmt,
                                                   pick_latest=args.pick == "latest", unpainted=args.unpainted)
            people.import_labels(exp, batch, converted.folder)
            handoff.write_correction(batch.folder, converted.effort)
    print(f"labeled {batch.name}; rerun `alges run` to continue")
    return 0


def _check_unpainted(unpainted: str | None, encoding) -> None:
    """``--unpainted ignore`` needs an ignore value in the pool's encoding: refused naming the flag,
    before a server is asked for anything."""
    from alges_dist.annotation.pool_encoding import ignore_value

    if unpainted == "ignore" and ignore_value(encoding) is None:
        raise InputError("--unpainted ignore: unpainted pixels cannot be ignored: the pool's mask encoding has no "
                         "ignore value; use --unpainted refuse, or paint every pixel")


def _export(args: argparse.Namespace) -> int:
    from alges_dist import people
    from alges_dist.handoff import export_batch

    with _existing_run(args) as (cfg, exp):
        batch = people.pending_batch(exp, args.strategy, args.seed)
        dest = export_batch(cfg, exp, batch, people.batch_manifest(exp, batch), args.format, args.dest,
                            document_root=args.document_root)
    print(f"exported {batch.name} for {args.format}: {dest} (see its README.md)")
    return 0


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(f) for f in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 0.9,0.95") from None
    if not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must be in (0, 1], got {text!r}")
    return values


def _dice(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number, e.g. 0.8") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a Dice lies in (0, 1], got {text!r}")
    return value


def _report(args: argparse.Namespace) -> int:
    from alges_dist.report import TARGET_FRACTIONS, write_report

    _log_to(args.run, args.argv)
    path = write_report(args.run, metric=args.metric, baselines=args.baseline,
                        target_fractions=args.target_fractions or TARGET_FRACTIONS, target_dice=args.target_dice)
    print((args.run / "report" / "aulc.md").read_text())
    print((args.run / "report" / "headline.md").read_text())
    print(f"report: {path}")
    return 0


def _log_to(run: Path, argv: list[str]) -> None:
    """Append this command's log to RUN/run.log (the run folder's history); main() detaches it."""
    run.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
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
        default = "0.7,0.15,0.15" if args.masks else "1,0,0"  # an archive without masks: all frames in the pool
        fractions = tuple(float(f) for f in (args.fractions or default).split(","))
        pixels = {} if args.max_pixels is None else {"max_pixels": args.max_pixels}
        table = ingest_video(args.videos, args.out, fps=args.fps, masks=args.masks, encoding=encoding,
                             fractions=fractions, skip_bad=args.skip_bad, **pixels)
        print(f"{table.num_rows} frames of {len(set(table['video_id'].to_pylist()))} videos; per-video facts in "
              f"{sidecar_path(args.out)}")
    else:
        from alges_dist.config import load_config
        from alges_dist.data.cholecseg8k import (
            CHOLECSEG8K_ENCODINGS,
            ingest_cholecseg8k,
        )

        split = load_config(args.config).data.split_videos if args.config else None
        table = ingest_cholecseg8k(args.root, args.out, split_videos=split,
                                   encoding=CHOLECSEG8K_ENCODINGS[args.mask_values])
    counts = {s: int(sum(1 for v in table["split"].to_pylist() if v == s)) for s in ("pool", "val", "test")}
    print(f"wrote {args.out}: {table.num_rows} frames ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    return 0


def _rounds(args: argparse.Namespace) -> int:
    from alges_dist.config import load_config
    from alges_dist.console import Console, native_stderr_to, quiet_ray_data
    from alges_dist.distributed.runtime import RaySession, raise_on_signals
    from alges_dist.loop import Experiment, WaitingForLabels, resolve_pool
    from alges_dist.report import format_results, write_report
    from alges_dist.run_folder import RunFolderLock

    # --pool is an override like any other, so RUN/config.yaml records the pool used
    pool_override = [] if args.pool is None else [f"data.pool={args.pool if args.pool == 'demo' else as_path(args.pool).resolve()}"]
    cfg = load_config(args.config, [*args.overrides, *pool_override])
    demo = None
    if cfg.data.pool == "demo":
        # generated (first run only: 3-4 s) while Ray starts, then the config names the file it used
        from concurrent.futures import ThreadPoolExecutor

        demo = ThreadPoolExecutor(max_workers=1, thread_name_prefix="demo-pool").submit(resolve_pool, cfg)
    else:
        pool = resolve_pool(cfg)
    if args.out.exists() and not args.out.is_dir():
        raise NotADirectoryError(f"--out {args.out} is a file; give a folder for the run")
    until = args.command if args.command in ("train", "score", "select") else None
    rounds = 1 if args.command in ("round", "train", "score", "select") else None
    runs = [(strategy, seed) for seed in cfg.loop.seeds for strategy in cfg.loop.arms]
    # the lock first: a second writer is refused at once, not after Ray and the pool check
    with RunFolderLock(args.out, " ".join(args.argv)), \
            RaySession(num_cpus=args.num_cpus, dashboard=args.dashboard, keep_logs=args.keep_ray_logs) as session:
        import ray

        if demo is not None:
            pool = demo.result()
            cfg = load_config(args.config, [*args.overrides, f"data.pool={pool.resolve()}"])
        args.driver_node_id = ray.get_runtime_context().get_node_id()
        if threading.current_thread() is threading.main_thread():
            raise_on_signals()  # again: Ray's core worker installs a SIGTERM handler of its own (it aborts)
        exp = Experiment(cfg, args.out, pool)
        exp.check()  # the pool and the config against it and the cluster, before anything is written
        with contextlib.ExitStack() as stack:
            _log_to(args.out, args.argv)
            log.info("%s", session.description)
            exp.prepare(force_config=args.force_config)
            if session.owned:  # this process is the command's own: Ray's native lines go to a log file
                stack.enter_context(native_stderr_to(args.out / "ray-driver.log"))
            # after the redirect: the console writes to the new sys.stderr, which still is the console
            console = Console(len(runs) * (cfg.loop.n_rounds + 1 if rounds is None else 1))
            args.console = console
            quiet_ray_data(console.tty)

            def on_stage(event: str, stage: str, strategy: str, seed: int, r: int, info: dict) -> None:
                console.stage(event, stage, strategy, seed, r, info)
                if event == "done" and r >= 0 and stage == exp.stages(r)[-1]:
                    console.round_done()

            exp.on_stage, exp.on_progress = on_stage, console.progress
            try:
                for strategy, seed in runs:
                    exp.advance(strategy, seed, rounds=rounds, until=until)
            except WaitingForLabels as waiting:
                console.close()
                print(waiting)
                return 3
            finally:
                console.close()
            print(format_results(exp.results_path))
            if args.command in ("run", "demo"):
                report = write_report(args.out, predict=_predict_on_worker)
                print((report.parent / "headline.md").read_text() + f"report: {report}")
    return 0


def _predict_on_worker(*args: Any) -> Any:
    """The report's predicted masks (``predictions.predict_masks``) on a warm Ray worker: the driver
    never imports torch and smp (4-5 s; issue 24)."""
    from alges_dist.distributed.tasks import on_worker
    from alges_dist.predictions import predict_masks

    return on_worker(predict_masks, *args)[0]


# What a user can fix: our own classes (a setting, file or row named in the message, a failed
# check, a busy folder) and the OS's (a missing file, a full disk). Anything else is a defect.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (AlgesError, OSError)


def _record_command(args: argparse.Namespace, code: int, started: float) -> None:
    """RUN/commands.jsonl: the command, where its driver ran, its exit status, seconds and peak RSS."""
    from alges_dist.run_folder import append_command, peak_rss_mb

    out = getattr(args, "out", None) if args.command != "ingest" else None
    if out is None or not (Path(out) / "config.yaml").exists():
        return
    append_command(out, {"argv": args.argv, "exit": code, "seconds": round(time.time() - started, 2),
                         "driver_node_id": getattr(args, "driver_node_id", ""), "driver_pid": os.getpid(),
                         "driver_peak_rss_mb": round(peak_rss_mb(), 1)})


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.filename}: {exc.strerror}"  # a full disk, a folder given for a file, ...
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _run_log() -> Path | None:
    """The run.log this command writes (``_log_to``), if it got that far."""
    files = [h for h in log.handlers if isinstance(h, logging.FileHandler)]
    return Path(files[0].baseFilename) if files else None


def _stage(args: argparse.Namespace) -> str:
    """Where the command was: the round stage the console last announced, else the command."""
    console = getattr(args, "console", None)
    return console.where if console is not None else args.command


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in RUN/run.log
    # The console gets warnings (everything with -v); run.log gets the whole story (_log_to).
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:  # the level is the handler's: records propagate past levels
        handler.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    log.setLevel(logging.DEBUG)
    from alges_dist.distributed.runtime import raise_on_signals

    if threading.current_thread() is threading.main_thread():
        raise_on_signals()  # SIGTERM (a scheduler stopping the job) ends the command like Ctrl-C
    started, code = time.time(), 1
    try:
        handler = {"ingest": _ingest, "label": _label, "export": _export, "report": _report}.get(args.command, _rounds)
        code = handler(args)
        return code
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: Ray is shut down on the way out
        console = getattr(args, "console", None)
        where = console.where if console is not None else "start-up"
        cause = f" ({stop})" if str(stop) else ""
        print(f"alges {args.command}: interrupted{cause} during {where}; nothing half-written counts as done: "
              f"rerun the same command to resume", file=sys.stderr)
        log.info("interrupted%s during %s", cause, where)  # run.log; the console has the line above, once
        code = 130
        return code
    except EXPECTED_ERRORS as exc:
        # Bad input or a failed check: one clear line, not a traceback (-v shows the traceback).
        if args.verbose:
            raise
        print(f"alges {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        log.debug("alges %s failed: %s", args.command, exc, exc_info=True)  # run.log keeps the traceback
        code = 2
        return code
    except Exception as exc:  # a defect of ours: say so, and where its traceback is
        if args.verbose:
            raise
        log.debug("alges %s: internal error in %s", args.command, _stage(args), exc_info=True)  # run.log only
        run_log = _run_log()
        where = f"traceback in {run_log}" if run_log else "rerun with -v for the traceback"
        print(f"alges {args.command}: internal error in {_stage(args)}: {type(exc).__name__}: {_one_line(exc)}, "
              f"{where}", file=sys.stderr)
        code = 1
        return code
    finally:
        _record_command(args, code, started)
        for handler in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
            log.removeHandler(handler)
            handler.close()


if __name__ == "__main__":
    sys.exit(main())
