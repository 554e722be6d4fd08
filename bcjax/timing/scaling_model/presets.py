"""Every number the scaling model uses that is not a measurement of the run itself.

Each preset names its source: the shared ``hardware_facts.csv`` / ``allreduce_busbw.csv``
(NCCL maintainers' statements and NCCL's own tuning-model constants), a framework's
documented default, or a stated assumption. The fitted quantities (``SYNC_CV``,
``NODE_SYNC_CV``, ``HOST_CONTENTION`` and ``INPUT_CEILINGS``) say how and on what they were
fitted; see ``fitting.py``.
"""

from __future__ import annotations

import dataclasses
import re

# NCCL's tuning model (src/graph/tuning.cc @5067397c, shared hardware_facts.csv), protocol
# "Simple" of the Ring algorithm, the one used for large buffers: a collective costs a base
# latency plus one hardware latency per ring step; an all-reduce takes 2(N-1) steps.
NCCL_BASE_LATENCY = 8.4e-6
NCCL_HOP_LATENCY = {"nvlink": 3.4e-6, "pci": 5.7e-6, "net": 14.0e-6}
# NCCL's topology model (src/graph/topo.h): bandwidth per NVLink link by GPU generation
# (GB/s, already the effective figure: 20 for A100 against a 25 GB/s line rate).
NCCL_NVLINK_GBPS = {"SM60": 18.0, "SM70": 20.0, "SM80": 20.0, "SM90": 20.6, "SM100": 40.1}
NCCL_PCI_GEN3_GBPS = 12.0  # PCI_BW, "PCI Gen3 x16"
NCCL_NET_GBPS_PER_100GBIT = 12.0  # NET_BW, "100Gbit"


@dataclasses.dataclass(frozen=True)
class Interconnect:
    """A machine's all-reduce fabric. Bandwidths are nccl-tests' bus bandwidth (bytes/s).

    Past ``gpus_per_node`` devices the ring crosses the hosts' network: it then runs at
    ``network_bus_bandwidth`` and those ring steps pay ``network_hop_latency``.
    """

    name: str
    bus_bandwidth: float
    hop_latency: float
    note: str
    base_latency: float = NCCL_BASE_LATENCY
    gpus_per_node: int = 8
    network_bus_bandwidth: float = NCCL_NET_GBPS_PER_100GBIT * 1e9
    network_hop_latency: float = NCCL_HOP_LATENCY["net"]


def _nvlink(name, links, generation, gpus_per_node, nics_100gbit, system, extra=""):
    gbps = links * NCCL_NVLINK_GBPS[generation]
    net = nics_100gbit * NCCL_NET_GBPS_PER_100GBIT
    note = (
        f"{system}: {links} NVLinks x NCCL's {generation} {NCCL_NVLINK_GBPS[generation]:g} GB/s "
        f"= {gbps:.0f} GB/s busbw{extra}; network {net:.0f} GB/s"
    )
    return Interconnect(
        name,
        gbps * 1e9,
        NCCL_HOP_LATENCY["nvlink"],
        note,
        gpus_per_node=gpus_per_node,
        network_bus_bandwidth=net * 1e9,
    )


def _pcie(name, factor, generation):
    gbps = NCCL_PCI_GEN3_GBPS * factor
    how = "NCCL's PCI_BW" if factor == 1 else f"{factor}x NCCL's Gen3 PCI_BW (stated assumption)"
    return Interconnect(
        name,
        gbps * 1e9,
        NCCL_HOP_LATENCY["pci"],
        f"PCIe {generation} x16, {gbps:.0f} GB/s busbw ({how}); one node of 8 "
        f"assumed, 100 Gb/s network",
    )


