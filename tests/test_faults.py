"""Training processes killed with SIGKILL (at a random step, and in the middle of
Orbax's asynchronous checkpoint write) restart from the last COMPLETE checkpoint
and end with the parameters and test metrics of an uninterrupted run.

One chain of worker processes (tests/_fault_worker.py) trains one workdir:
  1. killed while writing its first checkpoint (files on disk, not committed),
  2. killed right after a step drawn by a seeded RNG (an async write may be in flight),
  3. killed while writing its first checkpoint again, now with older complete ones,
  4. left to finish.
The uninterrupted reference runs in this process with the same environment
(the workers inherit XLA_FLAGS and the compilation cache from conftest.py).
Also: a kill after the last checkpoint but before the summary files, and a run
identity file torn by a kill during the very first start.

The network is a two-stage ResNet (tests/_fault_worker.tiny_model): every
process traces and compiles the step, and ResNet-18 would take most of the
minute this file may use; faults concern the loop and checkpoints, not the model.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import _events
import jax
import numpy as np
import pytest
from _fault_worker import DONE_MARK, KILLED_MARK, NUM_EPOCHS, tiny_config, tiny_model

from bcjax.data import synthetic
from bcjax.models import family
from bcjax.train import checkpoint, loop

WORKER = pathlib.Path(__file__).with_name("_fault_worker.py")
REPO = WORKER.parents[1]
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a step directory being written
SEED = 20261127
TIMEOUT_S = 180


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic.generate(
        tmp_path_factory.mktemp("busi"), num=48, seed=0, min_size=40, max_size=56
    )


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(family, "create_model", tiny_model)
        results = loop.train_and_evaluate(tiny_config(data), workdir)
    return workdir, results


def _step_dirs(workdir: pathlib.Path) -> dict:
    """Finalised steps, and each uncommitted temporary step directory with its files."""
    root = workdir / "checkpoints"
    names = [p.name for p in root.iterdir()] if root.is_dir() else []
    partial = {
        n: sorted(str(f.relative_to(root / n)) for f in (root / n).rglob("*"))
        for n in names
        if TMP_SUFFIX in n
    }
    return {"final": sorted(int(n) for n in names if n.isdigit()), "partial": partial}


def _launch(data, workdir, kill: str) -> dict:
    proc = subprocess.run(
        [
            sys.executable,
            str(WORKER),
            "--data",
            str(data),
            "--workdir",
            str(workdir),
            "--kill",
            kill,
        ],
        env=dict(os.environ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    resumed = re.search(r"Resumed from \S+ at step (\d+)", proc.stderr)
    return {
        "kill": kill,
        "returncode": proc.returncode,
        "after": _step_dirs(workdir),
        "resumed_at": int(resumed.group(1)) if resumed else None,
        "log": f"--- worker --kill={kill!r} exit {proc.returncode} ---\n{proc.stdout[-1500:]}\n"
        f"{proc.stderr[-3000:]}",
    }


@pytest.fixture(scope="module")
def killed_run(data, reference, tmp_path_factory):
    steps_per_epoch = reference[1]["steps_per_epoch"]
    total = steps_per_epoch * NUM_EPOCHS
    # A step of epoch 2 or 3, so that a checkpoint may still be in flight when it dies.
    kill_step = int(np.random.default_rng(SEED).integers(steps_per_epoch + 1, total))
    workdir = tmp_path_factory.mktemp("killed")
    runs = [
        _launch(data, workdir, kill)
        for kill in ("finalize:1", f"step:{kill_step}", "finalize:1", "")
    ]
    return workdir, runs, steps_per_epoch


def _logs(runs) -> str:
    return "\n".join(r["log"] for r in runs)


def test_every_kill_happened_and_the_last_run_finished(killed_run):
    _, runs, _ = killed_run
    for r in runs[:-1]:
        assert r["returncode"] == -signal.SIGKILL and KILLED_MARK in r["log"], _logs(runs)
    assert runs[-1]["returncode"] == 0 and DONE_MARK in runs[-1]["log"], _logs(runs)


def test_a_kill_mid_write_leaves_an_uncommitted_checkpoint_that_is_never_restored(killed_run):
    _, runs, steps_per_epoch = killed_run
    for i, r in enumerate(runs[:-1]):
        if not r["kill"].startswith("finalize"):
            continue
        # The step being written is the first save after where this run began.
        start = r["resumed_at"] or 0
        written = f"{start + steps_per_epoch}{TMP_SUFFIX}"
        assert written in r["after"]["partial"], _logs(runs)
        assert any(f.startswith("state") for f in r["after"]["partial"][written]), r["after"]
        assert start + steps_per_epoch not in r["after"]["final"]
        # The restart takes the newest finalised step (none: starts afresh).
        newest = max(r["after"]["final"], default=None)
        assert runs[i + 1]["resumed_at"] == newest, _logs(runs)


def test_every_restart_resumes_from_the_newest_complete_checkpoint(killed_run):
    _, runs, _ = killed_run
    for prev, r in zip(runs, runs[1:]):
        assert r["resumed_at"] == max(prev["after"]["final"], default=None), _logs(runs)
    assert runs[0]["resumed_at"] is None


def test_killed_run_ends_like_the_uninterrupted_one(killed_run, reference):
    workdir, runs, steps_per_epoch = killed_run
    ref_dir, ref = reference
    assert not _step_dirs(workdir)["partial"], "uncommitted checkpoint directories left behind"
    a = checkpoint.read_params(ref_dir / "checkpoints")
    b = checkpoint.read_params(workdir / "checkpoints")
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)
    got = json.loads((workdir / "results.json").read_text())
    assert got["best_epoch"] == ref["best_epoch"]
    assert got["test"]["confusion_matrix"] == ref["test"]["confusion_matrix"]
    for key in ("loss", "accuracy", "balanced_accuracy", "macro_f1"):
        np.testing.assert_allclose(got["test"][key], ref["test"][key], rtol=1e-6, err_msg=key)


def test_every_epoch_is_logged_once(killed_run):
    workdir, runs, _ = killed_run
    epochs = [
        json.loads(line)["epoch"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
    ]
    assert epochs == list(range(1, NUM_EPOCHS + 1)), _logs(runs)


def test_tensorboard_holds_every_epoch_once(killed_run, reference):
    # A kill inside a checkpoint's finalize comes after that epoch's events
    # were written: the restart redoes the epoch and must drop the old events.
    workdir, runs, _ = killed_run
    assert _events.logged_steps(workdir) == _events.logged_steps(reference[0]), _logs(runs)


def test_wall_time_counts_every_process(killed_run):
    workdir, runs, _ = killed_run
    got = json.loads((workdir / "results.json").read_text())
    assert got["wall_time_s"] > got["wall_time_s_this_process"] > 0


class _Killed(BaseException):
    """Stands in for SIGKILL where a process is not needed: nothing after it runs."""


@pytest.fixture(scope="module")
def killed_after_last_checkpoint(data, reference, tmp_path_factory):
    # Killed once the last checkpoint is committed, before the test evaluation and
    # the summary files (with timing_breakdown, minutes on a GPU); then run again.
    workdir = tmp_path_factory.mktemp("killed_at_the_end")

    def killed(self):
        raise _Killed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(family, "create_model", tiny_model)
        with mp.context() as kill:
            kill.setattr(checkpoint.CheckpointManager, "best_step", killed)
            with pytest.raises(_Killed):
                loop.train_and_evaluate(tiny_config(data), workdir)
        assert not (workdir / "results.json").exists()
        return workdir, loop.train_and_evaluate(tiny_config(data), workdir)


def test_a_run_killed_after_its_last_checkpoint_is_evaluated_on_restart(
    killed_after_last_checkpoint, reference
):
    _, results = killed_after_last_checkpoint
    assert results["test"]["confusion_matrix"] == reference[1]["test"]["confusion_matrix"]
    np.testing.assert_allclose(results["test"]["loss"], reference[1]["test"]["loss"], rtol=1e-6)


def test_a_run_killed_after_its_last_checkpoint_keeps_its_timing(
    killed_after_last_checkpoint, reference
):
    workdir, results = killed_after_last_checkpoint
    # The killed process's timing (all its steps), not the re-evaluation's (none).
    timing = json.loads((workdir / "timing.json").read_text())
    assert timing["steps_total"] == reference[1]["num_epochs"] * reference[1]["steps_per_epoch"]
    assert results["wall_time_s"] == timing["train_wall_s"] > 0


@pytest.mark.parametrize("torn", ["", '{"custom_metadata": {"identity": {"mod'])
def test_a_run_identity_torn_by_a_kill_at_the_first_start_is_written_again(tmp_path, torn):
    # Orbax writes the identity with a plain write before the first checkpoint;
    # a kill inside that write left a file that failed every restart.
    meta = checkpoint.run_metadata(tiny_config("data"))
    checkpoint.CheckpointManager(tmp_path, metadata=meta).close()
    (identity_file,) = [p for p in tmp_path.rglob("*") if p.is_file()]
    identity_file.write_text(torn)
    with checkpoint.CheckpointManager(tmp_path, metadata=meta) as ckpt:
        assert ckpt.metadata()["identity"] == meta["identity"]
    with pytest.raises(checkpoint.CheckpointMismatchError, match="width"):  # guarded again
        checkpoint.CheckpointManager(
            tmp_path, metadata=checkpoint.run_metadata(tiny_config("data", width=8))
        )
