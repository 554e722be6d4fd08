"""Where a train step's time goes: compute, collectives, compile.

    build = lambda collectives: strategies.build_steps(..., collectives=collectives)
    result = breakdown.measure(build, state, host_batch, rng)

The same step is compiled twice: as trained (with its cross-device
reductions) and with ``collectives=False`` (every device runs its own
forward/backward/update, nothing crosses devices). On a fixed batch, after
warm-up, both are timed step by step, synchronised (``block_until_ready``)
and interleaved, so slow drift of a shared machine hits both alike:

- compute      = the step without collectives (per-device work);
- exposed collective = full - compute: the communication the step waits
  for, i.e. what overlap with the backward pass did not hide (clamped at 0,
  the raw difference is kept too: noise can make it negative);
- raw all-reduce = a jitted ``shard_map`` psum over "data" of an fp32 tree
  shaped like the parameters, alone: what the gradient reduction costs
  when nothing hides it.

Compile time never enters step times: executables are built with
``lower()``/``compile()`` first, timed apart, and called directly.

At the end of a training run the loop has already compiled and timed the
step; ``from_run`` reuses that (its executable, compile times, step and
input-wait times) and compiles only what the run never built:

    result = breakdown.from_run(steps, compiled_train_step, state, host_batch, rng,
                                compile_times=chrono.compile_s, step_times=chrono.step_times(),
                                input_wait_s=..., build=build)

This module measures; reading and reporting the result (``stats``, ``check``,
``format_summary``, ``FIELDS``, the cost-analysis readers ``cost_flops`` and
``safe_cost``) live in bcjax.timing.breakdown_report, cold/warm compile times
(``compile_cold_warm``) in bcjax.timing.breakdown_compile; all are importable
from here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bcjax.timing import devices as devices_lib
from bcjax.timing.breakdown_compile import (  # noqa: F401  (part of this module's API)
    _fresh_persistent_cache,
    compile_cold_warm,
)
from bcjax.timing.breakdown_report import (  # noqa: F401  (part of this module's API)
    FIELDS,
    GPU_FLOPS_NOTE,
    MAYBE_NONE,
    _flops_fields,
    _hlo_text,
    check,
    cost_flops,
    format_summary,
    log,
    safe_cost,
    stats,
)
from bcjax.timing.chrono import timed_compile

DATA_AXIS = "data"

SIMULATED_NOTE = (
    "timings simulated: the devices are CPU devices sharing one host's cores, "
    "so per-device compute and collective times do not predict N real accelerators "
    "(bcjax.timing.scaling_model predicts N real accelerators from one device's step)"
)
ONE_DEVICE_NOTE = (
    "one device: nothing to separate (compute is the whole step, no collectives), "
    "so no step was timed again; step times are the loop's own"
)


def _copy_tree(tree):
    """Fresh buffers with the same shardings: the steps donate their state,
    and the caller's state must survive the measurement."""
    # device_put copies without compiling; Array.copy() would compile a small
    # program per leaf shape (18 for a ResNet-18).
    return jax.tree.map(
        lambda x: jax.device_put(x, x.sharding, may_alias=False) if isinstance(x, jax.Array) else x,
        tree,
    )


def _global_batch_size(batch: Mapping[str, np.ndarray]) -> int:
    return int(np.shape(next(iter(batch.values())))[0]) * jax.process_count()


def allreduce_fn(mesh, params):
    """A jitted psum over "data" of an fp32 tree shaped like ``params``, and
    its input (one distinct block per device, so nothing folds away)."""
    n = mesh.size
    sharding = NamedSharding(mesh, P(DATA_AXIS))

    def make_inputs():
        return jax.tree.map(
            lambda p: jnp.broadcast_to(
                jnp.arange(n, dtype=jnp.float32).reshape((n,) + (1,) * np.ndim(p)),
                (n,) + tuple(np.shape(p)),
            ),
            params,
        )

    inputs = jax.jit(make_inputs, out_shardings=sharding)()
    reduce = jax.jit(
        jax.shard_map(
            lambda t: jax.tree.map(lambda x: jax.lax.psum(x, DATA_AXIS), t),
            mesh=mesh,
            in_specs=P(DATA_AXIS),
            out_specs=P(),
        )
    )
    return reduce, inputs


