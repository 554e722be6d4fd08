"""The optimizer: SGD with momentum or AdamW, warm-up then cosine, masked
weight decay, optional clipping by global norm."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from bcjax.specs import OPTIMIZERS


def decay_mask(params: Any) -> Any:
    """True for the leaves that get weight decay: kernels (ndim > 1).

    BatchNorm scales/offsets and biases are 1-D, and decaying them only fights
    normalisation (Goyal et al. 2017; torchvision's recipes exclude them too).
    """
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_schedule(
    *,
    learning_rate: float,
    steps_per_epoch: int,
    num_epochs: float,
    warmup_epochs: float = 0.0,
    end_lr_factor: float = 0.0,
) -> optax.Schedule:
    """Linear warm-up from 0 to ``learning_rate`` over ``warmup_epochs``, then a
    cosine decay to ``learning_rate * end_lr_factor`` at the end of training."""
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    total_steps = max(int(round(num_epochs * steps_per_epoch)), warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=learning_rate * end_lr_factor,
    )


def make_optimizer(
    *,
    steps_per_epoch: int,
    num_epochs: float,
    optimizer: str = "sgd",
    learning_rate: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    warmup_epochs: float = 0.0,
    end_lr_factor: float = 0.0,
    clip_norm: float | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> tuple[optax.GradientTransformation, Callable]:
    """Returns ``(tx, lr_schedule)``.

    Keyword-only so a config section can be splatted:
    ``make_optimizer(steps_per_epoch=n, num_epochs=e, **config.optim)``;
    an unknown field raises TypeError.

    - ``optimizer="sgd"``: torch-style coupled weight decay (``wd * param`` is
      added to the gradient before momentum), ``momentum``/``nesterov``.
    - ``optimizer="adamw"``: decoupled weight decay, ``b1``/``b2``/``eps``.
    - Weight decay spares BatchNorm parameters and biases (see ``decay_mask``).
    - ``clip_norm``: clip the gradient to this global norm first (None/0: off).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}; allowed: {', '.join(OPTIMIZERS)}.")
    for name, value in (
        ("learning_rate", learning_rate),
        ("weight_decay", weight_decay),
        ("warmup_epochs", warmup_epochs),
        ("end_lr_factor", end_lr_factor),
    ):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}.")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
    if clip_norm is not None and clip_norm < 0:
        raise ValueError(f"clip_norm must be > 0 (or None/0 for no clipping), got {clip_norm}.")
    if steps_per_epoch < 1:
        raise ValueError(
            f"steps_per_epoch must be >= 1, got {steps_per_epoch} "
            "(is the training set smaller than one global batch?)."
        )
    if num_epochs <= 0:
        raise ValueError(f"num_epochs must be > 0, got {num_epochs}.")

    schedule = make_schedule(
        learning_rate=learning_rate,
        steps_per_epoch=steps_per_epoch,
        num_epochs=num_epochs,
        warmup_epochs=warmup_epochs,
        end_lr_factor=end_lr_factor,
    )
    parts = []
    if clip_norm:
        parts.append(optax.clip_by_global_norm(clip_norm))
    if optimizer == "sgd":
        if weight_decay:
            parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
        parts.append(optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
    else:
        parts.append(
            optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
        )
    return optax.chain(*parts), schedule
