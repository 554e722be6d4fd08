"""The device mesh and multi-process start-up.

One mesh axis, ``data``, over every device of every process. Everything that
touches JAX's backends lives here because the order matters: the CPU device
count and the distributed client must be set before the first JAX computation.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

DATA_AXIS = "data"

log = logging.getLogger(__name__)


def make_mesh(num_devices: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-axis mesh named ``"data"``.

    Args:
      num_devices: use the first ``num_devices`` of ``jax.devices()`` (all when
        None). A smaller mesh is only possible in a single process (it is how
        tests restore a checkpoint onto fewer devices).
      devices: explicit devices instead (overrides ``num_devices``).

    The axis type is ``Auto``: ``jax.make_mesh`` defaults to ``Explicit`` axes,
    under which plain ``jit`` propagates shardings into the types and the
    replicated-params / sharded-batch step no longer type-checks as written.
    Devices keep ``jax.devices()`` order, which groups them by process, the order
    ``jax.pmap`` uses too, so the pmap strategy needs no resharding.
    """
    if devices is None:
        all_devices = jax.devices()
        if num_devices is None:
            devices = all_devices
        else:
            if num_devices < 1 or num_devices > len(all_devices):
                raise ValueError(
                    f"num_devices={num_devices} but {len(all_devices)} devices exist "
                    f"({all_devices[0].platform}); on a CPU-only machine call "
                    "request_cpu_devices(n) before JAX starts."
                )
            if num_devices != len(all_devices) and jax.process_count() > 1:
                raise ValueError(
                    "A mesh over a subset of devices is only supported in a single "
                    f"process (process_count={jax.process_count()})."
                )
            devices = all_devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def per_device_batch(global_batch_size: int, num_devices: int) -> int:
    """Examples per device; ValueError when the batch does not split evenly."""
    if global_batch_size % num_devices:
        raise ValueError(
            f"Global batch size {global_batch_size} is not divisible by the number of "
            f"devices {num_devices}; use a multiple of {num_devices} (e.g. "
            f"{max(num_devices, global_batch_size // num_devices * num_devices)})."
        )
    return global_batch_size // num_devices


def request_cpu_devices(n: int) -> None:
    """Ask for ``n`` host (CPU) devices; must run before JAX initialises backends.

    Harmless on a machine with an accelerator: only the CPU backend gets the
    extra devices, ``jax.devices()`` still lists the accelerators.
    Raises RuntimeError when the backends are already up with another count
    (the count cannot change inside a running process).
    """
    if n < 1:
        raise ValueError(f"request_cpu_devices: n must be >= 1, got {n}")
    from jax._src import xla_bridge  # no public "are backends up?" query exists

    if xla_bridge.backends_are_initialized():
        have = len(jax.devices("cpu"))
        if have == n:
            return
        raise RuntimeError(
            f"request_cpu_devices({n}) called after JAX initialised its backends "
            f"with {have} CPU device(s); call it before any JAX computation, or start "
            f"Python with XLA_FLAGS=--xla_force_host_platform_device_count={n}."
        )
    jax.config.update("jax_num_cpu_devices", n)
    # Subprocesses and tools that read the environment see the same count.
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    flags.append(f"--xla_force_host_platform_device_count={n}")
    os.environ["XLA_FLAGS"] = " ".join(flags)
    log.info("Requested %d host CPU devices.", n)


def has_accelerator() -> bool:
    """Whether JAX would find a GPU/TPU, asked without starting JAX's backends
    (starting them would fix the CPU device count too early)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0] not in ("cpu", "")
    return any(
        importlib.util.find_spec(m) is not None
        for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu", "jax_rocm60_plugin")
    )


def ensure_devices(n: int) -> None:
    """Makes ``n`` devices exist: simulated CPU devices on a CPU-only host
    (must run before JAX starts), nothing to do where an accelerator is."""
    if n > 1 and not has_accelerator():
        try:
            request_cpu_devices(n)
        except RuntimeError:
            # JAX already started (a test session, a notebook): keep its
            # devices when there are enough of them.
            if len(jax.devices()) < n:
                raise


def _cluster_has_several_processes() -> bool:
    """True in a multi-process job that jax.distributed can detect on its own.

    A single-task SLURM job or a one-host TPU VM also sets these variables;
    starting a coordinator there would only cost time.
    """
    env = os.environ
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) > 1:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def maybe_init_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    initialization_timeout: int = 300,
) -> bool:
    """Start ``jax.distributed`` when this is a multi-process run.

    Explicit: pass ``coordinator_address`` ("host:port"), ``num_processes`` and
    ``process_id`` (e.g. from the config). Auto-detected: under SLURM, Open MPI
    or on a multi-host TPU slice JAX reads the cluster from the environment.
    Otherwise (a single process) nothing happens. Returns True when
    ``jax.distributed.initialize`` was called. Must run before any JAX
    computation. On CPU, cross-process collectives use gloo (set here).
    """
    explicit = coordinator_address is not None
    if not explicit:
        if num_processes not in (None, 1):
            raise ValueError(
                f"num_processes={num_processes} needs a coordinator_address (host:port)."
            )
        if not _cluster_has_several_processes():
            return False
    # gloo is the default in recent JAX, set explicitly since CPU multi-process
    # collectives fail with no implementation at all.
    if "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(initialization_timeout=initialization_timeout)
    if explicit:
        kwargs.update(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    jax.distributed.initialize(**kwargs)
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