PRESETS = {
    "pcie3": _pcie("pcie3", 1, "3.0"),
    "pcie4": _pcie("pcie4", 2, "4.0"),
    "pcie5": _pcie("pcie5", 4, "5.0"),
    # Link counts per GPU are stated assumptions (P100 4, V100 6, A100 12, H100 and B200 18);
    # NIC counts: DGX-1 4x EDR (assumption), DGX-2H 8x EDR, DGX A100 8x HDR 200, DGX H100
    # 8x NDR 400 (hardware_facts.csv), B200 like H100 (assumption).
    "nvlink1-hybrid-cube-mesh": _nvlink(
        "nvlink1-hybrid-cube-mesh", 4, "SM60", 8, 4, "DGX-1 (P100)"
    ),
    "nvlink2-hybrid-cube-mesh": _nvlink(
        "nvlink2-hybrid-cube-mesh", 6, "SM70", 8, 4, "DGX-1 (V100)"
    ),
    "nvlink2-nvswitch": _nvlink("nvlink2-nvswitch", 6, "SM70", 16, 8, "DGX-2 (V100)"),
    "nvlink3-nvswitch": dataclasses.replace(
        _nvlink("nvlink3-nvswitch", 12, "SM80", 8, 16, "DGX A100"),
        bus_bandwidth=230e9,
        note="DGX A100: ~230 GB/s busbw, NCCL maintainer (allreduce_busbw.csv, nccl-tests #149; "
        "12 links x 20 GB/s less other GPU bottlenecks); network 8x HDR 200 = 192 GB/s",
    ),
    "nvlink4-nvswitch": dataclasses.replace(
        _nvlink("nvlink4-nvswitch", 18, "SM90", 8, 32, "DGX H100"),
        bus_bandwidth=370e9,
        note="DGX H100: ~370 GB/s ring busbw, NCCL maintainer (allreduce_busbw.csv, nccl-tests "
        "#212; = 18 links x NCCL's 20.6 GB/s); network 8x NDR 400 = 384 GB/s",
    ),
    "nvlink5-nvswitch": _nvlink(
        "nvlink5-nvswitch",
        18,
        "SM100",
        8,
        32,
        "B200 (NVLink 5)",
        " (no measured figure in shared/)",
    ),
    "ethernet-100g": Interconnect(
        "ethernet-100g",
        NCCL_NET_GBPS_PER_100GBIT * 1e9,
        NCCL_HOP_LATENCY["net"],
        "100 Gb/s network between hosts, NCCL's NET_BW 12 GB/s",
        gpus_per_node=1,
    ),
}
# The names ring_model used; kept so existing command lines and configs still work.
ALIASES = {
    "nvlink_a100": "nvlink3-nvswitch",
    "nvlink_h100": "nvlink4-nvswitch",
    "ethernet_100g": "ethernet-100g",
}
INTERCONNECTS = {**PRESETS, **{alias: PRESETS[name] for alias, name in ALIASES.items()}}


def interconnect(name_or_value) -> Interconnect:
    """A preset by name (or ring_model alias), or an Interconnect as is."""
    if isinstance(name_or_value, Interconnect):
        return name_or_value
    try:
        return INTERCONNECTS[name_or_value]
    except KeyError:
        raise ValueError(
            f"Unknown interconnect {name_or_value!r}; presets: {', '.join(PRESETS)}"
        ) from None


def with_bus_bandwidth(link: Interconnect | None, bus_bandwidth: float) -> Interconnect:
    """A measured bus bandwidth (e.g. the raw all-reduce of ``python -m bcjax.benchmark``)
    in place of a preset's; without a preset, NCCL's PCI latencies (the slower ones)."""
    if link is None:
        return Interconnect(
            f"measured {bus_bandwidth / 1e9:g} GB/s",
            bus_bandwidth,
            NCCL_HOP_LATENCY["pci"],
            "measured bus bandwidth, NCCL PCI latencies",
        )
    return dataclasses.replace(
        link,
        name=f"{link.name} @ {bus_bandwidth / 1e9:g} GB/s",
        bus_bandwidth=bus_bandwidth,
        note=f"measured {bus_bandwidth / 1e9:g} GB/s; {link.note}",
    )


