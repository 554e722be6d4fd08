"""The terms of a data-parallel step on N GPUs, each a small pure function.

A step on N devices takes

    t_step(N) = t_compute + t_exposed_allreduce(N) + t_sync(N)

- all-reduce: the gradients go in buckets; each bucket is one NCCL ring all-reduce costing
  base latency + 2(N-1) hop latencies + 2(N-1)/N * bucket bytes / bus bandwidth;
- overlap: a bucket can start once the backward pass has produced it (buckets fill evenly
  through the backward, which is ``BACKWARD_FRACTION`` of the compute); only what is still
  running when the backward ends is exposed;
- sync: the step ends when the slowest device does: t_sync = cv * E[max of N normals] * t_compute,
  plus, past one host, the slowest host's own jitter (its input pipeline, OS, network):
  node_cv * E[max of `nodes` normals] * t_compute;
- host contention: the GPUs of one host share its CPUs (each training process's launch
  thread against the loader workers), so a step loses a fraction of its compute that grows
  with the GPUs in use on the host: contention * (g - 1) / (G - 1) * t_compute for g of
  the host's G GPUs (published rows scale it by ``presets.contention_factor``: none for
  synthetic input; for images decoded on the host's CPUs by a loader that spreads over them,
  the reference host's cores a GPU over theirs);

and the throughput is capped by the hosts' input pipeline, ``nodes * input_ceiling`` images/s.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Sequence

from bcjax.timing.scaling_model.fitted import SHIPPED
from bcjax.timing.scaling_model.presets import (
    BACKWARD_FRACTION,
    SCHEMES,
    Interconnect,
    interconnect,
)

# bcjax itself runs on JAX: XLA's all-reduce combine threshold.
DEFAULT_BUCKET_BYTES = SCHEMES["xla"].bucket_bytes
SYNC_CV = SHIPPED.sync_cv
NODE_SYNC_CV = SHIPPED.node_sync_cv


def ring_allreduce_time(
    num_bytes: float, n: int, bus_bandwidth: float, hop_latency: float = 0.0
) -> float:
    """Seconds for one ring all-reduce of ``num_bytes`` over ``n`` devices (no base latency)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n == 1:
        return 0.0
    return 2 * (n - 1) / n * num_bytes / bus_bandwidth + 2 * (n - 1) * hop_latency


def bucket_sizes(num_bytes: float, bucket_bytes: float | None) -> list[float]:
    """Full buckets then the remainder; None = one bucket holding everything."""
    if not bucket_bytes or num_bytes <= bucket_bytes:
        return [float(num_bytes)]
    full = int(num_bytes // bucket_bytes)
    rest = num_bytes - full * bucket_bytes
    return [float(bucket_bytes)] * full + ([rest] if rest > 0 else [])


def allreduce_cost(n: int, link):
    """seconds(bytes) of one NCCL ring all-reduce call on ``n`` devices. Past one node the
    ring's bandwidth is the network's, and 2(nodes-1) of its 2(N-1) steps pay the network's
    latency (NCCL's model)."""
    link = interconnect(link)
    if n == 1:
        return lambda nbytes: 0.0
    nodes = host_count(n, link.gpus_per_node)
    bandwidth = (
        link.bus_bandwidth if nodes == 1 else min(link.bus_bandwidth, link.network_bus_bandwidth)
    )
    net_steps = 2 * (nodes - 1)
    latency = (
        link.base_latency
        + (2 * (n - 1) - net_steps) * link.hop_latency
        + net_steps * link.network_hop_latency
    )
    return lambda nbytes: latency + ring_allreduce_time(nbytes, n, bandwidth)


def bucket_costs(num_bytes: float, n: int, link, bucket_bytes: float | None = None) -> list[float]:
    """Seconds of each bucket's all-reduce (``allreduce_cost`` per bucket)."""
    cost = allreduce_cost(n, link)
    return [cost(b) for b in bucket_sizes(num_bytes, bucket_bytes)]


def exposed_allreduce(costs: Sequence[float], backward_s: float) -> float:
    """Seconds of all-reduce left after the backward pass ends. Bucket k is ready at
    (k+1)/K of the backward (the last one, the first layers, at its very end) and the
    buckets share one link, one after the other."""
    t = 0.0
    for k, cost in enumerate(costs):
        ready = backward_s * (k + 1) / len(costs)
        t = max(t, ready) + cost
    return max(0.0, t - backward_s)


@functools.cache
def expected_max_normal(n: int) -> float:
    """E[max of n independent standard normals]: 0 for 1, 1/sqrt(pi) for 2, ~1.42 for 8."""
    if n <= 1:
        return 0.0
    # integral of x * n * pdf(x) * cdf(x)^(n-1) over [-10, 10], trapezoid, step 1e-3
    h, total = 1e-3, 0.0
    for i in range(20001):
        x = -10.0 + i * h
        pdf = math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + math.erf(x / math.sqrt(2)))
        weight = 0.5 if i in (0, 20000) else 1.0
        total += weight * x * n * pdf * cdf ** (n - 1)
    return total * h


