"""What each part of bcjax's train step costs, on one device.

    python -m bcjax.benchmark --ablate --models resnet18,resnet50 --batch 128 --out runs/ablate

The benchmark's anchors (``--anchors``: plain Flax and PyTorch steps timed on the
same machine) are plain steps: float input,
mean cross-entropy, ``jax.jit``, an optax update, nothing else. bcjax's step
does more. This module builds a ladder of steps from the same bcjax model,
each rung adding one thing, and times them side by side:

1. ``minimal``        the anchor's kind of step around the bcjax model:
                      normalised float32 input, mean cross-entropy,
                      ``optax.sgd`` with momentum, state donated, ``jax.jit``.
2. ``+bcjax step``    bcjax's ``train_step_local`` under plain jit, still on
                      float input, with the gradient norm and the NaN/Inf guard
                      off: adds the TrainState, the run's optimizer (schedule,
                      decay mask), per-example weights, metric sums, the
                      step-key folds.
3. ``+uint8 input``   images arrive as uint8 and are normalised on device,
                      as in a run (the batch is on the device before each
                      rung's step, so only the normalisation is timed, not
                      the 4x smaller host-to-device copy).
4. ``+grad norm``     the global gradient norm, one more pass over the gradients.
5. ``+NaN/Inf guard`` the finite check (of the sum of squares the norm
                      already computes) and the selects that keep the old
                      state after a bad step: the step as trained with
                      ``--config.strategy=jit``, without augmentation.
6. ``shard_map``      the same step under ``shard_map`` on a one-device mesh:
                      the default strategy, i.e. ``bcjax.benchmark``'s figure.

The rungs are timed interleaved (synchronised per call, so drift of a shared
machine hits all alike) and back to back (pipelined). Each rung's first-step
loss is returned too: for a model without dropout (the ResNets) they must
agree, or the ladder is not timing one computation (the tests check that);
MobileNet's dropout keys differ between the rungs. The difference between the anchor and
rung 1 is the model definition; between rung 1 and rung 6, the step's extras.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bcjax.timing import breakdown
from bcjax.timing import devices as devices_lib
from bcjax.timing.chrono import timed_compile

RUNGS = ("minimal", "+bcjax step", "+uint8 input", "+grad norm", "+NaN/Inf guard", "shard_map")


def _minimal_step(model, tx, dropout_key):
    """The plain step the anchors time, around a bcjax model."""

    def step(carry, images, labels):
        params, batch_stats, opt_state = carry

        def loss_fn(p):
            logits, updates = model.apply(
                {"params": p, "batch_stats": batch_stats},
                images,
                train=True,
                rngs={"dropout": dropout_key},
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), labels
            )
            return loss.mean(), updates["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), new_stats, opt_state), loss

    return jax.jit(step, donate_argnums=0)


class _Rung:
    """One compiled rung, stepping its own copy of the state."""

    def __init__(self, name, compiled, carry, args, loss_of):
        self.name, self.compiled, self.carry, self.args, self.loss_of = (
            name,
            compiled,
            carry,
            args,
            loss_of,
        )
        self.first_loss = None

    def __call__(self):
        self.carry, out = self.compiled(self.carry, *self.args)
        if self.first_loss is None:
            self.first_loss = float(self.loss_of(out))
        return self.carry, out


def ladder(model, state, batch: dict, rng, *, warmup: int = 3, iters: int = 20) -> dict:
    """Times the rungs of RUNGS for ``model`` on one device.

    Args:
      model: a bcjax model (``bcjax.models.create``).
      state: its TrainState on a one-device mesh (``state.tx`` is the run's optimizer).
      batch: a host batch {"image": uint8 [B,S,S,3], "label": int32 [B], "index": int32 [B]}.
      rng: the run's base key.
      warmup, iters: untimed, then timed synchronised calls of every rung.

    Returns {"rows": [one dict per rung], device facts}; a row holds the rung,
    its median/p10/p90 synchronised step time, pipelined images/s, the change
    against the rung before and against ``minimal``, lower/compile time, the
    compiled cost analysis (FLOPs, bytes accessed) and the first-step loss.
    """
    from bcjax.data import augment
    from bcjax.parallel import mesh as mesh_lib
    from bcjax.parallel import strategies

    jax.clear_caches()
    mesh = mesh_lib.make_mesh(1)
    batch_size = int(batch["label"].shape[0])
    labels = jax.device_put(jnp.asarray(batch["label"]))
    float_batch = dict(batch, image=np.asarray(augment.normalize(batch["image"])))

    rungs: list[_Rung] = []
    compile_times: dict[str, dict] = {}

    def add(name, fn, carry, args, loss_of):
        _, compiled, t = timed_compile(fn, carry, *args)
        compile_times[name] = t
        rungs.append(_Rung(name, compiled, breakdown._copy_tree(carry), args, loss_of))

    sgd = optax.sgd(0.01, momentum=0.9)
    carry = (state.params, state.batch_stats, sgd.init(state.params))
    add(
        "minimal",
        _minimal_step(model.clone(bn_axis_name=None), sgd, jax.random.key(1)),
        carry,
        (jax.device_put(jnp.asarray(float_batch["image"])), labels),
        lambda out: out,
    )

    def bcjax_rung(name, strategy, host_batch, **options):
        steps = strategies.build_steps(strategy, mesh, model, **options)
        placed = steps.place_state(state)
        add(
            name,
            steps.train_step,
            placed,
            (steps.shard_batch(host_batch), rng),
            lambda out: out["loss"],
        )

    as_float = {"preprocess": lambda images, keys: images}
    bcjax_rung(
        "+bcjax step", "jit", float_batch, grad_norm=False, nonfinite_guard=False, **as_float
    )
    bcjax_rung("+uint8 input", "jit", batch, grad_norm=False, nonfinite_guard=False)
    bcjax_rung("+grad norm", "jit", batch, nonfinite_guard=False)
    bcjax_rung("+NaN/Inf guard", "jit", batch)
    bcjax_rung("shard_map", "shard_map", batch)

    breakdown._time_interleaved(rungs, warmup)
    synced = breakdown._time_interleaved(rungs, iters)
    rows = []
    for rung, times in zip(rungs, synced):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = rung()
        jax.block_until_ready(out)
        pipelined = (time.perf_counter() - t0) / iters
        s = breakdown.stats(times)
        rows.append(
            {
                "rung": rung.name,
                "batch": batch_size,
                "step_ms": s["median"] * 1e3,
                "step_ms_p10": s["p10"] * 1e3,
                "step_ms_p90": s["p90"] * 1e3,
                "img_s": batch_size / s["median"],
                "img_s_pipelined": batch_size / pipelined,
                "lower_s": compile_times[rung.name]["lower_s"],
                "compile_s": compile_times[rung.name]["compile_s"],
                "gflop": _scaled(breakdown.safe_cost(rung.compiled, "flops"), 1e-9),
                "gb_accessed": _scaled(breakdown.safe_cost(rung.compiled, "bytes accessed"), 1e-9),
                "first_loss": rung.first_loss,
            }
        )
    base = rows[0]["step_ms"]
    for prev, row in zip([None] + rows[:-1], rows):
        row["delta_ms"] = 0.0 if prev is None else row["step_ms"] - prev["step_ms"]
        row["vs_minimal"] = base / row["step_ms"]
    return {**devices_lib.describe(list(mesh.devices.flat)), "rows": rows}


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


COLUMNS = (
    "model",
    "batch",
    "rung",
    "step_ms",
    "step_ms_p10",
    "step_ms_p90",
    "delta_ms",
    "vs_minimal",
    "img_s",
    "img_s_pipelined",
    "compile_s",
    "gflop",
    "gb_accessed",
    "first_loss",
)


def anchor_line(model_name: str, batch: int, rows: list[dict], anchors: dict) -> str | None:
    """The plain-Flax anchor of the same call against rung 1 and rung 6 (pipelined img/s)."""
    flax_img_s = anchors.get((model_name, batch), {}).get("jax-flax-linen")
    if not flax_img_s or not rows:
        return None
    first, last = rows[0]["img_s_pipelined"], rows[-1]["img_s_pipelined"]
    return (
        f"{model_name} b={batch}: plain-Flax anchor {flax_img_s:,.0f} img/s; bcjax model in the "
        f"minimal step {first:,.0f} ({first / flax_img_s:.3f}x: the model definition); full bcjax "
        f"step {last:,.0f} ({last / flax_img_s:.3f}x: model and step extras)"
    )


def format_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rounded copies for tables."""

    def rounded(key, value):
        if not isinstance(value, float):
            return value
        if key == "first_loss":  # compared between rungs: kept exact
            return value
        return round(value, 1) if key in ("img_s", "img_s_pipelined") else float(f"{value:.4g}")

    return [{k: rounded(k, v) for k, v in r.items()} for r in rows]
