"""People in the loop: batches handed to annotators, and their labels brought back.

A :class:`~alges_dist.handoff.Batch` is a round's picks or the first batch of a cold start;
this module decides which batches wait for people, hands one off (CSV + contact sheet, or a
Label Studio project) and imports people's masks for it, all or nothing. ``exp`` is the
run's :class:`~alges_dist.loop.Experiment` (its layout, config and pool). The files and
formats themselves are ``handoff``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alges_dist.data.manifest import Manifest, read_manifest, set_uris
from alges_dist.data.rounds import label_frames
from alges_dist.errors import InputError
from alges_dist.handoff import (
    Batch,
    batch_images,
    batch_key,
    collect_masks,
    push_to_labelstudio,
    write_batch,
)


class WaitingForLabels(RuntimeError):
    """People have frames to annotate; the run resumes once their labels are imported."""


def round_batch(exp: Any, strategy: str, seed: int, r: int) -> Batch:
    """Round ``r``'s query batch of ``strategy``/``seed``, as the hand-off sees it."""
    return Batch(f"round {r} of {strategy}/seed {seed}", exp.round_dir(strategy, seed, r),
                 exp.selection_path(strategy, seed, r), exp.model_path(strategy, seed, r),
                 batch_key(exp, f"{strategy}/seed_{seed}/round_{r:02d}"), f" --strategy {strategy} --seed {seed}",
                 strategy, seed, r)


def batch_manifest(exp: Any, batch: Batch) -> Manifest:
    """The manifest a batch's frames are read from: the run's, or the pool's for the first batch."""
    if batch.strategy is None:
        return read_manifest(exp.pool)
    return exp.manifest(batch.strategy, batch.seed)


def hand_off(exp: Any, batch: Batch) -> None:
    """Give ``batch`` to people (to_annotate.csv + contact sheet; Label Studio tasks with
    ``loop.oracle: labelstudio``) and stop the run until ``alges label`` brings the labels."""
    picks = batch.picks()
    frame_ids, splits = picks["frame_id"].to_pylist(), picks["split"].to_pylist()
    manifest = batch_manifest(exp, batch)
    sheet = write_batch(batch.folder, frame_ids, manifest, splits)
    n_test = splits.count("test")
    what = f"{len(frame_ids) - n_test} frames" + (f" and {n_test} test frames" if n_test else "")
    label = f"alges label --out {exp.out}" + (batch.label_args if len(pending_batches(exp)) > 1 else "")
    if exp.cfg.loop.oracle == "labelstudio":
        from alges_dist.annotation.labelstudio_api import client_from_env

        settings = exp.cfg.labelstudio
        pushed = push_to_labelstudio(exp.cfg, exp, batch, manifest,
                                     client_from_env(settings.url, settings.token_env))
        raise WaitingForLabels(
            f"{batch.name}: {what} await annotation in Label Studio project {pushed['project']!r} at "
            f"{pushed['url']}. When all are annotated: {label} --from labelstudio, and rerun this command")
    raise WaitingForLabels(
        f"{batch.name}: {what} await annotation, listed in {sheet.with_suffix('.csv')} (contact sheet {sheet}). "
        f"Save one mask per frame as FRAME_ID.png in a folder, then: {label} --masks FOLDER (or export them "
        f"for a tool: alges export --out {exp.out} --format labelstudio|cvat|coco, then {label} --from "
        "EXPORT), and rerun this command")


def pending_batches(exp: Any) -> list[Batch]:
    """Batches handed to people whose labels are not in yet (the first batch, or rounds' batches)."""
    if exp.first_batch.pending():
        return [exp.first_batch.batch()]
    if not exp.initial_manifest_path.exists():
        return []
    return [round_batch(exp, strategy, seed, r) for seed in exp.cfg.loop.seeds for strategy in exp.cfg.loop.arms
            if exp.manifest_path(strategy, seed).exists()
            for r in range(exp.cfg.loop.n_rounds)
            if exp.stage_done("select", strategy, seed, r) and not exp.stage_done("label", strategy, seed, r)]


def pending_batch(exp: Any, strategy: str | None = None, seed: int | None = None) -> Batch:
    """The one pending batch (narrowed by ``strategy``/``seed``); ValueError listing them otherwise."""
    pending = pending_batches(exp)
    chosen = [b for b in pending if (strategy is None or b.strategy == strategy) and (seed is None or b.seed == seed)]
    if len(chosen) == 1:
        return chosen[0]
    listed = "; ".join(f"{b.name} (alges label --out {exp.out}{b.label_args} ...)" for b in pending)
    if not chosen:
        which = " ".join(x for x in (strategy and f"--strategy {strategy}", seed is not None and f"--seed {seed}")
                         if x)
        raise InputError(f"{exp.out} has no batch waiting for labels{' for ' + which if which else ''}"
                         + (f"; waiting: {listed}" if pending else ""))
    raise InputError(f"{len(chosen)} batches of {exp.out} wait for labels; name one with --strategy and --seed: "
                     f"{listed}")


def import_labels(exp: Any, batch: Batch, masks: Path) -> dict[str, str]:
    """Label ``batch``'s picks with people's masks (``masks/FRAME_ID.png``); returns frame_id -> mask.

    All or nothing (``handoff.collect_masks``): the masks are validated and copied into
    the batch's folder before the manifest changes. The first batch's test frames get
    their masks (evaluated, never trained on); its pool frames are round 0's labels.
    """
    picks = batch.picks()
    frame_ids = picks["frame_id"].to_pylist()
    table = batch_manifest(exp, batch)
    files = batch_images(batch.folder, frame_ids, table)  # video picks as PNG files
    copies = collect_masks(frame_ids, table._replace(table=set_uris(table.table, "image_uri", files)), masks,
                           batch.folder / "labels")
    if batch.strategy is None:
        train = [f for f, s in zip(frame_ids, picks["split"].to_pylist()) if s == "pool"]
        exp.first_batch.label(train, mask_uris=copies, image_uris=files)
    else:
        label_frames(str(exp.manifest_file(batch.strategy, batch.seed)), frame_ids, batch.round + 1,
                     mask_uris=copies, image_uris=files)
    return copies
