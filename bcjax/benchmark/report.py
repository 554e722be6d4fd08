"""The benchmark's tables and files: one row per case (``COLUMNS``, ``to_row``),
the line printed per case (``case_line``), Markdown tables (``markdown_table``),
the anchors' ratios (``load_anchors``, ``anchor_rows``), the scaling
predictions of bcjax.timing.scaling_model (``ring_predictions``) and benchmark.csv/.json/.md
(``write_outputs``). Nothing here compiles or times anything.
"""

from __future__ import annotations

import csv
import json
import pathlib
from collections.abc import Sequence

COLUMNS = (
    "model",
    "strategy",
    "devices",
    "per_device_batch",
    "global_batch",
    "image_size",
    "dtype",
    "step_ms",
    "step_ms_p10",
    "step_ms_p90",
    "img_s",
    "img_s_per_device",
    "img_s_pipelined",
    "compute_ms",
    "exposed_collective_ms",
    "allreduce_ms",
    "lower_s",
    "compile_s",
    "compile_cold_s",
    "compile_warm_s",
    "gflop_per_device_step",
    "tflop_s_per_device",
    "utilisation",
    "peak_mem_mb",
    "params",
    "gradient_mb",
    "platform",
    "device_kind",
    "simulated",
    "error",
)


def to_row(model_name: str, r: dict, args) -> dict:
    ms = lambda s: None if s is None else round(s * 1e3, 3)  # noqa: E731
    train = r["compile"]["train_step"]
    flops = r.get("flops_per_device_step")
    achieved = r.get("achieved_flops_per_s_per_device")
    cache = (r.get("compile_cache") or {}).get("train_step") or {}  # --compile-cache
    return {
        "model": model_name,
        "strategy": r["strategy"],
        "devices": r["num_devices"],
        "per_device_batch": r["per_device_batch"],
        "global_batch": r["global_batch_size"],
        "image_size": args.image_size,
        "dtype": args.dtype,
        "step_ms": ms(r["step_time_s"]["median"]),
        "step_ms_p10": ms(r["step_time_s"]["p10"]),
        "step_ms_p90": ms(r["step_time_s"]["p90"]),
        "img_s": round(r["images_per_s"], 1),
        "img_s_per_device": round(r["images_per_s_per_device"], 1),
        "img_s_pipelined": round(r["images_per_s_pipelined"], 1),
        "compute_ms": ms(r["compute_time_s"]["median"]),
        "exposed_collective_ms": ms(r["exposed_collective_s"]),
        "allreduce_ms": ms((r.get("allreduce_s") or {}).get("median")),
        "lower_s": round(train["lower_s"], 2),
        "compile_s": round(train["compile_s"], 2),
        "compile_cold_s": _rounded(cache.get("cold_compile_s"), 2),
        "compile_warm_s": _rounded(cache.get("warm_compile_s"), 2),
        "gflop_per_device_step": None if flops is None else round(flops / 1e9, 3),
        "tflop_s_per_device": None if achieved is None else round(achieved / 1e12, 4),
        "utilisation": None if r.get("utilisation") is None else round(r["utilisation"], 4),
        "peak_mem_mb": (
            None if r.get("peak_memory_bytes") is None else round(r["peak_memory_bytes"] / 2**20, 1)
        ),
        "params": r["num_params"],
        "gradient_mb": round(r["gradient_bytes"] / 1e6, 2),
        "platform": r["platform"],
        "device_kind": r["device_kind"],
        "simulated": r["simulated"],
        "error": None,
    }


def _rounded(v, digits: int):
    return None if v is None else round(v, digits)


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def case_line(row: dict) -> str:
    """One compact line per case, printed as soon as it finishes."""
    if row.get("error"):
        return (
            f"{row['model']:<20} b={row['per_device_batch']:<4} x{row['devices']} dev  "
            f"ERROR {row['error']}"
        )
    u = row["utilisation"]
    return (
        f"{row['model']:<20} b={row['per_device_batch']:<4} x{row['devices']} dev {row['dtype']} "
        f"{row['image_size']}px | {row['img_s_pipelined']:>9,.1f} img/s pipelined, "
        f"{row['img_s']:,.1f} synced | step {row['step_ms']:.2f} ms "
        f"(p10 {row['step_ms_p10']:.2f}, p90 {row['step_ms_p90']:.2f}) | compute "
        f"{row['compute_ms']:.2f} ms, exposed collective {row['exposed_collective_ms']:.2f} ms | "
        f"compile {row['lower_s'] + row['compile_s']:.1f} s"
        + (
            f" | {row['tflop_s_per_device']:.3g} TFLOP/s"
            if row["tflop_s_per_device"] is not None
            else ""
        )
        + (f" ({u:.1%} of peak)" if u is not None else "")
    )


