"""The train state and its creation, replicated over the mesh."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

if TYPE_CHECKING:  # float16 runs alone import it (see default_loss_scale)
    from bcjax.step.loss_scale import LossScale

AUTO = "auto"


@flax.struct.dataclass
class TrainState:
    """Everything a train step updates.

    ``apply_fn`` and ``tx`` are static (not arrays; not checkpointed). The
    train step uses the model given to ``build_steps`` (whose BatchNorm axis
    suits the strategy) and ``state.tx`` for the update; ``apply_fn`` is there
    for ad-hoc inference: ``state.apply_fn(state.variables, x, train=False)``.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


@flax.struct.dataclass
class ScaledTrainState(TrainState):
    """The train state of a float16 run: a TrainState plus its dynamic loss
    scale (``bcjax.step.loss_scale``), checkpointed and resumed with it.

    A subclass rather than an optional field: a float32 or bfloat16 state keeps
    exactly the pytree (and so the checkpoint) structure it always had, and old
    workdirs resume unchanged.
    """

    loss_scale: LossScale


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of the state: a full copy on every device of the mesh."""
    return NamedSharding(mesh, P())


def default_loss_scale(compute_dtype) -> LossScale | None:
    """PyTorch's default dynamic loss scale for float16 compute, else None.

    Scaling is for float16 only: bfloat16 has float32's exponent range, so its
    gradients neither flush nor overflow earlier. ``bcjax.step.loss_scale`` is
    imported here, so float32 and bfloat16 runs never load it.
    """
    if compute_dtype is None or jnp.dtype(compute_dtype) != jnp.float16:
        return None
    from bcjax.step import loss_scale as loss_scale_lib

    return loss_scale_lib.create()


def create_train_state(
    model,
    tx: optax.GradientTransformation,
    rng: jax.Array | int,
    image_size: int,
    mesh: Mesh,
    *,
    channels: int = 3,
    loss_scale: LossScale | str | None = AUTO,
) -> TrainState:
    """Initialise ``model`` and ``tx`` directly into replicated arrays on ``mesh``.

    ``jit(init, out_shardings=...)`` builds the parameters on the devices (no
    host copy, no per-device init that could diverge). Initialisation runs the
    model with ``train=False`` so a BatchNorm ``axis_name`` is never evaluated
    outside a mapped context.

    ``rng``: a PRNG key, or an int seed, which becomes ``jax.random.key(seed,
    impl="rbg")``: XLA's RngBitGenerator compiles far faster than threefry
    on CPU (ResNet-18 init: ~8 s instead of ~37 s on a 2-core box), and its
    values are deterministic for a given backend and seed.

    ``loss_scale``: "auto" gives a ``ScaledTrainState`` with PyTorch's default
    dynamic loss scale when the model computes in float16 (its ``dtype``), a
    plain ``TrainState`` otherwise; a ``LossScale`` (e.g. another initial
    scale) forces a ``ScaledTrainState``; None never scales.
    """
    init = train_state_init(model, tx, image_size, mesh, channels=channels, loss_scale=loss_scale)
    return init(init_key(rng))


def init_key(rng: jax.Array | int) -> jax.Array:
    """The key `create_train_state` initialises from: an int seed becomes an rbg key."""
    if isinstance(rng, (int, np.integer)):
        return jax.random.key(int(rng), impl="rbg")
    return rng


def train_state_init(
    model,
    tx: optax.GradientTransformation,
    image_size: int,
    mesh: Mesh,
    *,
    channels: int = 3,
    loss_scale: LossScale | str | None = AUTO,
) -> Callable[[jax.Array], TrainState]:
    """The jitted ``init(key) -> TrainState`` of ``create_train_state`` (same arguments):
    ``jax.eval_shape(init, key)`` gives the state's shapes before it exists, and the call
    after that reuses its trace."""
    if isinstance(loss_scale, str):
        if loss_scale != AUTO:
            raise ValueError(f"loss_scale must be 'auto', a LossScale or None; got {loss_scale!r}.")
        loss_scale = default_loss_scale(getattr(model, "dtype", None))

    def init(rng):
        params_rng, dropout_rng = jax.random.split(rng)
        x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
        variables = model.init({"params": params_rng, "dropout": dropout_rng}, x, train=False)
        params = variables["params"]
        fields = dict(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            apply_fn=model.apply,
            tx=tx,
        )
        if loss_scale is None:
            return TrainState(**fields)
        return ScaledTrainState(**fields, loss_scale=loss_scale)

    return jax.jit(init, out_shardings=replicated(mesh))
