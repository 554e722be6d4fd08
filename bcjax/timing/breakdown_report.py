"""Reading and reporting bcjax.timing.breakdown's results.

- ``stats``: median/p10/p90/mean/min of a list of step times;
- cost-analysis readers: ``cost_flops`` (a ``cost_analysis()`` result),
  ``safe_cost`` (a lowered or compiled object) and the FLOPs/utilisation
  fields of a report (``_flops_fields``);
- ``FIELDS``/``MAYBE_NONE``, ``check`` (is a ``measure()`` result consistent?)
  and ``format_summary`` (a few lines for a log).

Every name here is also importable from ``bcjax.timing.breakdown``, which
measures; this module measures nothing and compiles nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bcjax.timing import devices as devices_lib

# The logger these helpers had inside bcjax.timing.breakdown, so its log settings still apply.
log = logging.getLogger("bcjax.timing.breakdown")

GPU_FLOPS_NOTE = (
    "XLA's compiled cost analysis on GPU leaves cuDNN convolutions out; FLOPs are "
    "counted on the pre-optimisation HLO (lowered) instead"
)


def stats(times: Sequence[float]) -> dict:
    """Median, p10, p90, mean, min of a list of seconds (None when empty)."""
    a = np.asarray(times, dtype=np.float64)
    if a.size == 0:
        return {"median": None, "p10": None, "p90": None, "mean": None, "min": None, "n": 0}
    return {
        "median": float(np.median(a)),
        "p10": float(np.percentile(a, 10)),
        "p90": float(np.percentile(a, 90)),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "n": int(a.size),
    }


def cost_flops(analysis, key: str = "flops") -> float | None:
    """FLOPs (or another ``key``, e.g. "bytes accessed") from a
    ``cost_analysis()`` result: a dict, a list of dicts (one per program,
    older JAX), or None (some backends)."""
    if analysis is None:
        return None
    if isinstance(analysis, (list, tuple)):
        values = [cost_flops(a, key) for a in analysis]
        values = [v for v in values if v is not None]
        return float(sum(values)) if values else None
    try:
        value = analysis.get(key)
    except AttributeError:
        return None
    return float(value) if value is not None and value >= 0 else None


def safe_cost(obj, key: str = "flops") -> float | None:
    """``cost_flops`` of a lowered or compiled object; None where the backend has none."""
    try:
        return cost_flops(obj.cost_analysis(), key)
    except Exception as e:  # not every backend/JAX version implements it
        log.debug("cost_analysis failed: %s", e)
        return None


def _hlo_text(compiled) -> str | None:
    try:
        return compiled.as_text()
    except Exception:
        return None


def _flops_fields(lowered, compiled, info, compute_s, step_s, dtype, *, jit_global, n) -> dict:
    """FLOPs of one device's step and the utilisation they imply (``lowered`` None: the
    compiled count alone)."""
    flops_compiled = safe_cost(compiled)
    flops_lowered = safe_cost(lowered) if lowered is not None else None
    if jit_global and flops_lowered is not None:
        flops_lowered /= n  # plain jit lowers the global program, before partitioning
    note = None
    if info["platform"] == "gpu":
        flops, source, note = flops_lowered, "lowered", GPU_FLOPS_NOTE
    else:
        flops, source = (
            (flops_compiled, "compiled") if flops_compiled else (flops_lowered, "lowered")
        )
    if dtype is None:
        dtype = "float32" if info["platform"] == "cpu" else "bfloat16"
    peak = devices_lib.peak_flops(info["device_kind"], dtype)
    achieved = flops / step_s if flops and step_s else None
    return {
        "flops_per_device_step": flops,
        "flops_source": source,
        "flops_compiled": flops_compiled,
        "flops_lowered": flops_lowered,
        "flops_note": note,
        "achieved_flops_per_s_per_device": achieved,
        "peak_flops_per_device": peak,
        "peak_dtype": dtype,
        "utilisation": achieved / peak if achieved and peak else None,
    }


# Every measure() result holds these; the values noted may be None.
FIELDS = (
    "platform",
    "device_kind",
    "num_devices",
    "simulated",
    "strategy",
    "global_batch_size",
    "per_device_batch",
    "step_time_s",
    "compute_time_s",
    "exposed_collective_s",
    "exposed_collective_raw_s",
    "pipelined_step_s",
    "images_per_s",
    "images_per_s_per_device",
    "images_per_s_pipelined",
    "compile",
    "shares",
    "gradient_bytes",
    "num_params",
    "allreduce_s",
    "flops_per_device_step",
    "utilisation",
    "peak_memory_bytes",
    "compiled_memory_bytes",
)
MAYBE_NONE = (
    "allreduce_s",
    "flops_per_device_step",
    "utilisation",
    "peak_memory_bytes",
    "compiled_memory_bytes",
    "strategy",
)


def check(result: Mapping[str, Any], *, tolerance: float | None = None) -> list[str]:
    """Problems with a ``measure()`` result (empty list: consistent).

    Every field present; every number >= 0; lower and compile times > 0.
    Steps cannot contain compiles by construction: executables are compiled
    before the first timed call. With ``tolerance`` (a fraction), also the
    timings' own relation: compute at most the full step plus that slack.
    That one is a statement about the machine's quiet, not the code, so only
    benchmarks ask it (a loaded machine breaks it: tests leave it out).
    """
    problems = []
    for f in FIELDS:
        if f not in result:
            problems.append(f"missing field {f}")
        elif result[f] is None and f not in MAYBE_NONE:
            problems.append(f"{f} is None")

    def walk(prefix, x):
        if isinstance(x, Mapping):
            for k, v in x.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            if x < 0 and not prefix.endswith(("_raw_s", "_paired_s")):
                problems.append(f"{prefix} = {x} < 0")
            if x != x:
                problems.append(f"{prefix} is NaN")

    walk("", {k: v for k, v in result.items() if k != "profile"})
    step = (result.get("step_time_s") or {}).get("median")
    comp = (result.get("compute_time_s") or {}).get("median")
    if (
        tolerance is not None
        and step is not None
        and comp is not None
        and comp > step * (1 + tolerance)
    ):
        problems.append(
            f"compute median {comp:.4g} s exceeds step median {step:.4g} s "
            f"by more than {tolerance:.0%}"
        )
    for name, t in (result.get("compile") or {}).items():
        if not (t.get("lower_s", 0) > 0 and t.get("compile_s", 0) > 0):
            problems.append(f"compile.{name} is not > 0")
    return problems


def format_summary(r: Mapping[str, Any]) -> str:
    """A few human lines for a log."""
    ms = lambda s: f"{s * 1e3:.2f} ms" if s is not None else "n/a"  # noqa: E731
    lines = [
        f"{r['num_devices']} {r['platform']} device(s) ({r['device_kind']}), strategy "
        f"{r['strategy']}, "
        f"global batch {r['global_batch_size']} ({r['per_device_batch']}/device)",
        f"step {ms(r['step_time_s']['median'])} (p10 {ms(r['step_time_s']['p10'])}, "
        f"p90 {ms(r['step_time_s']['p90'])}); compute {ms(r['compute_time_s']['median'])}; "
        f"exposed collective {ms(r['exposed_collective_s'])}; raw all-reduce "
        f"{ms((r.get('allreduce_s') or {}).get('median'))}",
        f"{r['images_per_s']:.1f} img/s ({r['images_per_s_per_device']:.1f}/device; pipelined "
        f"{r['images_per_s_pipelined']:.1f})",
    ]
    if r.get("flops_per_device_step"):
        u = r.get("utilisation")
        lines.append(
            f"{r['flops_per_device_step'] / 1e9:.2f} GFLOP/device/step "
            f"({r['flops_source']}), utilisation "
            + (f"{u:.1%}" if u is not None else "n/a (peak unknown)")
        )
    if r.get("note"):
        lines.append(r["note"])
    return "\n".join(lines)
