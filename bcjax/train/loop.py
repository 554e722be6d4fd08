"""The training loop: the only place with side effects.

Steps are pure jitted functions (bcjax.parallel.strategies); this module feeds
them, keeps the time, evaluates, logs, checkpoints and writes the summary.
Only process 0 writes files; every process runs the same steps.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import tempfile
import time

import jax
import numpy as np

from bcjax import config_check
from bcjax.data import pipeline, splits
from bcjax.parallel import mesh as mesh_lib
from bcjax.parallel import strategies
from bcjax.timing import breakdown, chrono as chrono_lib
from bcjax.data import datasets
from bcjax.step import optim, state as state_lib
from bcjax.train import checkpoint, metrics as metrics_lib, plots
from bcjax.train.writers import MetricWriter, read_jsonl
import bcjax.models

log = logging.getLogger(__name__)


class Interrupted(RuntimeError):
    """Raised by the `_stop_after_epoch` test hook, standing in for a killed process."""


class NonFiniteError(FloatingPointError):
    """The loss or gradients became NaN/Inf and config.nan_policy is "stop"."""


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
    free = _free_bytes(workdir)
    if free < min_free_bytes:
        raise WorkdirError(f"The workdir {workdir} has only {free / 2**20:.1f} MiB free; "
                           f"a run needs at least {min_free_bytes / 2**20:.0f} MiB for checkpoints and logs.")


def _free_bytes(path: pathlib.Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def create_model(config, *, dtype=None):
    """The config's model; width knobs only for the family that has them."""
    kwargs = {}
    if config.model.startswith("resnet"):
        kwargs["width"] = config.width
    else:
        kwargs["width_multiplier"] = config.width_multiplier
        kwargs["dropout_rate"] = config.dropout_rate
    return bcjax.models.create(config.model, num_classes=3,
                               dtype=dtype or jax.numpy.dtype(config.dtype), **kwargs)


def make_optimizer(config, steps_per_epoch: int):
    return optim.make_optimizer(
        steps_per_epoch=steps_per_epoch, num_epochs=config.num_epochs, optimizer=config.optimizer,
        learning_rate=config.learning_rate, momentum=config.momentum, nesterov=config.nesterov,
        weight_decay=config.weight_decay, warmup_epochs=config.warmup_epochs,
        clip_norm=config.clip_norm or None)


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


def evaluate(steps, state, data: pipeline.ArraySet, global_batch_size: int, *, with_arrays: bool = False):
    """Every example exactly once (padding masked out); a report dict.

    with_arrays: also {"names", "labels", "probs"} in the order of `data`.
    """
    acc = metrics_lib.EvalAccumulator(3, list(datasets.busi.CLASSES))
    for batch in pipeline.eval_batches(data, global_batch_size, jax.process_index(), jax.process_count()):
        out = steps.eval_step(state, steps.shard_batch(batch))
        acc.update(out["logits"], out["label"], out["valid"], loss=out["loss"])
    if not with_arrays:
        return acc.compute()
    arrays = acc.arrays()
    return acc.compute(), {"names": np.asarray(data.names), "labels": np.asarray(arrays["labels"]),
                           "probs": np.asarray(arrays["probs"])}


# What a run writes into its workdir; fresh_start moves all of it aside.
RUN_FILES = ("checkpoints", "metrics.jsonl", "results.json", "timing.json", "manifest.json",
             "learning_curves.png", "confusion_matrix.png", "val_predictions.npz", "test_predictions.npz",
             "tensorboard", "synthetic")


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
    log.warning("config.fresh_start: moved the previous run in %s to %s; starting afresh.", workdir, dest)
    return dest


def evals_since_best(history: list, metric: str) -> int:
    """Evaluations after the best one (ties are not improvements, as for checkpoints)."""
    best, since = None, 0
    for record in history:
        if "val" not in record:
            continue
        if _improves(record["val"], metric, best):
            best, since = record["val"][metric], 0
        else:
            since += 1
    return since