def step_time(
    compute_s: float,
    gradient_bytes: float,
    n: int,
    link,
    *,
    bucket_bytes: float | None = DEFAULT_BUCKET_BYTES,
    overlap: float | None = None,
    backward_fraction: float = BACKWARD_FRACTION,
    sync_cv: float = SYNC_CV,
    node_sync_cv: float = NODE_SYNC_CV,
    host_contention: float = 0.0,
    exposed_s: float | None = None,
) -> dict:
    """One device's step on ``n`` devices, by term (seconds).

    ``overlap`` None: the bucket schedule against the backward pass decides what is exposed;
    a number in [0, 1]: that fraction of the all-reduce is hidden (ring_model's knob).
    ``node_sync_cv`` counts only when the ``n`` devices span more than one of ``link``'s hosts.
    ``host_contention``: the fraction of compute lost when all of a host's GPUs are in use.
    ``exposed_s``: the exposed communication when the caller scheduled it layer by layer
    (``schedule``); otherwise the even-bucket schedule below decides.
    """
    link = interconnect(link)
    if overlap is not None and not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must be in [0, 1] or None, got {overlap}")
    costs = bucket_costs(gradient_bytes, n, link, bucket_bytes)
    allreduce = sum(costs)
    if exposed_s is not None:
        exposed = exposed_s
    elif overlap is None:
        exposed = exposed_allreduce(costs, backward_fraction * compute_s)
    else:
        exposed = (1.0 - overlap) * allreduce
    nodes = host_count(n, link.gpus_per_node)
    sync = (
        sync_cv * expected_max_normal(n) + node_sync_cv * expected_max_normal(nodes)
    ) * compute_s
    contention = host_contention * host_share(n, link.gpus_per_node) * compute_s
    return {
        "compute_s": compute_s,
        "allreduce_s": allreduce,
        "exposed_collective_s": exposed,
        "sync_s": sync,
        "contention_s": contention,
        "step_s": compute_s + exposed + sync + contention,
    }


def host_count(n: int, gpus_per_node: int) -> int:
    """Hosts a run of n devices spans, gpus_per_node to a host."""
    return math.ceil(n / gpus_per_node)


def host_share(n: int, gpus_per_node: int) -> float:
    """(g - 1) / (G - 1): how much of a host's GPUs beyond the first a run of n uses."""
    used = min(n, gpus_per_node)
    return (used - 1) / (gpus_per_node - 1) if gpus_per_node > 1 else 0.0


def limit_of(row: dict, efficiency: float, input_bound: bool) -> str:
    """What keeps the step from linear scaling: the input pipeline when it caps the
    throughput, else the largest of the all-reduce, sync and host-contention losses;
    'compute' when together they cost under 1% (nothing but the work itself)."""
    if input_bound:
        return "input"
    losses = {
        "all-reduce": row["exposed_collective_s"],
        "sync": row["sync_s"],
        "host": row.get("contention_s", 0.0),
    }
    if efficiency >= 0.99 or sum(losses.values()) < 0.01 * row["step_s"]:
        return "compute"
    return max(losses, key=losses.get)


