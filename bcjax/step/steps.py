"""Pure per-device step math: loss, train step, eval step.

These functions know nothing about meshes. ``bcjax.parallel.strategies``
wraps them in ``shard_map``, ``pmap`` or plain ``jit``; the arguments that
differ between those wrappers are ``axis_name`` (the mapped axis for the
reductions the step itself must do, None when the arrays are already global or
when cross-device communication is switched off) and ``psum_grads``.

Why the reductions look the way they do:
- The loss on each device is its share of the GLOBAL mean:
  ``sum_local(w_i * ce_i) / sum_global(w_i)``. Summing those gradients over
  devices gives exactly the gradient of the global-batch mean, whatever the
  device count.
- Under ``jax.shard_map(check_vma=True)`` the parameters are device-invariant,
  so JAX's transpose of their implicit broadcast already sums the gradients
  over the axis: ``psum_grads=False`` (an extra pmean would divide by the
  device count). Under ``pmap`` (``check_vma=False`` semantics) gradients are
  per device and need an explicit ``psum``: ``psum_grads=True``.
- Per-example augmentation keys are ``fold_in(step_key, index)``, with index
  the example's position in the dataset, so a batch augments identically on
  1 or 8 devices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax

from bcjax.step.state import TrainState

Batch = Mapping[str, jax.Array]


def step_keys(rng: jax.Array, step: jax.Array):
    """(augmentation key, dropout key) for a step; a function of (rng, step)
    only, so a resumed run draws the same randomness."""
    step_key = jax.random.fold_in(rng, step)
    return jax.random.fold_in(step_key, 0), jax.random.fold_in(step_key, 1)


def example_keys(key: jax.Array, index: jax.Array) -> jax.Array:
    """One key per example, from its dataset index."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(index)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example cross-entropy [B] against one-hot labels smoothed as torch
    does: ``(1 - eps) * onehot + eps / num_classes``."""
    num_classes = logits.shape[-1]
    targets = optax.smooth_labels(
        jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), label_smoothing
    )
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def example_weights(
    labels: jax.Array,
    class_weights: Sequence[float] | None = None,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Per-example weights [B]: the class weight of each label (1 without class
    weights), 0 for padding (``valid`` False)."""
    if class_weights is None:
        w = jnp.ones(labels.shape, jnp.float32)
    else:
        w = jnp.asarray(class_weights, jnp.float32)[labels]
    if valid is not None:
        w = w * valid.astype(jnp.float32)
    return w


def loss_fn(
    logits: jax.Array,
    labels: jax.Array,
    *,
    label_smoothing: float = 0.0,
    class_weights: Sequence[float] | None = None,
    valid: jax.Array | None = None,
):
    """Weighted mean cross-entropy of one (local or global) batch.

    Returns ``(loss, (loss_sum, weight_sum))`` with ``loss = loss_sum / weight_sum``:
    with class weights this is torch's ``CrossEntropyLoss(weight=...)``
    reduction (the weighted mean, not the plain mean of weighted terms).
    """
    w = example_weights(labels, class_weights, valid)
    loss_sum = jnp.sum(w * cross_entropy(logits, labels, label_smoothing))
    weight_sum = jnp.sum(w)
    return loss_sum / jnp.maximum(weight_sum, 1e-12), (loss_sum, weight_sum)


def sum_of_squares(tree) -> jax.Array:
    """Sum of the squares of all leaves, in float32."""
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def global_norm(tree) -> jax.Array:
    """L2 norm over all leaves (optax renamed its helper across versions)."""
    return jnp.sqrt(sum_of_squares(tree))


def _psum(x, axis_name):
    return x if axis_name is None else lax.psum(x, axis_name)


def _scaled(compute_loss: Callable, scale: jax.Array) -> Callable:
    """``compute_loss`` with its loss (not its aux outputs) multiplied by ``scale``."""

    def scaled(params):
        loss, aux = compute_loss(params)
        return loss * scale, aux

    return scaled


