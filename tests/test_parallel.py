"""Strategies agree with each other and with one device; loss, optimizer and
step details. 8 fake CPU devices (tests/conftest.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _mp_worker import (
    GLOBAL_BATCH,
    build,
    initial_state_host,
    make_batches,
    make_model,
    run,
    run_cached,
)

from bcjax.parallel import mesh as mesh_lib
from bcjax.parallel import strategies
from bcjax.parallel.mesh import make_mesh, request_cpu_devices
from bcjax.step import optim
from bcjax.step import steps as step_math

# fp32 on CPU: reductions in a different order (8 partial sums vs 1) differ in
# the last bits, a few 1e-6 after three steps.
TOL = dict(rtol=1e-5, atol=1e-5)


def _assert_trees_close(a, b, **tol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, err_msg=jax.tree_util.keystr(path), **tol)


def test_mesh_is_one_auto_data_axis():
    mesh = make_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == 8
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    assert make_mesh(4).size == 4
    with pytest.raises(ValueError, match="devices exist"):
        make_mesh(16)


def test_request_cpu_devices_after_start_is_clear():
    assert len(jax.devices()) == 8  # backends up
    request_cpu_devices(8)  # what is running: fine
    with pytest.raises(RuntimeError, match="before any JAX computation"):
        request_cpu_devices(2)


@pytest.mark.parametrize("strategy", ["shard_map", "pmap", "jit"])
def test_strategies_match_one_device(strategy):
    """Synced BatchNorm, real augmentation: same losses, parameters, BatchNorm
    statistics and eval logits on 8 devices as on 1."""
    ref = run_cached("shard_map", 1, augment=True)
    got = run_cached(strategy, 8, augment=True)
    np.testing.assert_allclose(got["losses"], ref["losses"], **TOL)
    assert ref["losses"][-1] < ref["losses"][0]  # it trains
    _assert_trees_close(got["params"], ref["params"], **TOL)
    _assert_trees_close(got["batch_stats"], ref["batch_stats"], **TOL)
    np.testing.assert_allclose(got["logits"], ref["logits"], **TOL)
    assert got["logits"].shape == (GLOBAL_BATCH, 3)
    for key in ("correct", "count", "weight_sum", "grad_norm"):
        np.testing.assert_allclose(
            [m[key] for m in got["metrics"]], [m[key] for m in ref["metrics"]], **TOL
        )
    assert all(m["grads_finite"] for m in got["metrics"])


def test_per_device_batchnorm_differs_from_synced():
    synced = run_cached("shard_map", 8, "tiny_cnn")
    per_device = run_cached("shard_map", 8, "tiny_cnn", bn_sync=False)
    per_device_pmap = run_cached("pmap", 8, "tiny_cnn", bn_sync=False)
    # 2 examples per device: per-device statistics change the very first loss.
    assert abs(per_device["losses"][0] - synced["losses"][0]) > 1e-3
    np.testing.assert_allclose(per_device_pmap["losses"], per_device["losses"], **TOL)
    _assert_trees_close(per_device_pmap["params"], per_device["params"], **TOL)
    # Per-device running statistics are averaged into the replicated state.
    _assert_trees_close(per_device_pmap["batch_stats"], per_device["batch_stats"], **TOL)


def test_one_device_per_device_bn_is_synced_bn():
    np.testing.assert_allclose(
        run_cached("shard_map", 1, "tiny_cnn", bn_sync=False)["losses"],
        run_cached("shard_map", 8, "tiny_cnn")["losses"],
        **TOL,
    )


def test_collectives_off():
    """Without collectives: identical to the full step on 1 device; on 8 each
    device trains on its own 2 examples, so the result differs."""
    full_1 = run_cached("shard_map", 1, "tiny_cnn")
    off_1 = run_cached("shard_map", 1, "tiny_cnn", collectives=False)
    np.testing.assert_allclose(off_1["losses"], full_1["losses"], **TOL)
    _assert_trees_close(off_1["params"], full_1["params"], **TOL)
    off_8 = run_cached("jit", 8, "tiny_cnn", collectives=False)
    assert off_8["metrics"][0]["count"] == GLOBAL_BATCH // 8  # device 0's share only
    assert np.abs(off_8["losses"] - full_1["losses"]).max() > 1e-4
    with pytest.raises(AssertionError):
        _assert_trees_close(off_8["params"], full_1["params"], **TOL)


def test_jit_cannot_keep_per_device_batchnorm():
    with pytest.raises(ValueError, match="bn_sync=False"):
        build("jit", make_mesh(), "tiny_cnn", bn_sync=False)
    with pytest.raises(ValueError, match="allowed: shard_map, pmap, jit"):
        build("pjit", make_mesh(), "tiny_cnn")


@pytest.mark.parametrize("strategy", ["shard_map", "pmap", "jit"])
def test_batch_not_divisible_is_a_clear_error(strategy):
    steps = build(strategy, make_mesh(), "tiny_cnn")
    batch = make_batches(1, global_batch=12)[0]
    with pytest.raises(ValueError, match="12 is not divisible by the number of devices 8"):
        steps.shard_batch(batch)
    assert mesh_lib.per_device_batch(16, 8) == 2
    with pytest.raises(ValueError, match="multiple of 8"):
        mesh_lib.per_device_batch(20, 8)


def _reference_loss(logits, labels, eps, class_weights):
    """float64 numpy: torch's CrossEntropyLoss(weight=w, label_smoothing=eps)."""
    logits = np.asarray(logits, np.float64)
    c = logits.shape[1]
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    target = np.full_like(logp, eps / c)
    target[np.arange(len(labels)), labels] += 1 - eps
    ce = -(target * logp).sum(1)
    w = np.ones(len(labels)) if class_weights is None else np.asarray(class_weights)[labels]
    return (w * ce).sum() / w.sum()


