"""An analytic estimate of data-parallel scaling on real multi-GPU machines.

Simulated CPU devices share one host's cores, so their timings cannot say how
N GPUs would scale. This model can: from the measured compute time of one
device and an interconnect's bus bandwidth, a ring all-reduce of the gradients
costs

    t_allreduce(N) = 2 (N-1)/N * gradient_bytes / bus_bandwidth + 2 (N-1) * hop_latency

(a reduce-scatter then an all-gather, each N-1 hops moving 1/N of the
buffer; "bus bandwidth" in the sense of nccl-tests, so the factor 2(N-1)/N is
the whole algorithm-to-bus conversion). A data-parallel step then takes

    t_step(N) = t_compute(per-device batch) + (1 - overlap) * t_allreduce(N)

where ``overlap`` is the fraction of the all-reduce hidden behind the backward
pass (XLA can start the reduction of late layers' gradients while early
layers still differentiate; 0 is the pessimistic bound).

Efficiency is measured against perfect scaling:
- same per-device batch (weak scaling): throughput(N) / (N * throughput(1))
  = t_step(1) / t_step(N);
- same global batch B (strong scaling): t_step(1, B) / (N * t_step(N, B/N)),
  where the smaller per-device batch also loses efficiency inside the
  device (fixed per-step costs), modelled by ``ComputeModel``.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Sequence


@dataclasses.dataclass(frozen=True)
class Interconnect:
    name: str
    bus_bandwidth: float  # bytes/s, per direction, as nccl-tests' busbw
    hop_latency: float  # seconds per ring hop
    note: str


# Stated assumptions (rounded public figures, not measured here):
# - PCIe 4.0 x16: 32 GB/s per direction raw, ~25 GB/s achievable busbw
#   between GPUs through the host bridge; ~10 us per hop.
# - PCIe 3.0 x16: 16 GB/s raw, ~12 GB/s achievable.
# - NVLink 3 (A100 SXM): 600 GB/s total = 300 GB/s per direction;
#   nccl-tests all-reduce busbw ~230 GB/s on 8x A100.
# - NVLink 4 (H100 SXM): 900 GB/s total = 450 GB/s per direction; ~3 us per hop.
# - 100 Gb/s Ethernet / InfiniBand EDR between hosts: 12.5 GB/s; ~5-10 us.
INTERCONNECTS = {
    "pcie3": Interconnect("pcie3", 12e9, 10e-6, "PCIe 3.0 x16, ~12 GB/s achievable (stated assumption)"),
    "pcie4": Interconnect("pcie4", 25e9, 10e-6, "PCIe 4.0 x16, ~25 GB/s achievable (stated assumption)"),
    "nvlink_a100": Interconnect("nvlink_a100", 230e9, 5e-6,
                                "NVLink 3 (A100 SXM), ~230 GB/s busbw (stated assumption)"),
    "nvlink_h100": Interconnect("nvlink_h100", 450e9, 3e-6,
                                "NVLink 4 (H100 SXM), 450 GB/s per direction (stated assumption)"),
    "ethernet_100g": Interconnect("ethernet_100g", 12.5e9, 8e-6,
                                  "100 Gb/s Ethernet/InfiniBand between hosts (stated assumption)"),
}


def interconnect(name_or_value) -> Interconnect:
    """A preset by name, or an Interconnect as is."""
    if isinstance(name_or_value, Interconnect):
        return name_or_value
    try:
        return INTERCONNECTS[name_or_value]
    except KeyError:
        raise ValueError(f"Unknown interconnect {name_or_value!r}; presets: "
                         f"{', '.join(INTERCONNECTS)}") from None


def ring_allreduce_time(num_bytes: float, n: int, bus_bandwidth: float,
                        hop_latency: float = 0.0) -> float:
    """Seconds for a ring all-reduce of ``num_bytes`` over ``n`` devices."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n == 1:
        return 0.0
    return 2 * (n - 1) / n * num_bytes / bus_bandwidth + 2 * (n - 1) * hop_latency


