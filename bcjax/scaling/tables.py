"""The device-count table: one row per run, speedups, and the scaling model's prediction.

Written as scaling.md, scaling.csv, scaling.json and scaling.png, each through
bcjax.files (a crash never leaves half a file).
"""

from __future__ import annotations

import math
import pathlib
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from bcjax import files, report

# The one import of the model of real multi-device machines.
from bcjax.timing import scaling_model

INTERCONNECTS = tuple(sorted(scaling_model.INTERCONNECTS))
SIMULATED = (
    "timings simulated: the devices are CPU devices sharing one host's cores; speedup and "
    "efficiency here measure that host, not N accelerators (see the pred_* columns)"
)
SYNTHETIC = "Data: the SYNTHETIC BUSI-like set; accuracies say nothing about real ultrasound."
COLUMNS = (
    "devices",
    "global_batch",
    "per_device_batch",
    "steps_per_epoch",
    "test_accuracy",
    "test_macro_f1",
    "test_auc",
    "best_epoch",
    "wall_s",
    "epoch_s",
    "compile_s",
    "step_ms",
    "img_s",
    "speedup",
    "efficiency",
    "speedup_step",
    "efficiency_step",
    "compute_share",
    "collective_share",
    "input_share",
    "other_share",
    "compute_ms",
    "exposed_collective_ms",
    "allreduce_ms",
    "pred_step_ms",
    "pred_speedup",
    "pred_efficiency",
    "pred_compute_source",
    "platform",
    "simulated",
    "dataset",
)
MD_COLUMNS = (
    "devices",
    "global_batch",
    "per_device_batch",
    "test_accuracy",
    "test_macro_f1",
    "test_auc",
    "wall_s",
    "epoch_s",
    "compile_s",
    "step_ms",
    "speedup",
    "efficiency",
    "speedup_step",
    "efficiency_step",
    "compute_share",
    "collective_share",
    "input_share",
    "other_share",
    "pred_speedup",
    "pred_efficiency",
)


def _get(d: Any, *path, default=None):
    """d[path[0]][path[1]]...; ``default`` where a level is missing or None."""
    for key in path:
        if not isinstance(d, Mapping) or d.get(key) is None:
            return default
        d = d[key]
    return d


def _compile_s(timing: Mapping) -> float | None:
    total = 0.0
    for step in (timing.get("compile") or {}).values():
        if isinstance(step, Mapping):
            total += float(step.get("lower_s", 0.0)) + float(step.get("compile_s", 0.0))
    return total or None


def _gradient_bytes(config: Mapping, num_classes: int) -> int | None:
    """Gradient bytes (fp32) of the run's model, from its shapes, without running it."""
    try:
        import jax
        import jax.numpy as jnp

        import bcjax.models
        from bcjax.models import family

        kw = family.width_of(
            config["model"], width=config["width"], width_multiplier=config["width_multiplier"]
        )
        model = bcjax.models.create(config["model"], num_classes=num_classes, **kw)
        size = int(config.get("image_size", 64))
        image = jnp.zeros((1, size, size, 3))
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), image, train=False))
        return int(sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(shapes["params"])))
    except Exception:  # an old or foreign results.json: the prediction columns stay empty
        return None


