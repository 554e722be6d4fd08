"""Start-up of a run: check the config, then set up devices before JAX starts.

The order matters: XLA reads the CPU device count and jax.distributed must be
initialised before the first computation, and a config error should surface
before minutes of compilation, not after.
"""

from __future__ import annotations

import logging
import os

from bcjax import config_check

log = logging.getLogger(__name__)


def prepare(config) -> None:
    """Validates `config` and makes its devices exist; raises ConfigError early."""
    config_check.validate(config)
    from bcjax.parallel import mesh

    if config.num_devices > 1 and not mesh.has_accelerator():
        # num_devices counts all processes' devices; each process brings its share.
        per_process = config.num_devices // max(config.num_processes, 1)
        mesh.request_cpu_devices(per_process)
        log.warning(
            "No accelerator: simulating %d devices on the CPU; their timings "
            "are simulated (all share the host's cores).",
            per_process,
        )
    mesh.maybe_init_distributed(
        config.coordinator_address or None,
        config.num_processes or None,
        None if config.process_id < 0 else config.process_id,
    )
    if config.compilation_cache:
        enable_compilation_cache()
    import jax

    config_check.validate(config, num_devices_available=len(jax.devices()))


def enable_compilation_cache(path: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache (a restart skips compiling)."""
    import jax

    # One cache root for bcjax ($BCJAX_CACHE_DIR, else ~/.cache/bcjax): compiled
    # programs in jax/, generated synthetic sets in synthetic/, extracted zips beside.
    root = os.environ.get("BCJAX_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "bcjax"
    )
    path = path or os.path.join(root, "jax")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # BUSI-sized steps compile in seconds; cache them all, not only the slow ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def default_dtype() -> str:
    """ "bfloat16" where the first device computes it natively (TPU, GPUs from
    Ampere on), else "float32": older GPUs such as Colab's T4 emulate bf16 slowly."""
    import jax

    device = jax.devices()[0]
    return dtype_for(device.platform, getattr(device, "compute_capability", ""))


def dtype_for(platform: str, compute_capability: str = "") -> str:
    if platform == "tpu":
        return "bfloat16"
    if platform == "gpu":
        try:
            return "bfloat16" if float(compute_capability or 0) >= 8.0 else "float32"
        except ValueError:
            return "float32"
    return "float32"


def probe_devices(timeout: float = 120.0) -> tuple[str, int, str, str]:
    """(platform, device count, device kind, default dtype) asked of a short-lived process.

    The caller's process never starts a JAX backend, so it can hand the
    accelerator to child processes (a TPU is held by one process at a time).
    """
    import subprocess
    import sys

    code = (
        "import jax; d = jax.devices(); "
        "print(d[0].platform, len(d), d[0].device_kind, getattr(d[0], "
        "'compute_capability', ''), sep='\\t')"
    )
    out = (
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    platform, count, kind, capability = (out.split("\t") + [""])[:4]
    return platform, int(count), kind, dtype_for(platform, capability)
