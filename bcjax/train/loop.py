"""The training loop: the only place with side effects.

Steps are pure jitted functions (bcjax.parallel.strategies); this module feeds
them, keeps the time, evaluates, logs, checkpoints and writes the summary.
Only process 0 writes files; every process runs the same steps.

`train_and_evaluate` reads top down through its phases:

    set_up          workdir, data, mesh, steps, state (restored when resuming): run_setup.py
    train_epochs    compile, then per epoch: steps, evaluation, log, early stop, checkpoint
    evaluate_best   the best checkpoint on the test and validation parts
    outputs         predictions, plots, timing.json and, last, results.json: outputs.py

A finished run (every epoch trained, or stopped early) skips training: `re_evaluate`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bcjax import report
from bcjax.data import pipeline
from bcjax.eval import accumulators, clinical_outputs
from bcjax.eval import metrics as metrics_lib
from bcjax.parallel import strategies
from bcjax.timing import breakdown
from bcjax.timing import chrono as chrono_lib
from bcjax.train import outputs
from bcjax.train.periodic import itstime

# Also reached through this module (bcjax.main's error messages, bcjax.predict's model).
from bcjax.train.run_setup import (
    Run,
    create_model,  # noqa: F401
    set_up,
)
from bcjax.train.workdir import WorkdirError  # noqa: F401

log = logging.getLogger(__name__)

# on_epoch_end(record) -> True stops the run as a kill would (see train_and_evaluate).
OnEpochEnd = Callable[[dict], Any]


class Interrupted(RuntimeError):
    """A run (or a cross-validation) stopped on its caller's request, as a kill would stop it."""


class NonFiniteError(FloatingPointError):
    """The loss or gradients became NaN/Inf and config.nan_policy is "stop"."""


def evaluate(
    steps,
    state,
    data: pipeline.ArraySet,
    global_batch_size: int,
    class_names,
    *,
    positive_class: str | None = None,
    with_arrays: bool = False,
):
    """Every example exactly once (padding masked out); a report dict.

    class_names: what the labels index (the data's); positive_class: the one a
    2-class report calls positive (default the last).
    with_arrays: also {"names", "labels", "probs"} in the order of `data`.
    """
    accumulator = accumulators.EvalAccumulator(
        len(class_names), list(class_names), positive_class=positive_class
    )
    for batch in pipeline.eval_batches(
        data, global_batch_size, jax.process_index(), jax.process_count()
    ):
        out = steps.eval_step(state, steps.shard_batch(batch))
        accumulator.update(out["logits"], out["label"], out["valid"], loss=out["loss"])
    if not with_arrays:
        return accumulator.compute()
    arrays = accumulator.arrays()
    return accumulator.compute(), {
        "names": np.asarray(data.names),
        "labels": np.asarray(arrays["labels"]),
        "probs": np.asarray(arrays["probs"]),
    }


# ------------------------------------------------------------------ the run


def train_and_evaluate(config, workdir, *, on_epoch_end: OnEpochEnd | None = None) -> dict:
    """Trains per `config`, resuming from `workdir` when it holds a run; returns results.json.

    on_epoch_end(record): called after every epoch once its checkpoint (if any)
    is saved, with the epoch's record ({"epoch", "train", "val"?, ...}). When it
    returns True the run stops as a kill would: the checkpoint writes are
    awaited, Interrupted is raised, and no summary is written (tests use it to
    interrupt and resume).
    """
    chrono = chrono_lib.Chrono(startup_s=chrono_lib.claim_startup_s())
    with chrono.phase("setup"):
        run = set_up(config, workdir, chrono)
    try:
        if run.is_complete:
            log.info(
                "The run in %s is complete; evaluating its best checkpoint again.", run.workdir
            )
            return re_evaluate(run)
        train_epochs(run, on_epoch_end)
        # A resumed run adds the time its earlier processes took to reach the
        # checkpoint it resumed from (work they did after it is redone, not counted twice).
        walls = {
            "train_wall_s": run.progress.wall_before_s + chrono.elapsed_s(),
            "train_wall_s_this_process": chrono.elapsed_s(),
        }
        # Now too, so that a kill in the test or the breakdown loses no timing.
        outputs.write_timing(run, {**chrono.summary(), **walls})
        with chrono.phase("test"):
            best = evaluate_best(run)
        if config.timing_breakdown:  # after the test, so wall_time_s is the run's own
            with chrono.phase("breakdown"):
                measure_breakdown(run)
        results = outputs.summarize(
            run, best, walls["train_wall_s"], walls["train_wall_s_this_process"]
        )
        with chrono.phase("outputs"):
            outputs.write_outputs(run, best)
        outputs.write_timing(run, {**chrono.summary(), **walls})
        outputs.write_results(run, results)  # last: its presence means the run is complete
        return results
    finally:
        run.close()


def re_evaluate(run: Run) -> dict:
    """A finished run's best checkpoint scored again; the trained process's timing is kept."""
    best = evaluate_best(run)
    walls = outputs.previous_walls(run.workdir)
    results = outputs.summarize(
        run,
        best,
        walls.get("wall_time_s", run.progress.wall_before_s + run.chrono.elapsed_s()),
        walls.get("wall_time_s_this_process", run.chrono.elapsed_s()),
    )
    outputs.write_outputs(run, best)
    outputs.write_results(run, results)
    return results


