"""The end-of-run breakdown from what the loop already compiled and measured
(``breakdown.from_run``): the report ``measure`` gives, without compiling the
run's step again. A conv-BN-dense model keeps the compiles to about a second."""

import collections
import contextlib

import flax.linen as nn
import jax
import jax.monitoring as monitoring
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax.parallel import mesh as mesh_lib
from bcjax.parallel import strategies
from bcjax.step import optim
from bcjax.step import state as state_lib
from bcjax.timing import breakdown
from bcjax.timing import chrono as chrono_lib

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # also a persistent-cache read
TRACE = "/jax/core/compile/jaxpr_trace_duration"


class Small(nn.Module):
    bn_axis_name: str | None = None
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), strides=2)(x)
        x = nn.BatchNorm(use_running_average=not train, axis_name=self.bn_axis_name)(x)
        return nn.Dense(self.num_classes)(nn.relu(x).mean((1, 2)))


def _to_float(images, keys=None):
    return images.astype(jnp.float32) / 255.0


@contextlib.contextmanager
def jax_work():
    """Counts backend compiles (by function name) and traces inside the block."""
    counts = {"compiles": collections.Counter(), "traces": 0}

    def listener(event, duration, **kwargs):
        if event == BACKEND_COMPILE:
            counts["compiles"][kwargs.get("fun_name")] += 1
        elif event == TRACE:
            counts["traces"] += 1

    monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        monitoring.unregister_event_duration_listener(listener)


def _loop_like_run(num_devices, batch_size=8, size=16, steps_run=6):
    """What the loop has after training: steps, its executable, Chrono's times."""
    mesh = mesh_lib.make_mesh(num_devices)
    model = Small()
    tx, _ = optim.make_optimizer(steps_per_epoch=10, num_epochs=1, learning_rate=0.01)

    def build(collectives):
        return strategies.build_steps(
            "shard_map",
            mesh,
            model,
            collectives=collectives,
            preprocess=_to_float,
            normalize=_to_float,
        )

    steps = build(True)
    state = steps.place_state(state_lib.create_train_state(model, tx, 0, size, mesh))
    rs = np.random.RandomState(0)
    host_batch = {
        "image": rs.randint(0, 256, (batch_size, size, size, 3)).astype(np.uint8),
        "label": rs.randint(0, 3, batch_size).astype(np.int32),
        "index": np.arange(batch_size, dtype=np.int32),
    }
    rng = jax.random.key(0)
    chrono = chrono_lib.Chrono(warmup_steps=1)
    batch = steps.shard_batch(host_batch)
    compiled = chrono.compile("train_step", steps.train_step, state, batch, rng)
    for _ in range(steps_run):
        with chrono.input_wait():
            batch = steps.shard_batch(host_batch)
        state, _ = compiled(state, batch, rng)
        chrono.step_dispatched()
    jax.block_until_ready(state)
    return dict(
        steps=steps,
        compiled=compiled,
        state=state,
        batch=host_batch,
        rng=rng,
        chrono=chrono,
        build=build,
    )


def _from_run(run, **kwargs):
    chrono = run["chrono"]
    return breakdown.from_run(
        run["steps"],
        run["compiled"],
        run["state"],
        run["batch"],
        run["rng"],
        compile_times=chrono.compile_s,
        step_times=chrono.step_times(),
        input_wait_s=chrono.input_wait_s[chrono.warmup_steps :],
        build=run["build"],
        warmup=1,
        iters=3,
        **kwargs,
    )


class CountingExecutable:
    """The loop's executable, counting the steps run with it."""

    def __init__(self, compiled):
        self.compiled, self.calls = compiled, 0

    def __call__(self, *args):
        self.calls += 1
        return self.compiled(*args)

    def __getattr__(self, name):  # cost_analysis, memory_analysis, as_text
        return getattr(self.compiled, name)