def time_allreduce(mesh, params, *, warmup: int = 2, iters: int = 10) -> dict:
    """Raw all-reduce time of a gradient-sized fp32 tree, synchronised per call."""
    reduce, inputs = allreduce_fn(mesh, params)
    compiled = reduce.lower(inputs).compile()
    for _ in range(warmup):
        jax.block_until_ready(compiled(inputs))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(inputs))
        times.append(time.perf_counter() - t0)
    return stats(times)


def _time_interleaved(runners: Sequence[Callable[[], Any]], iters: int) -> list[list[float]]:
    """Synchronised per-call times of each runner, alternating between them."""
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(iters):
        for i, run in enumerate(runners):
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            times[i].append(time.perf_counter() - t0)
    return times


class _Chain:
    """Calls a compiled train step on its own state, step after step."""

    def __init__(self, compiled, state, batch, rng):
        self.compiled, self.state, self.batch, self.rng = compiled, state, batch, rng

    def __call__(self):
        self.state, metrics = self.compiled(self.state, self.batch, self.rng)
        return self.state, metrics


def measure(
    build: Callable[[bool], Any] | tuple,
    state,
    batch: Mapping[str, np.ndarray],
    rng,
    *,
    warmup: int = 2,
    iters: int = 10,
    allreduce: bool = True,
    eval_step: bool = True,
    compile_cache: bool | str = False,
    dtype: str | None = None,
    profile_dir: str | None = None,
    profile_steps: int = 3,
    fresh: bool = True,
) -> dict:
    """Times a train step and splits it into compute and collective time.

    Standalone: builds and compiles everything itself (benchmarks, tests). At
    the end of a training run, ``from_run`` gives the same report from what the
    loop already compiled and measured.

    Args:
      build: ``build(collectives: bool) -> Steps`` (``strategies.build_steps``
        with the run's arguments and ``collectives`` passed through), or a pair
        ``(steps, steps_without_collectives_or_None)``.
      state: a TrainState (left untouched: copies are stepped).
      batch: one host batch of this process, numpy, as the train iterator yields.
      rng: the run's base key.
      warmup, iters: untimed then timed steps of each variant.
      allreduce: also time a gradient-sized all-reduce alone.
      eval_step: also lower/compile the eval step (timed).
      compile_cache: True (a temporary folder) or a folder path: also measure
        cold and warm compiles in a fresh persistent compilation cache
        (two more compiles per step: for benchmarks rather than every run).
      fresh: start with ``jax.clear_caches()``, so the compiles timed here are
        those of a new process: warm (``persistent_cache: "hit"``) when the
        run's persistent cache already holds the steps, cold otherwise.
        Jitted functions recompile (or reload) on their next use.
      dtype: compute dtype name, for the peak FLOP/s (default: bfloat16 on
        accelerators).
      profile_dir: when set, also record a ``jax.profiler`` trace of
        ``profile_steps`` steps there and sum collective ops per device.

    Returns a JSON-able dict (see ``FIELDS``); on one device compute equals
    the step and the collective fields are 0.
    """
    if fresh:
        jax.clear_caches()
    if isinstance(build, tuple):
        steps_full, steps_comp = build
    else:
        steps_full = build(True)
        steps_comp = build(False) if steps_full.mesh.size > 1 else None

    base = steps_full.place_state(state)
    b_full = steps_full.shard_batch(batch)
    lowered_full, compiled_full, t_full = timed_compile(steps_full.train_step, base, b_full, rng)
    compile_times = {"train_step": t_full}
    if eval_step and hasattr(steps_full.eval_step, "lower"):
        _, _, compile_times["eval_step"] = timed_compile(steps_full.eval_step, base, b_full)

    result, full_runner = _measure_compiled(
        steps_full,
        compiled_full,
        lowered_full,
        steps_comp,
        base,
        batch,
        rng,
        compile_times,
        warmup=warmup,
        iters=iters,
        allreduce=allreduce,
        dtype=dtype,
    )

    if compile_cache:
        calls = {"train_step": (steps_full.train_step, base, b_full, rng)}
        if eval_step and hasattr(steps_full.eval_step, "lower"):
            calls["eval_step"] = (steps_full.eval_step, base, b_full)
        result["compile_cache"] = compile_cold_warm(
            calls, cache_dir=compile_cache if isinstance(compile_cache, str) else None
        )

    if profile_dir:
        from bcjax.timing import profile

        result["profile"] = profile.profile_steps(
            full_runner, profile_dir, steps=profile_steps, hlo_text=_hlo_text(compiled_full)
        )
    return result


