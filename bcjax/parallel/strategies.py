"""Data-parallel train/eval steps for a mesh: ``shard_map``, ``pmap`` or ``jit``.

Whatever the strategy, the caller sees one contract:

    steps = build_steps("shard_map", mesh, model, bn_sync=True, augment_cfg=cfg)
    state = steps.place_state(state)                  # replicated on the mesh
    batch = steps.shard_batch(numpy_batch_of_this_process)
    state, metrics = steps.train_step(state, batch, rng)   # state donated
    outputs = steps.eval_step(state, steps.shard_batch(eval_numpy_batch))

The state is always a replicated global ``jax.Array`` tree (checkpointable as
is); metrics are replicated scalars; eval outputs are gathered so every
process holds the whole global batch's predictions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bcjax.parallel.mesh import DATA_AXIS, per_device_batch
from bcjax.specs import STRATEGIES
from bcjax.step import steps as step_math


class Steps(NamedTuple):
    """What ``build_steps`` returns.

    train_step(state, batch, rng) -> (state, metrics): jitted, donates state.
      ``batch`` comes from ``shard_batch``; ``rng`` is the run's base key
      (the step number is folded in inside). Has ``.lower(...)``.
    eval_step(state, batch) -> dict of per-example arrays over the GLOBAL batch
      (logits, probs, label, valid, loss), replicated on every device/process.
    shard_batch(numpy_dict) -> the batch in the layout ``train_step`` wants.
    place_state(state) -> the state replicated on this mesh.
    """

    train_step: Callable
    eval_step: Callable
    shard_batch: Callable
    place_state: Callable
    mesh: Mesh
    strategy: str


def _with_bn_axis(model, axis_name: str | None):
    if not hasattr(model, "bn_axis_name"):
        raise TypeError(
            f"{type(model).__name__} has no 'bn_axis_name' field; build_steps "
            "sets it per strategy (see bcjax.models.create)."
        )
    return model.clone(bn_axis_name=axis_name)


def _default_preprocess(augment_cfg, on_cpu: bool):
    # Imported here: the package must not need the data stack at import time.
    from bcjax.data import augment

    if augment_cfg is None:
        return lambda images, keys: augment.normalize(images), augment.normalize
    return (
        # CPU meshes augment in chunks (see augment.augment_batch), others in one vmap.
        lambda images, keys: augment.augment_batch(images, keys, augment_cfg, in_chunks=on_cpu),
        augment.normalize,
    )


def replicate_tree(tree, mesh: Mesh):
    """Place a pytree replicated on ``mesh`` (also across processes)."""
    sharding = NamedSharding(mesh, P())

    def place(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if jax.process_count() > 1 and not (
            isinstance(x, jax.Array) and not x.is_fully_addressable
        ):
            host = np.asarray(x)  # every process holds the same full value
            return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
        return jax.device_put(x, sharding)

    return jax.tree.map(place, tree)


def build_steps(
    strategy: str,
    mesh: Mesh,
    model,
    *,
    bn_sync: bool = True,
    augment_cfg: Any = None,
    label_smoothing: float = 0.0,
    class_weights: Sequence[float] | None = None,
    donate: bool = True,
    collectives: bool = True,
    preprocess: Callable | None = None,
    normalize: Callable | None = None,
    grad_norm: bool = True,
    nonfinite_guard: bool = True,
    max_traces: int | None = None,
) -> Steps:
    """Build the jitted steps of ``strategy`` on ``mesh``; the optimizer comes with the state.

    Args:
      strategy: "shard_map" (default choice), "pmap" or "jit".
      mesh: 1-axis "data" mesh (``bcjax.parallel.mesh.make_mesh``).
      model: a flax module with a ``bn_axis_name`` field (``bcjax.models.create``);
        it is cloned with the axis each strategy needs, so its own value is ignored.
      bn_sync: BatchNorm statistics over the global batch (True) or per device.
        ``jit`` only supports True: the batch is one logical array there, so
        its statistics are global by construction.
      augment_cfg: config for ``bcjax.data.augment.augment_batch``; None: no
        augmentation (normalize only).
      label_smoothing, class_weights: see ``bcjax.step.steps.loss_fn``.
      donate: donate the state to the train step (its buffers are reused).
      collectives: False builds the same step without any cross-device
        reduction (per-device loss/gradients/BatchNorm, no metric sums; the
        state returned is device 0's). Only for timing compute apart from
        communication; the results are not a valid training step on >1 device.
        For "jit" this is the shard_map step without collectives (plain jit has
        no per-device program to strip).
      preprocess, normalize: override the augmentation ``(images_uint8, keys)
        -> float32`` and the eval ``normalize(images_uint8)`` (tests, ablations).
      grad_norm, nonfinite_guard: see ``bcjax.step.steps.train_step_local``;
        only the step-cost ablation (``bcjax.timing.ablation``) turns them off.
      max_traces: when set, tracing the train or the eval step more often than
        this raises an AssertionError (``chex.assert_max_traces``), counted
        from this build on. A retrace is a silent recompile (10-80 s on a GPU),
        usually of an input whose shape, dtype or sharding changed.

    Results do not depend on the device count (fp32, synced BatchNorm), with
    one exception: dropout draws one key per device (``jit``: one for the
    batch), so with dropout the runs agree in distribution only.

    Raises ValueError for an unknown strategy or jit with bn_sync=False.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}.")
    if strategy == "jit" and not bn_sync and collectives:
        raise ValueError(
            "strategy='jit' computes BatchNorm statistics over the whole global batch "
            "(it is one logical array), so per-device BatchNorm (bn_sync=False) cannot "
            "be expressed; use strategy='shard_map' or 'pmap' for per-device statistics."
        )
    on_cpu = mesh.devices.flat[0].platform == "cpu"
    if preprocess is None or normalize is None:
        default_pre, default_norm = _default_preprocess(augment_cfg, on_cpu)
        preprocess = preprocess or default_pre
        normalize = normalize or default_norm

    loss_kw = dict(
        label_smoothing=label_smoothing,
        class_weights=None if class_weights is None else tuple(class_weights),
        grad_norm=grad_norm,
        nonfinite_guard=nonfinite_guard,
        # The guard's CPU form (a lax.cond around the update); accelerators keep the select.
        skip_in_cond=on_cpu,
    )
    donate_argnums = (0,) if donate else ()
    eval_model = _with_bn_axis(model, None)  # eval uses running statistics
    eval_local = functools.partial(step_math.eval_step_local, model=eval_model, normalize=normalize)

    if not collectives:
        train_local = functools.partial(
            step_math.train_step_local,
            model=_with_bn_axis(model, None),
            axis_name=None,
            psum_grads=False,
            sync_batch_stats=False,
            preprocess=preprocess,
            **loss_kw,
        )
    else:
        # Under plain jit the batch is one logical array: no named axis exists
        # and BatchNorm statistics are global by construction.
        bn_axis = DATA_AXIS if bn_sync and strategy != "jit" else None
        train_local = functools.partial(
            step_math.train_step_local,
            model=_with_bn_axis(model, bn_axis),
            axis_name=DATA_AXIS if strategy != "jit" else None,
            psum_grads=strategy == "pmap",
            sync_batch_stats=not bn_sync,
            preprocess=preprocess,
            **loss_kw,
        )
    if max_traces is not None:
        train_local, eval_local = _trace_guarded(train_local, eval_local, max_traces)

    if strategy == "pmap":
        from bcjax.parallel import pmap  # only pmap runs need its wrappers

        train_step, eval_step, shard_batch = pmap.build(
            mesh, train_local, eval_local, donate_argnums
        )
    else:
        train_step, eval_step, shard_batch = _build_global(
            strategy, mesh, train_local, eval_local, donate_argnums, collectives
        )
    return Steps(
        train_step=train_step,
        eval_step=eval_step,
        shard_batch=shard_batch,
        place_state=functools.partial(replicate_tree, mesh=mesh),
        mesh=mesh,
        strategy=strategy,
    )