@pytest.mark.parametrize(
    "eps,class_weights", [(0.0, None), (0.1, None), (0.0, (1.0, 0.5, 2.0)), (0.2, (3.0, 1.0, 0.25))]
)
def test_loss_matches_float64_reference(eps, class_weights):
    rs = np.random.RandomState(1)
    logits = rs.randn(10, 3).astype(np.float32) * 3
    labels = rs.randint(0, 3, 10).astype(np.int32)
    loss, (loss_sum, weight_sum) = step_math.loss_fn(
        jnp.asarray(logits), jnp.asarray(labels), label_smoothing=eps, class_weights=class_weights
    )
    np.testing.assert_allclose(
        float(loss), _reference_loss(logits, labels, eps, class_weights), rtol=1e-6
    )
    np.testing.assert_allclose(float(loss_sum / weight_sum), float(loss), rtol=1e-6)


def test_loss_masks_padding():
    rs = np.random.RandomState(2)
    logits = rs.randn(6, 3).astype(np.float32)
    labels = rs.randint(0, 3, 6).astype(np.int32)
    valid = np.array([1, 1, 1, 1, 0, 0], bool)
    masked, _ = step_math.loss_fn(logits, labels, class_weights=(1.0, 2.0, 3.0), valid=valid)
    np.testing.assert_allclose(
        float(masked), _reference_loss(logits[:4], labels[:4], 0.0, (1.0, 2.0, 3.0)), rtol=1e-6
    )


def test_class_weights_and_smoothing_reach_the_step():
    """The step optimises the weighted, smoothed loss: its first loss (before
    any update) equals the reference loss of the initial model's logits."""
    mesh = make_mesh()
    weights, eps = (0.5, 1.0, 2.0), 0.1
    steps = build("shard_map", mesh, "tiny_cnn", class_weights=weights, label_smoothing=eps)
    batch = make_batches(1)[0]
    state = steps.place_state(initial_state_host("tiny_cnn"))
    model = make_model("tiny_cnn")
    from _mp_worker import RNG_SEED, simple_preprocess

    aug_key, _ = step_math.step_keys(jax.random.key(RNG_SEED), 0)
    x = simple_preprocess(batch["image"], step_math.example_keys(aug_key, batch["index"]))
    logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        jax.device_get(state.variables), x
    )
    losses, _, metrics = run(steps, state, [batch])
    np.testing.assert_allclose(
        losses[0], _reference_loss(logits, batch["label"], eps, weights), rtol=2e-5
    )
    np.testing.assert_allclose(
        metrics[0]["weight_sum"], np.asarray(weights)[batch["label"]].sum(), rtol=1e-6
    )


def test_weight_decay_mask_spares_batchnorm_and_biases():
    params = initial_state_host("tiny_resnet").params
    mask = optim.decay_mask(params)
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat["['conv_init']['kernel']"] and flat["['fc']['kernel']"]
    assert not flat["['fc']['bias']"]
    bn = [k for k in flat if "bn" in k]
    assert bn and not any(flat[k] for k in bn)
    assert sum(flat.values()) == sum(1 for k in flat if k.endswith("['kernel']"))
    # With zero gradients, only decayed leaves move.
    for name in ("sgd", "adamw"):
        tx, _ = optim.make_optimizer(
            steps_per_epoch=1, num_epochs=1, optimizer=name, learning_rate=0.1, weight_decay=0.1
        )
        moved = jax.jit(
            lambda p, tx=tx: jax.tree.map(
                lambda u: jnp.any(u != 0),
                tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[0],
            )
        )
        assert jax.tree.map(bool, moved(params)) == mask, name