def from_run(
    steps,
    compiled,
    state,
    batch: Mapping[str, np.ndarray],
    rng,
    *,
    compile_times: Mapping[str, Mapping],
    step_times: Sequence[float] = (),
    input_wait_s: Sequence[float] = (),
    lowered=None,
    build: Callable[[bool], Any] | None = None,
    warmup: int = 1,
    iters: int = 10,
    allreduce: bool = True,
    dtype: str | None = None,
) -> dict:
    """``measure``'s report at the end of a run, from what its loop already has.

    Nothing the loop compiled is compiled again: the loop's own executable is
    timed (synchronised, on a fixed batch, as in ``measure``) and gives FLOPs
    and memory, and the compile times are the loop's. Only what the loop never
    built is compiled here: on more than one device the step without
    collectives and the gradient-sized all-reduce. On one device there is
    nothing to separate, and nothing is compiled, traced or timed: compute is
    the step, the collective fields are 0, and the step times are the loop's
    own ``step_times`` (``step_time_source``: "loop", where the others are
    "synchronised"; ``note`` says so). Only a run that timed no steady-state
    step (``step_times`` empty) has its step timed here.

    Args:
      steps: the run's ``Steps`` (``strategies.build_steps``).
      compiled: the train step executable the loop trained with
        (``chrono.compile("train_step", ...)``).
      state: the run's TrainState (left untouched: copies are stepped).
      batch: one host batch of this process, numpy, with "image", in the layout
        ``compiled`` was compiled for once through ``steps.shard_batch``.
      rng: the run's base key.
      compile_times: the loop's ``{name: {"lower_s", "compile_s",
        "persistent_cache"}}`` (``chrono.compile_s``); copied into the report.
      step_times: the loop's steady-state intervals between step dispatches
        (``chrono.step_times()``), seconds.
      input_wait_s: the loop's steady-state waits for a batch (warm-up dropped), seconds.
      lowered: the ``Lowered`` of ``compiled``, where the loop kept it; else it
        is taken from JAX's cache of the loop's lowering (no trace, no compile).
        Used on one device only, for the pre-optimisation FLOP count (which
        one CPU or TPU device skips unless ``lowered`` is given).
      build: ``build(collectives: bool) -> Steps`` as for ``measure``; called
        (with False) only on more than one device.
      warmup, iters, allreduce, dtype: as for ``measure``.

    Returns ``measure``'s fields plus the loop's own view of the steps:
    ``loop_step_time_s`` and ``input_wait_s`` (stats) and ``exposed_input_s``,
    the part of the mean input wait the loop's step interval shows beyond the
    synchronised step (0 when the device step hid it; None on one device,
    where no step is timed apart from the loop's intervals).
    """
    mesh = steps.mesh
    if mesh.size == 1 and stats(step_times)["median"] is not None:
        return _one_device_report(
            steps,
            compiled,
            state,
            batch,
            rng,
            {name: dict(t) for name, t in compile_times.items()},
            step_times,
            input_wait_s,
            lowered=lowered,
            dtype=dtype,
        )
    steps_comp = None
    if mesh.size > 1:
        if build is None:
            raise ValueError(
                f"a run on {mesh.size} devices needs build(collectives) "
                "for its step without collectives"
            )
        steps_comp = build(False)
    base = steps.place_state(state)
    if lowered is None and steps_comp is None:
        # The same jitted function with the same argument types as the loop's
        # compile: JAX returns its cached lowering.
        lowered = steps.train_step.lower(base, steps.shard_batch(batch), rng)
    result, _ = _measure_compiled(
        steps,
        compiled,
        lowered,
        steps_comp,
        base,
        batch,
        rng,
        {name: dict(t) for name, t in compile_times.items()},
        warmup=warmup,
        iters=iters,
        allreduce=allreduce,
        dtype=dtype,
    )

    loop, wait = stats(step_times), stats(input_wait_s)
    exposed_input = None
    if loop["median"] is not None and wait["mean"] is not None:
        # Input is fetched while the device runs the previous step: only what
        # the interval shows beyond the device's step time is waiting on input.
        beyond_step = max(loop["median"] - result["step_time_s"]["median"], 0.0)
        exposed_input = min(wait["mean"], beyond_step)
    result.update(loop_step_time_s=loop, input_wait_s=wait, exposed_input_s=exposed_input)
    return result