def row_from_run(run: Mapping) -> dict:
    """The measured part of one table row (from runs.read_run)."""
    from bcjax.data import busi

    res, timing = run["results"], run["timing"]
    breakdown = timing.get("breakdown") or {}
    n = int(res["num_devices"])
    global_batch = int(res["global_batch_size"])
    # The synchronised breakdown is the cleaner step time; the loop's dispatch
    # intervals (which include input waits) stand in when it is absent. A one-device
    # breakdown times no step of its own: its step time is the loop's ("step_time_source"
    # "loop"; older timing.json files lack the key and were synchronised).
    synced = (
        _get(breakdown, "step_time_s", "median")
        if breakdown.get("step_time_source", "synchronised") == "synchronised"
        else None
    )
    interval = _get(timing, "step_time_s", "median")
    step = synced or interval
    compute = _get(breakdown, "compute_time_s", "median")
    collective = breakdown.get("exposed_collective_s")
    wait = _get(timing, "input_wait_s", "mean") or _get(timing, "input_wait_s", "median")
    # Shares of the loop's own time per step (its dispatch interval). Input is
    # fetched while the device runs the previous step, so only the part of the
    # wait the device step did not cover is charged to input.
    per_step = interval or step
    if wait is not None and synced and interval:
        exposed_wait = min(wait, max(interval - synced, 0.0))
    else:
        exposed_wait = wait  # no synchronised step to compare with: an upper bound

    def share(seconds):
        return None if seconds is None or not per_step else min(seconds / per_step, 1.0)

    def ms(seconds):
        return None if seconds is None else seconds * 1e3

    epoch_s = statistics.median(run["epoch_times"]) if run["epoch_times"] else None
    if epoch_s is None and interval is not None:
        epoch_s = interval * res["steps_per_epoch"]
    test = res.get("test") or {}
    if compute is None or collective is None or not per_step:
        other = None
    else:
        # What is left: host-side work per step the device did not hide
        # (dispatch, metric transfers, logging), or idle device time.
        other = max(1.0 - (compute + collective + (exposed_wait or 0.0)) / per_step, 0.0)
    return {
        "devices": n,
        "global_batch": global_batch,
        "per_device_batch": global_batch // n,
        "steps_per_epoch": res.get("steps_per_epoch"),
        "test_accuracy": test.get("accuracy"),
        "test_macro_f1": test.get("macro_f1"),
        "test_auc": test.get("auc_macro"),
        "best_epoch": res.get("best_epoch"),
        "wall_s": res.get("wall_time_s"),
        "epoch_s": epoch_s,
        "compile_s": _compile_s(timing),
        "step_ms": ms(step),
        "img_s": global_batch / step if step else None,
        "compute_share": share(compute),
        "collective_share": share(collective),
        "input_share": share(exposed_wait),
        "other_share": other,
        "compute_ms": ms(compute),
        "exposed_collective_ms": ms(collective),
        "allreduce_ms": ms(_get(breakdown, "allreduce_s", "median")),
        "platform": res.get("platform"),
        "simulated": res.get("platform") == "cpu" and n > 1,
        "dataset": res.get("dataset"),
        # Inputs of the prediction, dropped from the saved rows.
        "_gradient_bytes": breakdown.get("gradient_bytes"),
        "_compute_s": compute if compute is not None else step,
        "_config": res.get("config") or {},
        "_num_classes": len(test.get("class_names") or busi.CLASSES),
    }


def build_table(
    runs: Sequence[Mapping],
    mode: str,
    *,
    link: str = "pcie4",
    overlap: float | None = None,
    compute_points: Mapping[int, float] | None = None,
) -> list[dict]:
    """Rows sorted by device count with speedups against the smallest count
    and the scaling model's prediction for real devices.

    The prediction needs 1-device compute at each per-device batch:
    ``compute_points`` ({batch: seconds}, measured by ``--probe-compute``)
    where given, else the smallest run's compute scaled in proportion to the
    batch (no fixed per-step cost: optimistic for small batches).
    """
    rows = sorted((row_from_run(r) for r in runs), key=lambda r: r["devices"])
    if not rows:
        return []
    ref = rows[0]
    grad_bytes = next((r["_gradient_bytes"] for r in rows if r["_gradient_bytes"]), None)
    if grad_bytes is None:
        grad_bytes = _gradient_bytes(ref["_config"], ref["_num_classes"])
    if compute_points:
        fit = scaling_model.ComputeModel.fit(compute_points.items())

        def compute(batch):
            return compute_points.get(batch) or fit(batch)

        source = "measured 1-device compute per batch"
    elif ref["_compute_s"]:
        # The smallest run's compute is per device at its per-device batch.
        compute = scaling_model.ComputeModel.proportional(
            ref["_compute_s"], ref["per_device_batch"]
        )
        source = "compute proportional to batch (optimistic)"
    else:
        compute, source = None, None
    for r in rows:
        scale = r["devices"] / ref["devices"]
        measured = r.get("wall_s") and ref.get("wall_s")
        r["speedup"] = ref["wall_s"] / r["wall_s"] if measured else None
        r["efficiency"] = r["speedup"] / scale if r["speedup"] is not None else None
        if r["img_s"] and ref["img_s"]:
            r["speedup_step"] = r["img_s"] / ref["img_s"]
            r["efficiency_step"] = r["speedup_step"] / scale
        else:
            r["speedup_step"] = r["efficiency_step"] = None
        if compute is not None and grad_bytes:
            # Against one device: same global batch -> t1 at the whole batch.
            t1 = compute(r["global_batch"] if mode == "same_global" else r["per_device_batch"])
            p = scaling_model.predict(
                compute(r["per_device_batch"]),
                grad_bytes,
                r["devices"],
                link,
                overlap=overlap,
                single_device_step_s=t1,
                global_batch_scaling=mode == "same_global",
            )
            r["pred_step_ms"] = p["step_s"] * 1e3
            r["pred_speedup"] = p["speedup"]
            r["pred_efficiency"] = p["efficiency"]
        else:
            r["pred_step_ms"] = r["pred_speedup"] = r["pred_efficiency"] = None
        r["gradient_bytes"] = grad_bytes
        r["pred_compute_source"] = source
    return rows


