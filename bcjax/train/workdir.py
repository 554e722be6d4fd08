"""A run's folder: writable and with room, holding this run or moved aside for a fresh one."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import tempfile
import time

import jax

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


def is_same_run(workdir: pathlib.Path, config) -> bool:
    """Whether the checkpoints in workdir were written by a run of this identity."""
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


def claim_workdir(config, workdir) -> pathlib.Path:
    """The run's folder, resolved and checked; with fresh_start, another run's files moved aside."""
    workdir = pathlib.Path(workdir).expanduser().resolve()
    check_workdir(workdir)
    # fresh_start replaces another run; a run of this same identity (say, this
    # command restarted after a kill with the flag still set) is resumed.
    if config.fresh_start and not is_same_run(workdir, config):
        if jax.process_index() == 0:
            move_old_run_aside(workdir)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("bcjax fresh_start")
    return workdir
