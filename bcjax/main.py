"""Trains and evaluates one bcjax run.

    python -m bcjax.main --config=configs/resnet_8dev.py --workdir=runs/r18

Kept short on purpose (as flax examples/imagenet does): the configuration is
checked and the devices are requested here, everything else lives in
`bcjax.train.loop`.
"""

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
    from bcjax import config_check, runtime

    config = _CONFIG.value
    try:
        runtime.prepare(config)  # checks the config, sets simulated CPU devices before JAX starts
    except config_check.ConfigError as e:
        sys.exit(f"error: {e}")
    from bcjax import cv
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
            cv.run_cross_validation(
                config, _WORKDIR.value
            )  # one training per fold, then the report
        else:
            loop.train_and_evaluate(config, _WORKDIR.value)
    except user_errors as e:
        sys.exit(f"error: {e}")


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