def _one_device_report(
    steps,
    compiled,
    state,
    batch,
    rng,
    compile_times: dict,
    step_times: Sequence[float],
    input_wait_s: Sequence[float],
    *,
    lowered,
    dtype: str | None,
) -> dict:
    """``from_run``'s report on one device, where there is nothing to separate.

    Compute is the whole step and every collective field is 0, so no step is
    run again: the step times are the loop's own (its steady-state dispatch
    intervals, which on one device also hold whatever input wait the device
    did not hide), and the rest comes from the loop's executable (FLOPs,
    memory) and its compile record. Nothing is traced, compiled or timed.

    FLOPs are counted once, where the report takes them from: the compiled
    program, except on GPUs, whose compiled count leaves cuDNN's convolutions
    out and where the lowered program is counted too. ``flops_lowered`` is
    None elsewhere: converting the lowered program to count it was most of
    what this report still cost (about 0.5 s for the quickstart's ResNet-18).
    """
    info = devices_lib.describe(list(steps.mesh.devices.flat))
    gbs = _global_batch_size(batch)
    loop = stats(step_times)
    step_s = loop["median"]
    if lowered is None and info["platform"] == "gpu":
        # The same jitted function with the same argument types as the loop's
        # compile: JAX returns its cached lowering (no trace, no compile).
        base = steps.place_state(state)
        lowered = steps.train_step.lower(base, steps.shard_batch(batch), rng)
    params = state.params
    result = {
        **info,
        "strategy": getattr(steps, "strategy", None),
        "global_batch_size": gbs,
        "per_device_batch": gbs,
        "warmup_steps": None,  # the loop's warm-up, dropped from step_times by the caller
        "timed_steps": loop["n"],
        "step_time_source": "loop",
        "step_time_s": loop,
        "compute_time_s": dict(loop),
        "exposed_collective_s": 0.0,
        "exposed_collective_raw_s": 0.0,
        "exposed_collective_paired_s": 0.0,
        # The loop dispatches back to back: its intervals are the pipelined step.
        "pipelined_step_s": step_s,
        "images_per_s": gbs / step_s,
        "images_per_s_per_device": gbs / step_s,
        "images_per_s_pipelined": gbs / step_s,
        "compile": compile_times,
        "shares": {"compute": 1.0, "collective": 0.0},
        "gradient_bytes": devices_lib.tree_bytes(params),
        "num_params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
        "allreduce_s": stats([0.0]),
        "allreduce_bus_GBps": None,
    }
    result.update(
        _flops_fields(
            lowered,
            compiled,
            info,
            step_s,
            step_s,
            dtype,
            jit_global=result["strategy"] == "jit",
            n=1,
        )
    )
    result["peak_memory_bytes"] = devices_lib.peak_memory_bytes()
    result["compiled_memory_bytes"] = devices_lib.compiled_memory_bytes(compiled)
    result["note"] = ONE_DEVICE_NOTE
    # The input wait is inside the loop's intervals, and with no step timed
    # apart it cannot be told from the device's step.
    result.update(loop_step_time_s=loop, input_wait_s=stats(input_wait_s), exposed_input_s=None)
    return result


