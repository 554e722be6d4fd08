"""The training loop: the only place with side effects.

Steps are pure jitted functions (bcjax.parallel.strategies); this module feeds
them, keeps the time, evaluates, logs, checkpoints and writes the summary.
Only process 0 writes files; every process runs the same steps.

`train_and_evaluate` reads top down:

    set_up          the frozen RunContext, the train state and Progress (run_setup.py)
    train           compile, then one loop over the steps; at each epoch's end:
                    validate, log, decide on early stopping, checkpoint
    evaluate_best   the best checkpoint on the test part (bcjax.eval.evaluators),
                    with the clinical report; then the timing breakdown
    outputs         predictions, plots, timing.json and, last, results.json (outputs.py)

A finished run (every epoch trained, or stopped early) skips training: `re_evaluate`.
The whole run holds its workdir's lock (bcjax.train.run_lock, process 0), whoever calls it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gc
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from bcjax.data import pipeline
from bcjax.eval import accumulators, evaluators
from bcjax.eval import metrics as metrics_lib
from bcjax.parallel import strategies
from bcjax.timing import chrono as chrono_lib
from bcjax.train import console as console_lib
from bcjax.train import outputs, run_lock
from bcjax.train.periodic import itstime
from bcjax.train.run_setup import Progress, RunContext, set_up
from bcjax.train.workdir import WorkdirError

__all__ = [
    "Interrupted",
    "NonFiniteError",
    "WorkdirError",  # what bcjax.main reports as a message, not a traceback
    "evaluate_best",
    "re_evaluate",
    "train",
    "train_and_evaluate",
]

log = logging.getLogger(__name__)

# on_epoch_end(record) -> True stops the run as a kill would (see train_and_evaluate).
OnEpochEnd = Callable[[dict], Any]


class Interrupted(RuntimeError):
    """A run (or a cross-validation) stopped on its caller's request, as a kill would stop it."""


class NonFiniteError(FloatingPointError):
    """The loss or gradients became NaN/Inf and config.nan_policy is "stop"."""


@dataclasses.dataclass(frozen=True)
class Trained:
    """What training leaves for the evaluators after it: the final state, the compiled
    train step with the host batch it was compiled for (the breakdown times them), and
    the compiled eval step (None when no part had a batch to compile it for), and the
    seconds each checkpoint save blocked the loop (its write may still be running)."""

    state: Any
    executable: Any
    host_batch: dict
    eval_step: Any = None
    save_s: tuple[float, ...] = ()


# ------------------------------------------------------------------ the run


def train_and_evaluate(config, workdir, *, on_epoch_end: OnEpochEnd | None = None) -> dict:
    """Trains per `config`, resuming from `workdir` when it holds a run; returns results.json.

    on_epoch_end(record): called after every epoch once its checkpoint (if any)
    is saved, with the epoch's record ({"epoch", "train", "val"?, ...}). When it
    returns True the run stops as a kill would: the checkpoint writes are
    awaited, Interrupted is raised, and no summary is written (tests use it to
    interrupt and resume).

    One run per workdir: process 0 holds the workdir's lock for the whole run
    (bcjax.train.run_lock; `WorkdirLockedError` names the live run that has it).
    bcjax.main took it already, before its imports; a notebook's call takes it here.
    """
    with run_lock.hold_on_process_0([workdir], reenter=True), _long_lived_frozen():
        return _train_and_evaluate(config, workdir, on_epoch_end)