def weak_scaling(
    images_per_s_1: float,
    batch_per_device: float,
    gradient_bytes: float,
    n: int,
    link,
    *,
    input_ceiling: float | None = None,
    **step_kw,
) -> dict:
    """A published-table row: same per-device batch on n devices, from the series' own
    measured 1-device throughput (never another series'). ``input_ceiling``: images/s one
    host's data path delivers, when the caller knows it."""
    link = interconnect(link)
    row = step_time(batch_per_device / images_per_s_1, gradient_bytes, n, link, **step_kw)
    images_per_s = min(n * images_per_s_1, n * batch_per_device / row["step_s"])
    nodes = host_count(n, link.gpus_per_node)
    input_bound = input_ceiling is not None and nodes * input_ceiling < images_per_s
    if input_bound:
        images_per_s = nodes * input_ceiling
        row["step_s"] = n * batch_per_device / images_per_s  # the devices wait for input
    efficiency = images_per_s / (n * images_per_s_1)
    row.update(
        devices=n,
        images_per_s=images_per_s,
        efficiency=efficiency,
        limit=limit_of(row, efficiency, input_bound),
    )
    return row


# ------------------------------------------------------------ ring_model's API


@dataclasses.dataclass(frozen=True)
class ComputeModel:
    """Per-device compute time as ``fixed + per_example * batch``.

    ``fixed`` holds what a step costs whatever its batch (kernel launches, optimizer update
    over all parameters, host round trip); it is what makes small per-device batches
    inefficient.
    """

    fixed: float
    per_example: float

    def __call__(self, batch: float) -> float:
        return self.fixed + self.per_example * batch

    @classmethod
    def proportional(cls, time_s: float, batch: int) -> ComputeModel:
        """Only one measurement: assume no fixed cost (optimistic for small batches)."""
        return cls(0.0, time_s / batch)

    @classmethod
    def fit(cls, points: Iterable[tuple[int, float]]) -> ComputeModel:
        """Least-squares line through (batch, seconds) points; one point falls back to
        ``proportional``. Negative intercepts are clipped to 0."""
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


def predict(
    compute_s: float,
    gradient_bytes: float,
    n: int,
    link,
    *,
    overlap: float | None = None,
    per_device_batch: int | None = None,
    single_device_step_s: float | None = None,
    global_batch_scaling: bool = False,
    bucket_bytes: float | None = DEFAULT_BUCKET_BYTES,
    sync_cv: float = SYNC_CV,
    node_sync_cv: float = NODE_SYNC_CV,
    input_images_per_s: float | None = None,
) -> dict:
    """One row of the model (ring_model's signature; the new terms are keywords).

    Args:
      compute_s: per-device compute time of one step at this N's per-device batch.
      gradient_bytes: bytes all-reduced per step (fp32 gradients).
      n: devices.
      link: an Interconnect or a preset name.
      overlap: None = buckets overlap the backward pass as scheduled; a fraction in [0, 1]
        = that share of the all-reduce hidden (0 is the pessimistic bound).
      per_device_batch: to report images/s (and needed for ``input_images_per_s``).
      single_device_step_s: step time of the 1-device reference (defaults to ``compute_s``).
      global_batch_scaling: True when the global batch is fixed (strong scaling):
        efficiency = t1 / (N t_N); otherwise t1 / t_N.
      bucket_bytes: gradient bucket size (XLA's 30 MiB by default; None = one bucket).
      sync_cv: spread of one device's step time (the straggler term; 0 turns it off).
      node_sync_cv: spread of one host's step time, counted past one host.
      input_images_per_s: images/s the host's input pipeline delivers (None = no cap).
    """
    link = interconnect(link)
    row = step_time(
        compute_s,
        gradient_bytes,
        n,
        link,
        bucket_bytes=bucket_bytes,
        overlap=overlap,
        sync_cv=sync_cv,
        node_sync_cv=node_sync_cv,
    )
    step = row["step_s"]
    input_bound = False
    if input_images_per_s is not None and per_device_batch:
        input_step = n * per_device_batch / input_images_per_s
        input_bound = input_step > step
        step = max(step, input_step)
    t1 = compute_s if single_device_step_s is None else single_device_step_s
    speedup = t1 / step if global_batch_scaling else n * t1 / step
    row.update(
        devices=n,
        interconnect=link.name,
        step_s=step,
        speedup=speedup,
        efficiency=speedup / n,
        overlap=overlap,
    )
    row["limit"] = limit_of(row, speedup / n, input_bound)
    if per_device_batch is not None:
        row["per_device_batch"] = per_device_batch
        row["images_per_s"] = n * per_device_batch / step
    return row


