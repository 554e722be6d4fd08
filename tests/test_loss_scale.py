"""float16 with dynamic loss scaling: the scale's rule, the train step, checkpoints."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _mp_worker import IMAGE_SIZE, TinyCNN, make_batches, simple_normalize

from bcjax.parallel.mesh import make_mesh
from bcjax.parallel.strategies import build_steps
from bcjax.step import loss_scale
from bcjax.step.optim import make_optimizer
from bcjax.step.state import ScaledTrainState, TrainState, create_train_state
from bcjax.train import checkpoint

RNG = jax.random.key(0)


def _no_augment(images, keys):
    return simple_normalize(images)


def _nan_images(images, keys):
    return jnp.full(images.shape, jnp.nan, jnp.float32)


def _setup(dtype, scale="auto", *, devices=1, tx=None, strategy="shard_map", preprocess=None):
    mesh = make_mesh(devices)
    model = TinyCNN(dtype=dtype)
    tx = tx or optax.sgd(1.0)  # update = -gradient: the step's gradients can be read back
    state = create_train_state(model, tx, 0, IMAGE_SIZE, mesh, loss_scale=scale)
    steps = build_steps(
        strategy,
        mesh,
        model,
        preprocess=preprocess or _no_augment,
        normalize=simple_normalize,
        donate=False,
    )
    return steps, steps.place_state(state)


def _step(steps, state, batch):
    state, metrics = steps.train_step(state, steps.shard_batch(batch), RNG)
    return state, {k: np.asarray(v) for k, v in metrics.items()}


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def _assert_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, _host(a), _host(b))


# -- the rule ---------------------------------------------------------------------


def test_defaults_are_pytorchs_grad_scaler():
    s = loss_scale.create()
    assert float(s.scale) == 2.0**16 and int(s.good_steps) == 0
    assert (s.growth_factor, s.backoff_factor, s.growth_interval) == (2.0, 0.5, 2000)
    assert s.scale.dtype == jnp.float32 and s.good_steps.dtype == jnp.int32


def test_overflow_halves_and_resets_the_count():
    s = loss_scale.create(1024.0, growth_interval=5)
    s = s.update(jnp.bool_(True)).update(jnp.bool_(True))
    assert (float(s.scale), int(s.good_steps)) == (1024.0, 2)
    s = s.update(jnp.bool_(False))
    assert (float(s.scale), int(s.good_steps)) == (512.0, 0)


def test_grows_after_n_good_steps_in_a_row():
    s = loss_scale.create(8.0, growth_interval=3)
    scales = []
    for finite in (True, True, False, True, True, True, True, True, True):
        s = s.update(jnp.bool_(finite))
        scales.append(float(s.scale))
    # As torch's GradScaler: the 3rd good step in a row doubles the scale for the next step.
    assert scales == [8.0, 8.0, 4.0, 4.0, 4.0, 8.0, 8.0, 8.0, 16.0]


def test_bounds():
    s = loss_scale.create(2.0, min_scale=1.0)
    s = s.update(jnp.bool_(False)).update(jnp.bool_(False))
    assert float(s.scale) == 1.0  # never below min_scale
    # At min_scale a non-finite gradient is a fault, not an overflow; above it, an overflow.
    assert not bool(s.is_overflow(jnp.bool_(True), jnp.bool_(False)))
    assert bool(loss_scale.create(2.0).is_overflow(jnp.bool_(True), jnp.bool_(False)))
    assert not bool(loss_scale.create(2.0).is_overflow(jnp.bool_(False), jnp.bool_(False)))
    big = loss_scale.create(float(np.finfo(np.float32).max), growth_interval=1)
    assert np.isfinite(float(big.update(jnp.bool_(True)).scale))  # growth stays finite
    with pytest.raises(ValueError, match="backoff_factor"):
        loss_scale.create(backoff_factor=2.0)


# -- the state --------------------------------------------------------------------


def test_only_float16_states_carry_a_loss_scale():
    for dtype in (jnp.float32, jnp.bfloat16):
        _, state = _setup(dtype)
        assert type(state) is TrainState
        # The pytree a checkpoint stores is the one float32/bfloat16 runs always had.
        nodes = [f.name for f in dataclasses.fields(state) if f.metadata.get("pytree_node", True)]
        assert nodes == ["step", "params", "batch_stats", "opt_state"]
    _, state = _setup(jnp.float16, tx=optax.sgd(0.1, momentum=0.9))
    assert isinstance(state, ScaledTrainState) and float(state.loss_scale.scale) == 2.0**16
    # Master weights, optimizer state and BatchNorm statistics stay float32.
    for tree in (state.params, state.batch_stats, state.opt_state):
        floats = [x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floats and all(d == jnp.float32 for d in floats)
    _, unscaled = _setup(jnp.float16, None)
    assert type(unscaled) is TrainState


# -- the step ---------------------------------------------------------------------


def test_overflow_skips_the_step_and_halves_the_scale():
    steps, state = _setup(jnp.float16, loss_scale.create(2.0**40))
    new, m = _step(steps, state, make_batches(1)[0])
    assert m["overflow"] == 1.0 and bool(m["grads_finite"])  # expected: not a fault
    assert m["loss_scale"] == 2.0**40 and np.isfinite(m["loss"]) and m["grad_norm"] == 0.0
    _assert_equal(
        (new.params, new.batch_stats, new.opt_state),
        (state.params, state.batch_stats, state.opt_state),
    )
    assert int(new.step) == int(state.step) + 1
    assert (float(new.loss_scale.scale), int(new.loss_scale.good_steps)) == (2.0**39, 0)


def test_a_nan_is_still_a_fault():
    steps, state = _setup(jnp.float16, preprocess=_nan_images)
    new, m = _step(steps, state, make_batches(1)[0])
    assert not bool(m["grads_finite"]) and m["overflow"] == 0.0
    _assert_equal(new.params, state.params)


def test_float32_and_bfloat16_steps_report_no_overflow():
    for dtype in (jnp.float32, jnp.bfloat16):
        steps, state = _setup(dtype)
        _, m = _step(steps, state, make_batches(1)[0])
        assert m["overflow"] == 0.0 and m["loss_scale"] == 1.0 and bool(m["grads_finite"])


def _tiny_resnet(dtype):
    """bcjax's ResNet code cut to two stages of width 4 (no conv bias before
    BatchNorm, whose true gradient is 0 and whose float16 value is pure noise)."""
    from bcjax.models.resnet import BasicBlock, ResNet

    return ResNet(stage_sizes=(1, 1), block_cls=BasicBlock, width=4, num_classes=3, dtype=dtype)


def _gradients(dtype, strategy="shard_map"):
    """One step's gradients (SGD at lr 1: the parameter change) on 2 devices."""
    mesh = make_mesh(2)
    model = _tiny_resnet(dtype)
    state = create_train_state(model, optax.sgd(1.0), 0, IMAGE_SIZE, mesh)
    steps = build_steps(
        strategy, mesh, model, preprocess=_no_augment, normalize=simple_normalize, donate=False
    )
    state = steps.place_state(state)
    new, m = _step(steps, state, make_batches(1)[0])
    assert m["overflow"] == 0.0 and m["loss_scale"] == (2.0**16 if dtype == jnp.float16 else 1)
    return jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), state.params, new.params)