MD_COLUMNS = (
    "model",
    "devices",
    "per_device_batch",
    "img_s_pipelined",
    "img_s",
    "step_ms",
    "step_ms_p10",
    "step_ms_p90",
    "compute_ms",
    "exposed_collective_ms",
    "allreduce_ms",
    "compile_s",
    "gflop_per_device_step",
    "utilisation",
    "peak_mem_mb",
)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] = MD_COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def load_anchors(path: str) -> dict:
    """{(model, batch): {fw: img_s}} from anchor_step.py's JSON lines."""
    out: dict = {}
    for line in pathlib.Path(path).read_text().splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "img_s" in rec and "model" in rec and "batch" in rec:
            out.setdefault((rec["model"], int(rec["batch"])), {})[rec["fw"]] = float(rec["img_s"])
    return out


def anchor_rows(rows: Sequence[dict], anchors: dict) -> list[dict]:
    """bcjax's pipelined img/s beside each anchor measured in the same call."""
    out = []
    for r in rows:
        if r.get("error") or r["devices"] != 1:
            continue
        a = anchors.get((r["model"], r["per_device_batch"]), {})
        row = {
            "model": r["model"],
            "batch": r["per_device_batch"],
            "bcjax_img_s": r["img_s_pipelined"],
        }
        for fw in ("torch", "torch+compile", "jax-flax-linen"):
            row[f"{fw}_img_s"] = a.get(fw)
            row[f"ratio_vs_{fw}"] = round(r["img_s_pipelined"] / a[fw], 2) if a.get(fw) else None
        out.append(row)
    return out


def ring_predictions(rows: Sequence[dict], links: Sequence[str]) -> list[dict]:
    """Weak-scaling predictions at N = 2, 4, 8 from each model's 1-device rows."""
    from bcjax.timing import scaling_model

    out = []
    by_model: dict = {}
    for r in rows:
        if not r.get("error") and r["devices"] == 1:
            by_model.setdefault(r["model"], []).append(r)
    for model, rs in by_model.items():
        compute = scaling_model.ComputeModel.fit(
            (r["per_device_batch"], r["compute_ms"] / 1e3) for r in rs
        )
        grad_bytes = rs[0]["gradient_mb"] * 1e6
        for link in links:
            for r in rs:
                t1 = r["compute_ms"] / 1e3  # measured, not the fit, at measured batches
                for n in (2, 4, 8):
                    p = scaling_model.predict(
                        t1, grad_bytes, n, link, per_device_batch=r["per_device_batch"]
                    )
                    out.append(
                        {
                            "model": model,
                            "interconnect": link,
                            "devices": n,
                            "per_device_batch": r["per_device_batch"],
                            "compute_ms": round(t1 * 1e3, 3),
                            "allreduce_ms": round(p["allreduce_s"] * 1e3, 3),
                            "img_s": round(p["images_per_s"], 1),
                            "efficiency": round(p["efficiency"], 3),
                        }
                    )
            eff_batch = scaling_model.batch_for_efficiency(compute, grad_bytes, 8, 0.9, link=link)
            out.append(
                {
                    "model": model,
                    "interconnect": link,
                    "devices": 8,
                    "per_device_batch": eff_batch,
                    "note": "smallest power-of-two batch for 90% efficiency",
                }
            )
    return out


def write_outputs(
    out: pathlib.Path,
    header: str,
    simulated: bool,
    args,
    rows: Sequence[dict],
    results: Sequence[dict],
    extra: dict,
) -> None:
    """benchmark.csv, benchmark.json (rows, full breakdowns, extras), benchmark.md."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "benchmark.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c) for c in COLUMNS})
    (out / "benchmark.json").write_text(
        json.dumps(
            {
                "header": header,
                "simulated": simulated,
                "args": vars(args),
                "rows": list(rows),
                "breakdowns": list(results),
                **extra,
            },
            indent=1,
            default=str,
        )
    )
    note = "\n(timings simulated: CPU devices sharing one host)\n" if simulated else ""
    (out / "benchmark.md").write_text(f"{header}\n\n{markdown_table(rows)}\n{note}")
