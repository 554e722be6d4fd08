"""A run before its first step: data, mesh, model, steps and state, resumed when possible.

`set_up` builds the `Run` that the phases of bcjax.train.loop share; `Progress`
is the run's course so far, what each checkpoint keeps beside the arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import bcjax.models
from bcjax import config_check
from bcjax.data import datasets, pipeline, splits
from bcjax.parallel import mesh as mesh_lib
from bcjax.parallel import strategies
from bcjax.step import optim
from bcjax.step import state as state_lib
from bcjax.timing import chrono as chrono_lib
from bcjax.train import checkpoint
from bcjax.train.early_stopping import EarlyStopping
from bcjax.train.workdir import claim_workdir, holds_checkpoint
from bcjax.train.writers import MetricWriter

log = logging.getLogger(__name__)


def create_model(config, *, num_classes: int, dtype=None):
    """The config's model with a `num_classes` head (the data's classes); width knobs only for
    the family that has them."""
    kwargs = {}
    if config.model.startswith("resnet"):
        kwargs["width"] = config.width
    else:
        kwargs["width_multiplier"] = config.width_multiplier
        kwargs["dropout_rate"] = config.dropout_rate
    return bcjax.models.create(
        config.model,
        num_classes=num_classes,
        dtype=dtype or jax.numpy.dtype(config.dtype),
        **kwargs,
    )


def make_optimizer(config, steps_per_epoch: int):
    return optim.make_optimizer(
        steps_per_epoch=steps_per_epoch,
        num_epochs=config.num_epochs,
        optimizer=config.optimizer,
        learning_rate=config.learning_rate,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
        warmup_epochs=config.warmup_epochs,
        clip_norm=config.clip_norm or None,
    )


# "auto" keeps the training images on the devices up to this size (per device).
INPUT_ON_DEVICE_MAX_BYTES = 2**30


def input_on_device(config, images: np.ndarray) -> bool:
    """Whether the training images live on the devices (config.input_on_device).

    On an accelerator the per-step host-to-device copy of a batch's images is
    what the host spends most of a small step on; on a CPU the "device" is
    host memory, so "auto" keeps the host path there.
    """
    if config.input_on_device != "auto":
        return config.input_on_device == "yes"
    return jax.devices()[0].platform != "cpu" and images.nbytes <= INPUT_ON_DEVICE_MAX_BYTES


def load_pretrained(config, state, num_classes: int):
    """The torchvision weights of config.pretrained in place of the initial params."""
    from bcjax.models import convert  # only runs that ask for it pay for the converter

    try:
        variables = convert.load_pretrained(
            config.model, config.pretrained, num_classes, state.variables
        )
    except (ValueError, ImportError) as e:  # weights of another model; a .pth without torch
        raise config_check.ConfigError(f"config.pretrained={config.pretrained!r}: {e}") from e
    log.info(
        "Fine-tuning from the torchvision weights in %s (new %d-class head).",
        config.pretrained,
        num_classes,
    )
    return state.replace(params=variables["params"], batch_stats=variables["batch_stats"])


@dataclasses.dataclass
class Progress:
    """The run's course so far: what a checkpoint keeps beside the arrays (its "extra")."""

    history: list  # per epoch: {"epoch", "lr", "epoch_time_s", "train", "skipped_steps", "val"?}
    early_stopping: EarlyStopping
    stopped: dict | None = None  # {"epoch", "reason"} once early stopping ended the run
    wall_before_s: float = 0.0  # training time of earlier processes, up to the checkpoint

    @classmethod
    def start(cls, config) -> Progress:
        return cls([], EarlyStopping(config.best_metric, config.early_stopping_patience))

    @classmethod
    def from_extra(cls, extra: dict, config) -> Progress:
        history = extra.get("history", [])
        saved = extra.get("early_stopping")
        patience = config.early_stopping_patience
        if saved and saved.get("metric") == config.best_metric:
            stopper = EarlyStopping.from_dict(saved, patience=patience)
        else:  # a checkpoint from before the state was saved, or of another metric
            stopper = EarlyStopping.from_history(config.best_metric, history, patience=patience)
        return cls(history, stopper, extra.get("stopped"), float(extra.get("wall_time_s", 0.0)))

    def to_extra(self, wall_time_s: float) -> dict:
        return {
            "history": self.history,
            "early_stopping": self.early_stopping.to_dict(),
            "stopped": self.stopped,
            "wall_time_s": wall_time_s,
        }

    @property
    def skipped_steps(self) -> int:
        return self.history[-1].get("skipped_steps", 0) if self.history else 0