def table(
    compute: ComputeModel,
    gradient_bytes: float,
    *,
    devices: Sequence[int] = (1, 2, 4, 8),
    per_device_batches: Sequence[int] = (8, 32, 128),
    link="pcie4",
    overlap: float | None = None,
    **kw,
) -> list[dict]:
    """Weak-scaling rows (same per-device batch) for each batch and N."""
    rows = []
    for b in per_device_batches:
        t1 = compute(b)
        for n in devices:
            rows.append(
                predict(
                    t1,
                    gradient_bytes,
                    n,
                    link,
                    overlap=overlap,
                    per_device_batch=b,
                    single_device_step_s=t1,
                    **kw,
                )
            )
    return rows


def strong_scaling_table(
    compute: ComputeModel,
    gradient_bytes: float,
    global_batch: int,
    *,
    devices: Sequence[int] = (1, 2, 4, 8),
    link="pcie4",
    overlap: float | None = None,
    **kw,
) -> list[dict]:
    """Rows for a fixed global batch split over N devices (the study's setting)."""
    t1 = compute(global_batch)
    rows = []
    for n in devices:
        if global_batch % n:
            continue
        b = global_batch // n
        rows.append(
            predict(
                compute(b),
                gradient_bytes,
                n,
                link,
                overlap=overlap,
                per_device_batch=b,
                single_device_step_s=t1,
                global_batch_scaling=True,
                **kw,
            )
        )
    return rows


def batch_for_efficiency(
    compute: ComputeModel,
    gradient_bytes: float,
    n: int,
    target: float,
    *,
    link="pcie4",
    overlap: float | None = None,
    max_batch: int = 4096,
    **kw,
) -> int | None:
    """Smallest per-device batch (power of two) whose weak-scaling efficiency at ``n``
    devices reaches ``target``; None if none up to ``max_batch``."""
    b = 1
    while b <= max_batch:
        if (
            predict(compute(b), gradient_bytes, n, link, overlap=overlap, **kw)["efficiency"]
            >= target
        ):
            return b
        b *= 2
    return None


def format_markdown(rows: Sequence[dict]) -> str:
    head = (
        "| devices | per-device batch | compute ms | all-reduce ms | exposed ms | sync ms "
        "| step ms | img/s | speedup | efficiency | limit |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['devices']} | {r.get('per_device_batch', '–')} | {r['compute_s'] * 1e3:.2f} | "
            f"{r['allreduce_s'] * 1e3:.2f} | {r['exposed_collective_s'] * 1e3:.2f} | "
            f"{r['sync_s'] * 1e3:.2f} | {r['step_s'] * 1e3:.2f} | "
            f"{r.get('images_per_s', float('nan')):,.0f} | {r['speedup']:.2f} | "
            f"{r['efficiency']:.0%} | {r['limit']} |"
        )
    return "\n".join(lines)


__all__ = [
    "Interconnect",
    "ComputeModel",
    "ring_allreduce_time",
    "bucket_sizes",
    "allreduce_cost",
    "bucket_costs",
    "exposed_allreduce",
    "expected_max_normal",
    "step_time",
    "weak_scaling",
    "predict",
    "table",
    "strong_scaling_table",
    "batch_for_efficiency",
    "format_markdown",
]
