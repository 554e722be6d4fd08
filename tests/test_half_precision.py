"""Half-precision compute (bfloat16, float16): what stays float32.

AMP's rule, which bcjax's models and step follow: convolutions and matmuls
compute in the half dtype (accumulating in float32 inside the op); every sum
(BatchNorm's mean and mean of squares, the global average pool), BatchNorm's
normalisation and the loss are float32; parameters and running statistics are
float32. Checked from shapes and jaxprs only (nothing compiled, nothing trained):
issue 24 traced the quickstart's half-precision accuracy to run-to-run
variation, not to a float16 reduction or loss, and these keep it that way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bcjax.models
from bcjax.models import layers
from bcjax.step.steps import loss_fn

HALF = [jnp.float16, jnp.bfloat16]
IMAGE = 32


def _tiny(name, dtype):
    if name == "resnet":
        from bcjax.models.resnet import BasicBlock, ResNet

        return ResNet(stage_sizes=(1, 1), block_cls=BasicBlock, width=4, dtype=dtype)
    return bcjax.models.create(name, dtype=dtype)


def _equations(jaxpr):
    """Every equation of a jaxpr, sub-jaxprs (platform_dependent branches,
    custom_vjp bodies, ...) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _equations(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _equations(sub)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2"])
def test_half_models_sum_in_float32_and_multiply_in_half(name, dtype):
    model = _tiny(name, dtype)
    x = jnp.zeros((2, IMAGE, IMAGE, 3), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))

    def forward(variables):
        return model.apply(
            variables, x, train=True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"]
        )

    closed = jax.make_jaxpr(forward)(variables)
    eqns = list(_equations(closed.jaxpr))
    sums = [e for e in eqns if e.primitive.name == "reduce_sum"]
    products = [e for e in eqns if e.primitive.name in ("conv_general_dilated", "dot_general")]
    assert sums and products
    # BatchNorm's mean and mean of squares, the global average pool: float32 sums.
    assert {e.invars[0].aval.dtype for e in sums} == {jnp.dtype(jnp.float32)}
    # Convolutions and matmuls: the half dtype (the point of it on an accelerator).
    assert {e.invars[0].aval.dtype for e in products} == {jnp.dtype(dtype)}
    logits, updates = jax.eval_shape(forward, variables)
    assert logits.dtype == jnp.float32
    for leaf in jax.tree.leaves(variables) + jax.tree.leaves(updates):
        assert leaf.dtype == jnp.float32


@pytest.mark.parametrize("dtype", HALF)
def test_batchnorm_statistics_are_float32_sums_of_half_inputs(dtype):
    # Channels with a large common offset: in float16 the sum of squares
    # (~900 each, spacing 0.5) loses the variance, in bfloat16 far more; float32
    # sums get it to ~1e-5.
    rs = np.random.RandomState(0)
    x = jnp.asarray(30.0 + rs.standard_normal((8, 4, 4, 3)), dtype)
    norm = layers.make_norm(
        train=True, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, axis_name=None
    )(name="bn")
    variables = norm.init(jax.random.key(0), x)
    y, updates = norm.apply(variables, x, mutable=["batch_stats"])
    stats = updates["batch_stats"]
    x64 = np.asarray(x, np.float64)
    mean, var = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))
    assert stats["mean"].dtype == stats["var"].dtype == jnp.float32
    # Running averages from zero mean / unit variance with momentum 0.9.
    np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var, rtol=1e-4)
    # Normalised in float32, rounded once to the half dtype (|y| < 4 here).
    want = (x64 - mean) / np.sqrt(var + 1e-5)
    assert y.dtype == dtype
    np.testing.assert_allclose(
        np.asarray(y, np.float64), want, atol=4 * float(jnp.finfo(dtype).eps)
    )


@pytest.mark.parametrize("dtype", HALF)
def test_the_loss_is_computed_in_float32_from_half_logits(dtype):
    rs = np.random.RandomState(1)
    logits = jnp.asarray(rs.standard_normal((16, 3)) * 4, dtype)
    labels = jnp.asarray(rs.randint(0, 3, 16), jnp.int32)

    def loss(logits):
        return loss_fn(logits, labels, label_smoothing=0.1)[0]

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(logits).jaxpr
    math = [e for e in jaxpr.eqns if e.primitive.name in ("exp", "log", "reduce_sum", "reduce_max")]
    assert math
    for eqn in math:
        assert all(v.aval.dtype == jnp.float32 for v in eqn.invars), eqn
    # Against float64 from the same (rounded) logits: smoothed one-hot targets.
    z = np.asarray(logits, np.float64)
    log_p = z - z.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    targets = np.eye(3)[np.asarray(labels)] * 0.9 + 0.1 / 3
    np.testing.assert_allclose(float(loss(logits)), -(targets * log_p).sum(-1).mean(), rtol=1e-6)