@dataclasses.dataclass
class Run:
    """What the phases of one run share; built by `set_up`."""

    config: Any
    workdir: pathlib.Path
    chrono: chrono_lib.Chrono
    data: datasets.RunData
    mesh: Any
    build_steps: Callable[..., strategies.Steps]  # build_steps with this run's arguments
    steps: strategies.Steps
    state: Any  # the train state, replicated on the mesh
    step: int  # steps done: the state's step, kept on the host
    steps_per_epoch: int
    schedule: Callable[[int], Any]  # step -> learning rate
    images_on_device: bool
    train_iter: Any
    ckpt: checkpoint.CheckpointManager
    writer: MetricWriter
    progress: Progress
    first_host_batch: dict | None = None  # what the train step was compiled for
    train_executable: Any = None  # the compiled train step the loop trains with
    checkpoints_saved: int = 0

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.num_epochs

    @property
    def is_complete(self) -> bool:
        return self.step >= self.total_steps or self.progress.stopped is not None

    def close(self) -> None:
        self.writer.close()
        self.ckpt.close()


def set_up(config, workdir, chrono: chrono_lib.Chrono) -> Run:
    """Everything before the first step; the latest checkpoint restored when there is one."""
    # Checked; another run moved aside on fresh_start, a failed start's leftovers dropped.
    workdir = claim_workdir(config, workdir)
    # A run resumes on the split it started with; a new one (or a start that
    # failed before its first checkpoint) makes its split afresh.
    resuming = holds_checkpoint(workdir)
    with chrono.phase("data"):
        data = datasets.prepare(
            config, workdir, manifest_path=workdir / "manifest.json" if resuming else None
        )
    is_main = jax.process_index() == 0
    mesh = mesh_lib.make_mesh(config.num_devices or None)
    global_batch_size = config.global_batch_size
    steps_per_epoch = pipeline.steps_per_epoch(len(data.train.labels), global_batch_size)
    if steps_per_epoch < 1:
        raise config_check.ConfigError(
            f"The training split has {len(data.train.labels)} images, fewer than one global "
            f"batch of {global_batch_size}; lower config.global_batch_size."
        )
    num_classes = len(data.class_names)
    model = create_model(config, num_classes=num_classes)
    tx, schedule = make_optimizer(config, steps_per_epoch)
    build_steps = functools.partial(
        strategies.build_steps,
        config.strategy,
        mesh,
        model,
        bn_sync=config.bn_sync,
        augment_cfg=config.augment if config.augment.enabled else None,
        label_smoothing=config.label_smoothing,
        class_weights=tuple(config.class_weights) or None,
    )
    steps = build_steps(max_traces=1)  # a second trace would be a silent recompile: fail instead
    state = state_lib.create_train_state(model, tx, config.seed, config.image_size, mesh)
    images_on_device = input_on_device(config, data.train.images)
    chrono.record("input_on_device", images_on_device)
    train_iter = pipeline.train_iterator(
        data.train,
        global_batch_size,
        config.seed,
        jax.process_index(),
        jax.process_count(),
        balanced=config.balanced_sampling,
        with_images=not images_on_device,
    )
    ckpt = checkpoint.CheckpointManager(
        workdir / "checkpoints",
        keep_latest=config.keep_latest,
        keep_best=config.keep_best,
        best_metric=config.best_metric,
        metadata=checkpoint.run_metadata(config, class_names=data.class_names),
    )  # refuses another run's workdir
    if is_main:
        splits.save_manifest(data.manifest, workdir / "manifest.json")
    state, progress = _resume_or_start(config, ckpt, state, train_iter, num_classes)
    step = int(state.step)
    if step:
        log.info(
            "Resumed from %s at step %d (epoch %d).", ckpt.directory, step, step // steps_per_epoch
        )
    # From step S on, what earlier processes logged is dropped (all of it on a
    # fresh start, S = 0): this run logs those epochs again.
    writer = MetricWriter(workdir, enabled=is_main, resume_step=step)
    log.info(
        "%s on %d %s device(s), strategy %s, global batch %d (%d per device), "
        "%d steps per epoch; training images %s.",
        config.model,
        mesh.devices.size,
        jax.devices()[0].platform,
        config.strategy,
        global_batch_size,
        global_batch_size // mesh.devices.size,
        steps_per_epoch,
        f"kept on the devices ({data.train.images.nbytes / 2**20:.0f} MiB each)"
        if images_on_device
        else "sent from the host every step",
    )
    return Run(
        config=config,
        workdir=workdir,
        chrono=chrono,
        data=data,
        mesh=mesh,
        build_steps=build_steps,
        steps=steps,
        state=steps.place_state(state),
        step=step,
        steps_per_epoch=steps_per_epoch,
        schedule=schedule,
        images_on_device=images_on_device,
        train_iter=train_iter,
        ckpt=ckpt,
        writer=writer,
        progress=progress,
    )


def _resume_or_start(config, ckpt, state, train_iter, num_classes: int):
    """(state, progress) of the latest checkpoint (the iterator set to it); else a fresh start."""
    if ckpt.latest_step() is None:
        if config.pretrained:
            state = load_pretrained(config, state, num_classes)
        return state, Progress.start(config)
    state, iter_state, extra = ckpt.restore_latest(state)
    train_iter.set_state(iter_state)
    return state, Progress.from_extra(extra, config)
