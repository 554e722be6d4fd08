"""Trains and evaluates one bcjax run.

    python -m bcjax.main --config=configs/resnet_8dev.py --workdir=runs/r18

Kept short on purpose (as flax examples/imagenet does): the configuration is
checked, the devices are requested and the workdir is locked here (one run per
workdir at a time: bcjax.train.run_lock), everything else lives in `bcjax.train.loop`.
"""

import contextlib
import logging as std_logging
import os
import sys


def _make_configs_importable():
    # Variant configs do `from configs import default`; make that work from any
    # working directory by putting the folder above configs/ on the path.
    for arg in sys.argv[1:]:
        if arg.startswith("--config="):
            path = os.path.abspath(arg.split("=", 1)[1].split(":")[0])
            sys.path.insert(0, os.path.dirname(os.path.dirname(path)))


_make_configs_importable()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Configuration file (a get_config() module).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])


_FLAGS_PARSED = False


def main(argv):
    global _FLAGS_PARSED
    _FLAGS_PARSED = True
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    # Orbax logs through absl at INFO on every save and restore; keep bcjax's own
    # progress lines readable. Here, not at import: app.run resets absl's level
    # from --verbosity while it parses the flags.
    std_logging.getLogger("absl").setLevel(std_logging.WARNING)
    from bcjax import config_check

    config = _CONFIG.value
    try:
        _start(config)
    except config_check.ConfigError as e:
        sys.exit(f"error: {e}")
    from bcjax.train import run_lock

    try:
        with contextlib.ExitStack() as held:
            # Before the training stack is imported: a second run is refused at once.
            _lock_workdir(held, config, _WORKDIR.value)
            _train(config, _WORKDIR.value)
    except run_lock.RunLockError as e:
        sys.exit(f"error: {e}")
    # The process ends next: the interpreter's last full garbage collection would scan every
    # live object (jax, flax, the run's programs), 0.1-0.15 s on a CPU quickstart
    # (BUILD_NOTES, #23 session 11); frozen objects are skipped. Nothing is kept or lost.
    import gc

    gc.freeze()


def _start(config) -> None:
    """Checks the config, then starts JAX on the run's devices (bcjax.runtime) and makes
    dtype "auto" the chip's dtype, so results.json and the checkpoints record that one."""
    from bcjax import config_check, runtime, specs

    config_check.validate(config)  # before minutes of compiling, not after
    num_devices = runtime.prepare(specs.from_config(config))
    if config.dtype == "auto":
        import jax

        config.dtype = runtime.default_dtype()
        kind = jax.devices()[0].device_kind
        std_logging.getLogger("bcjax.main").info("dtype 'auto' on %s: %s.", kind, config.dtype)
    config_check.validate(config, num_devices_available=num_devices)


def _train(config, workdir) -> None:
    from bcjax import config_check, cv
    from bcjax.data import busi
    from bcjax.train import checkpoint, loop

    # Problems with the user's data, workdir or numbers: a message, not a traceback.
    user_errors = (
        config_check.ConfigError,
        busi.BusiError,
        checkpoint.CheckpointMismatchError,
        loop.WorkdirError,
        loop.NonFiniteError,
        cv.CrossValidationError,
    )
    try:
        if config.cv.folds >= 2:
            cv.run_cross_validation(config, workdir)  # one training per fold, then the report
        else:
            loop.train_and_evaluate(config, workdir)
    except user_errors as e:
        sys.exit(f"error: {e}")


def _lock_workdir(stack: contextlib.ExitStack, config, workdir) -> None:
    """One run per workdir (bcjax.train.run_lock), held until ``stack`` closes.

    Process 0 takes the lock for all processes and tells them whether it got it,
    so that a refused multi-process run ends everywhere at once. Cross-validation
    locks each fold's folder it trains: one job per fold (cv.fold=k) shares the
    study's workdir with the others, not with a whole study (which also locks the
    workdir itself, against a second whole study).
    """
    from bcjax import cv
    from bcjax.train import run_lock

    folders = [workdir]
    if config.cv.folds >= 2:
        folds = [config.cv.fold] if config.cv.fold >= 0 else range(config.cv.folds)
        folders = [cv.fold_dir(workdir, k) for k in folds]
        if config.cv.fold < 0:
            folders.insert(0, workdir)
    # The loop holds its workdir too (a call from a notebook has no main); inside this
    # hold it re-enters this one (run_lock.hold's reenter).
    stack.enter_context(run_lock.hold_on_process_0(folders))


def run():
    try:
        app.run(main)
    except AttributeError as e:
        # Only while flags are parsed: an override of a field the (locked)
        # config does not have. Later AttributeErrors are real bugs.
        if _FLAGS_PARSED:
            raise
        from bcjax import config_check

        sys.exit(f"error: {config_check.unknown_field_message(e)}")


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    run()
