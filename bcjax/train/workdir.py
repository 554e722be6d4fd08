"""A run's folder: writable and with room, holding this run or moved aside for a fresh one.

A run claims its workdir with its first committed checkpoint. A start that
failed before one (the wrong pretrained weights, a data error, a kill while
compiling) leaves its run identity behind, written when the checkpoint manager
opened; the next start drops it, so that the corrected command is not refused
as "another run".
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import tempfile
import time

import jax

from bcjax.data.datasets import SYNTHETIC_RECORD
from bcjax.train import checkpoint

log = logging.getLogger(__name__)

# What a run writes into its workdir; fresh_start moves all of it aside.
RUN_FILES = (
    "checkpoints",
    "metrics.jsonl",
    "results.json",
    "timing.json",
    "manifest.json",
    "learning_curves.png",
    "confusion_matrix.png",
    "val_predictions.npz",
    "test_predictions.npz",
    "tensorboard",
    "synthetic",
    "reliability.png",
    "roc_curves.png",
    "pr_curves.png",
    "least_grounded.png",
    "curves.json",
    "external",  # bcjax.evaluate's reports score this run's model
)


class WorkdirError(OSError):
    """The workdir cannot hold this run."""


def check_workdir(workdir: pathlib.Path, min_free_bytes: int = 50 * 2**20) -> None:
    """Fails before any compiling when the workdir is unwritable or full."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise WorkdirError(f"The workdir {workdir} is not writable: {e.strerror or e}.") from e
    stat = os.statvfs(workdir)
    free = stat.f_bavail * stat.f_frsize
    if free < min_free_bytes:
        raise WorkdirError(
            f"The workdir {workdir} has only {free / 2**20:.1f} MiB free; a run needs "
            f"at least {min_free_bytes / 2**20:.0f} MiB for checkpoints and logs."
        )


def holds_checkpoint(workdir: pathlib.Path) -> bool:
    """Whether a run has committed a checkpoint in workdir: only then is the workdir its."""
    return bool(checkpoint.committed_steps(workdir / "checkpoints"))


def drop_failed_start(workdir: pathlib.Path) -> None:
    """Removes what a start that committed no checkpoint left to claim the workdir.

    Its run identity (checkpoints/metadata) and the record of the synthetic set it
    chose: the corrected command may differ in either. Its manifest.json is not
    reused either (bcjax.train.run_setup makes the split afresh) and is overwritten.
    """
    if holds_checkpoint(workdir):
        return
    identity = workdir / "checkpoints" / "metadata"
    synthetic_record = workdir / SYNTHETIC_RECORD
    if not (identity.exists() or synthetic_record.exists()):
        return
    log.info(
        "%s holds no checkpoint: an earlier start failed before its first one; "
        "this run takes the workdir.",
        workdir,
    )
    shutil.rmtree(identity, ignore_errors=True)
    synthetic_record.unlink(missing_ok=True)


def is_same_run(workdir: pathlib.Path, config) -> bool:
    """Whether the checkpoints in workdir were written by a run of this identity.

    config: bcjax.specs.Specs, or a config (checkpoint.run_metadata takes either)."""
    saved = checkpoint.saved_metadata(workdir / "checkpoints")
    if saved is None:
        return False
    try:
        checkpoint.check_identity(saved, checkpoint.run_metadata(config))
    except checkpoint.CheckpointMismatchError:
        return False
    return True


def move_old_run_aside(workdir: pathlib.Path) -> pathlib.Path | None:
    """fresh_start: the previous run's files go to workdir/replaced-<time>/, never deleted."""
    present = [workdir / name for name in RUN_FILES if (workdir / name).exists()]
    if not present:
        return None
    stamp, n = time.strftime("replaced-%Y%m%d-%H%M%S"), 0
    while True:
        dest = workdir / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            dest.mkdir()
            break
        except FileExistsError:
            n += 1
    for path in present:
        shutil.move(str(path), str(dest / path.name))
    log.warning(
        "config.fresh_start: moved the previous run in %s to %s; starting afresh.", workdir, dest
    )
    return dest


def claim_workdir(run_specs, workdir) -> pathlib.Path:
    """The run's folder, resolved and checked; a failed start's identity dropped and, with
    fresh_start, another run's files moved aside. run_specs: bcjax.specs.Specs."""
    workdir = pathlib.Path(workdir).expanduser().resolve()
    check_workdir(workdir)
    if jax.process_index() == 0:
        drop_failed_start(workdir)
        # fresh_start replaces another run; a run of this same identity (say, this
        # command restarted after a kill with the flag still set) is resumed.
        if run_specs.run.fresh_start and not is_same_run(workdir, run_specs):
            move_old_run_aside(workdir)
    if jax.process_count() > 1:  # the others look at the workdir once process 0 is done
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("bcjax claim_workdir")
    return workdir