def _relative_error(got, want):
    diff = sum(np.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    return float(np.sqrt(diff / sum(np.sum(b**2) for b in jax.tree.leaves(want))))


@pytest.mark.parametrize("strategy", ["shard_map", "pmap"])
def test_unscaled_gradients_equal_float32_gradients(strategy):
    g32, g16 = _gradients(jnp.float32, strategy), _gradients(jnp.float16, strategy)
    # float16 keeps 11 significant bits; after a dozen layers of float16
    # arithmetic (BatchNorm's backward pass subtracts near-equal sums) the
    # gradients agree to a few percent of their norm, elementwise to 2**-6 of
    # the largest (CPU-dev: 2.3% and 2**-6.9).
    biggest = max(np.abs(g).max() for g in jax.tree.leaves(g32))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(b, a, rtol=0, atol=2**-6 * biggest), g32, g16
    )
    error16 = _relative_error(g16, g32)
    assert error16 < 0.05
    if strategy == "shard_map":
        # Closer than bfloat16 (8 bits), the dtype bcjax already trains in (CPU-dev: 5.3%).
        assert error16 < _relative_error(_gradients(jnp.bfloat16), g32)


def _learnable_batches(num, batch=16, seed=0):
    """Class k: channel k brighter. Learnable by TinyCNN within a few dozen steps."""
    rs = np.random.RandomState(seed)
    out = []
    for i in range(num):
        labels = rs.randint(0, 3, batch).astype(np.int32)
        images = rs.randint(0, 120, (batch, IMAGE_SIZE, IMAGE_SIZE, 3))
        images[np.arange(batch), :, :, labels] += 100
        out.append(
            {
                "image": images.astype(np.uint8),
                "label": labels,
                "index": (np.arange(batch) + i * batch).astype(np.int32),
            }
        )
    return out


def _accuracy(steps, state, batches):
    hits = [
        np.asarray(steps.eval_step(state, steps.shard_batch(b))["logits"]).argmax(-1) == b["label"]
        for b in batches
    ]
    return float(np.mean(np.concatenate(hits)))