def _measure_compiled(
    steps_full,
    compiled_full,
    lowered_full,
    steps_comp,
    base,
    batch,
    rng,
    compile_times: dict,
    *,
    warmup: int,
    iters: int,
    allreduce: bool,
    dtype: str | None,
) -> tuple[dict, Callable[[], Any]]:
    """The report around an already compiled full step; compiles only the step
    without collectives (``steps_comp``, None on one device) and the all-reduce.

    ``compile_times`` gets the no-collectives compile added and becomes the
    report's "compile". Returns the report and the full step's runner.
    """
    mesh = steps_full.mesh
    n = mesh.size
    info = devices_lib.describe(list(mesh.devices.flat))
    gbs = _global_batch_size(batch)

    b_full = steps_full.shard_batch(batch)
    runners = [_Chain(compiled_full, _copy_tree(base), b_full, rng)]
    lowered_comp = compiled_comp = None
    if steps_comp is not None:
        b_comp = steps_comp.shard_batch(batch)
        lowered_comp, compiled_comp, t_comp = timed_compile(
            steps_comp.train_step, base, b_comp, rng
        )
        compile_times["train_step_no_collectives"] = t_comp
        runners.append(_Chain(compiled_comp, _copy_tree(base), b_comp, rng))

    _time_interleaved(runners, warmup)
    times = _time_interleaved(runners, iters)
    full = stats(times[0])
    comp = stats(times[1]) if len(times) > 1 else dict(full)

    # Back-to-back dispatch, one sync at the end: the throughput a training
    # loop sees when nothing else stalls it.
    t0 = time.perf_counter()
    for _ in range(iters):
        out = runners[0]()
    jax.block_until_ready(out)
    pipelined = (time.perf_counter() - t0) / iters

    raw_diff = full["median"] - comp["median"]
    paired = float(np.median(np.subtract(times[0], times[1]))) if len(times) > 1 else 0.0
    result = {
        **info,
        "strategy": getattr(steps_full, "strategy", None),
        "global_batch_size": gbs,
        "per_device_batch": gbs // n,
        "warmup_steps": warmup,
        "timed_steps": iters,
        "step_time_source": "synchronised",
        "step_time_s": full,
        "compute_time_s": comp,
        "exposed_collective_s": max(raw_diff, 0.0),
        "exposed_collective_raw_s": raw_diff,
        "exposed_collective_paired_s": paired,
        "pipelined_step_s": pipelined,
        "images_per_s": gbs / full["median"],
        "images_per_s_per_device": gbs / full["median"] / n,
        "images_per_s_pipelined": gbs / pipelined,
        "compile": compile_times,
    }
    result["shares"] = {
        "compute": min(comp["median"] / full["median"], 1.0),
        "collective": result["exposed_collective_s"] / full["median"],
    }

    params = base.params
    result["gradient_bytes"] = devices_lib.tree_bytes(params)
    result["num_params"] = int(sum(np.size(x) for x in jax.tree.leaves(params)))
    if allreduce and n > 1:
        ar = time_allreduce(mesh, params, warmup=warmup, iters=iters)
        result["allreduce_s"] = ar
        # nccl-tests' bus bandwidth: what the links moved per second.
        result["allreduce_bus_GBps"] = (
            2 * (n - 1) / n * result["gradient_bytes"] / ar["median"] / 1e9
        )
    else:
        result["allreduce_s"] = stats([0.0]) if n == 1 else None
        result["allreduce_bus_GBps"] = None

    result.update(
        _flops_fields(
            lowered_comp or lowered_full,
            compiled_comp or compiled_full,
            info,
            comp["median"],
            full["median"],
            dtype,
            jit_global=steps_comp is None and result["strategy"] == "jit",
            n=n,
        )
    )
    result["peak_memory_bytes"] = devices_lib.peak_memory_bytes()
    result["compiled_memory_bytes"] = devices_lib.compiled_memory_bytes(compiled_full)
    if info["simulated"]:
        result["note"] = SIMULATED_NOTE
    return result, runners[0]
