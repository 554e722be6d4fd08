"""One training process of the fault tests; it can SIGKILL itself at a chosen moment.

    python tests/_fault_worker.py --data DIR --workdir DIR [--kill SPEC]

SPEC says when the process kills itself. SIGKILL runs no handler, flushes
nothing and lets no thread finish, as a lost machine or the OOM killer would:
  step:N      right after dispatching its Nth train step (counted in this process)
  finalize:N  inside Orbax's background write of its Nth checkpoint, once every
              item's files are in the step's temporary directory but before the
              commit marker and the rename that finalise it
The launcher passes its own environment (XLA flags, fake CPU device count,
persistent compilation cache), so the steps compile to the same programs as
in the launching test process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import signal
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NUM_EPOCHS = 3
KILLED_MARK = "FAULT_WORKER_KILLED"
DONE_MARK = "FAULT_WORKER_DONE"


def tiny_config(data_dir, **overrides):
    """The tiny run of tests/_tiny.py on 2 devices, NUM_EPOCHS epochs."""
    from _tiny import tiny_config as shared

    return shared(data_dir, **{"num_epochs": NUM_EPOCHS, "num_devices": 2, **overrides})


def tiny_model(spec, *, num_classes, dtype=None):
    """Stands in for bcjax.models.family.create_model (the one place a run's model is
    built; the clinical report clones that model): bcjax's ResNet cut to two stages of one
    block. Faults concern the loop and the checkpoints, not the network, and
    ResNet-18 takes several times longer to trace and compile in every process."""
    import jax.numpy as jnp

    from bcjax.models.resnet import BasicBlock, ResNet

    return ResNet(
        stage_sizes=(1, 1),
        block_cls=BasicBlock,
        width=spec.width,
        num_classes=num_classes,
        dtype=jnp.dtype(dtype if dtype is not None else spec.dtype),
    )


def _die(reason: str) -> None:
    print(f"{KILLED_MARK} {reason}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_at_step(n: int) -> None:
    from bcjax.timing import chrono

    original = chrono.Chrono.step_dispatched
    count = [0]

    def step_dispatched(self):
        original(self)
        count[0] += 1
        if count[0] == n:
            _die(f"after step {n}")

    chrono.Chrono.step_dispatched = step_dispatched


def _kill_in_finalize(n: int) -> None:
    # AtomicRenameTemporaryPath.finalize turns "<step>.orbax-checkpoint-tmp" into
    # "<step>"; Orbax calls it from its background thread once every item is
    # written. Dying at its start leaves a complete-looking but uncommitted
    # checkpoint: the worst case for a restart.
    from orbax.checkpoint._src.path import atomicity

    original = atomicity.AtomicRenameTemporaryPath.finalize
    count = [0]

    async def finalize(self, *args, **kwargs):
        count[0] += 1
        if count[0] == n:
            written = sum(1 for _ in pathlib.Path(self.get()).rglob("*"))
            _die(f"in finalize {n} of {self.get()} ({written} entries written)")
        return await original(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


KILLERS = {"step": _kill_at_step, "finalize": _kill_in_finalize}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--config", default="{}", help="JSON overrides of tiny_config")
    parser.add_argument("--kill", default="")
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    logging.getLogger("bcjax.train.run_setup").setLevel(
        logging.INFO
    )  # "Resumed from ... at step N"
    if args.kill:
        kind, n = args.kill.split(":")
        KILLERS[kind](int(n))

    from bcjax.models import family
    from bcjax.train import loop

    family.create_model = tiny_model
    results = loop.train_and_evaluate(
        tiny_config(args.data, **json.loads(args.config)), args.workdir
    )
    print(f"{DONE_MARK} " + json.dumps({"test_accuracy": results["test"]["accuracy"]}), flush=True)


if __name__ == "__main__":
    main()
