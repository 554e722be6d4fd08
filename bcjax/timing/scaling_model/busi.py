"""The study's question redone: would 2, 4 or 8 GPUs train BUSI faster?

The study's setting: a fixed global batch (32 or 64; configs/*.py) split over N GPUs, so
each GPU's share of compute shrinks while the all-reduce does not. Per-step compute on one
H100 from /work/shared/BENCH.md (bf16, 224 px, 3 classes):

- ResNet-18: the plain-Flax (jit) anchor, 9,179 img/s at batch 32 and 14,265 at 128;
- MobileNetV2: torchvision eager, 1,358 img/s at 32 and 4,782 at 128 (no JAX figure for it
  on the H100 yet; eager's launch overhead makes its fixed per-step cost large).

Input is not modelled as a limit: bcjax keeps BUSI on the device (input_on_device), and its
host pipeline delivers 63,946 img/s on the H100 host (BUILD_NOTES, issue 3).
Error bars: the validation's mean (max) absolute efficiency error at the same GPU count,
applied as a relative error to the speed-up.
"""

from __future__ import annotations

import csv
import pathlib

from bcjax.timing.scaling_model import presets
from bcjax.timing.scaling_model.published import SUPERLINEAR, zoo_params
from bcjax.timing.scaling_model.terms import DEFAULT_BUCKET_BYTES, ComputeModel, predict

# (model, images/s at batch 32, images/s at batch 128, what measured it) — BENCH.md, H100.
H100_STEPS = (
    ("resnet18", 9_179, 14_265, "plain Flax linen (jit)"),
    ("mobilenet_v2", 1_358, 4_782, "torchvision eager"),
)
GLOBAL_BATCHES = (32, 64)
DEVICES = (1, 2, 4, 8)
LINKS = ("pcie4", "nvlink4-nvswitch")


def error_bars(validation_csv) -> dict[int, tuple[float, float]]:
    """{GPUs: (mean, max) absolute efficiency error} of the matchable validated rows."""
    by_n: dict[int, list[float]] = {}
    with open(validation_csv, newline="") as f:
        for r in csv.DictReader(f):
            if r["error"] == "" or float(r["published_efficiency"]) > SUPERLINEAR:
                continue
            by_n.setdefault(int(r["gpus"]), []).append(abs(float(r["error"])))
    return {n: (sum(e) / len(e), max(e)) for n, e in by_n.items()}


def deciding_term(row: dict, compute: ComputeModel, global_batch: int) -> str:
    """Of what the N-GPU step costs beyond a perfect 1/N split of the 1-GPU step: the fixed
    per-step compute that does not shrink, the exposed all-reduce, or the sync wait."""
    n = row["devices"]
    if n == 1:
        return "–"
    losses = {
        "fixed per-step compute": row["compute_s"] - compute(global_batch) / n,
        "all-reduce": row["exposed_collective_s"],
        "sync": row["sync_s"],
    }
    return max(losses, key=losses.get)


def verdict(speedup: float, speedup_no_overlap: float, error: float) -> str:
    """'slower' / 'gains' when the speed-up is below / above 1 by more than the validation's
    mean error; when overlap decides, both readings (the shared rows cannot tell: their
    all-reduce was under 1% of a step)."""

    def one(s):
        if s * (1 + error) < 1:
            return "slower"
        return "gains" if s * (1 - error) > 1 else "no clear change"

    overlapped, not_overlapped = one(speedup), one(speedup_no_overlap)
    if overlapped == not_overlapped:
        return overlapped
    return f"{overlapped} if overlapped, {not_overlapped} if not"


def busi_rows(bars: dict) -> list[dict]:
    rows = []
    for model, ips32, ips128, measured_by in H100_STEPS:
        compute = ComputeModel.fit([(32, 32 / ips32), (128, 128 / ips128)])
        grad_bytes = zoo_params(model, 3) * presets.GRADIENT_BYTES_PER_PARAM
        for link in LINKS:
            for global_batch in GLOBAL_BATCHES:
                t1 = compute(global_batch)
                for n in DEVICES:
                    b = global_batch // n
                    kw = dict(
                        per_device_batch=b,
                        single_device_step_s=t1,
                        global_batch_scaling=True,
                        bucket_bytes=DEFAULT_BUCKET_BYTES,
                    )
                    p = predict(compute(b), grad_bytes, n, link, **kw)
                    no_overlap = predict(compute(b), grad_bytes, n, link, overlap=0.0, **kw)
                    mae, worst = bars.get(n, (0.0, 0.0)) if n > 1 else (0.0, 0.0)
                    rows.append(
                        {
                            "model": model,
                            "compute": measured_by,
                            "link": link,
                            "global_batch": global_batch,
                            "devices": n,
                            "per_gpu_batch": b,
                            "step_ms": p["step_s"] * 1e3,
                            "speedup": p["speedup"],
                            "mae": mae,
                            "max": worst,
                            "speedup_no_overlap": no_overlap["speedup"],
                            "allreduce_ms": p["allreduce_s"] * 1e3,
                            "exposed_ms": p["exposed_collective_s"] * 1e3,
                            "term": deciding_term(p, compute, global_batch),
                            "verdict": "–"
                            if n == 1
                            else verdict(p["speedup"], no_overlap["speedup"], mae),
                        }
                    )
    return rows


def busi_markdown(rows: list[dict], bars: dict) -> str:
    lines = [
        "# Would more GPUs train BUSI faster? (scaling model, validated)",
        "",
        __doc__.split("\n\n", 1)[1].strip(),
        "",
        "Validation error used (efficiency points, mean / max): "
        + ", ".join(
            f"{n} GPUs {m * 100:.1f} / {x * 100:.1f}"
            for n, (m, x) in sorted(bars.items())
            if n in DEVICES
        ),
        "",
        "| model | link | global batch | GPUs | per-GPU batch | step ms | speed-up vs 1 GPU "
        "(± mean, max err) | no overlap | all-reduce ms (exposed) | deciding term | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["speedup"]
        err = "" if r["devices"] == 1 else f" ± {s * r['mae']:.2f} ({s * r['max']:.2f})"
        lines.append(
            f"| {r['model']} | {r['link']} | {r['global_batch']} | {r['devices']} | "
            f"{r['per_gpu_batch']} | {r['step_ms']:.2f} | {s:.2f}{err} | "
            f"{r['speedup_no_overlap']:.2f} | {r['allreduce_ms']:.2f} "
            f"({r['exposed_ms']:.2f}) | {r['term']} | {r['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def write_busi_question(out, validation_csv: str | None = None) -> str:
    out = pathlib.Path(out)
    bars = error_bars(validation_csv or out / "validation.csv")
    text = busi_markdown(busi_rows(bars), bars)
    out.mkdir(parents=True, exist_ok=True)
    (out / "busi_question.md").write_text(text)
    return text