# --------------------------------------------------------------- frameworks


@dataclasses.dataclass(frozen=True)
class Framework:
    name: str
    bucket_bytes: float  # gradients are all-reduced in buckets of about this size
    source: str


FRAMEWORKS = (
    Framework("pytorch", 25 * 2**20, "DistributedDataParallel bucket_cap_mb=25 (documented)"),
    Framework("horovod", 64 * 2**20, "Horovod fusion buffer, 64 MB default (docs/tensor-fusion)"),
    Framework("paddle", 32 * 2**20, "fleet DistributedStrategy fuse_grad_size_in_MB=32"),
    Framework("xla", 30 * 2**20, "XLA GPU all-reduce combine threshold, 30 MiB default"),
    Framework("mxnet", 25 * 2**20, "no fusion default documented for KVStore; 25 MB assumed"),
)
_FRAMEWORK_KEYWORDS = (
    ("pytorch", "pytorch"),
    ("torch", "pytorch"),
    ("horovod", "horovod"),
    ("tensorflow", "horovod"),
    ("paddle", "paddle"),
    ("mxnet", "mxnet"),
    ("jax", "xla"),
    ("flax", "xla"),
    ("xla", "xla"),
)


def framework(text: str) -> Framework:
    """The framework a free-text name means; DeepLearningExamples' TensorFlow runs use
    Horovod. Unknown names get PyTorch's 25 MB buckets (the smallest documented)."""
    low = (text or "").lower()
    by_name = {f.name: f for f in FRAMEWORKS}
    for keyword, name in _FRAMEWORK_KEYWORDS:
        if keyword in low:
            return by_name[name]
    return Framework("unknown", 25 * 2**20, "unrecognised framework: 25 MB buckets assumed")


# Backward ≈ 2x forward in FLOPs, so two thirds of a step's compute is backward: the
# window in which gradient buckets can be reduced (stated assumption).
BACKWARD_FRACTION = 2 / 3
# Gradients are all-reduced in fp32 (AMP keeps fp32 master weights), stated assumption.
GRADIENT_BYTES_PER_PARAM = 4
# Tables that do not print a per-GPU batch: DeepLearningExamples prints 64-512 elsewhere.
ASSUMED_BATCH_PER_GPU = 128


# --------------------------------------------------------------- data path and host


def loader_kind(data_source: str) -> str:
    """'synthetic', 'dali' (decoding on the GPU), or a CPU loader: 'tf.data', 'pytorch',
    'dali-cpu' or 'cpu' (any other, or an unrecognised text: the common default)."""
    low = (data_source or "").lower()
    if "synthetic" in low:
        return "synthetic"
    if "dali" in low:
        return "dali-cpu" if re.search(r"dali[- _]?cpu", low) else "dali"
    if "tf.data" in low:
        return "tf.data"
    if "pytorch" in low or "torch" in low:
        return "pytorch"
    return "cpu"


CPU_LOADERS = ("tf.data", "pytorch", "dali-cpu", "cpu")


def pipeline(framework_text: str, loader: str) -> str:
    """The input pipeline a row ran: the framework as printed, before any parenthesis, and
    the loader, e.g. 'tensorflow 2/tf.data'. The host CPU work per image is set by the
    framework's example pipeline (its augmentations), not by the loader library alone."""
    family = re.sub(r"\(.*", "", (framework_text or "").lower()).strip() or "unknown"
    return f"{family}/{loader}"


_HOSTS = (
    ("dgx-1", r"dgx-?1(?![0-9])"),
    ("dgx-2", r"dgx-?2"),
    ("dgx-a100", r"dgx[- ]?a100"),
    ("dgx-h100", r"dgx[- ]?h100"),
    ("dgx-b200", r"dgx[- ]?b200"),
)