def load_pretrained(config, state):
    """The torchvision weights of config.pretrained in place of the initial params."""
    from bcjax.models import convert  # only runs that ask for it pay for the converter
    try:
        variables = convert.load_pretrained(config.model, config.pretrained, 3, state.variables)
    except (ValueError, ImportError) as e:  # weights of another model; a .pth without torch
        raise config_check.ConfigError(f"config.pretrained={config.pretrained!r}: {e}") from e
    log.info("Fine-tuning from the torchvision weights in %s (new %d-class head).", config.pretrained, 3)
    return state.replace(params=variables["params"], batch_stats=variables["batch_stats"])


def _drop_logged_after(path: pathlib.Path, step: int) -> None:
    """A resumed run redoes the epochs after its checkpoint: drop their old log lines."""
    if path.exists():
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)


def _check_finite(pending, policy: str, ckpt) -> int:
    """1 when the step in `pending` was skipped for a NaN/Inf loss or gradient.

    The step itself never applied a non-finite update; with policy "stop" the
    run ends here, naming the step and the last good checkpoint.
    """
    if pending is None or bool(pending[1]):
        return 0
    step = pending[0]
    if policy == "stop":
        ckpt.wait_until_finished()
        last = ckpt.latest_step()
        where = f"step {last} in {ckpt.directory}" if last is not None else "none saved yet"
        raise NonFiniteError(f"NaN or Inf in the loss or gradients at step {step} (the update was not applied). "
                             f"Last good checkpoint: {where}. Lower the learning rate, set config.clip_norm, "
                             "or set config.nan_policy='skip' to skip such steps.")
    log.warning("Step %d: NaN or Inf in the loss or gradients; update skipped.", step)
    return 1


