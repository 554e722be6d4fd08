"""The study's question redone: would 2, 4 or 8 GPUs train BUSI faster?

The study's setting: a fixed global batch (32 or 64; configs/*.py) split over N GPUs, so
each GPU's share of compute shrinks while the all-reduce does not. Per-step compute on one
H100 as measured in BUILD_NOTES ("H100 (issues 4 and 5)"; bf16, 224 px, 3 classes):

- ResNet-18: the plain-Flax (jit) anchor, 9,179 img/s at batch 32 and 14,265 at 128;
- MobileNetV2: torchvision eager, 1,358 img/s at 32 and 4,782 at 128 (no JAX figure for it
  on the H100 yet; eager's launch overhead makes its fixed per-step cost large).

bcjax runs JAX, so the gradients go as XLA combines them (30 MiB buckets), scheduled layer
by layer against the backward pass (ResNet-18's documented layer shapes; MobileNetV2 with
gradients ready evenly). Input is not a limit: bcjax keeps BUSI on the device. The host
term is the fitted contention for data that never touches the host's CPU, reduced precision.
Intervals: the 10th-90th percentile of the model's out-of-sample errors on the published
rows, leaving sources and GPU generations out, each source document's errors counting once
(``fitted.json``; all rows', as no published
row is JAX with XLA's combining, the group a BUSI row is in), applied to the step's
efficiency: a consumer box over PCIe is a machine the published rows do not hold.
"""

from __future__ import annotations

import pathlib

from bcjax.timing.scaling_model import presets, profiles, schedule
from bcjax.timing.scaling_model.fitted import SHIPPED, ModelParams
from bcjax.timing.scaling_model.published import zoo_params
from bcjax.timing.scaling_model.terms import (
    ComputeModel,
    allreduce_cost,
    expected_max_normal,
    host_count,
    host_share,
)

# (model, images/s at batch 32, images/s at batch 128, what measured it): H100, BUILD_NOTES.
H100_STEPS = (
    ("resnet18", 9_179, 14_265, "plain Flax linen (jit)"),
    ("mobilenet_v2", 1_358, 4_782, "torchvision eager"),
)
GLOBAL_BATCHES = (32, 64)
DEVICES = (1, 2, 4, 8)
# pcie3-2gpu-nop2p: the BUSI study's kind of machine (2 consumer GPUs, PCIe, no NVLink/P2P);
# pcie4-nop2p: today's consumer box (GeForce RTX 30/40 cards: no P2P, copies through host
# memory; the kind of row the blind external check found the model least accurate on)
LINKS = ("pcie3-2gpu-nop2p", "pcie4-nop2p", "pcie4", "nvlink4-nvswitch")
# The intervals' group: JAX with XLA's combining (no published row has it, so all rows').
BUSI_GROUP = "jax / xla"


def profile_of(model: str) -> tuple:
    return profiles.documented(model, num_classes=3) or profiles.uniform(zoo_params(model, 3))


def step_terms(compute_s, profile, n, link, params: ModelParams = SHIPPED) -> dict:
    """One step on n GPUs (seconds by term): compute, the exposed XLA all-reduce, the wait
    for the slowest GPU / host, and the host contention for on-device data."""
    link = presets.interconnect(link)
    backward = presets.BACKWARD_FRACTION * compute_s
    grads = schedule.ready_times(profile, backward, presets.GRADIENT_BYTES_PER_PARAM)
    msgs = schedule.messages(grads, presets.SCHEMES["xla"])
    cost = allreduce_cost(n, link)
    exposed = schedule.exposed_time(grads, presets.SCHEMES["xla"], cost, backward) if n > 1 else 0.0
    nodes = host_count(n, link.gpus_per_node)
    sync = (
        params.sync_cv * expected_max_normal(n) + params.node_sync_cv * expected_max_normal(nodes)
    ) * compute_s
    contention, _ = params.host_contention("jax", "gpu", "reduced")
    host = contention * host_share(n, link.gpus_per_node) * compute_s
    return {
        "compute_s": compute_s,
        "allreduce_s": sum(cost(b) for _, b in msgs) if n > 1 else 0.0,
        "exposed_s": exposed,
        "sync_s": sync,
        "host_s": host,
        "step_s": compute_s + exposed + sync + host,
    }