def test_one_device_compiles_traces_and_runs_nothing():
    run = _loop_like_run(1)
    run["compiled"] = executable = CountingExecutable(run["compiled"])
    step_before = int(run["state"].step)
    with jax_work() as work:
        r = _from_run(run)
    # Nothing to separate on one device: no compile, no trace, not one step run.
    assert not work["compiles"] and work["traces"] == 0, work
    assert executable.calls == 0
    assert breakdown.check(r) == [], breakdown.format_summary(r)
    assert r["note"] == breakdown.ONE_DEVICE_NOTE and r["note"] in breakdown.format_summary(r)
    # The step times are the loop's own.
    loop_times = run["chrono"].step_times()
    assert r["step_time_source"] == "loop"
    assert r["step_time_s"] == breakdown.stats(loop_times) == r["loop_step_time_s"]
    assert r["timed_steps"] == len(loop_times) > 0
    assert r["images_per_s"] == pytest.approx(8 / np.median(loop_times))
    assert r["pipelined_step_s"] == np.median(loop_times)
    # No collectives, compute is the step.
    assert r["compute_time_s"] == r["step_time_s"]
    assert r["exposed_collective_s"] == 0 and r["allreduce_s"]["median"] == 0
    assert r["shares"] == {"compute": 1.0, "collective": 0.0}
    assert r["compile"] == run["chrono"].compile_s
    assert r["compile"] is not run["chrono"].compile_s  # the loop's record stays its own
    # FLOPs counted once, from the compiled program (a GPU would count the lowered one too).
    assert r["flops_per_device_step"] == r["flops_compiled"] > 0
    assert r["flops_source"] == "compiled" and r["flops_lowered"] is None
    assert r["input_wait_s"]["n"] == len(run["chrono"].input_wait_s) - 1
    assert r["exposed_input_s"] is None  # inside the loop's intervals, not told apart
    assert int(run["state"].step) == step_before


def test_one_device_without_loop_step_times_times_the_step():
    run = _loop_like_run(1, steps_run=1)  # the loop's only step was its warm-up
    assert run["chrono"].step_times().size == 0
    run["compiled"] = executable = CountingExecutable(run["compiled"])
    r = _from_run(run)
    assert r["step_time_source"] == "synchronised" and r["step_time_s"]["n"] == 3
    assert executable.calls == 1 + 3 + 3  # warm-up, timed, pipelined
    assert breakdown.check(r) == [], breakdown.format_summary(r)


def test_report_has_the_standalone_fields_and_values():
    run = _loop_like_run(1)
    reused = _from_run(run)
    # measure() starts from cleared caches and compiles everything itself.
    alone = breakdown.measure(
        run["build"], run["state"], run["batch"], run["rng"], warmup=1, iters=3, eval_step=False
    )
    # Every field of the standalone report is there (timing.json keeps its keys),
    # plus the loop's view of its steps and the one-device note.
    assert set(alone) <= set(reused)
    assert set(reused) - set(alone) == {
        "loop_step_time_s",
        "input_wait_s",
        "exposed_input_s",
        "note",
    }
    assert (alone["step_time_source"], reused["step_time_source"]) == ("synchronised", "loop")
    for key in (
        "platform",
        "device_kind",
        "num_devices",
        "simulated",
        "strategy",
        "global_batch_size",
        "per_device_batch",
        "gradient_bytes",
        "num_params",
        "exposed_collective_s",
        "exposed_collective_raw_s",
        "shares",
        "allreduce_s",
        "allreduce_bus_GBps",
        "flops_per_device_step",
        "flops_source",
        "flops_compiled",
        "compiled_memory_bytes",
        "peak_dtype",
        "utilisation",
    ):
        assert reused[key] == alone[key], key
    assert reused["compile"].keys() == alone["compile"].keys() == {"train_step"}
    assert alone["flops_lowered"] > 0 and reused["flops_lowered"] is None  # counted once


def test_one_device_counts_the_lowered_flops_when_given_the_lowering():
    run = _loop_like_run(1)
    placed = run["steps"].place_state(run["state"])
    lowered = run["steps"].train_step.lower(
        placed, run["steps"].shard_batch(run["batch"]), run["rng"]
    )
    r = _from_run(run, lowered=lowered)
    assert r["flops_lowered"] > 0 and r["step_time_source"] == "loop"


def test_two_devices_compile_only_what_the_loop_did_not():
    run = _loop_like_run(2)
    with jax_work() as work:
        r = _from_run(run)
    assert breakdown.check(r) == [], breakdown.format_summary(r)
    assert r["simulated"] and r["num_devices"] == 2
    assert r["step_time_source"] == "synchronised"  # two devices: timed apart, separated
    assert set(r["compile"]) == {"train_step", "train_step_no_collectives"}
    assert r["compile"]["train_step"] == run["chrono"].compile_s["train_step"]
    assert r["allreduce_s"]["median"] > 0
    # New here: the step without collectives and the all-reduce (its input and the psum).
    # The standalone measure() compiles 5: the step with collectives again, and the eval step.
    assert sum(work["compiles"].values()) == 3, work
    assert sum(n for name, n in work["compiles"].items() if "train_step" in name) == 1, work


def test_more_than_one_device_needs_build():
    run = _loop_like_run(2, steps_run=2)
    with pytest.raises(ValueError, match="without collectives"):
        breakdown.from_run(
            run["steps"],
            run["compiled"],
            run["state"],
            run["batch"],
            run["rng"],
            compile_times=run["chrono"].compile_s,
        )