@dataclasses.dataclass(frozen=True)
class ComputeModel:
    """Per-device compute time as ``fixed + per_example * batch``.

    ``fixed`` holds what a step costs whatever its batch (kernel launches,
    optimizer update over all parameters, host round trip); it is what makes
    small per-device batches inefficient.
    """
    fixed: float
    per_example: float

    def __call__(self, batch: float) -> float:
        return self.fixed + self.per_example * batch

    @classmethod
    def proportional(cls, time_s: float, batch: int) -> "ComputeModel":
        """Only one measurement: assume no fixed cost (optimistic for small batches)."""
        return cls(0.0, time_s / batch)

    @classmethod
    def fit(cls, points: Iterable[tuple[int, float]]) -> "ComputeModel":
        """Least-squares line through (batch, seconds) points; one point
        falls back to ``proportional``. Negative intercepts are clipped to 0."""
        pts = sorted((float(b), float(t)) for b, t in points)
        if not pts:
            raise ValueError("ComputeModel.fit needs at least one (batch, time) point")
        if len({b for b, _ in pts}) == 1:
            b, t = pts[0]
            return cls.proportional(t, b)
        n = len(pts)
        mb = sum(b for b, _ in pts) / n
        mt = sum(t for _, t in pts) / n
        slope = sum((b - mb) * (t - mt) for b, t in pts) / sum((b - mb) ** 2 for b, _ in pts)
        fixed = mt - slope * mb
        if fixed < 0:
            return cls(0.0, mt / mb)
        return cls(fixed, max(slope, 0.0))


def predict(compute_s: float, gradient_bytes: float, n: int, link, *,
            overlap: float = 0.0, per_device_batch: Optional[int] = None,
            single_device_step_s: Optional[float] = None,
            global_batch_scaling: bool = False) -> dict:
    """One row of the model.

    Args:
      compute_s: per-device compute time of one step at this N's per-device batch.
      gradient_bytes: bytes all-reduced per step (fp32 gradients).
      n: devices.
      link: an Interconnect or a preset name.
      overlap: fraction of the all-reduce hidden behind compute (0..1).
      per_device_batch: to report images/s.
      single_device_step_s: step time of the 1-device reference (defaults to
        ``compute_s``, the same-per-device-batch reference).
      global_batch_scaling: True when the global batch is fixed (strong
        scaling): efficiency = t1 / (N t_N); otherwise t1 / t_N.
    """
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must be in [0, 1], got {overlap}")
    link = interconnect(link)
    allreduce = ring_allreduce_time(gradient_bytes, n, link.bus_bandwidth, link.hop_latency)
    step = compute_s + (1.0 - overlap) * allreduce
    t1 = compute_s if single_device_step_s is None else single_device_step_s
    if global_batch_scaling:
        speedup = t1 / step
    else:
        speedup = n * t1 / step
    row = {
        "devices": n,
        "interconnect": link.name,
        "compute_s": compute_s,
        "allreduce_s": allreduce,
        "exposed_collective_s": (1.0 - overlap) * allreduce,
        "step_s": step,
        "speedup": speedup,
        "efficiency": speedup / n,
        "overlap": overlap,
    }
    if per_device_batch is not None:
        row["per_device_batch"] = per_device_batch
        row["images_per_s"] = n * per_device_batch / step
    return row


def table(compute: ComputeModel, gradient_bytes: float, *,
          devices: Sequence[int] = (1, 2, 4, 8),
          per_device_batches: Sequence[int] = (8, 32, 128),
          link="pcie4", overlap: float = 0.0) -> list[dict]:
    """Weak-scaling rows (same per-device batch) for each batch and N."""
    rows = []
    for b in per_device_batches:
        t1 = compute(b)
        for n in devices:
            rows.append(predict(t1, gradient_bytes, n, link, overlap=overlap,
                                per_device_batch=b, single_device_step_s=t1))
    return rows