def test_schedule_warmup_then_cosine():
    tx, schedule = optim.make_optimizer(
        steps_per_epoch=10, num_epochs=5, learning_rate=0.4, warmup_epochs=1
    )
    lrs = np.asarray([schedule(s) for s in range(51)])
    np.testing.assert_allclose(lrs[[0, 5, 10]], [0.0, 0.2, 0.4], rtol=1e-6)
    assert np.all(np.diff(lrs[10:]) <= 1e-9) and lrs[50] == pytest.approx(0.0, abs=1e-7)
    np.testing.assert_allclose(lrs[30], 0.2, rtol=1e-5)  # cosine half-way


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(learning_rate=-0.1), "learning_rate must be >= 0"),
        (dict(optimizer="adam"), "allowed: sgd, adamw"),
        (dict(momentum=1.5), "momentum"),
        (dict(clip_norm=-1.0), "clip_norm"),
    ],
)
def test_optimizer_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.make_optimizer(steps_per_epoch=10, num_epochs=1, **kwargs)
    with pytest.raises(TypeError):
        optim.make_optimizer(steps_per_epoch=10, num_epochs=1, learning_rat=0.1)


def test_clipping_bounds_the_update():
    tx, _ = optim.make_optimizer(
        steps_per_epoch=1, num_epochs=1, learning_rate=1.0, momentum=0.0, clip_norm=0.5
    )
    params = {"w": jnp.ones((2, 2))}
    updates, _ = tx.update({"w": jnp.full((2, 2), 10.0)}, tx.init(params), params)
    assert float(step_math.global_norm(updates)) == pytest.approx(0.5, rel=1e-5)


def test_bf16_compute_keeps_fp32_state_and_flags_nans():
    mesh = make_mesh()
    model = make_model("tiny_cnn").clone(dtype=jnp.bfloat16)
    steps = strategies.build_steps(
        "shard_map",
        mesh,
        model,
        bn_sync=True,
        preprocess=lambda im, k: im.astype(jnp.float32) / 255.0,
        normalize=lambda im: im.astype(jnp.float32) / 255.0,
    )
    state = steps.place_state(initial_state_host("tiny_cnn"))  # fp32 parameters
    batch = make_batches(1)[0]
    state, metrics = steps.train_step(state, steps.shard_batch(batch), jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((state.params, state.batch_stats)))
    assert bool(metrics["grads_finite"]) and np.isfinite(float(metrics["loss"]))
    assert steps.eval_step(state, steps.shard_batch(batch))["logits"].dtype == jnp.float32

    nan_steps = strategies.build_steps(
        "shard_map",
        mesh,
        model,
        bn_sync=True,
        preprocess=lambda im, k: im.astype(jnp.float32) * jnp.nan,
        normalize=lambda im: im.astype(jnp.float32),
    )
    before = jax.tree.map(np.asarray, (state.params, state.batch_stats, state.opt_state))
    after, metrics = nan_steps.train_step(state, nan_steps.shard_batch(batch), jax.random.key(0))
    assert not bool(metrics["grads_finite"])
    # The non-finite update was not applied: the state is the last good one.
    jax.tree.map(
        np.testing.assert_array_equal,
        before,
        jax.tree.map(np.asarray, (after.params, after.batch_stats, after.opt_state)),
    )


def test_state_is_donated_and_replicated():
    mesh = make_mesh()
    steps = build("shard_map", mesh, "tiny_cnn")
    state = steps.place_state(initial_state_host("tiny_cnn"))
    leaf = jax.tree.leaves(state.params)[0]
    new_state, _ = steps.train_step(state, steps.shard_batch(make_batches(1)[0]), jax.random.key(0))
    assert leaf.is_deleted()
    assert int(new_state.step) == 1
    for x in jax.tree.leaves(new_state):
        assert x.sharding.is_fully_replicated and len(x.sharding.device_set) == 8


@pytest.mark.parametrize("strategy", ["shard_map", "pmap", "jit"])
def test_images_kept_on_device_arrive_as_the_host_would_send_them(strategy):
    mesh = make_mesh(8)
    steps = strategies.build_steps(
        strategy, mesh, make_model("tiny_resnet")
    )  # never run: only shard_batch
    rs = np.random.default_rng(0)
    table = rs.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    index = rs.permutation(40)[:16].astype(np.int32)
    host = {"image": table[index], "label": np.zeros(16, np.int32), "index": index}
    sent = steps.shard_batch(host)
    gathered = strategies.on_device_images(table, mesh)(
        steps.shard_batch({k: v for k, v in host.items() if k != "image"})
    )
    assert gathered["image"].shape == sent["image"].shape
    assert gathered["image"].sharding.is_equivalent_to(sent["image"].sharding, sent["image"].ndim)
    np.testing.assert_array_equal(np.asarray(gathered["image"]), np.asarray(sent["image"]))
    for shard in gathered["image"].addressable_shards:  # each device holds its own rows
        np.testing.assert_array_equal(
            np.asarray(shard.data), np.asarray(sent["image"])[shard.index]
        )
