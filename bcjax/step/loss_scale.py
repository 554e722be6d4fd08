"""Dynamic loss scaling for float16 compute (``config.dtype="float16"``).

float16 has 5 exponent bits: gradients below ~6e-8 flush to zero and above
65504 overflow. The loss is multiplied by ``scale`` before the backward pass
so small gradients survive, and the gradients are divided by it afterwards
(in float32: parameters, optimizer state and BatchNorm statistics stay float32).
When the scaled gradients overflow, the step is skipped and the scale halved;
after ``growth_interval`` good steps in a row it doubles. The rule and its
defaults are PyTorch's ``torch.amp.GradScaler`` (init_scale 2**16,
growth_factor 2.0, backoff_factor 0.5, growth_interval 2000; documented at
https://pytorch.org/docs/stable/amp.html#torch.amp.GradScaler). One bound is
added: the scale never goes below ``min_scale`` (1.0, DeepSpeed's default
``min_loss_scale``), and a non-finite gradient at that scale is a fault, not
an overflow, so a real NaN cannot hide behind an endlessly halving scale.

Contract with the training loop (``bcjax.step.steps.train_step_local``):
- Every train step's metrics carry ``"overflow"`` (float32 scalar: 1.0 when
  this step's scaled float16 gradients overflowed and the update was skipped,
  else 0.0; always 0.0 without float16) and ``"loss_scale"`` (float32 scalar:
  the scale this step used; 1.0 without float16).
- On an overflow-skipped step ``"grads_finite"`` stays True: an overflow is
  expected, not a fault, and must not trigger ``nan_policy``. A non-finite
  loss, or a non-finite gradient at ``min_scale``, is a fault
  (``grads_finite`` False), as it is in float32 and bfloat16.
- The loop sums ``metrics.get("overflow", 0)`` per epoch (TensorBoard, epoch
  record, ``overflow_skipped_steps`` in results.json), apart from the
  non-finite steps.
- A skipped step advances ``state.step`` (the RNG of augmentation and
  dropout, the loop's step count) but not the optimizer state: momentum and
  optax's schedule count stay where they were, so the learning-rate schedule
  runs one step behind per skipped step (as ``optax.apply_if_finite`` does).
  PyTorch differs here: GradScaler skips ``optimizer.step()``, but the
  user's ``scheduler.step()`` still advances the learning rate.
- The scale and the good-step counter are arrays of the train state
  (``bcjax.step.state.ScaledTrainState``), so they are checkpointed and
  resumed; float32 and bfloat16 states have no such field and keep the
  checkpoint structure they always had.

Why not a library: optax has no loss scaling (``optax.apply_if_finite`` only
skips); DeepMind's jmp is still at 0.0.4 on PyPI and a fork (jamp)
describes it as unmaintained; ``flax.training.dynamic_scale`` wraps
``jax.value_and_grad`` and pmeans gradients itself, which conflicts with how
the step reduces gradients (summed by shard_map's transpose or by an explicit
psum under pmap), and grows one step later than PyTorch.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

# torch.amp.GradScaler's documented defaults.
INIT_SCALE = 2.0**16
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5
GROWTH_INTERVAL = 2000
MIN_SCALE = 1.0


@flax.struct.dataclass
class LossScale:
    """The dynamic loss scale: two arrays (checkpointed) and its fixed rule.

    scale: float32 scalar, what the loss is multiplied by.
    good_steps: int32 scalar, steps with finite gradients since the last
      overflow or growth.
    """

    scale: jax.Array
    good_steps: jax.Array
    growth_factor: float = flax.struct.field(pytree_node=False, default=GROWTH_FACTOR)
    backoff_factor: float = flax.struct.field(pytree_node=False, default=BACKOFF_FACTOR)
    growth_interval: int = flax.struct.field(pytree_node=False, default=GROWTH_INTERVAL)
    min_scale: float = flax.struct.field(pytree_node=False, default=MIN_SCALE)

    def update(self, grads_finite: jax.Array) -> LossScale:
        """The scale for the next step, given whether this step's gradients were finite.

        PyTorch's rule: non-finite -> scale * backoff_factor (here not below
        min_scale), counter reset; finite -> counter + 1, and when it reaches
        growth_interval, scale * growth_factor (kept finite in float32) and
        counter reset.
        """
        good = self.good_steps + 1
        grow = good >= self.growth_interval
        grown = self.scale * self.growth_factor
        grown = jnp.where(jnp.isfinite(grown), grown, self.scale)
        backed_off = jnp.maximum(self.scale * self.backoff_factor, self.min_scale)
        scale = jnp.where(grads_finite, jnp.where(grow, grown, self.scale), backed_off)
        good_steps = jnp.where(grads_finite & ~grow, good, 0)
        return self.replace(
            scale=scale.astype(jnp.float32), good_steps=good_steps.astype(jnp.int32)
        )

    def is_overflow(self, loss_finite: jax.Array, grads_finite: jax.Array) -> jax.Array:
        """Whether a step's non-finite gradients are an expected float16 overflow.

        Only when the loss itself is finite (a non-finite forward pass is not
        something a smaller scale cures) and the scale can still come down.
        """
        return loss_finite & ~grads_finite & (self.scale > self.min_scale)

    def unscale(self, grads):
        """The gradients of the unscaled loss, in float32."""
        inverse = 1.0 / self.scale
        return jax.tree.map(lambda g: g.astype(jnp.float32) * inverse, grads)


def create(
    init_scale: float = INIT_SCALE,
    *,
    growth_factor: float = GROWTH_FACTOR,
    backoff_factor: float = BACKOFF_FACTOR,
    growth_interval: int = GROWTH_INTERVAL,
    min_scale: float = MIN_SCALE,
) -> LossScale:
    """A fresh loss scale (PyTorch's defaults unless given)."""
    if not (growth_factor > 1 and 0 < backoff_factor < 1 and growth_interval >= 1):
        raise ValueError(
            "loss scaling needs growth_factor > 1, 0 < backoff_factor < 1 and "
            f"growth_interval >= 1; got {growth_factor}, {backoff_factor}, {growth_interval}."
        )
    if not 0 < min_scale <= init_scale:
        raise ValueError(f"need 0 < min_scale <= init_scale; got {min_scale}, {init_scale}.")
    return LossScale(
        scale=jnp.asarray(init_scale, jnp.float32),
        good_steps=jnp.zeros((), jnp.int32),
        growth_factor=float(growth_factor),
        backoff_factor=float(backoff_factor),
        growth_interval=int(growth_interval),
        min_scale=float(min_scale),
    )