def strong_scaling_table(compute: ComputeModel, gradient_bytes: float, global_batch: int, *,
                         devices: Sequence[int] = (1, 2, 4, 8), link="pcie4",
                         overlap: float = 0.0) -> list[dict]:
    """Rows for a fixed global batch split over N devices (the study's setting)."""
    t1 = compute(global_batch)
    rows = []
    for n in devices:
        if global_batch % n:
            continue
        b = global_batch // n
        rows.append(predict(compute(b), gradient_bytes, n, link, overlap=overlap,
                            per_device_batch=b, single_device_step_s=t1,
                            global_batch_scaling=True))
    return rows


def batch_for_efficiency(compute: ComputeModel, gradient_bytes: float, n: int, target: float,
                         *, link="pcie4", overlap: float = 0.0,
                         max_batch: int = 4096) -> Optional[int]:
    """Smallest per-device batch (power of two) whose weak-scaling efficiency
    at ``n`` devices reaches ``target``; None if none up to ``max_batch``."""
    b = 1
    while b <= max_batch:
        t1 = compute(b)
        if predict(t1, gradient_bytes, n, link, overlap=overlap)["efficiency"] >= target:
            return b
        b *= 2
    return None


def format_markdown(rows: Sequence[dict]) -> str:
    head = ("| devices | per-device batch | compute ms | all-reduce ms | step ms | img/s | speedup "
            "| efficiency |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['devices']} | {r.get('per_device_batch', '–')} | {r['compute_s'] * 1e3:.2f} | "
            f"{r['allreduce_s'] * 1e3:.2f} | {r['step_s'] * 1e3:.2f} | "
            f"{r.get('images_per_s', float('nan')):,.0f} | {r['speedup']:.2f} | {r['efficiency']:.0%} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    """``python -m bcjax.timing.ring_model --grad-mb 44.7 --fixed-ms 1.66 --per-image-ms 0.057``

    Weak scaling for each ``--batches`` (per device); with ``--global-batch``
    also the study's setting, a fixed global batch split over the devices.
    """
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    p.add_argument("--grad-mb", type=float, required=True, help="gradient size in MB (1e6 bytes)")
    p.add_argument("--fixed-ms", type=float, default=0.0, help="per-step compute cost at any batch")
    p.add_argument("--per-image-ms", type=float, required=True)
    p.add_argument("--link", default="pcie4,nvlink_h100", help=f"presets: {', '.join(INTERCONNECTS)}")
    p.add_argument("--overlap", type=float, default=0.0)
    p.add_argument("--devices", default="1,2,4,8")
    p.add_argument("--batches", default="8,32,128")
    p.add_argument("--global-batch", default="", help="fixed global batches, comma separated")
    a = p.parse_args(argv)
    model = ComputeModel(a.fixed_ms * 1e-3, a.per_image_ms * 1e-3)
    devices = [int(x) for x in a.devices.split(",")]
    for link in a.link.split(","):
        note = interconnect(link).note
        rows = table(model, a.grad_mb * 1e6, devices=devices,
                     per_device_batches=[int(x) for x in a.batches.split(",")], link=link,
                     overlap=a.overlap)
        print(f"\nSame per-device batch; {note}; overlap {a.overlap:.0%}")
        print(format_markdown(rows))
        for g in [int(x) for x in a.global_batch.split(",") if x]:
            print(f"\nGlobal batch {g} split over the devices; {note}; overlap {a.overlap:.0%}")
            print(format_markdown(strong_scaling_table(model, a.grad_mb * 1e6, g, devices=devices,
                                                       link=link, overlap=a.overlap)))
        need = batch_for_efficiency(model, a.grad_mb * 1e6, max(devices), 0.9, link=link,
                                    overlap=a.overlap)
        print(f"\n90% efficiency at {max(devices)} devices needs a per-device batch of "
              f"{need if need else 'more than 4096'} (powers of two).")


if __name__ == "__main__":
    main()