@contextlib.contextmanager
def _long_lived_frozen():
    """Python's full garbage collections skip the objects that live as long as the run.

    The block starts with gc.freeze() (what the process imported and holds), and `train`
    freezes again once compiled (the model, the traced and compiled programs, JAX's caches):
    a full collection then scans only what is newer. Scanning everything was ≈ 0.5 s of a
    warm quickstart on CPU-dev (9 full collections of 14-150 ms, each longer as the heap grew;
    ≈ 0.2 s with the freezes: BUILD_NOTES, #23 session 11). gc.unfreeze() when the run ends
    puts them back, so what became garbage meanwhile is collected then (Python has one
    frozen generation: objects a caller froze before the run are unfrozen with them).
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _train_and_evaluate(config, workdir, on_epoch_end: OnEpochEnd | None) -> dict:
    chrono = chrono_lib.Chrono(startup_s=chrono_lib.claim_startup_s())
    with chrono.phase("setup"):
        ctx, state, progress = set_up(config, workdir, chrono)
    try:
        if ctx.first_step >= ctx.total_steps or progress.stopped is not None:
            log.info(
                "The run in %s is complete; evaluating its best checkpoint again.", ctx.workdir
            )
            return re_evaluate(ctx, state, progress)
        trained = train(ctx, state, progress, on_epoch_end)
        # A resumed run adds the time its earlier processes took to reach the
        # checkpoint it resumed from (work they did after it is redone, not counted twice).
        walls = {
            "train_wall_s": progress.wall_before_s + chrono.elapsed_s(),
            "train_wall_s_this_process": chrono.elapsed_s(),
        }
        # Now too, so that a kill in the test or the breakdown loses no timing.
        outputs.write_timing(ctx, {**chrono.summary(), **walls})
        with chrono.phase("test"):
            best = evaluate_best(ctx, trained.state, eval_step=trained.eval_step, final_state=True)
        if ctx.specs.run.timing_breakdown:  # after the test, so wall_time_s is the run's own
            with chrono.phase("breakdown"):
                chrono.record("breakdown", breakdown_of(ctx, trained).run(trained.state))
        # The last checkpoint's write ran beside the test; it is on disk before the outputs.
        finish_checkpoint_writes(ctx, trained.save_s)
        results = outputs.summarize(
            ctx, progress, best, walls["train_wall_s"], walls["train_wall_s_this_process"]
        )
        with chrono.phase("outputs"):
            outputs.write_outputs(ctx, progress, best)
        outputs.write_timing(ctx, {**chrono.summary(), **walls})
        outputs.write_results(ctx, results)  # last: its presence means the run is complete
        return results
    finally:
        ctx.close()


def re_evaluate(ctx: RunContext, state, progress: Progress) -> dict:
    """A finished run's best checkpoint scored again; the trained process's timing is kept."""
    best = evaluate_best(ctx, state)
    walls = outputs.previous_walls(ctx.workdir)
    elapsed = ctx.chrono.elapsed_s()
    results = outputs.summarize(
        ctx,
        progress,
        best,
        walls.get("wall_time_s", progress.wall_before_s + elapsed),
        walls.get("wall_time_s_this_process", elapsed),
    )
    outputs.write_outputs(ctx, progress, best)
    outputs.write_results(ctx, results)
    return results


# ------------------------------------------------------------------ training


def train(ctx: RunContext, state, progress: Progress, on_epoch_end: OnEpochEnd | None = None):
    """Compiles the train step, then trains from the resumed step to the last or an early
    stop; returns `Trained`. `progress` is updated in place (and checkpointed with the state).
    Once compiled, it freezes the heap (gc.freeze; `train_and_evaluate` unfreezes it)."""
    run, chrono = ctx.specs.run, ctx.chrono
    rng = jax.random.key(run.seed)
    with chrono.phase("data"):
        to_device = _batch_to_device(ctx)
    # Apart from the steps, so that no step time includes the compile; the eval step
    # compiles here too, not inside the first validation's time. A fresh CPU run's train
    # step has been compiling since set-up (beside the state's initialisation and, here, the
    # eval step's compile; BUILD_NOTES, #23 session 11): the phase waits for it.
    with (
        chrono.phase("compile"),
        console_lib.announced("compiling the train and eval steps", enabled=ctx.is_main),
    ):
        host_batch = next(ctx.train_iter)
        first_batch = to_device(host_batch)
        # The eval step first: a train step that set-up started compiling (run_setup.py's
        # `compiles_train_step_ahead`) may still be compiling on its thread meanwhile.
        eval_batch = _eval_batch_to_compile_for(ctx)
        eval_step = (
            None
            if eval_batch is None
            else chrono.compile("eval_step", ctx.steps.eval_step, state, eval_batch)
        )
        if ctx.train_step_ahead is not None:
            train_step, times = ctx.train_step_ahead.result()
            chrono.compile_s["train_step"] = {**times, "beside": "setup"}
        else:
            train_step = chrono.compile("train_step", ctx.steps.train_step, state, first_batch, rng)
    # What the run made so far (the model, the traced and compiled programs, their caches)
    # lives as long as the run: out of the collector's way too (see _long_lived_frozen).
    gc.freeze()
    console = console_lib.Console(
        first_step=ctx.first_step,
        total_steps=ctx.total_steps,
        steps_per_epoch=ctx.steps_per_epoch,
        platform=jax.devices()[0].platform,
        enabled=ctx.is_main,
        log_every_steps=run.log_every_steps,
    )
    validation = evaluators.Validation(scorer(ctx, eval_step), ctx.data.val)
    epoch_metrics = accumulators.TrainAccumulator()
    checks = _FiniteChecks(run.nan_policy, ctx.ckpt, progress.total("skipped_steps"))
    save_s: list[float] = []  # what each asynchronous save blocked the loop for
    console.start()
    epoch_start = time.perf_counter()
    with chrono.phase("train"), _end_of_run_prepared_meanwhile(ctx, state):
        batches = _device_batches(first_batch, ctx, to_device)
        for step, batch in zip(range(ctx.first_step + 1, ctx.total_steps + 1), batches):
            state, step_metrics = train_step(state, batch, rng)
            chrono.step_dispatched()
            if step > ctx.first_step + 1 and (step - 1) % ctx.steps_per_epoch == 0:
                # An epoch's first step: the epoch's end read every flag, so the next step
                # is dispatched at once, without waiting for this one; that interval would
                # be dispatch alone, not a step (the finite checks pace the loop, see there).
                chrono.pause()
            epoch_metrics.update(step_metrics)
            checks.after(step, step_metrics)
            console.step(step)
            if step % ctx.steps_per_epoch:
                continue
            # ---- the epoch's end
            chrono.pause()
            checks.flush()
            epoch = step // ctx.steps_per_epoch
            record = _epoch_record(ctx, progress, epoch, step, epoch_metrics.compute(), checks)
            record["epoch_time_s"] = time.perf_counter() - epoch_start
            epoch_metrics = accumulators.TrainAccumulator()
            if itstime(epoch, run.eval_every_epochs, run.num_epochs):
                with chrono.phase("eval"):
                    record["val"] = validation.run(state)
            log_epoch(ctx, progress, record, step)
            console.epoch(record, step)
            if "val" in record:  # a checkpoint carries its validation metrics: only then
                decide_early_stop(progress, record, run.best_metric)
                if checkpoint_due(progress, epoch, run.checkpoint_every_epochs, run.num_epochs):
                    save_s.append(save_checkpoint(ctx, state, progress, step, record["val"]))
            if on_epoch_end is not None and on_epoch_end(record):
                ctx.ckpt.wait_until_finished()
                raise Interrupted(f"stopped after epoch {epoch} (on_epoch_end)")
            if progress.stopped:
                break
            epoch_start = time.perf_counter()
    chrono.record("checkpoints_saved", len(save_s))
    return Trained(
        state=state,
        executable=train_step,
        host_batch=host_batch,
        eval_step=eval_step,
        save_s=tuple(save_s),
    )


@contextlib.contextmanager
def _end_of_run_prepared_meanwhile(ctx: RunContext, state):
    """What the end of the run needs and training does not, made while the block (the train
    loop) runs: a thread imports the clinical report's modules (matplotlib with them) and
    compiles its Grad-CAM program from shapes (traced and lowered; then read from the
    compile cache, or compiled), so that the report finds both ready.

    The thread runs no device computation, only Python and XLA's compiler, mostly on the
    core the step leaves idle (the host thread waits for the step). It is joined when the
    block ends, before anything uses its work and before timing.json and results.json are
    written; its error is raised there (an error of the block itself comes first).
    timing.json's "end_of_run_ahead_s": the thread's imports, its Grad-CAM compile
    ({"lower_s", "compile_s", "persistent_cache"}) and total, all beside the train phase and
    in no phase (nor in "compile", which keeps the steps' own compiles), and the join's wait,
    which the train phase holds. CPU runs of one process with a clinical report only
    (`prepares_end_of_run`); elsewhere the block runs alone, as before.
    """
    if not prepares_end_of_run(ctx):
        yield
        return
    model = report_model(ctx)
    variables = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), state.variables)
    test_shape = ctx.data.test.images.shape
    batch_size = ctx.specs.run.global_batch_size
    with_gradcam = any(example.mask_paths for example in ctx.data.test_examples)

    def prepare() -> dict:
        t0 = time.perf_counter()
        from bcjax.eval import clinical_outputs, plots  # noqa: F401  (the report's modules)

        done = {"imports": time.perf_counter() - t0}
        if with_gradcam:  # the report runs Grad-CAM only where lesion masks are
            t1 = time.perf_counter()
            lowered = clinical_outputs.gradcam_lowered(model, variables, test_shape, batch_size)
            lower_s = time.perf_counter() - t1
            _, times = chrono_lib.timed_compile_lowered(lowered)  # kept in JAX's caches
            done["gradcam"] = {"lower_s": lower_s, **times}
        done["thread"] = time.perf_counter() - t0
        return done

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bcjax-end-of-run") as pool:
        prepared = pool.submit(prepare)
        try:
            yield
        except BaseException:
            concurrent.futures.wait([prepared])  # the block's error is the one raised
            raise
        t0 = time.perf_counter()
        done = prepared.result()  # its error, if any, is raised here
        wait_s = time.perf_counter() - t0
    ctx.chrono.record("end_of_run_ahead_s", {**done, "wait": wait_s})


def prepares_end_of_run(ctx: RunContext) -> bool:
    """Whether training prepares the end of the run beside its steps (see
    `_end_of_run_prepared_meanwhile`): CPU runs of one process whose clinical report has test
    images. Accelerators and runs of several processes prepare nothing ahead."""
    return (
        ctx.specs.run.clinical_report
        and len(ctx.data.test) > 0
        and ctx.mesh.devices.flat[0].platform == "cpu"
        and jax.process_count() == 1
    )


def finish_checkpoint_writes(ctx: RunContext, save_s=()) -> None:
    """Waits for the asynchronous checkpoint writes (before any output that says the run is
    done); timing.json's "checkpoint_s": what each save blocked the loop for, and this wait."""
    with ctx.chrono.phase("checkpoint"):
        t0 = time.perf_counter()
        ctx.ckpt.wait_until_finished()
        final_wait_s = time.perf_counter() - t0
    ctx.chrono.record("checkpoint_s", {"save_calls": list(save_s), "final_wait": final_wait_s})


def scorer(ctx: RunContext, eval_step=None) -> evaluators.Scorer:
    """The eval step over a part; eval_step: its compiled executable (None: compiled on use)."""
    return evaluators.Scorer(
        ctx.steps,
        eval_batch_size(ctx),
        tuple(ctx.data.class_names),
        positive_class=ctx.data.positive_class,
        eval_step=eval_step,
    )


def eval_batch_size(ctx: RunContext) -> int:
    """The eval step's global batch (validation, test, the clinical probes).

    On a CPU: the validation part (else the test part) in the fewest batches of at most the
    global batch size, made as equal as the mesh allows, so that the last one is not mostly
    padding (a padded row costs what an image costs): 78 images at batch 32 go as 3 x 26, not
    3 x 32. Eval mode scores each example alone (BatchNorm's running statistics), so the
    batch changes at most float rounding (with jax 0.10.2 the quickstart's logits are
    bit-identical at batch 16 to 96). Elsewhere: the global batch size, as before.
    """
    batch = ctx.specs.run.global_batch_size
    n = len(ctx.data.val) or len(ctx.data.test)
    if n == 0 or ctx.mesh.devices.flat[0].platform != "cpu":
        return batch
    per_batch = -(-n // -(-n // batch))  # ceil(n / ceil(n / batch))
    devices = ctx.mesh.devices.size
    return min(batch, -(-per_batch // devices) * devices)


def _eval_batch_to_compile_for(ctx: RunContext):
    """The validation part's first batch on the devices (else the test part's): every eval
    batch has its shapes (the last one is padded). None when both parts are empty."""
    for part in (ctx.data.val, ctx.data.test):
        if len(part):
            batches = pipeline.eval_batches(
                part, eval_batch_size(ctx), jax.process_index(), jax.process_count()
            )
            return ctx.steps.shard_batch(next(iter(batches)))
    return None


def _batch_to_device(ctx: RunContext) -> Callable[[dict], dict]:
    """Host batch -> the train step's input; with the images on the devices, only indices cross."""
    if not ctx.images_on_device:
        return ctx.steps.shard_batch
    add_images = strategies.on_device_images(ctx.data.train.images, ctx.mesh)
    return lambda host_batch: add_images(ctx.steps.shard_batch(host_batch))


def _device_batches(first_batch, ctx: RunContext, to_device) -> Iterator[dict]:
    """The compiled-for batch, then the iterator's, each fetched only when asked for (so a
    checkpoint's iterator state is that of the steps taken), its wait timed."""
    yield first_batch
    while True:
        with ctx.chrono.input_wait():
            batch = to_device(next(ctx.train_iter))
        yield batch


class _FiniteChecks:
    """Steps whose update was skipped for a NaN/Inf loss or gradient; with nan_policy
    "stop" the run ends at the check, naming the step and the last good checkpoint.

    A step's flag is read one step late, so the check never waits for the step just
    dispatched. That read is also what paces the loop: without it the host would
    dispatch ahead of the devices and the dispatch intervals (chrono's step times,
    timing.json, the one-device breakdown) would measure dispatch, not steps. A float16
    overflow ("overflow" in the step's metrics, grads_finite still True) is the loss
    scale's expected skip, counted per epoch apart from these. `skipped`: the run's
    non-finite steps so far.
    """

    def __init__(self, policy: str, ckpt, skipped: int):
        self.policy, self.ckpt, self.skipped = policy, ckpt, skipped
        self._pending: tuple[int, Any] | None = None

    def after(self, step: int, step_metrics: dict) -> None:
        self.flush()
        self._pending = (step, step_metrics["grads_finite"])

    def flush(self) -> None:
        if self._pending is None:
            return
        (step, finite), self._pending = self._pending, None
        if bool(finite):
            return
        if self.policy == "stop":
            self.ckpt.wait_until_finished()
            last = self.ckpt.latest_step()
            where = (
                f"step {last} in {self.ckpt.directory}" if last is not None else "none saved yet"
            )
            raise NonFiniteError(
                f"NaN or Inf in the loss or gradients at step {step} (the update was not "
                f"applied). Last good checkpoint: {where}. Lower the learning rate, set "
                "config.clip_norm, or set config.nan_policy='skip' to skip such steps."
            )
        log.warning("Step %d: NaN or Inf in the loss or gradients; update skipped.", step)
        self.skipped += 1


def _epoch_record(ctx, progress: Progress, epoch: int, step: int, train_metrics, checks) -> dict:
    # float16: "overflow" averages to the fraction of the epoch's steps that overflowed.
    overflowed = round((train_metrics.get("overflow") or 0.0) * train_metrics.get("steps", 0))
    overflow_total = progress.total("overflow_skipped_steps") + overflowed
    # The rate the optimiser uses: a skipped step (NaN/Inf under nan_policy "skip", a float16
    # overflow) keeps its whole state, the schedule's count with it, while `step` advances.
    applied = step - checks.skipped - overflow_total
    return {
        "epoch": epoch,
        "lr": float(ctx.schedule(applied)),
        "train": train_metrics,
        "skipped_steps": checks.skipped,
        "overflow_skipped_steps": overflow_total,
    }


def log_epoch(ctx: RunContext, progress: Progress, record: dict, step: int) -> None:
    """The epoch into the history, metrics.jsonl and TensorBoard."""
    progress.history.append(record)
    scalars = {
        "lr": record["lr"],
        "epoch_time_s": record["epoch_time_s"],
        "overflow_skipped_steps": record["overflow_skipped_steps"],
        **metrics_lib.flatten_scalars(record["train"], "train/"),
    }
    if "val" in record:
        scalars.update(metrics_lib.flatten_scalars(record["val"], "val/"))
    ctx.writer.write_scalars(step, scalars, epoch=record["epoch"])


def decide_early_stop(progress: Progress, record: dict, best_metric: str) -> None:
    """Early stopping told of the epoch's validation metric; `progress.stopped` once it says so."""
    progress.early_stopping = progress.early_stopping.update(record["val"].get(best_metric))
    if progress.early_stopping.should_stop:
        progress.stopped = {"epoch": record["epoch"], "reason": progress.early_stopping.reason()}
        log.info("Early stop after epoch %d: %s.", record["epoch"], progress.stopped["reason"])


def checkpoint_due(progress: Progress, epoch: int, every: int, num_epochs: int) -> bool:
    """Every `every` epochs and the last; also a new best, so that the best checkpoint is
    the best epoch, and an early stop, so that a rerun knows the run is over."""
    return bool(
        itstime(epoch, every, num_epochs) or progress.early_stopping.improved or progress.stopped
    )


def save_checkpoint(ctx: RunContext, state, progress: Progress, step: int, val: dict) -> float:
    """Starts the checkpoint's asynchronous write; returns the seconds the loop waited (the
    copy off the devices), which the phase holds."""
    with ctx.chrono.phase("checkpoint"):
        t0 = time.perf_counter()
        wall_time_s = progress.wall_before_s + ctx.chrono.elapsed_s()
        ctx.ckpt.save(
            step,
            state,
            ctx.train_iter.get_state(),
            metrics=val,
            extra=progress.to_extra(wall_time_s),
        )
        return time.perf_counter() - t0


# ------------------------------------------------------------------ after training


def evaluate_best(ctx: RunContext, state, *, eval_step=None, final_state: bool = False) -> dict:
    """The best checkpoint: {"epoch", "test" (report), "clinical", "predictions" {"test", "val"}}.

    state: a train state of the run (the target the checkpoint is restored into);
    eval_step: the compiled eval step, when training compiled one. final_state: `state`
    is the one training ended with, saved as the latest checkpoint; when that one is the
    best it is scored as it is (the same arrays the checkpoint holds), so its write goes
    on in the background instead of being waited for and read back.
    """
    best_step = ctx.ckpt.best_step()
    if final_state and best_step == ctx.ckpt.latest_step() == int(state.step):
        best_state = state
    else:
        best_state, _, _ = ctx.ckpt.restore(best_step, state)
        best_state = ctx.steps.place_state(best_state)
    score = scorer(ctx, eval_step)
    tested = evaluators.Test(score, ctx.data.test, ctx.data.val).run(best_state)
    best_epoch = best_step // ctx.steps_per_epoch
    log.info(
        "Test (best checkpoint, epoch %d):\n%s",
        best_epoch,
        metrics_lib.format_report(tested["test"]),
    )
    clinical = {}
    if ctx.specs.run.clinical_report:
        with ctx.chrono.phase("clinical"):
            clinical = clinical_report_of(ctx, score, tested["predictions"]).run(best_state)
    return {"epoch": best_epoch, **tested, "clinical": clinical}


def clinical_report_of(ctx: RunContext, score, predictions: dict) -> evaluators.ClinicalReport:
    return evaluators.ClinicalReport(
        score=score,
        model=report_model(ctx),
        test=ctx.data.test,
        test_examples=ctx.data.test_examples,  # as read at set-up: no second read of the source
        predictions=predictions,
        out_dir=ctx.workdir if ctx.is_main else None,
        seed=ctx.specs.run.seed,
        batch_size=ctx.specs.run.global_batch_size,
    )


def report_model(ctx: RunContext):
    """The trained network in float32: the report's gradients and probes need no bf16."""
    return ctx.model.clone(dtype=jnp.float32)


def breakdown_of(ctx: RunContext, trained: Trained) -> evaluators.Breakdown:
    return evaluators.Breakdown(
        steps=ctx.steps,
        executable=trained.executable,
        host_batch=trained.host_batch,
        train_images=ctx.data.train.images,
        build_steps=ctx.build_steps,
        chrono=ctx.chrono,
        seed=ctx.specs.run.seed,
        dtype=ctx.specs.model.dtype,
    )
