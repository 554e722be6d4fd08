"""A run before its first step: `set_up` reads the config once and returns a frozen
`RunContext` (data, mesh, model, steps, checkpoints, writer, the run's specs), the
train state and the run's `Progress` (restored from the latest checkpoint when
there is one).

`Progress` is the run's course so far, mutable and small: what each checkpoint
keeps beside the arrays. The step count lives in one place, the train state's
`step` (read once here, as `RunContext.first_step`; the loop counts from it).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bcjax import specs
from bcjax.data import datasets, pipeline
from bcjax.data import manifest as manifest_lib
from bcjax.models import family
from bcjax.parallel import chips, strategies
from bcjax.parallel import mesh as mesh_lib
from bcjax.step import optim
from bcjax.step import state as state_lib
from bcjax.timing import chrono as chrono_lib
from bcjax.train import checkpoint
from bcjax.train.early_stopping import EarlyStopping
from bcjax.train.workdir import claim_workdir, holds_checkpoint
from bcjax.train.writers import MetricWriter

log = logging.getLogger(__name__)


def make_optimizer(spec: specs.OptimizerSpec, *, steps_per_epoch: int, num_epochs: int):
    """(optax transformation, step -> learning rate) of an optimiser spec."""
    return optim.make_optimizer(
        steps_per_epoch=steps_per_epoch,
        num_epochs=num_epochs,
        optimizer=spec.optimizer,
        learning_rate=spec.learning_rate,
        momentum=spec.momentum,
        nesterov=spec.nesterov,
        weight_decay=spec.weight_decay,
        warmup_epochs=spec.warmup_epochs,
        clip_norm=spec.clip_norm or None,
    )


# "auto" keeps the training images on the devices up to this size (per device).
INPUT_ON_DEVICE_MAX_BYTES = 2**30


def input_on_device(choice: str, images: np.ndarray) -> bool:
    """Whether the training images live on the devices (config.input_on_device).

    On an accelerator the per-step host-to-device copy of a batch's images is
    what the host spends most of a small step on; on a CPU the "device" is
    host memory, so "auto" keeps the host path there.
    """
    if choice != "auto":
        return choice == "yes"
    return jax.devices()[0].platform != "cpu" and images.nbytes <= INPUT_ON_DEVICE_MAX_BYTES


def load_pretrained(spec: specs.ModelSpec, state, num_classes: int):
    """The torchvision weights of spec.pretrained in place of the initial params."""
    from bcjax.models import convert  # only runs that ask for it pay for the converter

    try:
        variables = convert.load_pretrained(
            spec.name, spec.pretrained, num_classes, state.variables
        )
    except (ValueError, ImportError) as e:  # weights of another model; a .pth without torch
        raise specs.ConfigError(f"config.pretrained={spec.pretrained!r}: {e}") from e
    log.info(
        "Fine-tuning from the torchvision weights in %s (new %d-class head).",
        spec.pretrained,
        num_classes,
    )
    return state.replace(params=variables["params"], batch_stats=variables["batch_stats"])


@dataclasses.dataclass
class Progress:
    """The run's course so far: what a checkpoint keeps beside the arrays (its "extra")."""

    # per epoch: {"epoch", "lr", "epoch_time_s", "train", "skipped_steps",
    # "overflow_skipped_steps", "val"?}; the step counts are the run's totals so far
    history: list
    early_stopping: EarlyStopping
    stopped: dict | None = None  # {"epoch", "reason"} once early stopping ended the run
    wall_before_s: float = 0.0  # training time of earlier processes, up to the checkpoint

    @classmethod
    def start(cls, run: specs.RunSpec) -> Progress:
        return cls([], EarlyStopping(run.best_metric, run.early_stopping_patience))

    @classmethod
    def from_extra(cls, extra: dict, run: specs.RunSpec) -> Progress:
        history = extra.get("history", [])
        saved = extra.get("early_stopping")
        patience = run.early_stopping_patience
        if saved and saved.get("metric") == run.best_metric:
            stopper = EarlyStopping.from_dict(saved, patience=patience)
        else:  # a checkpoint from before the state was saved, or of another metric
            stopper = EarlyStopping.from_history(run.best_metric, history, patience=patience)
        return cls(history, stopper, extra.get("stopped"), float(extra.get("wall_time_s", 0.0)))

    def to_extra(self, wall_time_s: float) -> dict:
        return {
            "history": self.history,
            "early_stopping": self.early_stopping.to_dict(),
            "stopped": self.stopped,
            "wall_time_s": wall_time_s,
        }

    def total(self, key: str) -> int:
        """A running step count of the last epoch ("skipped_steps", "overflow_skipped_steps")."""
        return self.history[-1].get(key, 0) if self.history else 0

    @property
    def skipped_steps(self) -> int:
        return self.total("skipped_steps")


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What does not change while a run trains; built by `set_up`.

    Some members are stateful objects (the iterator, checkpoint manager, writer,
    clock), but none is replaced: the loop's changing values are its train state
    and its `Progress`.
    """

    specs: specs.Specs
    workdir: pathlib.Path
    chrono: chrono_lib.Chrono
    data: datasets.RunData
    mesh: Any
    model: Any  # the flax module the steps run
    build_steps: Callable[..., strategies.Steps]  # build_steps with this run's arguments
    steps: strategies.Steps
    first_step: int  # the train state's step when this process started (0, or the resumed one)
    steps_per_epoch: int
    schedule: Callable[[int], Any]  # step -> learning rate
    images_on_device: bool
    train_iter: Any
    ckpt: checkpoint.CheckpointManager
    writer: MetricWriter
    is_main: bool  # process 0: the one that writes files
    # (executable, compile times) of the train step, compiled while set-up went on, or None
    # (`compiles_train_step_ahead`): a Future the loop's compile phase waits for.
    train_step_ahead: concurrent.futures.Future | None = None

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.specs.run.num_epochs

    def close(self) -> None:
        self.writer.close()
        self.ckpt.close()


def set_up(config, workdir, chrono: chrono_lib.Chrono):
    """Everything before the first step: (RunContext, train state, Progress), the
    latest checkpoint restored when there is one."""
    run_specs = specs.from_config(config)
    # dtype "auto": the chip's fast dtype (bcjax.main did so already; library callers did not).
    run_specs = specs.with_dtype(run_specs, chips.resolve_dtype(run_specs.model.dtype))
    run, model_spec = run_specs.run, run_specs.model
    # Checked; another run moved aside on fresh_start, a failed start's leftovers dropped.
    workdir = claim_workdir(run_specs, workdir)
    # A run resumes on the split it started with; a new one (or a start that
    # failed before its first checkpoint) makes its split afresh.
    resuming = holds_checkpoint(workdir)
    with chrono.phase("data"):
        data = datasets.prepare(
            run_specs.data,
            workdir,
            manifest_path=workdir / "manifest.json" if resuming else None,
            class_weights=run_specs.optimizer.class_weights,
        )
    is_main = jax.process_index() == 0
    mesh = mesh_lib.make_mesh(run.num_devices or None)
    steps_per_epoch = pipeline.steps_per_epoch(len(data.train.labels), run.global_batch_size)
    if steps_per_epoch < 1:
        raise specs.ConfigError(
            f"The training split has {len(data.train.labels)} images, fewer than one global "
            f"batch of {run.global_batch_size}; lower config.global_batch_size."
        )
    num_classes = len(data.class_names)
    model = family.create_model(model_spec, num_classes=num_classes)
    tx, schedule = make_optimizer(
        run_specs.optimizer, steps_per_epoch=steps_per_epoch, num_epochs=run.num_epochs
    )
    build_steps = functools.partial(
        strategies.build_steps,
        run.strategy,
        mesh,
        model,
        bn_sync=model_spec.bn_sync,
        augment_cfg=run_specs.data.augment,
        label_smoothing=run_specs.optimizer.label_smoothing,
        class_weights=run_specs.optimizer.class_weights or None,
    )
    steps = build_steps(max_traces=1)  # a second trace would be a silent recompile: fail instead
    init = state_lib.train_state_init(model, tx, run_specs.data.image_size, mesh)
    key = state_lib.init_key(run.seed)
    images_on_device = input_on_device(run_specs.data.input_on_device, data.train.images)
    train_step_ahead = None
    if compiles_train_step_ahead(steps, resuming):
        train_step_ahead = _compile_train_step_ahead(
            steps, jax.eval_shape(init, key), data.train, run.global_batch_size
        )
    try:
        state = init(key)
        chrono.record("input_on_device", images_on_device)
        train_iter = pipeline.train_iterator(
            data.train,
            run.global_batch_size,
            run.seed,
            jax.process_index(),
            jax.process_count(),
            balanced=run_specs.data.balanced_sampling,
            with_images=not images_on_device,
        )
        ckpt = checkpoint.CheckpointManager(
            workdir / "checkpoints",
            keep_latest=run.keep_latest,
            keep_best=run.keep_best,
            best_metric=run.best_metric,
            metadata=checkpoint.run_metadata(run_specs, class_names=data.class_names),
        )  # refuses another run's workdir
        if is_main:
            manifest_lib.save_manifest(data.manifest, workdir / "manifest.json")
        state, progress = _resume_or_start(run_specs, ckpt, state, train_iter, num_classes)
        first_step = int(state.step)
        if first_step:
            log.info(
                "Resumed from %s at step %d (epoch %d).",
                ckpt.directory,
                first_step,
                first_step // steps_per_epoch,
            )
        # From step S on, what earlier processes logged is dropped (all of it on a
        # fresh start, S = 0): this run logs those epochs again.
        writer = MetricWriter(workdir, enabled=is_main, resume_step=first_step)
        log.info(
            "%s on %d %s device(s), strategy %s, global batch %d (%d per device), "
            "%d steps per epoch; training images %s.",
            model_spec.name,
            mesh.devices.size,
            jax.devices()[0].platform,
            run.strategy,
            run.global_batch_size,
            run.global_batch_size // mesh.devices.size,
            steps_per_epoch,
            f"kept on the devices ({data.train.images.nbytes / 2**20:.0f} MiB each)"
            if images_on_device
            else "sent from the host every step",
        )
        context = RunContext(
            specs=run_specs,
            workdir=workdir,
            chrono=chrono,
            data=data,
            mesh=mesh,
            model=model,
            build_steps=build_steps,
            steps=steps,
            first_step=first_step,
            steps_per_epoch=steps_per_epoch,
            # Jitted: the epoch's logged rate is then one compiled program, not a dozen op-by-op
            # compiles on a run with a cold cache (0.3-0.7 s measured, CPU-dev).
            schedule=jax.jit(schedule),
            images_on_device=images_on_device,
            train_iter=train_iter,
            ckpt=ckpt,
            writer=writer,
            is_main=is_main,
            train_step_ahead=train_step_ahead,
        )
    except BaseException:  # the thread's work is not wanted: it is let finish, not left running
        if train_step_ahead is not None:
            concurrent.futures.wait([train_step_ahead])
        raise
    return context, steps.place_state(state), progress


def compiles_train_step_ahead(steps: strategies.Steps, resuming: bool) -> bool:
    """Whether set-up compiles the train step on a thread from the state's and the batch's
    shapes while it initialises the state (and the rest of set-up) on its own thread: CPU
    runs of one process that start afresh, with global arrays ("shard_map", "jit").
    Initialising and compiling then share the cores (XLA:CPU's compiler keeps ≈ 1.4-1.7 of
    2 busy, tracing 1). Elsewhere the loop compiles it in its compile phase, as before."""
    return (
        not resuming
        and steps.strategy in ("shard_map", "jit")
        and steps.mesh.devices.flat[0].platform == "cpu"
        and jax.process_count() == 1
    )


def _compile_train_step_ahead(
    steps: strategies.Steps, state_shapes, train: pipeline.ArraySet, batch_size: int
) -> concurrent.futures.Future:
    """Starts the train step's lowering and compile from shapes on a thread; its Future
    gives (executable, {"lower_s", "compile_s", "persistent_cache"}). The shapes and
    shardings are those the loop's first call has (a mismatch fails at that call, it
    does not compile again): the replicated state, this batch sharded over "data", the
    run's key."""
    replicated = NamedSharding(steps.mesh, P())
    data_sharding = NamedSharding(steps.mesh, P(mesh_lib.DATA_AXIS))
    state = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(
            s.shape, s.dtype, sharding=replicated, weak_type=s.weak_type
        ),
        state_shapes,
    )
    # With the images kept on the devices the loop gathers them there: the same batch.
    spec = pipeline.train_batch_spec(train, batch_size, with_images=True)
    batch = {
        key: jax.ShapeDtypeStruct(shape, dtype, sharding=data_sharding)
        for key, (shape, dtype) in spec.items()
    }
    rng = jax.eval_shape(lambda: jax.random.key(0))

    def compile_train_step():
        lowered, lower_s = chrono_lib.timed_lower(steps.train_step, state, batch, rng)
        compiled, times = chrono_lib.timed_compile_lowered(lowered)
        return compiled, {"lower_s": lower_s, **times}

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bcjax-train-step")
    try:
        return pool.submit(compile_train_step)
    finally:
        pool.shutdown(wait=False)  # the thread ends with its one task


def _resume_or_start(run_specs: specs.Specs, ckpt, state, train_iter, num_classes: int):
    """(state, progress) of the latest checkpoint (the iterator set to it); else a fresh start."""
    if ckpt.latest_step() is None:
        if run_specs.model.pretrained:
            state = load_pretrained(run_specs.model, state, num_classes)
        return state, Progress.start(run_specs.run)
    state, iter_state, extra = ckpt.restore_latest(state)
    train_iter.set_state(iter_state)
    return state, Progress.from_extra(extra, run_specs.run)