def verdict(low: float, high: float) -> str:
    if high < 1.0:
        return "slower"
    if low > 1.0:
        return "faster"
    return "straddles 1.0x: cannot tell"


def busi_rows(links=LINKS, params: ModelParams = SHIPPED) -> list[dict]:
    q10, q90, _ = params.interval(BUSI_GROUP)
    rows = []
    for model, ips32, ips128, measured_by in H100_STEPS:
        compute = ComputeModel.fit([(32, 32 / ips32), (128, 128 / ips128)])
        profile = profile_of(model)
        for link in links:
            for global_batch in GLOBAL_BATCHES:
                t1 = compute(global_batch)
                for n in DEVICES:
                    if n > presets.interconnect(link).gpus_per_node:
                        continue  # one host only: a 2-GPU box has no 4-GPU row
                    b = global_batch // n
                    terms = step_terms(compute(b), profile, n, link, params)
                    speedup = t1 / terms["step_s"]
                    # the interval is on the step's efficiency compute / step (published
                    # rows' sense); the speed-up scales with it
                    eff = compute(b) / terms["step_s"]
                    low = speedup * max(eff - q90, 0.0) / eff if n > 1 else 1.0
                    high = speedup * min(eff - q10, 1.0) / eff if n > 1 else 1.0
                    losses = {
                        "fixed per-step compute": compute(b) - t1 / n,
                        "all-reduce": terms["exposed_s"],
                        "sync": terms["sync_s"],
                        "host": terms["host_s"],
                    }
                    rows.append(
                        {
                            "model": model,
                            "compute": measured_by,
                            "link": link,
                            "global_batch": global_batch,
                            "devices": n,
                            "per_gpu_batch": b,
                            "step_ms": terms["step_s"] * 1e3,
                            "speedup": speedup,
                            "low": low,
                            "high": high,
                            "allreduce_ms": terms["allreduce_s"] * 1e3,
                            "exposed_ms": terms["exposed_s"] * 1e3,
                            "term": "–" if n == 1 else max(losses, key=losses.get),
                            "verdict": "–" if n == 1 else verdict(low, high),
                        }
                    )
    return rows


def busi_markdown(rows: list[dict], params: ModelParams = SHIPPED) -> str:
    q10, q90, key = params.interval(BUSI_GROUP)
    lines = [
        "# Would more GPUs train BUSI faster? (scaling model, out-of-sample intervals)",
        "",
        __doc__.split("\n\n", 1)[1].strip(),
        "",
        "Interval: 10th and 90th percentiles of the model's out-of-sample efficiency errors "
        f"on the published rows ({key}; leaving each source document out and each GPU "
        f"generation out, pooled): q10 {q10 * 100:+.1f}, q90 {q90 * 100:+.1f} points. Links: "
        + "; ".join(
            f"{name}: {presets.interconnect(name).note}"
            for name in dict.fromkeys(r["link"] for r in rows)
        ),
        "",
        "| model | link | global batch | GPUs | per-GPU batch | step ms | speed-up vs 1 GPU "
        "[80% interval] | all-reduce ms (exposed) | deciding term | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        interval = "" if r["devices"] == 1 else f" [{r['low']:.2f}, {r['high']:.2f}]"
        lines.append(
            f"| {r['model']} | {r['link']} | {r['global_batch']} | {r['devices']} | "
            f"{r['per_gpu_batch']} | {r['step_ms']:.2f} | {r['speedup']:.2f}{interval} | "
            f"{r['allreduce_ms']:.2f} ({r['exposed_ms']:.2f}) | {r['term']} | {r['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def write_busi_question(out, links=None) -> str:
    out = pathlib.Path(out)
    text = busi_markdown(busi_rows(links or LINKS))
    out.mkdir(parents=True, exist_ok=True)
    (out / "busi_question.md").write_text(text)
    return text
