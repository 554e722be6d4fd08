"""The step ablation (bcjax.timing.ablation, `python -m bcjax.benchmark --ablate`)."""
import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bcjax.models
from bcjax import benchmark
from bcjax.parallel import mesh as mesh_lib, strategies
from bcjax.timing import ablation
from bcjax.train import optim, state as state_lib


def test_ablate_cli_times_every_rung_of_one_computation(tmp_path, capsys):
    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text('{"fw": "jax-flax-linen", "model": "resnet18", "batch": 4, "img_s": 100.0}\n')
    out = tmp_path / "ablate"
    rows = benchmark.main(["--ablate", "--models=resnet18", "--width=2", "--image-size=32", "--batch=4",
                           "--steps=2", "--warmup=1", "--dtype=float32", f"--anchors={anchors}", f"--out={out}"])
    assert [r["rung"] for r in rows] == list(ablation.RUNGS)
    # Every rung runs the same forward pass on the same images and labels: the
    # first step's loss agrees (float input vs uint8 normalised on device, mean
    # vs weighted-mean loss, jit vs shard_map), else the ladder compares
    # different computations.
    losses = np.array([r["first_loss"] for r in rows])
    np.testing.assert_allclose(losses, losses[0], rtol=1e-5)
    assert np.isfinite(losses[0]) and losses[0] > 0
    for r in rows:
        assert r["step_ms"] > 0 and r["img_s"] > 0 and r["img_s_pipelined"] > 0 and r["compile_s"] > 0
        assert r["step_ms_p10"] <= r["step_ms"] <= r["step_ms_p90"]
    assert rows[0]["delta_ms"] == 0 and rows[0]["vs_minimal"] == 1
    for prev, r in zip(rows, rows[1:]):
        assert r["delta_ms"] == pytest.approx(r["step_ms"] - prev["step_ms"], abs=2e-3 * r["step_ms"])
    printed = capsys.readouterr().out
    assert "| resnet18 | 4 | +NaN/Inf guard |" in printed and "plain-Flax anchor 100 img/s" in printed

    with open(out / "ablation.csv") as f:
        saved = list(csv.DictReader(f))
    assert [r["rung"] for r in saved] == list(ablation.RUNGS)
    data = json.loads((out / "ablation.json").read_text())
    assert data["device"]["num_devices"] == 1 and len(data["rows"]) == len(ablation.RUNGS)
    assert "model definition" in data["anchor_lines"][0]
    assert "| resnet18 | 4 | minimal |" in (out / "ablation.md").read_text()


def test_switching_off_grad_norm_and_guard_changes_no_update():
    """The ablation's switches remove work, not math: same state after a finite
    step; the guard, when on, is what keeps a non-finite step out of the state."""
    mesh = mesh_lib.make_mesh(1)
    model = bcjax.models.create("resnet18", num_classes=3, width=2, dtype=jnp.float32)
    tx, _ = optim.make_optimizer(steps_per_epoch=10, num_epochs=1, learning_rate=0.1, momentum=0.9)
    state = state_lib.create_train_state(model, tx, 0, 32, mesh)
    rs = np.random.default_rng(0)
    batch = {"image": rs.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
             "label": np.array([0, 1, 2, 1], np.int32), "index": np.arange(4, dtype=np.int32)}
    rng = jax.random.key(0)
    results = {}
    for guarded in (True, False):
        steps = strategies.build_steps("jit", mesh, model, tx, donate=False, grad_norm=guarded,
                                       nonfinite_guard=guarded)
        new, metrics = steps.train_step(steps.place_state(state), steps.shard_batch(batch), rng)
        results[guarded] = (new, metrics)
    for a, b in zip(jax.tree.leaves(results[True][0].params), jax.tree.leaves(results[False][0].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(results[True][1]["grad_norm"]) > 0 and float(results[False][1]["grad_norm"]) == 0
    assert bool(results[False][1]["grads_finite"])

    # A NaN input: guarded, the state is kept and the step is flagged; unguarded, NaN reaches it.
    nan_images = lambda images, keys: jnp.full(images.shape, jnp.nan, jnp.float32)  # noqa: E731
    for guarded in (True, False):
        steps = strategies.build_steps("jit", mesh, model, tx, donate=False, nonfinite_guard=guarded,
                                       preprocess=nan_images)
        new, metrics = steps.train_step(steps.place_state(state), steps.shard_batch(batch), rng)
        leaves = [np.asarray(x) for x in jax.tree.leaves(new.params)]
        if guarded:
            assert not bool(metrics["grads_finite"])
            for a, b in zip(leaves, jax.tree.leaves(state.params)):
                np.testing.assert_array_equal(a, np.asarray(b))
        else:
            assert any(np.isnan(x).any() for x in leaves)
