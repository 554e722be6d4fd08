"""Profiler mode: a ``jax.profiler`` trace of a few steps, summed per device
over collective ops (all-reduce, all-gather, reduce-scatter,
collective-permute, all-to-all).

What jax 0.10.2 writes under ``<log_dir>/plugins/profile/<run>/``:
``<host>.xplane.pb`` (an XSpace protobuf), ``<host>.trace.json.gz`` and, with
``create_perfetto_trace=True``, ``perfetto_trace.json.gz`` (Chrome trace
events). No TensorFlow or tensorboard-plugin-profile is needed to read them:
the XSpace is read with ``jax.profiler.ProfileData`` (part of jaxlib), the
JSON with ``gzip``/``json``; the JSON path is the fallback.

Which events are collectives: an HLO op's name (e.g. ``psum_invariant.7``)
says nothing of its kind, so the compiled module's HLO text (``hlo_text``)
maps instruction names to opcodes; without it names are matched by pattern
(``all-reduce``, ``psum``, NCCL kernel names, ...).

Limits, stated: on CPU (simulated devices) each device's ops appear on the
host's thread pool with a ``device_ordinal``; a collective's duration there
includes waiting at the rendezvous for the slowest device, so it measures
synchronisation plus copying, not link bandwidth. On GPU the XSpace has one
plane per device (``/device:GPU:N``) whose "XLA Ops" line is used; async
collectives (``all-reduce-start``/``-done``) are counted by their op events,
and NCCL kernels on the stream lines are matched by name when no op line
exists. The GPU path follows the XSpace layout XLA documents but was
exercised here on CPU traces only.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import time
from collections.abc import Callable, Iterable

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")

_OPCODE_RE = re.compile(
    r"\s(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(-start|-done)?\("
)
_NAME_PATTERNS = (
    ("all-reduce", re.compile(r"all[-_]?reduce|psum(?!_scatter)|allreduce", re.I)),
    ("reduce-scatter", re.compile(r"reduce[-_]?scatter|psum_scatter", re.I)),
    ("all-gather", re.compile(r"all[-_]?gather", re.I)),
    ("collective-permute", re.compile(r"collective[-_]?permute|ppermute|sendrecv", re.I)),
    ("all-to-all", re.compile(r"all[-_]?to[-_]?all", re.I)),
)
_DEVICE_RE = re.compile(r"/device:[A-Za-z_]+:(\d+)")


def opcode_map(hlo_text: str | None) -> dict[str, str]:
    """HLO instruction name -> collective kind, from compiled HLO text."""
    out = {}
    if not hlo_text:
        return out
    for line in hlo_text.splitlines():
        if " = " not in line:
            continue
        lhs, rhs = line.split(" = ", 1)
        m = _OPCODE_RE.search(" " + rhs)
        if m:
            name = lhs.strip().removeprefix("ROOT ").strip().lstrip("%")
            out[name] = m.group(1)
    return out


def classify(name: str, opcodes: dict[str, str]) -> str | None:
    """Collective kind of an op/kernel event name, or None."""
    base = name.strip().lstrip("%").split(" ")[0]
    if opcodes:
        if base in opcodes:
            return opcodes[base]
        # Kernels are not HLO instructions: only NCCL names are collectives.
        if "nccl" not in name.lower():
            return None
    if name.startswith("end: "):
        return None
    for kind, pat in _NAME_PATTERNS:
        if pat.search(name):
            return kind
    return None


def _empty_device():
    return {
        "collectives": {k: {"count": 0, "total_s": 0.0} for k in KINDS},
        "collective_total_s": 0.0,
        "op_total_s": 0.0,
    }


def _add(per_device, device, name, seconds, opcodes):
    d = per_device.setdefault(str(device), _empty_device())
    d["op_total_s"] += seconds
    kind = classify(name, opcodes)
    if kind is not None:
        d["collectives"][kind]["count"] += 1
        d["collectives"][kind]["total_s"] += seconds
        d["collective_total_s"] += seconds


def parse_xplane(path: str, hlo_text: str | None = None) -> dict:
    """Per-device op and collective seconds from an ``.xplane.pb``."""
    from jax.profiler import ProfileData

    opcodes = opcode_map(hlo_text)
    data = ProfileData.from_file(path)
    per_device: dict = {}
    for plane in data.planes:
        m = _DEVICE_RE.search(plane.name)
        lines = list(plane.lines)
        if m:  # an accelerator plane: one device
            ops = [ln for ln in lines if ln.name == "XLA Ops"] or lines
            for ln in ops:
                for ev in ln.events:
                    _add(per_device, m.group(1), ev.name, ev.duration_ns * 1e-9, opcodes)
        elif plane.name.startswith("/host:"):
            # CPU devices: op events carry hlo_op and device_ordinal stats.
            for ln in lines:
                for ev in ln.events:
                    st = dict(ev.stats)
                    if "hlo_op" in st and "device_ordinal" in st:
                        _add(
                            per_device,
                            st["device_ordinal"],
                            str(st["hlo_op"]),
                            ev.duration_ns * 1e-9,
                            opcodes,
                        )
    return per_device


def parse_trace_json(path: str, hlo_text: str | None = None) -> dict:
    """The same from a Chrome-trace ``.trace.json.gz`` / ``perfetto_trace.json.gz``."""
    opcodes = opcode_map(hlo_text)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    process, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process[e.get("pid")] = e.get("args", {}).get("name", "")
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[(e.get("pid"), e.get("tid"))] = e.get("args", {}).get("name", "")
    has_ops_line = {pid for (pid, _), name in thread.items() if name == "XLA Ops"}
    per_device: dict = {}
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        args = e.get("args") or {}
        seconds = float(e["dur"]) * 1e-6
        if "device_ordinal" in args and "hlo_op" in args:
            _add(per_device, args["device_ordinal"], str(args["hlo_op"]), seconds, opcodes)
            continue
        m = _DEVICE_RE.search(process.get(e.get("pid"), ""))
        if m and (
            e.get("pid") not in has_ops_line
            or thread.get((e.get("pid"), e.get("tid"))) == "XLA Ops"
        ):
            _add(per_device, m.group(1), e.get("name", ""), seconds, opcodes)
    return per_device


def find_trace(log_dir: str) -> tuple[str, str] | None:
    """``(format, path)`` of the newest trace under ``log_dir``: xplane first."""
    runs = sorted(glob.glob(os.path.join(log_dir, "plugins", "profile", "*")), key=os.path.getmtime)
    for run in reversed(runs):
        for fmt, pattern in (
            ("xplane", "*.xplane.pb"),
            ("trace_json", "*.trace.json.gz"),
            ("trace_json", "perfetto_trace.json.gz"),
        ):
            hits = sorted(glob.glob(os.path.join(run, pattern)))
            if hits:
                return fmt, hits[0]
    return None


def summarize(log_dir: str, hlo_text: str | None = None, steps: int = 1) -> dict:
    """Parses the newest trace under ``log_dir`` into per-device sums; falls
    back from the XSpace to the JSON trace when the former cannot be read."""
    found = find_trace(log_dir)
    if found is None:
        return {"error": f"no trace found under {log_dir}"}
    fmt, path = found
    try:
        per_device = (
            parse_xplane(path, hlo_text) if fmt == "xplane" else parse_trace_json(path, hlo_text)
        )
    except Exception as e:  # e.g. a jaxlib without ProfileData
        alt = sorted(glob.glob(os.path.join(os.path.dirname(path), "*.json.gz")))
        if not alt:
            return {"error": f"cannot parse {path}: {e}"}
        fmt, path = "trace_json", alt[0]
        per_device = parse_trace_json(path, hlo_text)
    totals = [d["collective_total_s"] for d in per_device.values()]
    by_kind = collections.Counter()
    for d in per_device.values():
        for k, v in d["collectives"].items():
            by_kind[k] += v["total_s"]
    ndev = max(len(per_device), 1)
    return {
        "format": fmt,
        "path": path,
        "steps": steps,
        "per_device": per_device,
        "collective_s_per_step": (sum(totals) / ndev / steps) if totals else 0.0,
        "collective_s_per_step_max_device": (max(totals) / steps) if totals else 0.0,
        "by_kind_s_per_step": {k: v / ndev / steps for k, v in by_kind.items()},
        "note": ("collective op time includes waiting for the slowest device at the rendezvous"),
    }


def profile_steps(
    run_step: Callable, log_dir: str, *, steps: int = 3, hlo_text: str | None = None
) -> dict:
    """Traces ``steps`` synchronised calls of ``run_step()`` and summarises them."""
    import jax

    os.makedirs(log_dir, exist_ok=True)
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(steps):
            jax.block_until_ready(run_step())
    # The trace is written on exit; a short wait guards slow filesystems.
    for _ in range(20):
        if find_trace(log_dir):
            break
        time.sleep(0.05)
    return summarize(log_dir, hlo_text, steps)


def format_summary(summary: dict, devices: Iterable[str] | None = None) -> str:
    if "error" in summary:
        return f"profile: {summary['error']}"
    lines = [f"profile ({summary['format']}): collective time per step, per device"]
    for dev in sorted(summary["per_device"], key=lambda s: int(s) if s.isdigit() else s):
        if devices is not None and dev not in devices:
            continue
        d = summary["per_device"][dev]
        kinds = ", ".join(
            f"{k} {v['total_s'] / summary['steps'] * 1e3:.3f} ms "
            f"({v['count'] / summary['steps']:g} ops)"
            for k, v in d["collectives"].items()
            if v["count"]
        )
        lines.append(
            f"  device {dev}: {d['collective_total_s'] / summary['steps'] * 1e3:.3f} ms"
            f" of {d['op_total_s'] / summary['steps'] * 1e3:.3f} ms ops; {kinds or 'none'}"
        )
    return "\n".join(lines)
