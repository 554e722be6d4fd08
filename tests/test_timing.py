"""Timing: the compute/collective breakdown, compile timing, profiler parsing
(the scaling model: test_scaling_model.py). Tiny models only: a 2-conv network with BatchNorm
compiles in about a second, which is what the suite's budget allows for
three strategies on 8 simulated devices."""

import importlib
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax.parallel import mesh as mesh_lib
from bcjax.parallel import strategies
from bcjax.step import optim
from bcjax.step import state as state_lib
from bcjax.timing import breakdown, devices, profile
from bcjax.timing import chrono as chrono_lib


class Tiny(nn.Module):
    """Conv-BN-conv-dense: the step's structure (BatchNorm, gradients,
    optimizer) at a fraction of a ResNet's compile time."""

    bn_axis_name: str | None = None
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), strides=2)(x)
        x = nn.BatchNorm(use_running_average=not train, axis_name=self.bn_axis_name)(x)
        x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        return nn.Dense(self.num_classes)(x.mean((1, 2)))


def _pre(images, keys):
    return images.astype(jnp.float32) / 255.0


def _norm(images):
    return images.astype(jnp.float32) / 255.0


def _setup(strategy, n, batch_size=16, size=32):
    mesh = mesh_lib.make_mesh(n)
    model = Tiny()
    tx, _ = optim.make_optimizer(steps_per_epoch=10, num_epochs=1, learning_rate=0.01)
    state = state_lib.create_train_state(model, tx, 0, size, mesh)
    rs = np.random.RandomState(0)
    batch = {
        "image": rs.randint(0, 256, (batch_size, size, size, 3)).astype(np.uint8),
        "label": rs.randint(0, 3, batch_size).astype(np.int32),
        "index": np.arange(batch_size, dtype=np.int32),
    }

    def build(collectives):
        return strategies.build_steps(
            strategy, mesh, model, collectives=collectives, preprocess=_pre, normalize=_norm
        )

    return build, state, batch


@pytest.fixture(scope="module")
def results():
    out = {}
    for strategy in strategies.STRATEGIES:
        build, state, batch = _setup(strategy, 8)
        out[strategy] = breakdown.measure(
            build,
            state,
            batch,
            jax.random.key(0),
            warmup=1,
            iters=5,
            eval_step=strategy == "shard_map",
        )
        # The caller's state is not donated away.
        assert int(state.step) == 0
    return out


@pytest.mark.parametrize("strategy", strategies.STRATEGIES)
def test_breakdown_on_8_devices(results, strategy):
    r = results[strategy]
    assert breakdown.check(r) == [], breakdown.format_summary(r)
    assert r["num_devices"] == 8 and r["strategy"] == strategy and r["simulated"]
    assert r["global_batch_size"] == 16 and r["per_device_batch"] == 2
    assert r["exposed_collective_s"] >= 0
    assert r["exposed_collective_s"] == pytest.approx(
        max(r["step_time_s"]["median"] - r["compute_time_s"]["median"], 0.0)
    )
    assert r["allreduce_s"]["median"] > 0 and r["allreduce_bus_GBps"] > 0
    assert r["gradient_bytes"] == 4 * r["num_params"]
    assert r["flops_per_device_step"] > 0 and r["flops_source"] == "compiled"
    assert r["utilisation"] is None  # no peak for CPUs
    assert r["compiled_memory_bytes"] > 0
    # Compile is timed apart (how it compares with a step is a benchmark's figure).
    for name in ("train_step", "train_step_no_collectives"):
        t = r["compile"][name]
        assert t["lower_s"] > 0 and t["compile_s"] > 0
        assert t["persistent_cache"] in ("hit", "miss", "off")
    # First compile of this program in the session's fresh cache. (The "jit"
    # strategy's collective-free step is shard_map's: that one is a hit.)
    assert r["compile"]["train_step"]["persistent_cache"] == "miss"
    assert "simulated" in r["note"]
    # The module the note sends the reader to exists.
    named = re.findall(r"bcjax(?:\.\w+)+", r["note"])
    assert named
    for name in named:
        importlib.import_module(name)
    assert r["step_time_source"] == "synchronised"
    json.dumps(r)


def test_one_device_has_no_collective():
    build, state, batch = _setup("shard_map", 1, batch_size=4)
    r = breakdown.measure(
        build, state, batch, jax.random.key(0), warmup=1, iters=3, eval_step=False
    )
    assert breakdown.check(r) == []
    assert r["compute_time_s"] == r["step_time_s"]
    assert r["exposed_collective_s"] == 0 and r["allreduce_s"]["median"] == 0
    assert "train_step_no_collectives" not in r["compile"] and not r["simulated"]


def test_timing_json_has_every_field(results):
    """What the loop writes: Chrono's summary plus the recorded breakdown."""
    c = chrono_lib.Chrono(warmup_steps=1)
    build, state, batch = _setup("shard_map", 8)
    steps = build(True)
    sharded = steps.shard_batch(batch)
    step = c.compile(
        "train_step", steps.train_step, steps.place_state(state), sharded, jax.random.key(0)
    )
    s = steps.place_state(jax.tree.map(lambda x: x.copy(), state))
    for _ in range(4):
        with c.input_wait():
            sharded = steps.shard_batch(batch)
        s, _ = step(s, sharded, jax.random.key(0))
        c.step_dispatched()
    jax.block_until_ready(s)
    c.record("breakdown", results["shard_map"])
    timing = json.loads(json.dumps(c.summary()))
    assert timing["compile"]["train_step"]["compile_s"] > 0
    # conftest turns the persistent cache on: the fixture compiled this step.
    assert timing["compile"]["train_step"]["persistent_cache"] == "hit"
    assert timing["steps_timed"] == 2 and timing["steps_total"] == 4
    for k in ("median", "p10", "p90"):
        assert timing["step_time_s"][k] > 0
    assert timing["input_wait_s"]["median"] >= 0 and timing["input_wait_s"]["total"] > 0
    bd = timing["breakdown"]
    assert breakdown.check(bd) == []
    for key in (
        "step_time_s",
        "compute_time_s",
        "exposed_collective_s",
        "allreduce_s",
        "images_per_s",
        "images_per_s_per_device",
        "flops_per_device_step",
        "utilisation",
        "peak_memory_bytes",
        "compile",
    ):
        assert key in bd
    assert bd["compile"]["eval_step"]["compile_s"] > 0


