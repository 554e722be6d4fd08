"""The compute dtype per chip: what ``config.dtype="auto"`` becomes.

``dtype_for`` is a pure function of (platform, compute capability), so a table
of chips is tested without the hardware; ``default_dtype`` asks the first
device. Below the train layer, so that ``run_setup.set_up`` resolves "auto" for library
callers of the loop as ``bcjax.main`` does for the command line.
"""

from __future__ import annotations

# bfloat16 needs native support (TPUs; NVIDIA from
# Ampere, compute capability 8.0); without it, XLA emulates it slower than
# float32. float16 with dynamic loss scaling (bcjax.step.loss_scale) is the fast
# path on Volta and Turing (7.x: tensor cores, e.g. a T4's 65 TFLOP/s float16
# against 8.1 float32, NVIDIA's datasheet) and on the P100 (6.0: float16 at
# twice its float32 rate). The other Pascal chips (6.1: P4, P40, GTX 10xx)
# run float16 at a small fraction of float32, and older GPUs lack it: float32.
BFLOAT16_MIN_CAPABILITY = 8.0
FLOAT16_MIN_CAPABILITY = 7.0
FLOAT16_PASCAL_CAPABILITY = 6.0  # the P100 (GP100) only


def dtype_for(platform: str, compute_capability: str = "") -> str:
    """The fast compute dtype of a chip, from what JAX reports about it.

    platform: ``device.platform`` ("tpu", "gpu", "cuda", "cpu", ...);
    compute_capability: ``device.compute_capability`` of a CUDA GPU ("7.5").
    A GPU whose capability is missing or not a number (e.g. ROCm's "gfx90a")
    gets float32, the safe choice.
    """
    if platform == "tpu":
        return "bfloat16"
    if platform not in ("gpu", "cuda"):
        return "float32"
    try:
        capability = float(compute_capability or 0)
    except ValueError:
        return "float32"
    if capability >= BFLOAT16_MIN_CAPABILITY:
        return "bfloat16"
    if capability >= FLOAT16_MIN_CAPABILITY or capability == FLOAT16_PASCAL_CAPABILITY:
        return "float16"
    return "float32"


def default_dtype() -> str:
    """The fast compute dtype of the first device (``dtype_for``): bfloat16 on
    TPUs and Ampere or newer, float16 (with loss scaling) on V100/T4/P100,
    float32 elsewhere and on the CPU."""
    import jax

    device = jax.devices()[0]
    return dtype_for(device.platform, getattr(device, "compute_capability", ""))


def resolve_dtype(name: str) -> str:
    """``config.dtype`` as a concrete dtype name: "auto" is ``default_dtype()``."""
    return default_dtype() if name == "auto" else name
