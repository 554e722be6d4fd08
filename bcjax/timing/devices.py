"""What the hardware can do: peak FLOP/s per device kind, memory, platform facts.

Peak figures are vendor spec-sheet numbers for dense math (no structured
sparsity), per JAX device (a TPU v2/v3 core is one JAX device, half a chip).
They are stated assumptions, not measurements: utilisation computed against
them is a lower bound on how well a kernel uses the card. On an H100 a large
bf16 matmul was measured at about 800 TFLOP/s, about 81% of the sheet's 989.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Peak:
    bf16: float | None  # FLOP/s, dense tensor-core / MXU
    fp32: float | None  # FLOP/s, plain fp32 (no TF32)
    source: str


# Matched as substrings of jax.Device.device_kind, most specific first
# ("H100 PCIe" before "H100", "A100" before "A10").
PEAKS: tuple[tuple[str, Peak], ...] = (
    ("H100 PCIe", Peak(756e12, 51e12, "NVIDIA H100 PCIe datasheet")),
    ("H100 NVL", Peak(835e12, 60e12, "NVIDIA H100 NVL datasheet")),
    ("H100", Peak(989e12, 67e12, "NVIDIA H100 SXM datasheet")),
    ("H200", Peak(989e12, 67e12, "NVIDIA H200 SXM datasheet")),
    ("A100", Peak(312e12, 19.5e12, "NVIDIA A100 datasheet")),
    ("A10G", Peak(70e12, 31.2e12, "AWS A10G (approximate)")),
    ("A10", Peak(125e12, 31.2e12, "NVIDIA A10 datasheet")),
    ("L4", Peak(121e12, 30.3e12, "NVIDIA L4 datasheet")),
    ("V100", Peak(125e12, 15.7e12, "NVIDIA V100 SXM2 datasheet (fp16; no bf16 tensor cores)")),
    ("T4", Peak(65e12, 8.1e12, "NVIDIA T4 datasheet (fp16; no bf16 tensor cores)")),
    ("TPU v2", Peak(22.5e12, None, "Google TPU v2, per core (45 per chip)")),
    ("TPU v3", Peak(61.5e12, None, "Google TPU v3, per core (123 per chip)")),
    ("TPU v4", Peak(275e12, None, "Google TPU v4, per chip")),
    ("TPU v5 lite", Peak(197e12, None, "Google TPU v5e, per chip")),
    ("TPU v5e", Peak(197e12, None, "Google TPU v5e, per chip")),
    ("TPU v5", Peak(459e12, None, "Google TPU v5p, per chip")),
    ("TPU v6 lite", Peak(918e12, None, "Google TPU v6e, per chip")),
    ("TPU v6e", Peak(918e12, None, "Google TPU v6e, per chip")),
)


def peak_for(device_kind: str) -> Peak | None:
    """The spec-sheet peak of a device kind, or None when unknown (CPUs)."""
    for key, peak in PEAKS:
        if key.lower() in device_kind.lower():
            return peak
    return None


def peak_flops(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """Peak FLOP/s per device for a compute dtype, None when unknown."""
    peak = peak_for(device_kind)
    if peak is None:
        return None
    return peak.fp32 if str(dtype) in ("float32", "fp32", "f32") else peak.bf16


def describe(devices=None) -> dict:
    """Platform facts a timing table must carry."""
    import jax

    devices = list(devices) if devices is not None else jax.devices()
    d0 = devices[0]
    return {
        "platform": d0.platform,
        "device_kind": d0.device_kind,
        "num_devices": len(devices),
        "num_processes": jax.process_count(),
        "jax_version": jax.__version__,
        # Simulated CPU devices share the host's cores: any time they report
        # says nothing about N real accelerators.
        "simulated": d0.platform == "cpu" and len(devices) > 1,
    }


def peak_memory_bytes(devices=None) -> int | None:
    """Largest ``peak_bytes_in_use`` over this process's devices; None where
    the backend keeps no statistics (CPU)."""
    import jax

    devices = devices if devices is not None else jax.local_devices()
    peaks = []
    for d in devices:
        if d.process_index != jax.process_index():
            continue
        try:
            stats = d.memory_stats()
        except Exception:  # some backends raise instead of returning None
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def compiled_memory_bytes(compiled) -> int | None:
    """XLA's static estimate for one device: arguments + outputs + temporaries
    minus what outputs alias (donated buffers)."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    if isinstance(m, (list, tuple)):
        m = m[0]
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return int(max(total, 0))


def tree_bytes(tree, dtype=np.float32) -> int:
    """Bytes of a tree's leaves if stored as ``dtype`` (gradients are fp32)."""
    import jax

    itemsize = np.dtype(dtype).itemsize
    return int(sum(int(np.prod(np.shape(x))) * itemsize for x in jax.tree.leaves(tree)))
