"""The NaN/Inf guard of the train step (bcjax.step.steps.apply_if): on CPU meshes the
update runs inside a lax.cond; accelerators keep the elementwise select. Either way a
finite step is the unguarded step, and a skipped step leaves the whole state as it was."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _mp_worker import make_model

from bcjax.data import augment
from bcjax.parallel import mesh as mesh_lib
from bcjax.parallel import strategies
from bcjax.step import optim
from bcjax.step import state as state_lib
from bcjax.step import steps as step_math

IMAGE_SIZE = 32


def nan_if_black(images, keys):
    """Normalised images, NaN for an all-black batch: one compiled step sees both cases."""
    return augment.normalize(images) + jnp.where(images.max() == 0, jnp.nan, 0.0)


def _setup(num_devices, optimizer="sgd"):
    mesh = mesh_lib.make_mesh(num_devices)
    model = make_model("tiny_resnet")
    # The quickstart's optimiser: Nesterov momentum, weight decay on kernels, warm-up.
    tx, _ = optim.make_optimizer(
        steps_per_epoch=10,
        num_epochs=2,
        optimizer=optimizer,
        learning_rate=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=1e-4,
        warmup_epochs=1,
    )
    state = state_lib.create_train_state(model, tx, 0, IMAGE_SIZE, mesh)
    rs = np.random.default_rng(0)
    batches = [
        {
            "image": rs.integers(0, 256, (8, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
            "label": rs.integers(0, 3, 8).astype(np.int32),
            "index": np.arange(8 * i, 8 * i + 8, dtype=np.int32),
        }
        for i in range(3)
    ]
    return mesh, model, state, batches


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def _assert_same(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)


def _run(steps, state, batches, rng):
    state = steps.place_state(state)
    metrics = []
    for b in batches:
        state, m = steps.train_step(state, steps.shard_batch(b), rng)
        metrics.append(_host(m))
    return _host((state.step, state.params, state.batch_stats, state.opt_state)), metrics


@pytest.mark.parametrize("num_devices, optimizer", [(1, "sgd"), (2, "sgd"), (1, "adamw")])
def test_a_finite_step_is_the_unguarded_step_bit_for_bit(num_devices, optimizer):
    mesh, model, state, batches = _setup(num_devices, optimizer)
    rng = jax.random.key(0)
    build = functools.partial(
        strategies.build_steps, "shard_map", mesh, model, augment_cfg={}, donate=False
    )
    guarded = build()
    # The CPU form: the update is inside a conditional of the compiled step.
    compiled = guarded.train_step.lower(
        guarded.place_state(state), guarded.shard_batch(batches[0]), rng
    ).compile()
    assert " conditional(" in compiled.as_text()
    got, got_metrics = _run(guarded, state, batches, rng)
    want, want_metrics = _run(build(nonfinite_guard=False), state, batches, rng)
    if optimizer == "sgd":  # the quickstart's: bit for bit (the old select was not)
        _assert_same(got, want)
    else:
        # AdamW's update fuses differently with and without the guard: equal to float
        # rounding (here depending even on the host device count XLA:CPU is given).
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
    for g, w in zip(got_metrics, want_metrics):
        assert bool(g["grads_finite"]) and g["grad_norm"] == w["grad_norm"] > 0
        np.testing.assert_allclose(g["loss"], w["loss"], rtol=1e-6)


@pytest.mark.parametrize("in_cond, optimizer", [(True, "sgd"), (False, "sgd"), (True, "adamw")])
def test_a_skipped_step_leaves_the_whole_state(in_cond, optimizer):
    """Both forms of the guard (CPU's cond, the accelerators' select) keep params, BatchNorm
    statistics and the optimizer state, optax's step count included, of the last good
    step; only the step number (the randomness) advances."""
    mesh, model, state, batches = _setup(1, optimizer)
    steps = strategies.build_steps(
        "shard_map", mesh, model, preprocess=nan_if_black, normalize=augment.normalize, donate=False
    )
    train_local = functools.partial(
        step_math.train_step_local,
        model=model.clone(bn_axis_name=None),
        axis_name=None,
        psum_grads=False,
        sync_batch_stats=False,
        preprocess=nan_if_black,
        skip_in_cond=in_cond,
    )
    train_step = jax.jit(train_local)
    rng = jax.random.key(0)
    good, _ = train_step(state, batches[0], rng)  # a count above zero, momentum non-zero
    black = dict(batches[1], image=np.zeros_like(batches[1]["image"]))
    skipped, metrics = train_step(good, black, rng)
    assert not bool(metrics["grads_finite"])
    _assert_same(
        _host((skipped.params, skipped.batch_stats, skipped.opt_state)),
        _host((good.params, good.batch_stats, good.opt_state)),
    )
    assert int(skipped.step) == int(good.step) + 1
    # The next finite step goes on from the kept state as if the NaN batch never came.
    after_skip, _ = train_step(skipped, batches[2], rng)
    direct, _ = train_step(good.replace(step=skipped.step), batches[2], rng)
    _assert_same(_host(after_skip.params), _host(direct.params))
    # The cond form is what build_steps gives a CPU mesh.
    compiled = jax.jit(train_local).lower(good, black, rng).compile()
    assert (" conditional(" in compiled.as_text()) == in_cond
    compiled = steps.train_step.lower(
        steps.place_state(good), steps.shard_batch(black), rng
    ).compile()
    assert " conditional(" in compiled.as_text()
