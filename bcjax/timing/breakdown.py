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
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bcjax.timing import devices as devices_lib
from bcjax.timing.chrono import timed_compile

log = logging.getLogger(__name__)

DATA_AXIS = "data"

SIMULATED_NOTE = (
    "timings simulated: the devices are CPU devices sharing one host's cores, "
    "so per-device compute and collective times do not predict N real accelerators "
    "(see bcjax.timing.ring_model)"
)
GPU_FLOPS_NOTE = (
    "XLA's compiled cost analysis on GPU leaves cuDNN convolutions out; FLOPs are "
    "counted on the pre-optimisation HLO (lowered) instead"
)


def stats(times: Sequence[float]) -> dict:
    """Median, p10, p90, mean, min of a list of seconds (None when empty)."""
    a = np.asarray(times, dtype=np.float64)
    if a.size == 0:
        return {"median": None, "p10": None, "p90": None, "mean": None, "min": None, "n": 0}
    return {
        "median": float(np.median(a)),
        "p10": float(np.percentile(a, 10)),
        "p90": float(np.percentile(a, 90)),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "n": int(a.size),
    }


def cost_flops(analysis, key: str = "flops") -> float | None:
    """FLOPs (or another ``key``, e.g. "bytes accessed") from a
    ``cost_analysis()`` result: a dict, a list of dicts (one per program,
    older JAX), or None (some backends)."""
    if analysis is None:
        return None
    if isinstance(analysis, (list, tuple)):
        values = [cost_flops(a, key) for a in analysis]
        values = [v for v in values if v is not None]
        return float(sum(values)) if values else None
    try:
        value = analysis.get(key)
    except AttributeError:
        return None
    return float(value) if value is not None and value >= 0 else None


def safe_cost(obj, key: str = "flops") -> float | None:
    """``cost_flops`` of a lowered or compiled object; None where the backend has none."""
    try:
        return cost_flops(obj.cost_analysis(), key)
    except Exception as e:  # not every backend/JAX version implements it
        log.debug("cost_analysis failed: %s", e)
        return None


@contextlib.contextmanager
def _fresh_persistent_cache(path: str):
    """A persistent compilation cache in ``path`` for the duration, then the
    previous settings back. In-memory caches are cleared on the way in, so the
    first compile inside is cold."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {k: jax.config.values.get(k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()
    jax.clear_caches()
    try:
        yield
    finally:
        for k, v in old.items():
            jax.config.update(k, v)
        cc.reset_cache()


def compile_cold_warm(named_calls: Mapping[str, tuple], cache_dir: str | None = None) -> dict:
    """Cold and warm lower/compile times with a persistent compilation cache.

    ``named_calls``: name -> (jitted, *args). Cold: first compile into an empty
    cache folder (a temporary one unless ``cache_dir`` is given, which should
    then be empty). Warm: ``jax.clear_caches()`` (as a restarted process would
    be), then the same compile again, which reads the executable back from
    disk; lowering (tracing) is paid again either way.
    """
    out: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        if cache_dir is None:
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bcjax-cc-"))
        stack.enter_context(_fresh_persistent_cache(cache_dir))
        for name, (fn, *args) in named_calls.items():
            _, _, t = timed_compile(fn, *args)
            out[name] = {
                "cold_lower_s": t["lower_s"],
                "cold_compile_s": t["compile_s"],
                "cold_cache": t["persistent_cache"],
            }
        jax.clear_caches()
        for name, (fn, *args) in named_calls.items():
            _, _, t = timed_compile(fn, *args)
            out[name].update(
                {
                    "warm_lower_s": t["lower_s"],
                    "warm_compile_s": t["compile_s"],
                    "warm_cache": t["persistent_cache"],
                }
            )
    return out


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
    collectives and the gradient-sized all-reduce. On one device nothing is
    compiled: compute is the step itself and the collective fields are 0.

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
        Needed on one device only, for the pre-optimisation FLOP count.
      build: ``build(collectives: bool) -> Steps`` as for ``measure``; called
        (with False) only on more than one device.
      warmup, iters, allreduce, dtype: as for ``measure``.

    Returns ``measure``'s fields plus the loop's own view of the steps:
    ``loop_step_time_s`` and ``input_wait_s`` (stats) and ``exposed_input_s``,
    the part of the mean input wait the loop's step interval shows beyond the
    synchronised step (0 when the device step hid it).
    """
    mesh = steps.mesh
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


def _hlo_text(compiled) -> str | None:
    try:
        return compiled.as_text()
    except Exception:
        return None


