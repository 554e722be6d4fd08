"""bcjax models used from flax.nnx through nnx.bridge.ToNNX.

Shows the wrapped model reproduces linen's `apply` with the same variables,
in eval mode and in train mode (BatchNorm statistics updated in place).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import bcjax.models as models

# As in test_models: tiny shapes compile far faster without XLA:CPU's code
# generation passes.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def _compile(fn, *args):
    lowered = jax.jit(fn).lower(*args)
    try:
        return lowered.compile(_FAST_COMPILE)
    except jax.errors.JaxRuntimeError as error:
        if "compile option" not in str(error):
            raise
        return lowered.compile()


def _wrapped(linen_model, x):
    model = nnx.bridge.ToNNX(linen_model, rngs=nnx.Rngs(params=0, dropout=1))
    return nnx.bridge.lazy_init(model, x, train=False)


def _linen_variables(model):
    return {
        "params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
    }


def test_to_nnx_matches_linen_apply():
    linen_model = models.create("resnet18", width=4)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 32, 3)), jnp.float32)

    # The README's two lines, `ToNNX(...)` then `lazy_init(...)`, run eagerly;
    # here they run inside one compiled function to keep the test fast.
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: _wrapped(linen_model, x)))
    state = _compile(lambda x: nnx.state(_wrapped(linen_model, x)), x)(x)
    model = nnx.merge(graphdef, state)

    variables = _linen_variables(model)
    assert variables["params"]["conv_init"]["kernel"].shape == (7, 7, 3, 4)

    logits = model(x, train=False)
    want = linen_model.apply(variables, x, train=False)
    np.testing.assert_allclose(logits, want, rtol=1e-6, atol=1e-6)
    assert logits.shape == (4, 3) and logits.dtype == jnp.float32

    # Train mode: mutable batch_stats are written back into the nnx module.
    train_logits = model(x, train=True, mutable=["batch_stats"])
    want_train, updates = linen_model.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(train_logits, want_train, rtol=1e-5, atol=1e-5)
    new_stats = _linen_variables(model)["batch_stats"]
    for got, ref in zip(jax.tree.leaves(new_stats), jax.tree.leaves(updates["batch_stats"])):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert not np.allclose(
        new_stats["bn_init"]["mean"], variables["batch_stats"]["bn_init"]["mean"]
    )