def _build_global(strategy, mesh: Mesh, train_local, eval_local, donate_argnums, collectives):
    """(train_step, eval_step, shard_batch) of "shard_map" and "jit": global arrays, one
    program over the mesh."""
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P(DATA_AXIS))

    def shard_batch(batch: Mapping[str, np.ndarray]) -> dict:
        return {k: _global_batch_array(v, data_sharding) for k, v in batch.items()}

    if strategy == "jit" and collectives:
        train_step = jax.jit(
            train_local,
            in_shardings=(replicated, data_sharding, replicated),
            out_shardings=(replicated, replicated),
            donate_argnums=donate_argnums,
        )
        eval_step = jax.jit(
            eval_local, in_shardings=(replicated, data_sharding), out_shardings=replicated
        )
    else:
        train_step = jax.jit(
            jax.shard_map(
                train_local,
                mesh=mesh,
                in_specs=(P(), P(DATA_AXIS), P()),
                out_specs=(P(), P()),
                check_vma=collectives,
            ),
            donate_argnums=donate_argnums,
        )
        # Gathering to every device (out_shardings) lets every process read all
        # predictions of the global batch; eval batches are small.
        eval_step = jax.jit(
            jax.shard_map(
                eval_local, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P(DATA_AXIS)
            ),
            out_shardings=replicated,
        )
    return train_step, eval_step, shard_batch


def _trace_guarded(train_local: Callable, eval_local: Callable, max_traces: int):
    """The two step bodies behind ``chex.assert_max_traces`` (see ``build_steps``)."""
    # chex counts per place of definition, process-wide: a new build (the next
    # run, the next fold) starts its own count.
    chex.clear_trace_counter()

    def train_step(state, batch, rng):
        return train_local(state, batch, rng)

    def eval_step(state, batch):
        return eval_local(state, batch)

    return (
        chex.assert_max_traces(train_step, max_traces),
        chex.assert_max_traces(eval_step, max_traces),
    )


def on_device_images(images: np.ndarray, mesh: Mesh) -> Callable[[Mapping[str, jax.Array]], dict]:
    """Keeps a training set's uint8 images on every device of ``mesh``.

    Returns ``add_images(batch)``: for a batch from ``shard_batch`` without
    "image", the rows its "index" names, gathered on each device into the
    layout ``shard_batch`` would have given them (any strategy). BUSI's
    training part is ~82 MB at 224 px; per step only indices and labels then
    cross from the host, not 150 KB per image.
    """
    table = replicate_tree(np.asarray(images), mesh)
    # Indices come from the data pipeline, always in range: "clip" spares the fill mask.
    take = jax.jit(
        lambda t, idx: jnp.take(t, idx, axis=0, mode="clip"),
        out_shardings=NamedSharding(mesh, P(DATA_AXIS)),
    )

    def add_images(batch: Mapping[str, jax.Array]) -> dict:
        return {**batch, "image": take(table, batch["index"])}

    return add_images


def _global_batch_array(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """This process's rows -> one global array sharded over "data"."""
    local = np.asarray(local)
    global_rows = local.shape[0] * jax.process_count()
    per_device_batch(global_rows, sharding.mesh.size)
    return jax.make_array_from_process_local_data(sharding, local, (global_rows,) + local.shape[1:])
