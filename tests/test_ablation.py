"""The step ablation (bcjax.timing.ablation, `python -m bcjax.benchmark --ablate`)."""

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _mp_worker import make_model

from bcjax import benchmark
from bcjax.parallel import mesh as mesh_lib
from bcjax.parallel import strategies
from bcjax.step import optim
from bcjax.step import state as state_lib
from bcjax.timing import ablation

IMAGE_SIZE = 32


def _state_and_batch(model, batch_size=4):
    mesh = mesh_lib.make_mesh(1)
    tx, _ = optim.make_optimizer(steps_per_epoch=10, num_epochs=1, learning_rate=0.1, momentum=0.9)
    state = state_lib.create_train_state(model, tx, 0, IMAGE_SIZE, mesh)
    rs = np.random.default_rng(0)
    batch = {
        "image": rs.integers(0, 256, (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
        "label": rs.integers(0, 3, batch_size).astype(np.int32),
        "index": np.arange(batch_size, dtype=np.int32),
    }
    return mesh, tx, state, batch


def test_ladder_times_every_rung_of_one_computation():
    # bcjax's ResNet code (one basic block per stage, BatchNorm, no dropout): small to compile
    # six times.
    model = make_model("tiny_resnet")
    _, _, state, batch = _state_and_batch(model)
    result = ablation.ladder(model, state, batch, jax.random.key(0), warmup=1, iters=2)
    rows = result["rows"]
    assert [r["rung"] for r in rows] == list(ablation.RUNGS) and result["num_devices"] == 1
    # Every rung runs the same forward pass on the same images and labels: the
    # first step's loss agrees (float input vs uint8 normalised on device, mean
    # vs weighted-mean loss, jit vs shard_map), else the ladder compares
    # different computations.
    losses = np.array([r["first_loss"] for r in rows])
    np.testing.assert_allclose(losses, losses[0], rtol=1e-5)
    assert np.isfinite(losses[0]) and losses[0] > 0
    for r in rows:
        assert (
            r["step_ms"] > 0 and r["img_s"] > 0 and r["img_s_pipelined"] > 0 and r["compile_s"] > 0
        )
        assert r["step_ms_p10"] <= r["step_ms"] <= r["step_ms_p90"]
        assert r["img_s"] == pytest.approx(4 / (r["step_ms"] / 1e3))
    assert rows[0]["delta_ms"] == 0 and rows[0]["vs_minimal"] == 1
    for prev, r in zip(rows, rows[1:]):
        assert r["delta_ms"] == pytest.approx(r["step_ms"] - prev["step_ms"])
        assert r["vs_minimal"] == pytest.approx(rows[0]["step_ms"] / r["step_ms"])
    # The compiled programs differ as the rungs say: the same FLOPs give or take
    # the norm's few, and the norm and guard never remove memory traffic.
    flops = [r["gflop"] for r in rows]
    assert max(flops) == pytest.approx(min(flops), rel=0.05)
    by = {r["rung"]: r["gb_accessed"] for r in rows}
    assert by["+grad norm"] >= by["+uint8 input"] and by["+NaN/Inf guard"] >= by["+grad norm"]


def test_ablate_cli_writes_tables_and_the_anchor_comparison(tmp_path, capsys, monkeypatch):
    # The CLI's plumbing around the ladder (tested above): the rows it is given
    # reach the tables and files, beside the plain-Flax anchor of the same call.
    seen = []

    def ladder(model, state, batch, rng, *, warmup, iters):
        seen.append((type(model).__name__, batch["image"].shape, warmup, iters))
        rows = [
            {
                "rung": name,
                "batch": 4,
                "step_ms": 10.0 + i,
                "step_ms_p10": 9.0 + i,
                "step_ms_p90": 11.0 + i,
                "img_s": 4e3 / (10 + i),
                "img_s_pipelined": 4e3 / (10 + i) + 1,
                "lower_s": 0.1,
                "compile_s": 0.2,
                "gflop": 1.0,
                "gb_accessed": 0.5,
                "first_loss": 1.0986,
                "delta_ms": float(i > 0),
                "vs_minimal": 10 / (10 + i),
            }
            for i, name in enumerate(ablation.RUNGS)
        ]
        return {"platform": "cpu", "num_devices": 1, "rows": rows}

    monkeypatch.setattr(ablation, "ladder", ladder)
    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text(
        '{"fw": "jax-flax-linen", "model": "resnet18", "batch": 4, "img_s": 100.0}\n'
    )
    out = tmp_path / "ablate"
    rows = benchmark.main(
        [
            "--ablate",
            "--models=resnet18",
            "--width=2",
            "--image-size=32",
            "--batch=4",
            "--steps=2",
            "--warmup=1",
            "--dtype=float32",
            f"--anchors={anchors}",
            f"--out={out}",
        ]
    )
    assert seen == [("ResNet", (4, 32, 32, 3), 1, 2)]
    assert [r["rung"] for r in rows] == list(ablation.RUNGS) and all(
        r["model"] == "resnet18" for r in rows
    )
    printed = capsys.readouterr().out
    assert printed.startswith("bcjax step ablation") and "strategy" not in printed.splitlines()[0]
    assert "| resnet18 | 4 | +NaN/Inf guard | 14 |" in printed
    # 401 img/s in the minimal step and 267.67 in the last rung against the anchor's 100.
    assert "plain-Flax anchor 100 img/s" in printed and "minimal step 401 (4.010x" in printed
    assert "full bcjax step 268 (2.677x" in printed

    with open(out / "ablation.csv") as f:
        saved = list(csv.DictReader(f))
    assert [r["rung"] for r in saved] == list(ablation.RUNGS) and float(
        saved[0]["first_loss"]
    ) == 1.0986
    data = json.loads((out / "ablation.json").read_text())
    assert data["device"] == {"platform": "cpu", "num_devices": 1} and len(data["rows"]) == len(
        ablation.RUNGS
    )
    assert "model definition" in data["anchor_lines"][0]
    assert "| resnet18 | 4 | minimal |" in (out / "ablation.md").read_text()


def test_switching_off_grad_norm_and_guard_changes_no_update():
    """The ablation's switches remove work, not math: same state after a finite
    step; the guard, when on, is what keeps a non-finite step out of the state."""
    model = make_model("tiny_resnet")
    mesh, tx, state, batch = _state_and_batch(model)
    rng = jax.random.key(0)
    # NaN images for an all-black batch, so one compiled step sees both cases.
    from bcjax.data import augment

    nan_if_black = lambda images, keys: (
        augment.normalize(images)
        + jnp.where(  # noqa: E731
            images.max() == 0, jnp.nan, 0.0
        )
    )
    black = dict(batch, image=np.zeros_like(batch["image"]))
    results = {}
    for guarded in (True, False):
        steps = strategies.build_steps(
            "jit",
            mesh,
            model,
            donate=False,
            grad_norm=guarded,
            nonfinite_guard=guarded,
            preprocess=nan_if_black,
        )
        results[guarded] = [
            steps.train_step(steps.place_state(state), steps.shard_batch(b), rng)
            for b in (batch, black)
        ]
    (on, on_metrics), (off, off_metrics) = results[True][0], results[False][0]
    for a, b in zip(jax.tree.leaves(on.params), jax.tree.leaves(off.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(on_metrics["grad_norm"]) > 0 and float(off_metrics["grad_norm"]) == 0
    assert bool(on_metrics["grads_finite"]) and bool(off_metrics["grads_finite"])

    # The NaN batch: guarded, the state is kept and the step is flagged; unguarded, NaN reaches it.
    (on, on_metrics), (off, _) = results[True][1], results[False][1]
    assert not bool(on_metrics["grads_finite"])
    for a, b in zip(jax.tree.leaves(on.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(np.isnan(np.asarray(x)).any() for x in jax.tree.leaves(off.params))