def test_forced_overflow_recovers_within_a_few_steps_and_trains_to_the_same_accuracy():
    train, held_out = _learnable_batches(30), _learnable_batches(4, seed=1)
    tx = make_optimizer(steps_per_epoch=10, num_epochs=3, learning_rate=0.2, clip_norm=5.0)[0]
    results = {}
    for name, dtype, scale in (
        ("float32", jnp.float32, "auto"),
        ("float16", jnp.float16, "auto"),
        ("forced", jnp.float16, loss_scale.create(2.0**24)),
    ):
        steps, state = _setup(dtype, scale, devices=2, tx=tx)
        skipped = 0
        for batch in train:
            state, m = _step(steps, state, batch)
            while m["overflow"]:  # a skipped step: the same batch again
                skipped += 1
                assert skipped <= 10, "the scale did not come down within 10 steps"
                state, m = _step(steps, state, batch)
            assert bool(m["grads_finite"])
        results[name] = (skipped, state, _accuracy(steps, state, held_out))
    skipped, forced, accuracy = results["forced"]
    assert skipped >= 3  # 2**24 does overflow a float16 backward pass here
    assert float(forced.loss_scale.scale) == 2.0**24 / 2**skipped  # halved per skip
    assert results["float16"][0] == 0 and results["float32"][0] == 0
    assert results["float32"][2] >= 0.9  # the task is learnt, so "same accuracy" says something
    assert abs(accuracy - results["float32"][2]) <= 2 / 64
    assert abs(results["float16"][2] - results["float32"][2]) <= 2 / 64


# -- checkpoints ------------------------------------------------------------------


def test_loss_scale_is_checkpointed_and_resumes_bit_identical(tmp_path):
    batches = make_batches(8)
    steps, state = _setup(jnp.float16, loss_scale.create(2.0**21, growth_interval=3), devices=2)
    for batch in batches[:2]:  # 2**21 overflows here: the scale comes down
        state, _ = _step(steps, state, batch)
    assert float(state.loss_scale.scale) < 2.0**21
    with checkpoint.CheckpointManager(tmp_path, keep_latest=1, keep_best=0) as ckpt:
        ckpt.save(int(state.step), state)
        ckpt.wait_until_finished()
        _, fresh = _setup(jnp.float16, loss_scale.create(growth_interval=3), devices=2)
        restored, _, _ = ckpt.restore_latest(fresh)
    assert isinstance(restored, ScaledTrainState)
    _assert_equal(restored.loss_scale, state.loss_scale)
    _assert_equal(restored.params, state.params)
    overflows = []
    for batch in batches[2:]:  # going on from either gives the same steps
        state, a = _step(steps, state, batch)
        restored, b = _step(steps, restored, batch)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), (a, b)
        overflows.append(float(a["overflow"]))
    _assert_equal((restored.params, restored.loss_scale), (state.params, state.loss_scale))
    assert 0 < sum(overflows) < len(overflows)  # resumed through overflows and good steps


# -- through the training loop ------------------------------------------------------


def _saved_loss_scale(checkpoints) -> dict:
    """The loss scale of the latest checkpoint, read without a target state."""
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(
        checkpoints,
        item_handlers={"state": ocp.PyTreeCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True),
    )
    try:
        step = manager.latest_step()
        meta = manager.item_metadata(step)["state"]
        abstract = {
            "loss_scale": jax.tree.map(lambda m: np.empty(m.shape, m.dtype), meta["loss_scale"])
        }
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=abstract,
                    restore_args=jax.tree.map(
                        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract
                    ),
                    partial_restore=True,
                )
            ),
        )
        return restored["state"]["loss_scale"]
    finally:
        manager.close()


def test_a_float16_run_resumes_with_its_loss_scale(tmp_path):
    """The public train API in float16: no non-finite step, and a run killed after
    epoch 1 resumes to the same parameters and loss scale as a straight run."""
    from _tiny import tiny_config

    from bcjax.data import synthetic
    from bcjax.train import loop

    data = synthetic.generate(tmp_path / "busi", num=48, seed=0, min_size=40, max_size=56)
    config = tiny_config(data, dtype="float16", num_devices=2, num_epochs=2)
    straight = loop.train_and_evaluate(config, tmp_path / "straight")
    with pytest.raises(loop.Interrupted):
        loop.train_and_evaluate(config, tmp_path / "killed", on_epoch_end=lambda r: r["epoch"] == 1)
    resumed = loop.train_and_evaluate(config, tmp_path / "killed")
    for results in (straight, resumed):
        assert results["skipped_steps"] == 0  # no non-finite step
        assert results["overflow_skipped_steps"] == straight["overflow_skipped_steps"]
    a, b = (
        checkpoint.read_params(tmp_path / run / "checkpoints") for run in ("straight", "killed")
    )
    jax.tree.map(np.testing.assert_array_equal, a, b)
    scale_a, scale_b = (
        _saved_loss_scale(tmp_path / run / "checkpoints") for run in ("straight", "killed")
    )
    jax.tree.map(np.testing.assert_array_equal, scale_a, scale_b)
    assert float(scale_a["scale"]) == 2.0**16 / 2 ** straight["overflow_skipped_steps"]
    assert int(scale_a["good_steps"]) > 0
