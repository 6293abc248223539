"""The run folder: where every output of an experiment lives, its result columns and writers.

The loop writes through this module and the report reads through it, so neither
imports the other and a copied run folder renders anywhere::

    RUN/config.yaml                      resolved config of the run
    RUN/run.log                          the log of every command run on this folder
    RUN/initial/manifest.parquet         the initial labeled set: one per experiment,
                                         shared by every strategy and seed (as the paper)
    RUN/initial/seed_S/init.pt           initial weights of seed S (every retrain starts here)
    RUN/initial/seed_S/round_00/         round-0 model, eval and scores of seed S, shared by
                                         all strategies (same labels, same weights)
    RUN/STRATEGY/seed_S/manifest.parquet this run's labels (labeled_round per frame)
    RUN/STRATEGY/seed_S/round_RR/        model.pt, eval.json, scores/, errors.parquet (RR > 0),
                                         selection.parquet, hand-off files, record.json
    RUN/initial/RULE/                    loop.initial_strategies (a cold-start comparison): the
                                         first batch of each cold-start rule, as RUN/initial/ (its
                                         manifest, selection, seed_S/round_00/); the arms are named
                                         RULE+STRATEGY (RUN/RULE+STRATEGY/seed_S/...); init.pt stays shared
    RUN/reference/manifest.parquet       loop.full_data_reference: every pool frame with a mask
    RUN/reference/seed_S/                model.pt, record.json (test metrics) of seed S's full-data model
    RUN/results.csv                      one row per (strategy, seed, round)
    RUN/results_per_class.csv            one row per (strategy, seed, round, class): Dice per class
    RUN/reference.csv, reference_per_class.csv  the full-data reference, per seed (and class)
    RUN/queries.parquet                  one row per picked frame
    RUN/report/                          alges report: curves, tables, report.html
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from alges_dist.arms import arm_name, split_arm  # noqa: F401  (arm_name: the layout's names, re-exported)
from alges_dist.data.atomic import atomic_path, atomic_write_text, temp_owner
from alges_dist.data.manifest import MASK_ENCODING_KEY, MaskEncoding
from alges_dist.errors import AlgesError, InputError

RESULT_COLUMNS = ["strategy", "seed", "round", "n_labeled", "dice", "miou", "mdice"]
QUERY_COLUMNS = ["strategy", "seed", "round", "pick_rank", "frame_id", "value"]
# dice: the paper's Dice of the class (mean over test images); dataset_dice: 2TP/(2TP+FP+FN)
# over the test split, empty where the class is absent from predictions and masks alike.
PER_CLASS_COLUMNS = ["strategy", "seed", "round", "n_labeled", "class_id", "class_name", "dice", "dataset_dice"]
REFERENCE_COLUMNS = ["seed", "n_labeled", "dice", "miou", "mdice"]
REFERENCE_PER_CLASS_COLUMNS = ["seed", "n_labeled", "class_id", "class_name", "dice", "dataset_dice"]
_CLASS_FIELDS = ("class_id", "class_name", "dice", "dataset_dice")


class RunLayout:
    """Where each output of a run folder lives.

    ``strategy`` arguments are arm names: a round strategy, or ``RULE+STRATEGY`` when the
    experiment compares cold starts (the arm's round 0 then lives under ``RUN/initial/RULE/``).
    """

    def __init__(self, out: Path):
        self.out = Path(out)

    @property
    def config_path(self) -> Path:
        return self.out / "config.yaml"

    @property
    def results_path(self) -> Path:
        return self.out / "results.csv"

    @property
    def queries_path(self) -> Path:
        return self.out / "queries.parquet"

    @property
    def report_dir(self) -> Path:
        return self.out / "report"

    @property
    def results_per_class_path(self) -> Path:
        return self.out / "results_per_class.csv"

    @property
    def reference_results_path(self) -> Path:
        return self.out / "reference.csv"

    @property
    def reference_per_class_path(self) -> Path:
        return self.out / "reference_per_class.csv"

    @property
    def initial_manifest_path(self) -> Path:
        return self.out / "initial" / "manifest.parquet"

    def initial_dir(self, initial: str | None = None) -> Path:
        """The first batch's folder: ``RUN/initial``, or ``RUN/initial/RULE`` of one cold start of several."""
        return self.out / "initial" if initial is None else self.out / "initial" / initial

    def initial_manifest_of(self, arm: str) -> Path:
        """The initial labeled set the arm starts from."""
        return self.initial_dir(split_arm(arm)[0]) / "manifest.parquet"

    @property
    def reference_manifest_path(self) -> Path:
        return self.out / "reference" / "manifest.parquet"

    def reference_dir(self, seed: int) -> Path:
        return self.out / "reference" / f"seed_{seed}"

    def reference_model_path(self, seed: int) -> Path:
        return self.reference_dir(seed) / "model.pt"

    def reference_record_path(self, seed: int) -> Path:
        return self.reference_dir(seed) / "record.json"

    def init_weights_path(self, seed: int) -> Path:
        return self.out / "initial" / f"seed_{seed}" / "init.pt"

    def run_dir(self, strategy: str, seed: int) -> Path:
        return self.out / strategy / f"seed_{seed}"

    def round_dir(self, strategy: str, seed: int, r: int) -> Path:
        return self.run_dir(strategy, seed) / f"round_{r:02d}"

    def model_dir(self, strategy: str, seed: int, r: int) -> Path:
        # Round 0 trains on the same initial set from the same weights for every
        # strategy: train, evaluate and score it once per seed.
        if r == 0:  # ... of the same cold start
            return self.initial_dir(split_arm(strategy)[0]) / f"seed_{seed}" / "round_00"
        return self.round_dir(strategy, seed, r)

    def model_path(self, strategy: str, seed: int, r: int) -> Path:
        return self.model_dir(strategy, seed, r) / "model.pt"

    def eval_path(self, strategy: str, seed: int, r: int) -> Path:
        return self.model_dir(strategy, seed, r) / "eval.json"

    def scores_dir(self, strategy: str, seed: int, r: int) -> Path:
        return self.model_dir(strategy, seed, r) / "scores"

    def selection_path(self, strategy: str, seed: int, r: int) -> Path:
        return self.round_dir(strategy, seed, r) / "selection.parquet"

    def record_path(self, strategy: str, seed: int, r: int) -> Path:
        return self.round_dir(strategy, seed, r) / "record.json"

    def manifest_path(self, strategy: str, seed: int) -> Path:
        return self.run_dir(strategy, seed) / "manifest.parquet"

    # ---- writers -------------------------------------------------------------------------
    def write_outputs(self, strategies: list[str], seeds: list[int], n_rounds: int) -> None:
        """Rebuild RUN/results.csv, results_per_class.csv, queries.parquet and the reference's
        CSVs from the round and reference folders."""
        rows, per_class, queries = [], [], []
        names = self.class_names()
        for strategy in strategies:
            for seed in seeds:
                for r in range(n_rounds + 1):
                    record = self.record_path(strategy, seed, r)
                    if record.exists():
                        d = json.loads(record.read_text())
                        rows.append({k: d[k] for k in RESULT_COLUMNS})
                        per_class += _per_class_rows(d, names, record, PER_CLASS_COLUMNS)
                    selection = self.selection_path(strategy, seed, r)
                    if selection.exists():
                        t = pq.read_table(selection)
                        n = t.num_rows
                        queries.append(pa.table({
                            "strategy": [strategy] * n, "seed": pa.array([seed] * n, pa.int32()),
                            "round": pa.array([r] * n, pa.int32()), "pick_rank": t["pick_rank"],
                            "frame_id": t["frame_id"], "value": t["value"],
                        }))
        _write_rows(self.results_path, RESULT_COLUMNS, rows)
        if per_class:
            _write_rows(self.results_per_class_path, PER_CLASS_COLUMNS, per_class)
        references = [(self.reference_record_path(s), json.loads(self.reference_record_path(s).read_text()))
                      for s in seeds if self.reference_record_path(s).exists()]
        if references:
            _write_rows(self.reference_results_path, REFERENCE_COLUMNS,
                        [{k: d[k] for k in REFERENCE_COLUMNS} for _, d in references])
            _write_rows(self.reference_per_class_path, REFERENCE_PER_CLASS_COLUMNS,
                        [row for path, d in references
                         for row in _per_class_rows(d, names, path, REFERENCE_PER_CLASS_COLUMNS)])
        if queries:
            with atomic_path(self.queries_path) as tmp:
                pq.write_table(pa.concat_tables(queries), tmp)


    def class_names(self) -> list[str] | None:
        """The pool's class names, from an initial manifest's encoding (None before one exists)."""
        found = [self.initial_manifest_path, *sorted(self.initial_dir().glob("*/manifest.parquet"))]
        found = [p for p in found if p.exists()]
        if not found:
            return None
        metadata = pq.read_schema(found[0]).metadata or {}
        if MASK_ENCODING_KEY not in metadata:
            raise InputError(f"{found[0]} has no mask encoding in its metadata")
        return MaskEncoding.from_json(metadata[MASK_ENCODING_KEY]).class_names


def _per_class_rows(record: dict[str, Any], names: list[str] | None, source: Path,
                    columns: list[str]) -> list[dict[str, Any]]:
    """One row per class of a round or reference record (none for records written before
    evaluation reported classes)."""
    dice = record.get("dice_per_class")
    if dice is None:
        return []
    dataset = record["dataset_dice_per_class"]
    if names is not None and len(names) != len(dice):
        raise InputError(f"{source}: {len(dice)} per-class Dice values but the pool encodes {len(names)} classes")
    base = {k: record[k] for k in columns if k not in _CLASS_FIELDS}  # which run, round and seed
    return [{**base, "class_id": k, "class_name": names[k] if names else f"class_{k}", "dice": d,
             "dataset_dice": "" if dataset[k] is None else dataset[k]} for k, d in enumerate(dice)]


def _write_rows(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def read_results(results_csv: Path) -> list[dict[str, Any]]:
    """Rows of results.csv (or results_per_class.csv, reference.csv) with numbers as numbers;
    an empty cell (a class absent everywhere) is None."""
    with open(results_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    ints, floats = ("seed", "round", "n_labeled", "class_id"), ("dice", "miou", "mdice", "dataset_dice")

    def number(key: str, value: str) -> Any:
        if key in ints:
            return int(value)
        if key in floats:
            return float(value) if value != "" else None
        return value

    return [{k: number(k, v) for k, v in r.items()} for r in rows]


def package_versions() -> dict[str, str]:
    """Versions recorded in every round record."""
    out = {"python": platform.python_version()}
    for name in ("torch", "ray", "segmentation-models-pytorch", "numpy", "pyarrow", "faiss-cpu", "faiss-gpu"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def append_command(out: Path, entry: dict[str, Any]) -> None:
    """One line per command run on the folder (RUN/commands.jsonl): what ran, where, how it ended,
    its seconds and the driver's peak memory. Appends are single small writes (O_APPEND)."""
    line = json.dumps(entry, default=str) + "\n"
    fd = os.open(Path(out) / "commands.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB, since its own start.

    Linux's VmHWM, not getrusage's ru_maxrss: that one carries the high-water mark of the
    process that exec'd us (a big parent makes a small child look big)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# ---- one writer at a time -------------------------------------------------------------------
class RunFolderBusy(AlgesError, RuntimeError):
    """Another process holds the run folder's lock."""


class RunFolderLock:
    """An exclusive OS lock (``flock``) on ``RUN/.lock`` for the life of one writing command.

    The kernel releases it when the process dies, however it dies, so a crash never leaves
    a stale lock. The holder writes its PID and command into the file; a second writer fails
    at once naming them. Commands take it before anything else (Ray, the pool check), so a
    second writer is refused at once; a folder the lock created and nothing else wrote is
    removed again on release. Readers (``alges report``) take no lock. On taking the lock, crash
    litter of earlier writers (temp siblings of atomic writes, unfinished score folders) is
    removed: nobody else can be writing it.
    """

    def __init__(self, out: Path, command: str):
        self.path, self.command, self._fd = Path(out) / ".lock", command, None

    def __enter__(self) -> RunFolderLock:
        import fcntl

        self._created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            self._created = False
            raise RunFolderBusy(
                f"run folder {self.path.parent} is in use by pid {holder.get('pid', '?')} "
                f"(`alges {holder.get('command', '?')}`, since {holder.get('since', '?')}); one command "
                "writes a run folder at a time: wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": self.command,
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self._fd = fd
        remove_crash_litter(self.path.parent)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            folder = self.path.parent
            if self._created and os.listdir(folder) == [self.path.name]:
                # a command refused before it wrote anything (the pool check) leaves no folder behind;
                # removed while the lock is held, so no other writer is inside
                with contextlib.suppress(OSError):
                    self.path.unlink()
                    folder.rmdir()
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


LITTER_PATTERNS = (".*.tmp", ".scores-*", ".*.partial")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_crash_litter(out: Path) -> list[Path]:
    """Remove what an interrupted writer left: ``.NAME.PID-HEX.tmp`` files of atomic writes
    whose process is gone, ``.scores-*`` folders of unfinished scoring jobs, ``.*.partial``
    label imports. The temp of a process still running is not litter: ``alges report``
    (no lock) writes beside a writer, and its ``os.replace`` must find its temp."""
    removed = []
    for pattern in LITTER_PATTERNS:
        for path in Path(out).rglob(pattern):
            owner = temp_owner(path) if pattern == ".*.tmp" else None
            if owner is not None and _alive(owner):
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# ---- the settings a run folder was made with ---------------------------------------------------
class SettingsChanged(InputError):
    """A resumed run folder was made with other settings or another pool."""


def fingerprint(config: dict[str, Any], pool_sha256: str, *, ignore: frozenset[str]) -> dict[str, Any]:
    """The resolved settings that change results (every config key but ``ignore``) and the
    pool manifest's content hash."""
    flat = {k: v for k, v in _flatten(config).items() if k not in ignore and k.split(".")[0] + ".*" not in ignore}
    return {"config": flat, "pool_sha256": pool_sha256}


def settings_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints ("train.epochs: 4 -> 5")."""
    out = [f"{k}: {old['config'].get(k, '(unset)')!r} -> {new['config'].get(k, '(unset)')!r}"
           for k in sorted(set(old["config"]) | set(new["config"])) if old["config"].get(k) != new["config"].get(k)]
    if old.get("pool_sha256") != new.get("pool_sha256"):
        out.append(f"pool manifest content: sha256 {str(old.get('pool_sha256'))[:12]} -> "
                   f"{str(new.get('pool_sha256'))[:12]}")
    return out


def check_settings(layout: RunLayout, new: dict[str, Any], *, force: bool) -> list[str]:
    """Record the fingerprint on a new run folder; on an existing one refuse other settings
    (naming them) unless ``force``, which records the change. Returns the changes accepted."""
    path = layout.out / "fingerprint.json"
    if not path.exists():
        atomic_write_text(path, json.dumps({**new, "forced_changes": []}, indent=1, default=str))
        return []
    old = json.loads(path.read_text())
    changes = settings_diff(old, new)
    if changes and not force:
        raise SettingsChanged(
            f"{layout.out} was made with other settings; resuming would mix them: {'; '.join(changes)}. "
            "Rerun with the original settings, use another --out, or pass --force-config to accept the change "
            "(recorded in run.log and record.json)")
    if changes:
        history = old.get("forced_changes", []) + [{"at": time.strftime("%Y-%m-%d %H:%M:%S"), "changes": changes}]
        atomic_write_text(path, json.dumps({**new, "forced_changes": history}, indent=1, default=str))
    return changes


def forced_changes(layout: RunLayout) -> list[dict[str, Any]]:
    path = layout.out / "fingerprint.json"
    return json.loads(path.read_text()).get("forced_changes", []) if path.exists() else []


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value) and name.count(".") < 1:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out