def host_system(gpu_text: str) -> str | None:
    """The DGX system a ``gpu`` column names, e.g. 'A100-SXM4-80GB (DGX A100)'; None if none."""
    low = (gpu_text or "").lower()
    for name, pattern in _HOSTS:
        if re.search(pattern, low):
            return name
    return None


# --------------------------------------------------------------- inconsistent inputs

# A series' 1-GPU row is the model's measure of one GPU's compute. When another series of
# the same framework, model, GPU chip, precision, batch and loader ran more than PEER_GAP
# times faster on one GPU, the chip demonstrably computes that fast and the slow 1-GPU figure is
# not the compute its own multi-GPU rows ran at. In the shared tables same-chip 1-GPU
# rows agree within 1.14x (16 vs 32 GB, SXM2 vs SXM3, container versions); the pairs
# 1.34x and more apart are the ones whose sources print superlinear scaling.
PEER_GAP = 1.25


def gpu_chip(gpu_text: str) -> str:
    """The GPU chip a ``gpu`` column names: 'V100-SXM2-16GB (DGX-1)' -> 'V100'; the first
    word holding a digit, upper-cased (memory size and form factor do not change the chip)."""
    for word in re.split(r"[\s\-_(),/]+", gpu_text or ""):
        if (
            re.search(r"\d", word)
            and re.search(r"[A-Za-z]", word)
            and not word.lower().endswith("gb")
        ):
            return word.upper()
    return (gpu_text or "").strip().lower()


# --------------------------------------------------------------- fitted

# Fitted by `python -m bcjax.timing.scaling_model fit` on the declared subset: the rows of
# DeepLearningExamples' current tables (notes without "HISTORICAL") in the shared
# published_scaling.csv, 2026-11-30; held-out and leave-one-framework/source-out errors in
# BUILD_NOTES. Never tuned per row.
#
# SYNC_CV: coefficient of variation of one GPU's step time. A synchronous step ends when
# the slowest of N GPUs does, ~ (1 + cv * E[max of N standard normals]); fitted on the
# rows whose host decodes no images (DALI).
SYNC_CV = 0.024
# NODE_SYNC_CV: the same for a whole host, counted when a run spans several: each host's
# input pipeline, OS and network port add their own jitter, and the step waits for the
# slowest host ~ (1 + node_cv * E[max of nodes standard normals]).
NODE_SYNC_CV = 0.04
# HOST_CONTENTION: fraction of a step's compute lost when all of a host's GPUs train at once,
# by (pipeline, host): their processes' launch threads share the host's CPUs with the
# loader workers (scaled by (g - 1) / (G - 1) for g of G GPUs). Kept only where it cuts its
# group's error by >= 1 point; 0 elsewhere.
HOST_CONTENTION: dict[tuple[str, str], float] = {
    ("mxnet/dali", "dgx-2"): 0.0088,
    ("pytorch/pytorch", "dgx-1"): 0.008,
    ("tensorflow 1/tf.data", "dgx-2"): 0.0188,
    ("tensorflow 2/tf.data", "dgx-1"): 0.3032,
    ("tensorflow 2/tf.data", "dgx-a100"): 0.0244,
}
# Host input ceiling: images/s one host's data path delivers, by (pipeline, host) (see
# ``pipeline``); a pipeline never fitted on a host has no ceiling (the row says so).
INPUT_CEILINGS: dict[tuple[str, str], float] = {
    ("mxnet/dali", "dgx-2"): 21_484,
    ("paddlepaddle/dali", "dgx-a100"): 20_144,
    ("pytorch/pytorch", "dgx-1"): 8_056,
    ("pytorch/pytorch", "dgx-a100"): 16_621,
    ("tensorflow 1/tf.data", "dgx-1"): 9_510,
    ("tensorflow 1/tf.data", "dgx-2"): 17_250,
    ("tensorflow 1/tf.data", "dgx-a100"): 17_400,
    ("tensorflow 2/tf.data", "dgx-1"): 4_880,
    ("tensorflow 2/tf.data", "dgx-a100"): 20_647,
}