def test_compile_cold_then_warm_from_persistent_cache(tmp_path):
    build, state, batch = _setup("shard_map", 2, batch_size=4)
    steps = build(True)
    placed = steps.place_state(state)
    before = jax.config.values["jax_compilation_cache_dir"]
    t = breakdown.compile_cold_warm(
        {"train_step": (steps.train_step, placed, steps.shard_batch(batch), jax.random.key(0))},
        cache_dir=str(tmp_path),
    )
    t = t["train_step"]
    assert all(
        t[k] > 0 for k in ("cold_lower_s", "cold_compile_s", "warm_lower_s", "warm_compile_s")
    )
    # The warm compile reads the executable back instead of running XLA (how much
    # faster that is: python -m bcjax.benchmark --compile-cache, a benchmark's figure).
    assert (t["cold_cache"], t["warm_cache"]) == ("miss", "hit")
    assert any(tmp_path.iterdir())
    assert jax.config.values["jax_compilation_cache_dir"] == before


def test_profile_counts_collectives_per_device(tmp_path):
    mesh = mesh_lib.make_mesh(4)
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    f = jax.jit(
        jax.shard_map(
            lambda x: (jax.lax.psum(jnp.tanh(x), "data"), jax.lax.all_gather(x, "data")),
            mesh=mesh,
            in_specs=P("data"),
            out_specs=(P(), P("data")),
        )
    )
    x = jax.device_put(jnp.ones((4 * 8, 16)), NamedSharding(mesh, P("data")))
    compiled = f.lower(x).compile()
    jax.block_until_ready(compiled(x))
    summary = profile.profile_steps(
        lambda: compiled(x), str(tmp_path), steps=2, hlo_text=compiled.as_text()
    )
    assert summary["format"] == "xplane", summary
    assert sorted(summary["per_device"]) == ["0", "1", "2", "3"]
    for d in summary["per_device"].values():
        assert d["collectives"]["all-reduce"]["count"] == 2
        assert d["collectives"]["all-gather"]["count"] == 2
        assert 0 < d["collective_total_s"] <= d["op_total_s"]
    # The JSON trace gives the same counts (the fallback path).
    fmt_json = profile.parse_trace_json(
        str(next(tmp_path.glob("plugins/profile/*/*.trace.json.gz"))), compiled.as_text()
    )
    assert {k: v["collectives"]["all-reduce"]["count"] for k, v in fmt_json.items()} == {
        str(i): 2 for i in range(4)
    }
    assert "device 3" in profile.format_summary(summary)


def test_collective_names_without_hlo():
    assert profile.classify("ncclDevKernel_AllReduce_Sum_f32_RING_LL", {}) == "all-reduce"
    assert profile.classify("all-gather-start.2", {}) == "all-gather"
    assert profile.classify("reduce-scatter.1", {}) == "reduce-scatter"
    assert profile.classify("fusion.12", {}) is None
    hlo = (
        "  %psum_invariant.7 = f32[64,64]{1,0} all-reduce(%x), channel_id=1\n"
        "  ROOT %ag = (f32[4,8]{1,0}, f32[2]) all-gather-start(%y)\n"
        "  %fusion.3 = f32[8] fusion(%all-reduce.1)\n"
    )
    assert profile.opcode_map(hlo) == {"psum_invariant.7": "all-reduce", "ag": "all-gather"}


def test_cost_flops_accepts_every_shape():
    assert breakdown.cost_flops({"flops": 10.0}) == 10.0
    assert breakdown.cost_flops([{"flops": 2.0}, {"flops": 3.0}]) == 5.0
    assert breakdown.cost_flops(None) is None
    assert breakdown.cost_flops([{}]) is None
    assert breakdown.cost_flops({"flops": -1.0}) is None


def test_check_reports_inconsistencies():
    bad = {f: 1.0 for f in breakdown.FIELDS}
    bad.update(
        step_time_s={"median": 1.0},
        compute_time_s={"median": 2.0},
        exposed_collective_s=-0.5,
        compile={"train_step": {"lower_s": 0.1, "compile_s": 0.2}},
    )
    problems = breakdown.check(bad, tolerance=0.25)
    assert any("compute median" in p for p in problems)
    assert not any("compute median" in p for p in breakdown.check(bad))  # no timing relation
    assert any("exposed_collective_s" in p for p in problems)
    assert not any("compile.train_step" in p for p in problems)
    bad["compile"] = {"train_step": {"lower_s": 0.1, "compile_s": 0.0}}
    assert any("compile.train_step" in p for p in breakdown.check(bad))


def test_device_peaks():
    assert devices.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert devices.peak_flops("NVIDIA H100 PCIe", "float32") == 51e12
    assert devices.peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert devices.peak_flops("NVIDIA A10G") == 70e12
    assert devices.peak_flops("Tesla T4") == 65e12
    assert devices.peak_flops("TPU v2") == 22.5e12
    assert devices.peak_flops("cpu") is None