def cell(value, column: str) -> str:
    """A table cell: shares and efficiencies in percent, scores to 3 decimals."""
    if isinstance(value, float) and ("share" in column or "efficiency" in column):
        return report.percent(value)
    if column.endswith(("accuracy", "f1", "auc")):
        return report.number(value, 3)
    return report.number(value, None)


def _overlap_words(overlap: float | None) -> str:
    if overlap is None:
        return "all-reduce overlapped with the backward pass as the model schedules it"
    return f"{overlap:.0%} of the all-reduce hidden"


def markdown(
    rows: Sequence[dict], *, mode: str, link: str, overlap: float | None, title: str = ""
) -> str:
    lines = [title, ""] if title else []
    lines.append(report.markdown_table(rows, MD_COLUMNS, fmt=cell))
    baseline = rows[0]["devices"] if rows else 1
    source = (rows[0].get("pred_compute_source") if rows else None) or "no compute measured"
    lines += [
        "",
        f"Mode {mode}. speedup/efficiency: wall time of the whole run against "
        f"{baseline} device(s); *_step: steady-state images/s. Shares: of the training "
        "loop's time per step; input counts the wait not hidden behind the device step. "
        f"pred_*: the scaling model (bcjax.timing.scaling_model) for real devices ({source}; "
        f"{scaling_model.interconnect(link).note}, {_overlap_words(overlap)}), "
        "against 1 device.",
    ]
    if any(r.get("simulated") for r in rows):
        lines += ["", f"**{SIMULATED}.**"]
    if any(r.get("dataset") == "synthetic" for r in rows):
        lines += ["", SYNTHETIC]
    return "\n".join(lines)


def plot(rows: Sequence[dict], path: pathlib.Path, *, mode: str, title: str = "") -> None:
    """Wall/epoch time, speedup (measured, ideal, model) and test metrics
    against the device count, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = [r["devices"] for r in rows]
    fig = Figure(figsize=(13, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)

    def series(key, scale=1.0):
        return [math.nan if r.get(key) is None else r[key] * scale for r in rows]

    ax1.plot(n, series("wall_s"), "o-", label="wall time (s)")
    ax1.plot(n, series("epoch_s", 10), "s--", label="time per epoch x10 (s)")
    ax1.plot(n, series("compile_s"), "^:", label="compile (s)")
    ax1.set_title("time")

    ax2.plot(n, [x / n[0] for x in n], "k:", label="ideal")
    ax2.plot(n, series("speedup"), "o-", label="measured (wall)")
    ax2.plot(n, series("speedup_step"), "s--", label="measured (steady-state img/s)")
    ax2.plot(n, series("pred_speedup"), "^-.", label="scaling model, real devices")
    simulated = any(r.get("simulated") for r in rows)
    ax2.set_title("speedup" + (" (simulated devices)" if simulated else ""))

    ax3.plot(n, series("test_accuracy"), "o-", label="test accuracy")
    ax3.plot(n, series("test_macro_f1"), "s--", label="test macro-F1")
    ax3.plot(n, series("test_auc"), "^:", label="test AUC (macro)")
    ax3.set_ylim(0, 1.02)
    ax3.set_title("test metrics")
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("devices")
        ax.set_xticks(n)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"bcjax scaling, {mode}")
    fig.tight_layout()
    with files.atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")


def write_outputs(
    rows: Sequence[dict],
    out_dir: pathlib.Path,
    *,
    mode: str,
    link: str,
    overlap: float | None,
    title: str = "",
) -> str:
    """scaling.md, scaling.csv, scaling.json and scaling.png; returns the markdown."""
    out_dir = pathlib.Path(out_dir)
    md = markdown(rows, mode=mode, link=link, overlap=overlap, title=title)
    files.write_text(md + "\n", out_dir / "scaling.md")
    report.write_csv(rows, out_dir / "scaling.csv", COLUMNS)
    saved = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    files.write_json(
        {
            "mode": mode,
            "interconnect": link,
            "overlap": overlap,
            "rows": saved,
            "simulated": any(r.get("simulated") for r in rows),
        },
        out_dir / "scaling.json",
        default=str,
    )
    plot(rows, out_dir / "scaling.png", mode=mode, title=title)
    return md