def _flops_fields(lowered, compiled, info, compute_s, step_s, dtype, *, jit_global, n) -> dict:
    """FLOPs of one device's step and the utilisation they imply."""
    flops_compiled = safe_cost(compiled)
    flops_lowered = safe_cost(lowered)
    if jit_global and flops_lowered is not None:
        flops_lowered /= n  # plain jit lowers the global program, before partitioning
    note = None
    if info["platform"] == "gpu":
        flops, source, note = flops_lowered, "lowered", GPU_FLOPS_NOTE
    else:
        flops, source = (
            (flops_compiled, "compiled") if flops_compiled else (flops_lowered, "lowered")
        )
    if dtype is None:
        dtype = "float32" if info["platform"] == "cpu" else "bfloat16"
    peak = devices_lib.peak_flops(info["device_kind"], dtype)
    achieved = flops / step_s if flops and step_s else None
    return {
        "flops_per_device_step": flops,
        "flops_source": source,
        "flops_compiled": flops_compiled,
        "flops_lowered": flops_lowered,
        "flops_note": note,
        "achieved_flops_per_s_per_device": achieved,
        "peak_flops_per_device": peak,
        "peak_dtype": dtype,
        "utilisation": achieved / peak if achieved and peak else None,
    }


# Every measure() result holds these; the values noted may be None.
FIELDS = (
    "platform",
    "device_kind",
    "num_devices",
    "simulated",
    "strategy",
    "global_batch_size",
    "per_device_batch",
    "step_time_s",
    "compute_time_s",
    "exposed_collective_s",
    "exposed_collective_raw_s",
    "pipelined_step_s",
    "images_per_s",
    "images_per_s_per_device",
    "images_per_s_pipelined",
    "compile",
    "shares",
    "gradient_bytes",
    "num_params",
    "allreduce_s",
    "flops_per_device_step",
    "utilisation",
    "peak_memory_bytes",
    "compiled_memory_bytes",
)
MAYBE_NONE = (
    "allreduce_s",
    "flops_per_device_step",
    "utilisation",
    "peak_memory_bytes",
    "compiled_memory_bytes",
    "strategy",
)


def check(result: Mapping[str, Any], *, tolerance: float = 0.25) -> list[str]:
    """Problems with a ``measure()`` result (empty list: consistent).

    Every field present; every number >= 0; compute at most the full step
    (``tolerance`` relative slack for timing noise on a shared machine);
    lower and compile times > 0. Steps cannot contain compiles by construction:
    executables are compiled before the first timed call.
    """
    problems = []
    for f in FIELDS:
        if f not in result:
            problems.append(f"missing field {f}")
        elif result[f] is None and f not in MAYBE_NONE:
            problems.append(f"{f} is None")

    def walk(prefix, x):
        if isinstance(x, Mapping):
            for k, v in x.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            if x < 0 and not prefix.endswith(("_raw_s", "_paired_s")):
                problems.append(f"{prefix} = {x} < 0")
            if x != x:
                problems.append(f"{prefix} is NaN")

    walk("", {k: v for k, v in result.items() if k != "profile"})
    step = (result.get("step_time_s") or {}).get("median")
    comp = (result.get("compute_time_s") or {}).get("median")
    if step is not None and comp is not None and comp > step * (1 + tolerance):
        problems.append(
            f"compute median {comp:.4g} s exceeds step median {step:.4g} s "
            f"by more than {tolerance:.0%}"
        )
    for name, t in (result.get("compile") or {}).items():
        if not (t.get("lower_s", 0) > 0 and t.get("compile_s", 0) > 0):
            problems.append(f"compile.{name} is not > 0")
    return problems


def format_summary(r: Mapping[str, Any]) -> str:
    """A few human lines for a log."""
    ms = lambda s: f"{s * 1e3:.2f} ms" if s is not None else "n/a"  # noqa: E731
    lines = [
        f"{r['num_devices']} {r['platform']} device(s) ({r['device_kind']}), strategy "
        f"{r['strategy']}, "
        f"global batch {r['global_batch_size']} ({r['per_device_batch']}/device)",
        f"step {ms(r['step_time_s']['median'])} (p10 {ms(r['step_time_s']['p10'])}, "
        f"p90 {ms(r['step_time_s']['p90'])}); compute {ms(r['compute_time_s']['median'])}; "
        f"exposed collective {ms(r['exposed_collective_s'])}; raw all-reduce "
        f"{ms((r.get('allreduce_s') or {}).get('median'))}",
        f"{r['images_per_s']:.1f} img/s ({r['images_per_s_per_device']:.1f}/device; pipelined "
        f"{r['images_per_s_pipelined']:.1f})",
    ]
    if r.get("flops_per_device_step"):
        u = r.get("utilisation")
        lines.append(
            f"{r['flops_per_device_step'] / 1e9:.2f} GFLOP/device/step "
            f"({r['flops_source']}), utilisation "
            + (f"{u:.1%}" if u is not None else "n/a (peak unknown)")
        )
    if r.get("note"):
        lines.append(r["note"])
    return "\n".join(lines)
