"""Model zoo tests: torchvision parity of structure, dtypes, BatchNorm modes,
registry, light import, and a data-parallel training step on 8 fake CPU devices.

Large models are only traced (jax.eval_shape); anything executed is tiny and
initialised once per configuration, since XLA:CPU compile dominates here.
"""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import bcjax.models as models
from bcjax.models import layers, resnet

# torchvision's trainable parameter counts at 1000 classes.
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "mobilenet_v2": 3_504_872,
    "mobilenet_v3_large": 5_483_032,
    "mobilenet_v3_small": 2_542_856,
}

# Narrow versions used wherever something is executed.
TINY = {
    "resnet18": dict(width=8),
    "resnet50": dict(width=4),
    "mobilenet_v2": dict(width_multiplier=0.25),
    "mobilenet_v3_small": dict(width_multiplier=0.25),
    "mobilenet_v3_large": dict(width_multiplier=0.25),
}


# Tiny shapes: XLA:CPU's code generation costs far more than it saves here
# (a tiny MobileNetV2 training step compiled in ~24 s by default, ~9 s with
# these), so everything executed compiles with them.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def _fast_compile(lowered):
    try:
        return lowered.compile(_FAST_COMPILE)
    except jax.errors.JaxRuntimeError as error:  # an XLA without these options
        if "compile option" not in str(error):
            raise
        return lowered.compile()


def _compile(fn, *args):
    return _fast_compile(jax.jit(fn).lower(*args))


def _images(batch, size, seed=0):
    # numpy, not jax.random: every new shape would compile a threefry kernel.
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)


@functools.cache
def _tiny_variables(name):
    """Variables for a tiny model, filled on the host.

    Real initialisation is tested on its own (test_zero_init_residual,
    test_conv_init_is_kaiming_normal_fan_out); compiling a whole model.init
    costs XLA:CPU one threefry kernel per parameter, seconds per model.
    Params are fp32 whatever the compute dtype, and input size does not change
    parameter shapes, so one set serves every dtype and size.
    """
    model = models.create(name, **TINY[name])
    shapes = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, 32, 32, 3))
    )
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        kind = path[-1].key
        if kind == "kernel":  # He init on fan_out, as the models do
            fan_out = int(np.prod(leaf.shape[:-2])) * leaf.shape[-1]
            value = rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_out)
        elif kind in ("scale", "var"):
            value = np.ones(leaf.shape)
        else:
            value = np.zeros(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


# --------------------------------------------------------------- structure


def test_registry_lists_all_models():
    assert sorted(models.list_models()) == sorted(TORCHVISION_PARAMS)


@pytest.mark.parametrize("name", list(TORCHVISION_PARAMS))
def test_param_count_matches_torchvision(name):
    # Traced only; bf16 compute to check at the same time that params stay
    # fp32 and logits come back fp32.
    model = models.create(name, num_classes=1000, dtype=jnp.bfloat16)
    logits, variables = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), train=False)
    )
    assert _count(variables["params"]) == TORCHVISION_PARAMS[name]
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    assert logits.shape == (2, 1000) and logits.dtype == jnp.float32


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as error:
        models.create("resnet19")
    for name in TORCHVISION_PARAMS:
        assert name in str(error.value)


