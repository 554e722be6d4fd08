"""``strategy="pmap"``: ``jax.pmap`` behind ``bcjax.parallel.strategies``'s contract.

Loaded only by runs that ask for pmap (``strategies.build_steps`` imports it);
shard_map and jit runs never read it.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bcjax.parallel.mesh import DATA_AXIS, per_device_batch


class _PmapStep:
    """``jax.pmap`` behind the common contract: global arrays in, replicated
    global state out, also through ``.lower(...).compile()``.

    In several processes, pmap returns host-local arrays and its compiled
    executable only takes global ones; so every argument is made global
    first (the batch already is, see shard_batch; the rng is replicated) and
    host-local outputs are rewrapped as global arrays on the mesh.
    """

    def __init__(self, pmapped, mesh: Mesh):
        self._pmapped, self._mesh = pmapped, mesh
        self._multi = jax.process_count() > 1

    def _args(self, args):
        return _globalize_local(args, self._mesh) if self._multi else args

    def _out(self, out):
        return _global_from_host_local(out, self._mesh) if self._multi else out

    def __call__(self, *args):
        return self._out(self._pmapped(*self._args(args)))

    def lower(self, *args):
        return _PmapLowered(self._pmapped.lower(*self._args(args)), self)


class _PmapLowered:
    def __init__(self, lowered, step: _PmapStep):
        self._lowered, self._step = lowered, step

    def compile(self, *args, **kwargs):
        return _PmapCompiled(self._lowered.compile(*args, **kwargs), self._step)

    def __getattr__(self, name):  # as_text, cost_analysis, ...
        return getattr(self._lowered, name)


class _PmapCompiled:
    def __init__(self, compiled, step: _PmapStep):
        self._compiled, self._step = compiled, step

    def __call__(self, *args):
        return self._step._out(self._compiled(*self._step._args(args)))

    def __getattr__(self, name):  # cost_analysis, memory_analysis, ...
        return getattr(self._compiled, name)


def _global_from_host_local(tree, mesh: Mesh):
    """Multi-process pmap returns host-local replicated arrays; rewrap their
    local shards (no copy) as global arrays replicated on ``mesh``."""
    sharding = NamedSharding(mesh, P())

    def rewrap(x):
        if not isinstance(x, jax.Array) or not x.is_fully_addressable:
            return x
        by_device = {s.device: s.data for s in x.addressable_shards}
        shards = [by_device[d] for d in sharding.addressable_devices_indices_map(x.shape)]
        return jax.make_array_from_single_device_arrays(x.shape, sharding, shards)

    return jax.tree.map(rewrap, tree)


def _globalize_local(tree, mesh: Mesh):
    """Fully addressable leaves (e.g. the rng) -> global arrays replicated on
    ``mesh``; global arrays pass unchanged."""
    sharding = NamedSharding(mesh, P())

    def place(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = np.asarray(jax.random.key_data(x))
            return jax.random.wrap_key_data(
                jax.make_array_from_callback(data.shape, sharding, lambda idx: data[idx]),
                impl=jax.random.key_impl(x),
            )
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(place, tree)


def build(mesh: Mesh, train_local, eval_local, donate_argnums):
    """``(train_step, eval_step, shard_batch)`` of ``strategy="pmap"``, which
    ``strategies.build_steps`` returns as its ``Steps``."""
    devices = list(mesh.devices.flat)
    n_local = sum(d.process_index == jax.process_index() for d in devices)
    stacked = NamedSharding(mesh, P(DATA_AXIS))
    multi_process = jax.process_count() > 1

    # The state is broadcast (in_axes=None) and comes back as one value
    # (out_axes=None): the caller's state stays a replicated global array.
    p_train = jax.pmap(
        train_local,
        axis_name=DATA_AXIS,
        in_axes=(None, 0, None),
        out_axes=(None, None),
        donate_argnums=donate_argnums,
        devices=devices,
    )
    p_eval = jax.pmap(
        eval_local, axis_name=DATA_AXIS, in_axes=(None, 0), out_axes=0, devices=devices
    )

    def shard_batch(batch):
        """[B_local, ...] per process -> global [num_devices, B/num_devices, ...]."""
        out = {}
        for k, v in batch.items():
            v = np.asarray(v)
            per_dev = per_device_batch(v.shape[0] * jax.process_count(), mesh.size)
            out[k] = jax.make_array_from_process_local_data(
                stacked,
                v.reshape((n_local, per_dev) + v.shape[1:]),
                (mesh.size, per_dev) + v.shape[1:],
            )
        return out

    eval_pmapped = _PmapStep(p_eval, mesh)

    def eval_step(state, batch):
        out = p_eval(*eval_pmapped._args((state, batch)))
        if multi_process:
            from jax.experimental import multihost_utils

            # Host-local [n_local, b] per process -> [n_devices, b] everywhere.
            out = multihost_utils.process_allgather(out, tiled=True)
        return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), out)

    return _PmapStep(p_train, mesh), eval_step, shard_batch