def apply_if(applied: jax.Array, update: Callable, old, *, in_cond: bool):
    """``update()`` when ``applied`` (a scalar bool), else ``old`` (a tree of its structure).

    ``in_cond``: the update runs inside a ``lax.cond`` (the CPU form) instead of
    being computed and then selected elementwise against ``old``. On XLA:CPU the
    select made the compiled step copy the donated state once more (about 1-2% of
    the quickstart's step), and its fusions rounded the stored momentum of the
    BatchNorm scales differently from the step without the guard; with the cond
    the quickstart's SGD step is the unguarded one bit for bit. XLA:GPU's
    conditional reads its predicate on the host, so accelerators keep the select.
    """
    if in_cond:
        return lax.cond(applied, update, lambda: old)
    return jax.tree.map(lambda n, o: jnp.where(applied, n, o), update(), old)


def train_step_local(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    model,
    axis_name: str | None,
    psum_grads: bool,
    sync_batch_stats: bool,
    preprocess: Callable,
    label_smoothing: float = 0.0,
    class_weights: Sequence[float] | None = None,
    grad_norm: bool = True,
    nonfinite_guard: bool = True,
    skip_in_cond: bool = False,
):
    """One optimisation step on this device's slice of the global batch.

    Args:
      state: replicated TrainState.
      batch: {"image": uint8 [B,S,S,3], "label": int32 [B], "index": int32 [B]}
        (optional "valid": bool [B] masks padding out of loss and metrics).
      rng: the run's base key; the step folds in ``state.step``.
      model: the flax module (its BatchNorm axis name chosen by the strategy).
      axis_name: mapped axis to reduce loss denominators and metrics over, or
        None (global arrays under jit, or collectives switched off).
      psum_grads: sum gradients explicitly over ``axis_name`` (pmap).
      sync_batch_stats: pmean the updated BatchNorm running statistics over
        ``axis_name``; used with per-device BatchNorm so the replicated state
        holds the mean of the per-device running averages.
      preprocess: ``preprocess(images_uint8, keys) -> float32`` (augmentation).
      grad_norm, nonfinite_guard: switch off the gradient norm (reported as 0)
        and the NaN/Inf check with its keep-the-old-state selects (reported
        as finite). Only ``bcjax.timing.ablation`` switches them off, to time
        what they cost; a training run always has both.
      skip_in_cond: how the guard keeps a skipped step out of the state (see
        ``apply_if``); ``bcjax.parallel.strategies`` sets it for CPU meshes only.
        Either way a skipped step leaves params, BatchNorm statistics and the
        optimizer state (its step count too) as they were.

    A ``ScaledTrainState`` (float16 compute) gets dynamic loss scaling
    (``bcjax.step.loss_scale``): the loss is scaled before the backward pass,
    the summed gradients unscaled in float32 before the optimizer, and an
    overflowed step is skipped with the scale halved.

    Returns ``(new_state, metrics)``; metrics are global scalars:
      loss (the optimised weighted mean, unscaled), loss_sum, weight_sum,
      correct, count, grad_norm (before clipping; 0 on an overflowed step),
      grads_finite (bool; False when the loss or any gradient is NaN/Inf and
      that is not a float16 overflow, in which case the update was not
      applied), overflow (float32 1.0 when a float16 overflow skipped the
      step, else 0.0), loss_scale (float32, the scale this step used; 1.0
      without float16).
    """
    aug_key, dropout_key = step_keys(rng, state.step)
    if axis_name is not None:
        dropout_key = jax.random.fold_in(dropout_key, lax.axis_index(axis_name))
    images = preprocess(batch["image"], example_keys(aug_key, batch["index"]))
    labels = batch["label"]
    valid = batch.get("valid")
    weights = example_weights(labels, class_weights, valid)
    # Depends on labels only, so reducing it inside the loss adds no gradient term.
    global_weight_sum = jnp.maximum(_psum(jnp.sum(weights), axis_name), 1e-12)

    def compute_loss(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            rngs={"dropout": dropout_key},
            mutable=["batch_stats"],
        )
        loss_sum = jnp.sum(weights * cross_entropy(logits, labels, label_smoothing))
        return loss_sum / global_weight_sum, (logits, updates["batch_stats"], loss_sum)

    loss_scale = getattr(state, "loss_scale", None)  # float16 runs only (ScaledTrainState)
    scaled_loss = compute_loss if loss_scale is None else _scaled(compute_loss, loss_scale.scale)
    grads, (logits, batch_stats, loss_sum) = jax.grad(scaled_loss, has_aux=True)(state.params)
    if psum_grads and axis_name is not None:
        grads = lax.psum(grads, axis_name)
    if loss_scale is not None:
        # Unscaled after the reduction: every device then sees the same sums,
        # so all take the same skip/scale decision.
        grads = loss_scale.unscale(grads)
    if sync_batch_stats and axis_name is not None:
        batch_stats = lax.pmean(batch_stats, axis_name)

    def update():
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), batch_stats, opt_state

    counted = jnp.ones_like(weights) if valid is None else valid.astype(jnp.float32)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) * counted)
    loss_sum = _psum(loss_sum, axis_name)
    # One pass over the gradients serves the norm and the guard: a NaN or Inf
    # anywhere makes the sum of squares non-finite (so does a norm above ~1e19,
    # which overflows float32: as good as diverged). With float16 the guard is
    # not optional: an overflowed step must be skipped.
    guard = nonfinite_guard or loss_scale is not None
    grad_sq = sum_of_squares(grads) if grad_norm or guard else None
    overflow = jnp.asarray(False)
    if guard:
        loss_finite = jnp.isfinite(loss_sum)
        applied = jnp.isfinite(grad_sq) & loss_finite
        # A skipped step never reaches the state: params, optimizer and BatchNorm
        # statistics stay those of the last good step (the loop then stops or skips).
        params, batch_stats, opt_state = apply_if(
            applied,
            update,
            (state.params, state.batch_stats, state.opt_state),
            in_cond=skip_in_cond,
        )
        finite = applied
        if loss_scale is not None:
            # An overflow of the scaled float16 gradients is expected: skipped
            # and the scale halved, but not reported as a fault (nan_policy).
            overflow = loss_scale.is_overflow(loss_finite, jnp.isfinite(grad_sq))
            finite = applied | overflow
    else:
        params, batch_stats, opt_state = update()
        finite = jnp.asarray(True)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    if loss_scale is not None:
        new_state = new_state.replace(loss_scale=loss_scale.update(applied))
    if grad_norm:
        # An overflowed step applied no gradient: its norm (Inf/NaN) is reported
        # as 0 so an epoch's mean stays finite; "overflow" counts those steps.
        norm = jnp.where(overflow, 0.0, jnp.sqrt(grad_sq))
    else:
        norm = jnp.zeros((), jnp.float32)
    metrics = {
        "loss": loss_sum / global_weight_sum,
        "loss_sum": loss_sum,
        "weight_sum": global_weight_sum,
        "correct": _psum(correct, axis_name),
        "count": _psum(jnp.sum(counted), axis_name),
        "grad_norm": norm,
        "grads_finite": finite,
        "overflow": overflow.astype(jnp.float32),
        "loss_scale": (
            jnp.ones((), jnp.float32) if loss_scale is None else loss_scale.scale
        ).astype(jnp.float32),
    }
    return new_state, metrics


def eval_step_local(state: TrainState, batch: Batch, *, model, normalize: Callable):
    """Predictions for this device's slice of an eval batch.

    Returns per-example arrays: logits float32 [B,C], probs [B,C], label [B],
    valid bool [B] (all True when the batch has no "valid"), loss [B]
    (unweighted, unsmoothed cross-entropy). Reductions are left to the caller,
    which masks padding with ``valid``.
    """
    images = normalize(batch["image"])
    logits = model.apply(state.variables, images, train=False).astype(jnp.float32)
    labels = batch["label"]
    valid = batch.get("valid")
    if valid is None:
        valid = jnp.ones(labels.shape, bool)
    return {
        "logits": logits,
        "probs": jax.nn.softmax(logits),
        "label": labels,
        "valid": valid,
        "loss": cross_entropy(logits, labels),
    }