def test_import_is_light():
    heavy = "{'grain', 'tensorflow_datasets', 'orbax', 'clu', 'tensorflow'}"
    code = (
        "import sys, bcjax.models; "
        f"loaded = {heavy} & {{m.split('.')[0] for m in sys.modules}}; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_make_divisible_matches_torchvision():
    assert layers.make_divisible(32 * 0.25) == 8
    assert layers.make_divisible(1280) == 1280
    assert layers.make_divisible(11) == 16  # would lose more than 10% at 8
    assert layers.make_divisible(72 * 0.75) == 56


def test_torchvision_bn_constants():
    for name in ("resnet18", "mobilenet_v2"):
        model = models.create(name)
        assert (model.bn_momentum, model.bn_epsilon) == (0.9, 1e-5)
    for name in ("mobilenet_v3_small", "mobilenet_v3_large"):
        model = models.create(name)
        assert (model.bn_momentum, model.bn_epsilon) == (0.99, 1e-3)


@pytest.mark.parametrize("block, last_bn", [(resnet.BasicBlock, "bn2"), (resnet.Bottleneck, "bn3")])
def test_zero_init_residual(block, last_bn):
    conv = layers.make_conv(jnp.float32, jnp.float32)
    norm = layers.make_norm(
        train=False,
        momentum=0.9,
        epsilon=1e-5,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        axis_name=None,
    )
    module = block(features=4, strides=2, conv=conv, norm=norm, zero_init_residual=True)
    key, x = jax.random.key(0), jnp.ones((1, 8, 8, 4))
    params = _compile(module.init, key, x)(key, x)["params"]
    assert not np.any(params[last_bn]["scale"])
    assert np.all(params["bn1"]["scale"] == 1.0)
    assert "downsample_conv" in params


def test_conv_init_is_kaiming_normal_fan_out():
    init = functools.partial(layers.conv_kernel_init, shape=(3, 3, 64, 128))
    kernel = _compile(init, jax.random.key(0))(jax.random.key(0))
    assert kernel.shape == (3, 3, 64, 128)
    np.testing.assert_allclose(np.std(kernel), np.sqrt(2.0 / (3 * 3 * 128)), rtol=0.02)


# --------------------------------------------------------------- execution


@pytest.mark.parametrize(
    "name, dtype, size",
    [
        ("resnet18", jnp.float32, 64),
        ("resnet50", jnp.bfloat16, 64),
        ("mobilenet_v3_small", jnp.bfloat16, 64),
    ],
)
def test_tiny_forward(name, dtype, size):
    # Shapes at every size are covered by eval_shape above; this executes.
    model = models.create(name, dtype=dtype, **TINY[name])
    variables, x = _tiny_variables(name), _images(2, size)
    logits = _compile(functools.partial(model.apply, train=False), variables, x)(variables, x)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    assert np.std(logits) > 0


@functools.cache
def _resnet18_forwards():
    """Compiled train/eval forwards of the tiny resnet18 at the batch shape the
    sharded step uses, shared by two tests to compile once."""
    model = models.create("resnet18", **TINY["resnet18"])
    variables, x = _tiny_variables("resnet18"), _images(16, 32)
    train = _compile(
        lambda v, x: model.apply(
            v,
            x,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda mdl, _: mdl.name == "conv_init",
        ),
        variables,
        x,
    )
    evaluate = _compile(functools.partial(model.apply, train=False), variables, x)
    return train, evaluate


def test_batchnorm_train_and_eval_differ():
    variables = _tiny_variables("resnet18")
    x = _images(16, 32, seed=1) * 3.0 + 1.0
    # Same first example, different batch-mates.
    x_other = x.at[1:].set(_images(15, 32, seed=4))
    train, evaluate = _resnet18_forwards()

    logits, state = train(variables, x)
    logits_other, _ = train(variables, x_other)
    eval_logits, eval_other = evaluate(variables, x), evaluate(variables, x_other)

    assert not np.allclose(logits, eval_logits, atol=1e-4)
    # Eval uses the running averages: an example's logits ignore its batch.
    np.testing.assert_allclose(eval_logits[0], eval_other[0], rtol=1e-5, atol=1e-5)
    # Train normalises with batch statistics: they do not.
    assert not np.allclose(logits[0], logits_other[0], atol=1e-4)
    # torch momentum 0.1 = flax 0.9: new running mean = 0.9 * 0 + 0.1 * batch mean.
    stem = state["intermediates"]["conv_init"]["__call__"][0]
    np.testing.assert_allclose(
        state["batch_stats"]["bn_init"]["mean"],
        0.1 * stem.mean(axis=(0, 1, 2)),
        rtol=1e-4,
        atol=1e-6,
    )
    assert not jax.tree.all(
        jax.tree.map(np.array_equal, state["batch_stats"], variables["batch_stats"])
    )


def _make_mesh():
    devices = np.array(jax.devices()[:8])
    assert devices.size == 8, "tests/conftest.py should provide 8 CPU devices"
    # jax.make_mesh defaults to Explicit axes; shard_map here wants Auto.
    return jax.sharding.Mesh(devices, ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _sharded_train_step(model, tx, mesh):
    num_devices = mesh.shape["data"]

    def loss_fn(params, batch_stats, images, labels, rng):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            rngs={"dropout": rng},
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates["batch_stats"]

    def step(params, batch_stats, opt_state, images, labels, rng):
        rng = jax.random.fold_in(rng, jax.lax.axis_index("data"))
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, images, labels, rng
        )
        # check_vma: grads of replicated params arrive summed over devices;
        # dividing turns the sum of per-device means into the global mean.
        grads = jax.tree.map(lambda g: g / num_devices, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, batch_stats, opt_state, jax.lax.pmean(loss, "data"), grads

    replicated, sharded = P(), P("data")
    return jax.jit(
        jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(replicated, replicated, replicated, sharded, sharded, replicated),
            out_specs=(replicated, replicated, replicated, replicated, replicated),
            check_vma=True,
        )
    )


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_sharded_train_step_with_synced_batchnorm(name):
    mesh = _make_mesh()
    model = models.create(name, bn_axis_name="data", **TINY[name])
    variables = _tiny_variables(name)
    tx = optax.sgd(0.1)  # stateless: nothing to initialise per parameter
    opt_state = tx.init(variables["params"])
    images = _images(16, 32, seed=2)
    labels = jnp.arange(16, dtype=jnp.int32) % 3

    args = (
        variables["params"],
        variables["batch_stats"],
        opt_state,
        images,
        labels,
        jax.random.key(3),
    )
    step = _fast_compile(_sharded_train_step(model, tx, mesh).lower(*args))
    params, batch_stats, _, loss, grads = step(*args)
    assert np.isfinite(loss)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))
    assert not jax.tree.all(jax.tree.map(np.array_equal, params, variables["params"]))

    if name == "resnet18":
        # No dropout in ResNet: synced BatchNorm over 8 shards must reproduce
        # one device on the whole batch (loss and running statistics).
        logits, updates = _resnet18_forwards()[0](variables, images)
        want = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        np.testing.assert_allclose(loss, want, rtol=1e-5)
        for got, ref in zip(jax.tree.leaves(batch_stats), jax.tree.leaves(updates["batch_stats"])):
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
        # d(mean loss)/d(fc bias) = mean(softmax - onehot): catches a wrong
        # gradient scale (e.g. a pmean over grads that check_vma already summed).
        bias_grad = (jax.nn.softmax(logits) - jax.nn.one_hot(labels, 3)).mean(axis=0)
        np.testing.assert_allclose(grads["fc"]["bias"], bias_grad, rtol=1e-4, atol=1e-6)
