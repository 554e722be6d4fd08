"""Start-up of a run: set up devices before JAX starts.

The order matters: XLA reads the CPU device count and jax.distributed must be
initialised before the first computation. bcjax.main checks the config first
(a config error should surface before minutes of compilation, not after) and
hands `prepare` the run's specs.
"""

from __future__ import annotations

import logging
import os

from bcjax import specs

# The dtype per chip lives below the train layer (the loop may resolve "auto" too);
# re-exported here for the notebooks.
from bcjax.parallel.chips import default_dtype, dtype_for, resolve_dtype  # noqa: F401

log = logging.getLogger(__name__)


def prepare(run_specs: specs.Specs) -> int:
    """Makes the run's devices exist (simulated CPU devices, the multi-process start,
    the compilation cache) and returns how many JAX then sees, all processes'."""
    from bcjax.parallel import mesh

    process, num_devices = run_specs.process, run_specs.run.num_devices
    if num_devices > 1 and not mesh.has_accelerator():
        # num_devices counts all processes' devices; each process brings its share.
        per_process = num_devices // max(process.num_processes, 1)
        mesh.request_cpu_devices(per_process)
        log.warning(
            "No accelerator: simulating %d devices on the CPU; their timings "
            "are simulated (all share the host's cores).",
            per_process,
        )
    mesh.maybe_init_distributed(
        process.coordinator_address or None,
        process.num_processes or None,
        None if process.process_id < 0 else process.process_id,
    )
    if process.compilation_cache:
        enable_compilation_cache()
    import jax

    return len(jax.devices())


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


# Where a notebook runs. Kaggle mounts attached datasets read-only under
# /kaggle/input and gives a writable /kaggle/working (kept as the notebook's output).
KAGGLE_INPUT = "/kaggle/input"
KAGGLE_WORKING = "/kaggle/working"
BUSI_FOLDER = "Dataset_BUSI_with_GT"


def notebook_host() -> str:
    """ "kaggle", "colab" or "local"."""
    import importlib.util

    if os.path.isdir(KAGGLE_INPUT) and os.access(KAGGLE_WORKING, os.W_OK):
        return "kaggle"
    if importlib.util.find_spec("google.colab") is not None:
        return "colab"
    return "local"


def kaggle_busi() -> str | None:
    """The first BUSI attached to a Kaggle notebook: a Dataset_BUSI_with_GT folder
    (or a zip of it) within three levels of /kaggle/input; None without one."""
    import pathlib

    root = pathlib.Path(KAGGLE_INPUT)
    for depth in range(3):  # /kaggle/input/<dataset>/Dataset_BUSI_with_GT is depth 1
        pattern = "*/" * depth + BUSI_FOLDER
        found = sorted(root.glob(pattern)) + sorted(root.glob(pattern + ".zip"))
        if found:
            return str(found[0])
    return None


def peer_to_peer(topology: str) -> bool:
    """Whether GPU0 reaches another GPU peer to peer, from `nvidia-smi topo -p2p r`
    (a matrix of OK / NS / ... per GPU pair; "OK" = supported)."""
    for line in topology.splitlines():
        cells = line.split()
        if cells[:1] == ["GPU0"] and "OK" in cells[1:]:
            return True
    return False


def two_gpu_link() -> str:
    """The scaling model's interconnect preset for a host of 2 GPUs such as
    Kaggle's T4 x2: PCIe 3, peer to peer only when nvidia-smi reports it."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "topo", "-p2p", "r"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    return "pcie3" if peer_to_peer(out) else "pcie3-2gpu-nop2p"