# ------------------------------------------------------------------ training


def train_epochs(run: Run, on_epoch_end: OnEpochEnd | None = None) -> None:
    """Compiles the train step, then trains from the resumed epoch to the last or an early stop."""
    config, chrono = run.config, run.chrono
    rng = jax.random.key(config.seed)
    with chrono.phase("data"):
        to_device = _batch_to_device(run)
    with chrono.phase("compile"):  # apart from the steps, so that no step time includes it
        run.first_host_batch = next(run.train_iter)
        batch = to_device(run.first_host_batch)
        train_step = chrono.compile("train_step", run.steps.train_step, run.state, batch, rng)
        run.train_executable = train_step  # the breakdown times it again, compiling nothing
    started = (time.perf_counter(), run.step)
    with chrono.phase("train"):
        for epoch in range(run.step // run.steps_per_epoch + 1, config.num_epochs + 1):
            epoch_start = time.perf_counter()
            train_metrics, skipped = _train_one_epoch(
                run, train_step, to_device, batch, rng, epoch, started
            )
            batch = None  # the first batch is the first epoch's
            record = {
                "epoch": epoch,
                "lr": float(run.schedule(run.step)),
                "epoch_time_s": time.perf_counter() - epoch_start,
                "train": train_metrics,
                "skipped_steps": run.progress.skipped_steps + skipped,
            }
            if itstime(epoch, config.eval_every_epochs, config.num_epochs):
                with chrono.phase("eval"):
                    record["val"] = evaluate(
                        run.steps,
                        run.state,
                        run.data.val,
                        config.global_batch_size,
                        run.data.class_names,
                        positive_class=run.data.positive_class,
                    )
                _log_epoch(record)
            _end_epoch(run, record)
            if on_epoch_end is not None and on_epoch_end(record):
                run.ckpt.wait_until_finished()
                raise Interrupted(f"stopped after epoch {epoch} (on_epoch_end)")
            if run.progress.stopped:
                break
    with chrono.phase("checkpoint"):
        run.ckpt.wait_until_finished()
    chrono.record("checkpoints_saved", run.checkpoints_saved)


def _batch_to_device(run: Run) -> Callable[[dict], dict]:
    """Host batch -> the train step's input; with the images on the devices, only indices cross."""
    if not run.images_on_device:
        return run.steps.shard_batch
    add_images = strategies.on_device_images(run.data.train.images, run.mesh)
    return lambda host_batch: add_images(run.steps.shard_batch(host_batch))


def _train_one_epoch(
    run: Run, train_step, to_device, batch, rng, epoch: int, started: tuple[float, int]
) -> tuple[dict, int]:
    """The epoch's steps: its train metrics and how many steps were skipped for NaN/Inf.

    batch: the first step's input when already on the devices, else None.
    started: (time, step) when this process began training, for the rate and the ETA.
    """
    config, chrono = run.config, run.chrono
    accumulator = accumulators.TrainAccumulator()
    skipped, pending_check = 0, None
    for _ in range(run.steps_per_epoch):
        if batch is None:
            with chrono.input_wait():
                batch = to_device(next(run.train_iter))
        run.state, step_metrics = train_step(run.state, batch, rng)
        batch = None
        accumulator.update(step_metrics)
        run.step += 1
        chrono.step_dispatched()
        # Read one step late, so the check never waits for the step just dispatched.
        skipped += _check_finite(pending_check, config.nan_policy, run.ckpt)
        pending_check = (run.step, step_metrics["grads_finite"])
        if run.is_main and itstime(run.step, config.log_every_steps, run.total_steps):
            rate = (run.step - started[1]) / max(time.perf_counter() - started[0], 1e-9)
            log.info(
                "epoch %d/%d step %d/%d  %.1f steps/s  ETA %s",
                epoch,
                config.num_epochs,
                run.step,
                run.total_steps,
                rate,
                report.duration((run.total_steps - run.step) / max(rate, 1e-9)),
            )
    chrono.pause()
    skipped += _check_finite(pending_check, config.nan_policy, run.ckpt)
    return accumulator.compute(), skipped


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
        raise NonFiniteError(
            f"NaN or Inf in the loss or gradients at step {step} (the update was not applied). "
            f"Last good checkpoint: {where}. Lower the learning rate, set config.clip_norm, "
            "or set config.nan_policy='skip' to skip such steps."
        )
    log.warning("Step %d: NaN or Inf in the loss or gradients; update skipped.", step)
    return 1


def _log_epoch(record: dict) -> None:
    # A metric is None when undefined (e.g. every step of the epoch skipped for NaN).
    train, val = record["train"], record["val"]
    log.info(
        "epoch %d: train loss %s acc %s | val loss %s acc %s macro-F1 %s (%.1f s)",
        record["epoch"],
        report.number(train["loss"], 4),
        report.number(train["accuracy"]),
        report.number(val["loss"], 4),
        report.number(val["accuracy"]),
        report.number(val["macro_f1"]),
        record["epoch_time_s"],
    )


def _end_epoch(run: Run, record: dict) -> None:
    """Logs the epoch; after an evaluation, updates early stopping and saves when due."""
    config, progress, epoch = run.config, run.progress, record["epoch"]
    progress.history.append(record)
    scalars = {
        "lr": record["lr"],
        "epoch_time_s": record["epoch_time_s"],
        **metrics_lib.flatten_scalars(record["train"], "train/"),
    }
    if "val" in record:
        scalars.update(metrics_lib.flatten_scalars(record["val"], "val/"))
    run.writer.write_scalars(run.step, scalars, epoch=epoch)
    if "val" not in record:
        return  # a checkpoint carries its validation metrics (the best one is chosen by them)
    progress.early_stopping = progress.early_stopping.update(record["val"].get(config.best_metric))
    if progress.early_stopping.should_stop:
        progress.stopped = {"epoch": epoch, "reason": progress.early_stopping.reason()}
        log.info("Early stop after epoch %d: %s.", epoch, progress.stopped["reason"])
    # A new best is always saved, so the best checkpoint is the best epoch;
    # an early stop is saved so that a rerun knows the run is over.
    if (
        itstime(epoch, config.checkpoint_every_epochs, config.num_epochs)
        or progress.early_stopping.improved
        or progress.stopped
    ):
        # Asynchronous: the phase holds what the loop waits for (the copy off the device).
        with run.chrono.phase("checkpoint"):
            wall_time_s = progress.wall_before_s + run.chrono.elapsed_s()
            run.ckpt.save(
                run.step,
                run.state,
                run.train_iter.get_state(),
                metrics=record["val"],
                extra=progress.to_extra(wall_time_s),
            )
        run.checkpoints_saved += 1


# ------------------------------------------------------------------ after training


def evaluate_best(run: Run) -> dict:
    """The best checkpoint: {"epoch", "test" (report), "predictions" {"test", "val"}}."""
    best_step = run.ckpt.best_step()
    state, _, _ = run.ckpt.restore(best_step, run.state)
    state = run.steps.place_state(state)
    score = functools.partial(
        evaluate,
        run.steps,
        state,
        global_batch_size=run.config.global_batch_size,
        class_names=run.data.class_names,
        positive_class=run.data.positive_class,
        with_arrays=True,
    )
    test, test_predictions = score(run.data.test)
    _, val_predictions = score(run.data.val)
    best_epoch = best_step // run.steps_per_epoch
    log.info("Test (best checkpoint, epoch %d):\n%s", best_epoch, metrics_lib.format_report(test))
    clinical = {}
    if run.config.clinical_report:
        with run.chrono.phase("clinical"):
            clinical = clinical_report(run, state, score, val_predictions, test_predictions)
    return {
        "epoch": best_epoch,
        "test": test,
        "clinical": clinical,
        "predictions": {"test": test_predictions, "val": val_predictions},
    }


def clinical_report(run: Run, state, score, val_predictions, test_predictions) -> dict:
    """Calibration, operating points, bootstrap, grounding and probes of the test part."""

    def probs_of(images):  # the probes' altered test images through the compiled eval step
        altered = pipeline.ArraySet(images, run.data.test.labels, run.data.test.names)
        return score(altered)[1]["probs"]

    # Every process calls this (the eval step is collective); only the main one writes files.
    sections = clinical_outputs.clinical_sections(
        model=create_model(run.config, num_classes=len(run.data.class_names), dtype=jnp.float32),
        variables=state.variables,
        test_examples=clinical_outputs.test_examples(run.config, run.data),
        test_images=run.data.test.images,
        val_probs=val_predictions["probs"],
        val_labels=val_predictions["labels"],
        test_probs=test_predictions["probs"],
        test_labels=test_predictions["labels"],
        class_names=run.data.class_names,
        positive_class=run.data.positive_class,
        out_dir=run.workdir if run.is_main else None,
        seed=run.config.seed,
        eval_fn=probs_of,
        batch_size=run.config.global_batch_size,
    )
    log.info(
        "Clinical (best checkpoint, test part):\n%s", clinical_outputs.format_sections(sections)
    )
    return sections


def measure_breakdown(run: Run) -> None:
    """The step's compute vs collective time (bcjax.timing.breakdown) into timing.json,
    from the executable, compile and step times the loop already has."""
    batch = run.first_host_batch
    if "image" not in batch:  # the images stayed on the devices; the breakdown times a host batch
        batch = {**batch, "image": np.take(run.data.train.images, batch["index"], axis=0)}
    chrono = run.chrono
    result = breakdown.from_run(
        run.steps,
        run.train_executable,
        run.state,
        batch,
        jax.random.key(run.config.seed),
        compile_times=chrono.compile_s,
        step_times=chrono.step_times(),
        input_wait_s=chrono.input_wait_s[chrono.warmup_steps :],
        build=lambda collectives: run.build_steps(collectives=collectives),
        dtype=run.config.dtype,
    )
    run.chrono.record("breakdown", result)
    log.info("Timing breakdown:\n%s", breakdown.format_summary(result))