def _improves(val: dict, metric: str, best) -> bool:
    value = val.get(metric)
    if value is None:
        return False
    return best is None or (value < best if "loss" in metric else value > best)


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_and_evaluate(config, workdir, *, _stop_after_epoch: int | None = None) -> dict:
    """Trains per `config`, resuming from `workdir` when it holds a run; returns results.json's dict.

    `_stop_after_epoch` (tests only) stops the run as a kill would, right after
    that epoch's checkpoint is complete.
    """
    workdir = pathlib.Path(workdir).expanduser().resolve()
    is_main = jax.process_index() == 0
    check_workdir(workdir)
    # fresh_start replaces another run; a run of this same identity (say, this
    # command restarted after a kill with the flag still set) is resumed.
    if config.fresh_start and not is_same_run(workdir, config):
        if is_main:
            move_old_run_aside(workdir)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("bcjax fresh_start")
    wall = time.perf_counter()
    chrono = chrono_lib.Chrono()

    with chrono.phase("data"):
        data = datasets.prepare(config, workdir, manifest_path=workdir / "manifest.json")

    mesh = mesh_lib.make_mesh(config.num_devices or None)
    num_devices = mesh.devices.size
    gbs = config.global_batch_size
    steps_per_epoch = pipeline.steps_per_epoch(len(data.train.labels), gbs)
    if steps_per_epoch < 1:
        raise config_check.ConfigError(f"The training split has {len(data.train.labels)} images, fewer than one global "
                         f"batch of {gbs}; lower config.global_batch_size.")
    total_steps = steps_per_epoch * config.num_epochs

    model = create_model(config)
    tx, schedule = make_optimizer(config, steps_per_epoch)
    steps = strategies.build_steps(
        config.strategy, mesh, model, tx, bn_sync=config.bn_sync,
        augment_cfg=config.augment if config.augment.enabled else None,
        label_smoothing=config.label_smoothing,
        class_weights=tuple(config.class_weights) or None)
    state = state_lib.create_train_state(model, tx, config.seed, config.image_size, mesh)
    on_device = input_on_device(config, data.train.images)
    chrono.record("input_on_device", on_device)
    train_iter = pipeline.train_iterator(data.train, gbs, config.seed, jax.process_index(),
                                         jax.process_count(), balanced=config.balanced_sampling,
                                         with_images=not on_device)

    meta = checkpoint.run_metadata(config)
    ckpt = checkpoint.CheckpointManager(workdir / "checkpoints", keep_latest=config.keep_latest,
                                        keep_best=config.keep_best, best_metric=config.best_metric,
                                        metadata=meta)  # refuses another run's workdir
    if is_main:
        splits.save_manifest(data.manifest, workdir / "manifest.json")
    history = []
    best_so_far = None
    stopped = None  # {"epoch", "reason"} once early stopping ended the run
    start_step = 0
    wall_before = 0.0  # training time of earlier processes of this run, up to the checkpoint resumed
    if ckpt.latest_step() is not None:
        state, iter_state, extra = ckpt.restore_latest(state)
        train_iter.set_state(iter_state)
        history = extra.get("history", [])
        best_so_far = extra.get("best_so_far")
        stopped = extra.get("stopped")
        wall_before = float(extra.get("wall_time_s", 0.0))
        start_step = int(state.step)
        log.info("Resumed from %s at step %d (epoch %d).", ckpt.directory, start_step,
                 start_step // steps_per_epoch)
    elif config.pretrained:
        state = load_pretrained(config, state)
    state = steps.place_state(state)
    rng = jax.random.key(config.seed)

    if is_main:
        # Also at step 0: a run killed before its first checkpoint may have logged epochs.
        _drop_logged_after(workdir / "metrics.jsonl", start_step)
    # Also drops TensorBoard events of the epochs this run redoes.
    writer = MetricWriter(workdir, enabled=is_main, resume_step=start_step)
    log.info("%s on %d %s device(s), strategy %s, global batch %d (%d per device), %d steps per epoch; "
             "training images %s.", config.model, num_devices, jax.devices()[0].platform, config.strategy, gbs,
             gbs // num_devices, steps_per_epoch,
             f"kept on the devices ({data.train.images.nbytes / 2**20:.0f} MiB each)" if on_device
             else "sent from the host every step")

    finished = start_step >= total_steps or stopped is not None
    if finished:
        log.info("The run in %s is complete; evaluating its best checkpoint again.", workdir)
    else:
        # Compile apart from the steps, so step times never include it.
        if on_device:  # only for training: a finished run's re-evaluation needs no copy
            add_images = strategies.on_device_images(data.train.images, mesh)
            to_device = lambda host_batch: add_images(steps.shard_batch(host_batch))  # noqa: E731
        else:
            to_device = steps.shard_batch
        first = next(train_iter)
        batch = to_device(first)
        if config.timing_breakdown and "image" not in first:  # the breakdown times a host batch
            first = {**first, "image": np.take(data.train.images, first["index"], axis=0)}
        train_step = chrono.compile("train_step", steps.train_step, state, batch, rng)
    train_acc = metrics_lib.TrainAccumulator()
    step = start_step
    skipped = history[-1].get("skipped_steps", 0) if history else 0
    pending_check = None
    saves = 0
    loop_start, loop_step0 = time.perf_counter(), step
    first_epoch = config.num_epochs if finished else start_step // steps_per_epoch
    for epoch in range(first_epoch, config.num_epochs):
        epoch_start = time.perf_counter()
        for _ in range(steps_per_epoch):
            if batch is None:
                with chrono.input_wait():
                    batch = to_device(next(train_iter))
            state, step_metrics = train_step(state, batch, rng)
            batch = None
            train_acc.update(step_metrics)
            step += 1
            chrono.step_dispatched()
            # Read one step late, so the check never waits for the step just dispatched.
            skipped += _check_finite(pending_check, config.nan_policy, ckpt)
            pending_check = (step, step_metrics["grads_finite"])
            if is_main and (step % config.log_every_steps == 0 or step == total_steps):
                rate = (step - loop_step0) / max(time.perf_counter() - loop_start, 1e-9)
                log.info("epoch %d/%d step %d/%d  %.1f steps/s  ETA %s", epoch + 1, config.num_epochs, step,
                         total_steps, rate, _eta((total_steps - step) / max(rate, 1e-9)))
        chrono.pause()
        skipped += _check_finite(pending_check, config.nan_policy, ckpt)
        pending_check = None
        train_metrics = train_acc.compute()
        train_acc.reset()
        epoch_time = time.perf_counter() - epoch_start
        record = {"epoch": epoch + 1, "lr": float(schedule(step)), "epoch_time_s": epoch_time,
                  "train": train_metrics, "skipped_steps": skipped}
        last = epoch + 1 == config.num_epochs
        if (epoch + 1) % config.eval_every_epochs == 0 or last:
            with chrono.phase("eval"):
                val = evaluate(steps, state, data.val, gbs)
            record["val"] = val
            # A metric is None when undefined (e.g. every step of the epoch skipped for NaN).
            log.info("epoch %d: train loss %s acc %s | val loss %s acc %s macro-F1 %s (%.1f s)", epoch + 1,
                     _num(train_metrics["loss"], 4), _num(train_metrics["accuracy"]), _num(val["loss"], 4),
                     _num(val["accuracy"]), _num(val["macro_f1"]), epoch_time)
        history.append(record)
        scalars = {"lr": record["lr"], "epoch_time_s": epoch_time,
                   **metrics_lib.flatten_scalars(train_metrics, "train/")}
        if "val" in record:
            scalars.update(metrics_lib.flatten_scalars(record["val"], "val/"))
        writer.write_scalars(step, scalars, epoch=epoch + 1)
        improved = "val" in record and _improves(record["val"], config.best_metric, best_so_far)
        if improved:
            best_so_far = record["val"][config.best_metric]
        patience = config.early_stopping_patience
        if "val" in record and patience and evals_since_best(history, config.best_metric) >= patience:
            best_text = "none" if best_so_far is None else f"{best_so_far:.4f}"
            stopped = {"epoch": epoch + 1,
                       "reason": f"val {config.best_metric} did not improve for {patience} evaluation(s) "
                                 f"after {best_text}"}
            log.info("Early stop after epoch %d: %s.", epoch + 1, stopped["reason"])
        # A new best is always saved, so the best checkpoint is the best epoch;
        # an early stop is saved so that a rerun knows the run is over.
        if "val" in record and ((epoch + 1) % config.checkpoint_every_epochs == 0 or last or improved
                                or stopped):
            # Asynchronous: the phase holds what the loop waits for (the copy off the device).
            with chrono.phase("checkpoint"):
                ckpt.save(step, state, train_iter.get_state(), metrics=record["val"],
                          extra={"history": history, "best_so_far": best_so_far, "stopped": stopped,
                                 "wall_time_s": wall_before + time.perf_counter() - wall})
                saves += 1
        if _stop_after_epoch == epoch + 1:
            ckpt.wait_until_finished()
            raise Interrupted(f"stopped after epoch {epoch + 1} (test hook)")
        if stopped:
            break
    with chrono.phase("checkpoint"):
        ckpt.wait_until_finished()
    chrono.record("checkpoints_saved", saves)
    process_wall = time.perf_counter() - wall
    # A resumed run adds the time its earlier processes took to reach the
    # checkpoint it resumed from (work they did after it is redone, not counted twice).
    train_wall = wall_before + process_wall
    wall_fields = {"train_wall_s": train_wall, "train_wall_s_this_process": process_wall}
    timing_path = workdir / "timing.json"
    if is_main and not finished:
        # Written now too, so that a kill during the test or the breakdown loses no timing.
        files.write_json({**chrono.summary(), **wall_fields}, timing_path, default=str)

    best_step = ckpt.best_step()
    best_state, _, _ = ckpt.restore(best_step, state)
    best_state = steps.place_state(best_state)
    test, test_arrays = evaluate(steps, best_state, data.test, gbs, with_arrays=True)
    _, val_arrays = evaluate(steps, best_state, data.val, gbs, with_arrays=True)
    best_epoch = best_step // steps_per_epoch
    log.info("Test (best checkpoint, epoch %d):\n%s", best_epoch, metrics_lib.format_report(test))

    if config.timing_breakdown and not finished:
        # After the test, so wall_time_s is the run's own; on a fresh copy of the state.
        with chrono.phase("breakdown"):
            timing_breakdown = breakdown.measure(
                lambda collectives: strategies.build_steps(
                    config.strategy, mesh, model, tx, bn_sync=config.bn_sync,
                    augment_cfg=config.augment if config.augment.enabled else None,
                    label_smoothing=config.label_smoothing,
                    class_weights=tuple(config.class_weights) or None, collectives=collectives),
                state, first, rng, warmup=2, iters=10, dtype=config.dtype)
        chrono.record("breakdown", timing_breakdown)
        log.info("Timing breakdown:\n%s", breakdown.format_summary(timing_breakdown))

    results = {
        "model": config.model, "strategy": config.strategy, "num_devices": num_devices,
        "num_processes": jax.process_count(), "platform": jax.devices()[0].platform,
        "global_batch_size": gbs, "num_epochs": config.num_epochs, "steps_per_epoch": steps_per_epoch,
        "input_on_device": on_device,
        "dataset": data.source["dataset"], "data_path": data.source["path"],
        "warning": data.source["warning"],
        "best_epoch": best_epoch, "best_metric": config.best_metric,
        "epochs_trained": history[-1]["epoch"] if history else 0,
        "stopped_epoch": stopped["epoch"] if stopped else None,
        "stop_reason": stopped["reason"] if stopped else None,
        "pretrained": config.pretrained or None,
        "cv_fold": config.cv.fold if config.cv.folds >= 2 else None,
        "val_best": next((h["val"] for h in history if h["epoch"] == best_epoch and "val" in h), None),
        "test": test, "wall_time_s": train_wall, "wall_time_s_this_process": process_wall,
        "skipped_steps": history[-1].get("skipped_steps", 0) if history else 0,
        "config": config.to_dict(),
    }
    if is_main:
        if finished:
            # Keep the timing of the run that trained, not of this re-evaluation.
            if (workdir / "results.json").exists():
                previous = json.loads((workdir / "results.json").read_text())
            elif timing_path.exists():
                previous = json.loads(timing_path.read_text())
                previous = {"wall_time_s": previous.get("train_wall_s"),
                            "wall_time_s_this_process": previous.get("train_wall_s_this_process")}
            else:
                previous = {}
            for key in ("wall_time_s", "wall_time_s_this_process"):
                if previous.get(key) is not None:
                    results[key] = previous[key]
        np.savez(workdir / "test_predictions.npz", **test_arrays)
        np.savez(workdir / "val_predictions.npz", **val_arrays)
        # results.json last: its presence means the run is complete (bcjax.cv relies on it).
        _write_outputs(workdir, results, history, test,
                       None if finished else {**chrono.summary(), **wall_fields}, best_epoch, stopped)
    writer.close()
    ckpt.close()
    if data.source["warning"]:
        log.warning(data.source["warning"])
    return results


def _write_outputs(workdir, results, history, test, timing, best_epoch, stopped) -> None:
    if timing is not None:
        files.write_json(timing, workdir / "timing.json", default=str)
    curves = [{"epoch": h["epoch"], "train": h["train"], **({"val": h["val"]} if "val" in h else {})}
              for h in history]
    plots.plot_learning_curves(curves, workdir / "learning_curves.png", best_epoch=best_epoch,
                               stop_epoch=stopped["epoch"] if stopped else None,
                               title=f"early stop: {stopped['reason']}" if stopped else None)
    plots.plot_confusion_matrix(np.asarray(test["confusion_matrix"]), test["class_names"],
                                workdir / "confusion_matrix.png")
    files.write_json(results, workdir / "results.json", default=str)

