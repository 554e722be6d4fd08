"""The XLA:CPU rewrites of the model zoo: convolutions (layers.cpu_friendly_conv,
issue 18) and max pooling (layers.max_pool, issue 23).

On CPU, dense convolutions whose kernel has more taps than the feature map has
pixels become patches x kernel matrix products, and depthwise convolutions
become shifted multiply-adds; every other convolution, and every convolution
lowered for another platform, stays lax.conv_general_dilated. These tests
check that the rewritten forms compute the same values and gradients (fp32
rounding), that XLA:CPU is left no convolution to run in its slow loop, that a
program lowered for GPU/TPU computes exactly the plain convolution, and that
the training step and the parameter tree are those of the plain model. The
max pool's CPU form gives the same values and gradients as nn.max_pool (its
gradient, select_and_scatter, is what XLA:CPU expands into index maps and a
scatter).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export, lax

import bcjax.models as models
from bcjax.models import layers
from bcjax.parallel import mesh as mesh_lib
from bcjax.parallel import strategies
from bcjax.step import optim
from bcjax.step import state as state_lib

# Tiny programs compile slower than they run: as in test_models.py.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}

# (input NHWC, kernel HWIO, strides, padding, feature groups)
REWRITTEN = {
    # ResNet's last stage at 64 px: XLA:CPU swaps the operands of these (slow loop).
    "dense_3x3_on_2x2": ((4, 2, 2, 8), (3, 3, 8, 16), (1, 1), ((1, 1), (1, 1)), 1),
    # Strided from 4x4: the forward is left alone, its input gradient is swapped.
    "dense_3x3_stride2_on_4x4": ((4, 4, 4, 8), (3, 3, 8, 16), (2, 2), ((1, 1), (1, 1)), 1),
    # The last stage at 32 px, with padding given as lax's string.
    "dense_3x3_on_1x1_same": ((4, 1, 1, 8), (3, 3, 8, 8), (1, 1), "SAME", 1),
    "depthwise_3x3_stride2_odd": ((2, 7, 7, 16), (3, 3, 1, 16), (2, 2), ((1, 1), (1, 1)), 16),
    "depthwise_5x5": ((2, 6, 6, 8), (5, 5, 1, 8), (1, 1), ((2, 2), (2, 2)), 8),
}


def _conv(fn, x, w, strides, padding, groups):
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    return fn(x, w, strides, padding, dimension_numbers=dn, feature_group_count=groups)


def _value_and_vjp(fn, strides, padding, groups):
    def run(x, w, cotangent):
        y, vjp = jax.vjp(
            functools.partial(_conv, fn, strides=strides, padding=padding, groups=groups), x, w
        )
        return (y, *vjp(cotangent))

    return run


def _random(shape, seed):
    # numpy, not jax.random: every new shape would compile a threefry kernel.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("case", sorted(REWRITTEN))
def test_rewritten_convolution_matches_lax(case):
    x_shape, w_shape, strides, padding, groups = REWRITTEN[case]
    x, w = _random(x_shape, 0), _random(w_shape, 1)
    plain = functools.partial(
        _conv, lax.conv_general_dilated, strides=strides, padding=padding, groups=groups
    )
    cotangent = _random(jax.eval_shape(plain, x, w).shape, 2)
    expected = _value_and_vjp(lax.conv_general_dilated, strides, padding, groups)(x, w, cotangent)
    rewritten = jax.jit(_value_and_vjp(layers.cpu_friendly_conv, strides, padding, groups))
    compiled = rewritten.lower(x, w, cotangent).compile(_FAST_COMPILE)
    # Forward, input and kernel gradient: none is left to XLA:CPU as a convolution.
    assert "convolution(" not in compiled.as_text()
    for got, want, what in zip(
        compiled(x, w, cotangent), expected, ("value", "input gradient", "kernel gradient")
    ):
        assert got.shape == want.shape, what
        # fp32 sums of at most a few hundred products, in another order.
        np.testing.assert_allclose(
            got, want, rtol=0, atol=1e-5 * np.max(np.abs(want)), err_msg=what
        )


@pytest.mark.parametrize(
    "x_shape, w_shape, dtype, kwargs",
    [
        ((2, 8, 8, 4), (1, 1, 4, 8), jnp.float32, {}),  # 1x1
        ((2, 8, 8, 4), (3, 3, 4, 8), jnp.float32, {}),  # map larger than the kernel
        ((2, 2, 2, 4), (3, 3, 4, 8), jnp.bfloat16, {}),  # not float32
        ((2, 2, 2, 4), (3, 3, 4, 8), jnp.float32, {"rhs_dilation": (2, 2)}),
        ((2, 8, 8, 4), (3, 3, 2, 8), jnp.float32, {"feature_group_count": 2}),  # grouped
    ],
)
def test_other_convolutions_are_plain_lax(x_shape, w_shape, dtype, kwargs):
    x, w = jnp.zeros(x_shape, dtype), jnp.zeros(w_shape, dtype)
    dn = lax.conv_dimension_numbers(x_shape, w_shape, ("NHWC", "HWIO", "NHWC"))
    args = ((1, 1), ((1, 1), (1, 1)))

    def trace(fn):
        return str(
            jax.make_jaxpr(lambda x, w: fn(x, w, *args, dimension_numbers=dn, **kwargs))(x, w)
        )

    assert trace(layers.cpu_friendly_conv) == trace(lax.conv_general_dilated)


@pytest.mark.parametrize(
    "shape, window, strides, padding",
    [
        ((2, 9, 9, 4), (3, 3), (2, 2), ((1, 1), (1, 1))),  # ResNet's stem pool, odd size
        ((2, 8, 8, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),
        ((2, 6, 7, 2), (2, 2), (2, 2), ((0, 0), (0, 0))),  # windows that do not overlap
        ((1, 5, 5, 2), (3, 3), (1, 1), ((1, 1), (1, 1))),  # stride 1: heavy overlap
    ],
)
def test_cpu_max_pool_matches_nn_max_pool(shape, window, strides, padding):
    # Few distinct values, so that many windows hold their maximum more than
    # once: the gradient must go to the first of them, as select_and_scatter's.
    x = jnp.asarray(np.random.default_rng(0).integers(-2, 3, shape), jnp.float32)
    plain = functools.partial(nn.max_pool, window_shape=window, strides=strides, padding=padding)
    cotangent = _random(jax.eval_shape(plain, x).shape, 1)

    def value_and_grad(pool):
        def run(x, cotangent):
            y, vjp = jax.vjp(pool, x)
            return y, vjp(cotangent)[0]

        return jax.jit(run)

    cpu = value_and_grad(lambda x: layers.max_pool(x, window, strides, padding))
    compiled = cpu.lower(x, cotangent).compile(_FAST_COMPILE)
    hlo = compiled.as_text()
    assert "reduce-window" not in hlo and "scatter" not in hlo
    want_y, want_dx = value_and_grad(plain)(x, cotangent)
    got_y, got_dx = compiled(x, cotangent)
    np.testing.assert_array_equal(got_y, want_y)
    # A pixel that is the maximum of several windows sums their gradients, in
    # another order than select_and_scatter's: fp32 rounding of a few terms.
    np.testing.assert_allclose(got_dx, want_dx, rtol=0, atol=1e-6 * np.max(np.abs(want_dx)))
    # Without the CPU form (cpu=False) the model's pool is nn.max_pool itself.
    no_cpu = lambda x: layers.max_pool(x, window, strides, padding, cpu=False)  # noqa: E731
    assert str(jax.make_jaxpr(no_cpu)(x)) == str(jax.make_jaxpr(plain)(x))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_cpu_max_pool_leaves_other_dtypes_plain(dtype):
    x = jnp.zeros((2, 8, 8, 3), dtype)
    pad = ((1, 1), (1, 1))
    got = jax.make_jaxpr(lambda x: layers.max_pool(x, (3, 3), (2, 2), pad))(x)
    want = jax.make_jaxpr(lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=pad))(x)
    assert str(got) == str(want)


def test_programs_lowered_for_accelerators_compute_the_plain_convolution():
    """GPU and TPU lowerings select lax.conv_general_dilated and nn.max_pool:
    exported for them and run here, they give bit for bit the plain program's
    results."""
    x, w_dense, w_depthwise = (
        _random((4, 2, 2, 8), 0),
        _random((3, 3, 8, 8), 1),
        _random((3, 3, 1, 8), 2),
    )

    def loss_and_grads(conv, pool):
        def loss(x, w_dense, w_depthwise):
            y = jnp.tanh(_conv(conv, x, w_dense, (1, 1), ((1, 1), (1, 1)), 1))
            y = _conv(conv, y, w_depthwise, (1, 1), ((1, 1), (1, 1)), 8)
            return jnp.sum(pool(y, (2, 2), (1, 1), ((1, 1), (1, 1))) ** 2)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    def nn_pool(x, window, strides, padding):
        return nn.max_pool(x, window, strides=strides, padding=padding)

    args = (x, w_dense, w_depthwise)
    plain = jax.tree.leaves(loss_and_grads(lax.conv_general_dilated, nn_pool)(*args))
    on_cpu = jax.tree.leaves(loss_and_grads(layers.cpu_friendly_conv, layers.max_pool)(*args))
    # The CPU form does change the rounding (else this test would prove nothing).
    assert not all(np.array_equal(a, b) for a, b in zip(on_cpu, plain))
    for platform in ("cuda", "rocm", "tpu"):
        exported = export.export(
            loss_and_grads(layers.cpu_friendly_conv, layers.max_pool),
            platforms=(platform,),
            disabled_checks=[export.DisabledSafetyCheck.platform()],
        )(*args)
        for got, want in zip(jax.tree.leaves(exported.call(*args)), plain):
            np.testing.assert_array_equal(got, want, err_msg=platform)


@pytest.mark.parametrize(
    "name, kwargs", [("resnet50", {"width": 4}), ("mobilenet_v3_large", {"width_multiplier": 0.25})]
)
def test_parameter_tree_unchanged(name, kwargs):
    def shapes(cpu_conv):
        model = models.create(name, cpu_conv=cpu_conv, **kwargs)
        init = functools.partial(model.init, train=False)
        return jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))

    assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes(True)) == jax.tree.map(
        lambda s: (s.shape, s.dtype), shapes(False)
    )


def _slow_convolutions(hlo_text):
    """Convolutions that XLA:CPU hands to its generic loop emitter: reversed
    windows or dimensions other than NHWC/HWIO/NHWC (what the operand swap makes)."""
    lines = [line for line in hlo_text.splitlines() if " convolution(" in line]
    return [
        line for line in lines if "rhs_reversal" in line or "dim_labels=b01f_01io->b01f" not in line
    ]


def _host_state(model, tx, size):
    """A TrainState filled on the host (He-normal kernels, unit BatchNorm), so
    that no model.init is compiled; shared by the plain and the fixed step."""
    shapes = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, size, size, 3))
    )
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        kind = path[-1].key
        if kind == "kernel":
            fan_out = int(np.prod(leaf.shape[:-2])) * leaf.shape[-1]
            return jnp.asarray(rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_out), leaf.dtype)
        return jnp.full(leaf.shape, 1.0 if kind in ("scale", "var") else 0.0, leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    state = state_lib.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        apply_fn=model.apply,
        tx=tx,
    )
    # numpy leaves: each step gets its own device copy (the step donates its state).
    return jax.tree.map(np.asarray, state)


def _one_step(name, kwargs, size, batch_size):
    """The train step a run builds (shard_map, one device), plain and fixed,
    from the same state and batch: (compiled HLO, metrics, update, batch_stats) each."""
    mesh = mesh_lib.make_mesh(1)
    tx, _ = optim.make_optimizer(
        steps_per_epoch=10, num_epochs=1, optimizer="sgd", learning_rate=0.1, momentum=0.9
    )
    host_state = _host_state(models.create(name, **kwargs), tx, size)
    rs = np.random.default_rng(0)
    host_batch = {
        "image": rs.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
        "label": np.arange(batch_size, dtype=np.int32) % 3,
        "index": np.arange(batch_size, dtype=np.int32),
    }
    rng = jax.random.key(1)
    results = {}
    for cpu_conv in (False, True):
        steps = strategies.build_steps(
            "shard_map", mesh, models.create(name, cpu_conv=cpu_conv, **kwargs)
        )
        state, batch = steps.place_state(host_state), steps.shard_batch(host_batch)
        compiled = steps.train_step.lower(state, batch, rng).compile(_FAST_COMPILE)
        new_state, metrics = compiled(state, batch, rng)
        update = jax.tree.map(
            lambda new, old: np.asarray(new) - old, new_state.params, host_state.params
        )
        results[cpu_conv] = compiled.as_text(), metrics, update, new_state.batch_stats
    return results[True], results[False]


@pytest.mark.parametrize(
    "name, kwargs, size",
    [
        # 32 px: layer3 runs on 2x2 maps and layer4 on 1x1, both swapped by XLA:CPU.
        ("resnet18", {"width": 4}, 32),
        ("mobilenet_v3_small", {"width_multiplier": 0.25}, 32),  # depthwise 3x3 and 5x5
    ],
)
def test_train_step_equals_the_plain_models(name, kwargs, size):
    fixed, plain = _one_step(name, kwargs, size, 8)
    hlo, metrics, update, batch_stats = fixed
    _, plain_metrics, plain_update, plain_stats = plain
    # Every convolution left in the fixed step is on XLA:CPU's fast path.
    assert _slow_convolutions(hlo) == []
    assert "feature_group_count" not in hlo
    # ResNet's max pool: no select_and_scatter expansion (index maps + scatter).
    assert "scatter" not in hlo
    np.testing.assert_allclose(metrics["loss"], plain_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], plain_metrics["grad_norm"], rtol=1e-5)
    assert bool(metrics["grads_finite"])
    # One SGD step from the same parameters: the updates are lr x gradients. fp32
    # rounding through the whole network, relative to the largest update.
    scale = max(np.max(np.abs(u)) for u in jax.tree.leaves(plain_update))
    for got, want in zip(jax.tree.leaves(update), jax.tree.leaves(plain_update)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)
    for got, want in zip(jax.tree.leaves(batch_stats), jax.tree.leaves(plain_stats)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
