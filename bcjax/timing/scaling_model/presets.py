"""Every number the scaling model uses that is not a measurement of the run itself.

Each preset names its source: NCCL's own tuning-model constants and its maintainers'
statements (copied in ``tests/data/hardware_facts.csv`` and ``allreduce_busbw.csv``), public
NCCL issues for 2016-2017 NCCL 1.x bandwidths, a framework's documented default, or a stated
assumption. The fitted quantities live in ``fitted.json`` (written by ``python -m
bcjax.timing.scaling_model fit``; see ``fitting.py``): every one is attached to a property a
new row can have (framework family, input kind, precision), never to one machine.
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
    # A consumer box: 2 GPUs on PCIe, no P2P (the BUSI question's setting).
    "pcie3-2gpu-nop2p": Interconnect(
        "pcie3-2gpu-nop2p",
        5e9,
        NCCL_HOP_LATENCY["pci"],
        "2 GPUs on PCIe 3.0 without P2P: 5 GB/s busbw through host shared memory (NVIDIA NCCL "
        "2.3 blog); a host of 2 GPUs",
        gpus_per_node=2,
    ),
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
    # PCIe without peer-to-peer (GeForce cards, or P2P disabled): NCCL goes through host
    # shared memory, "which will limit the bandwidth to 5GB/s" (NVIDIA blog "Scaling Deep
    # Learning Training with NCCL", NCCL 2.3, PCIe 3 era); PCIe 4 taken as twice that
    # (stated assumption).
    "pcie3-nop2p": dataclasses.replace(
        _pcie("pcie3-nop2p", 5 / 12, "3.0"),
        note="PCIe 3.0 without P2P, 5 GB/s busbw through host shared memory (NVIDIA NCCL 2.3 "
        "blog); one node of 8 assumed",
    ),
    # Users' p2pBandwidthLatencyTest runs with P2P disabled (copies staged through host memory)
    # on PCIe 4.0 GeForce hosts span the 10 GB/s: 6.3 GB/s one way between 2 RTX 4090s
    # (tinygrad/open-gpu-kernel-modules #44), 6.1-8.6 GB/s both ways on an 8x RTX 3090 server
    # (NVIDIA/nccl #1127), 25.8 GB/s both ways on 3 RTX 4090s (tinygrad/open-gpu-kernel-modules
    # #6): the host decides; the value stays the stated one.
    "pcie4-nop2p": dataclasses.replace(
        _pcie("pcie4-nop2p", 10 / 12, "4.0"),
        note="PCIe 4.0 without P2P, 10 GB/s busbw (2x the NCCL blog's 5 GB/s through shared "
        "memory, stated assumption; users' staged-copy tests on GeForce hosts 6-26 GB/s); one "
        "node of 8 assumed",
    ),
    "pcie5-nop2p": dataclasses.replace(
        _pcie("pcie5-nop2p", 20 / 12, "5.0"),
        note="PCIe 5.0 without P2P, 20 GB/s busbw (4x the NCCL blog's 5 GB/s through shared "
        "memory, stated assumption; 8 GeForce RTX 5090s reached 28 GB/s with tuning, "
        "NVIDIA/nccl issue #1639); one node of 8 assumed",
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


# --------------------------------------------------------------- 2017-era NCCL (1.x)

# TensorFlow 1.1's `replicated` mode (tf_cnn_benchmarks, May 2017) called NCCL 1.x through
# tf.contrib.nccl, one all-reduce per gradient tensor. NCCL 1.x built a single ring, far
# from NCCL 2's several rings over every link (GPU generation decides the era: Kepler,
# Maxwell and Pascal rows run these):
# - PCIe: NVIDIA/nccl issue #44 (2016-08-24), NCCL 1's all_reduce_test on 8 GPUs behind two
#   PCIe Gen3 switches: 11.3 GB/s busbw on 2 GPUs, 8.2 GB/s on 8. K80 boards carry two GPUs
#   behind one on-board PCIe switch, so 8 GB/s is taken for K80 rings.
# - NVLink (P100 DGX-1): one ring over one NVLink per hop, NCCL's own SM60 per-link figure
#   (topo.h, 18 GB/s; the 4-link preset is NCCL 2's). A user of NCCL 1.x on an NVLink
#   machine reported "less than 10 GB/s" (NVIDIA/nccl issue #76, 2017-11), a lower bound.
NCCL1_BUS_BANDWIDTH = {"pci": 8e9, "nvlink": NCCL_NVLINK_GBPS["SM60"] * 1e9}
NCCL1_SOURCE = {
    "pci": "NCCL 1.x on PCIe Gen3 switches, 8 GB/s busbw at 8 GPUs (NVIDIA/nccl issue #44)",
    "nvlink": "NCCL 1.x, one ring over one NVLink: NCCL's SM60 18 GB/s per link (topo.h)",
}
NCCL1_GENERATIONS = ("kepler", "maxwell", "pascal")
# NCCL 1.x (the open-source library TensorFlow 1.x built into tf.contrib.nccl) chains its
# one ring in the order of the devices it is given: the search for rings over the NVLink
# topology came with NCCL 2 (and NVIDIA's NVLink-optimised NCCL 1 build only shipped inside
# the DGX containers, NVIDIA/nccl issue #76). DGX-1's hybrid cube-mesh joins GPUs 0-3 and
# 4-7 as two fully NVLinked quads with cross links 0-4, 1-5, 2-6 and 3-7 only (NVIDIA DGX-1
# system architecture white paper), the quads under different CPU sockets: a ring of up to
# 4 GPUs in device order stays on NVLink, one of 5-8 has hops (3->4, 7->0) without a link,
# which go over PCIe between the sockets' PCIe trees, and the ring runs at NCCL 1.x's PCIe
# figure.
NCCL1_NVLINK_RING_GPUS = 4


def nccl1_link(link: Interconnect, n: int = 2) -> Interconnect:
    """The same fabric at 2017 NCCL 1.x's bandwidth for a ring of ``n`` GPUs in device order:
    NVLink (by its hop latency) up to ``NCCL1_NVLINK_RING_GPUS`` GPUs, PCIe past them."""
    kind = "nvlink" if link.hop_latency == NCCL_HOP_LATENCY["nvlink"] else "pci"
    note = NCCL1_SOURCE[kind]
    if kind == "nvlink" and n > NCCL1_NVLINK_RING_GPUS:
        kind = "pci"
        note = (
            f"NCCL 1.x ring in device order over {n} GPUs of a hybrid cube-mesh: hops without "
            f"NVLink between the two quads, at PCIe speed ({NCCL1_SOURCE['pci']})"
        )
    return dataclasses.replace(
        link,
        name=f"{link.name} (NCCL 1.x)",
        bus_bandwidth=min(link.bus_bandwidth, NCCL1_BUS_BANDWIDTH[kind]),
        note=note,
    )


# The host side of a parameter server: each GPU pushes its gradients to the CPU's memory and
# pulls the updated variables back over its own PCIe Gen3 x16 link (NCCL's PCI_BW, 12 GB/s),
# and two GPUs share one upstream link (a K80 board's two GPUs; DGX-1's PCIe switches hold
# two P100s each): 6 GB/s per GPU, stated assumption.
PS_BYTES_PER_S_PER_GPU = NCCL_PCI_GEN3_GBPS * 1e9 / 2
# Between hosts a parameter server goes over the instances' network: AWS p2.8xlarge has a
# 10 Gb/s network (AWS instance type table), 1.25 GB/s; stated for any multi-node PS row.
PS_NETWORK_BYTES_PER_S = 1.25e9
# Synchronous parameter servers spread over the hosts (tf_cnn_benchmarks
# distributed_replicated, a PS shard on every worker): a variable is updated once every host
# has pushed its (host-aggregated) gradient shard, and only then pulled back. Each host's NIC
# carries, per direction, its pushes to the other hosts' shards plus the other hosts' pulls
# of its own shard: 2 (H - 1) / H of the gradient bytes. Push, update and pull are taken to
# follow one another after the backward pass, not overlapped with it (stated assumption,
# the same barrier as TF1 `replicated`; the overlapped alternative is in ablation.md).
PS_NETWORK_OVERLAPS = False
# On each GPU's own PCIe link, the push (gradients to the CPU's memory) is not overlapped with
# the backward pass either: TF 1.x's GPU-to-CPU copy makes its device-to-host stream wait for
# everything queued on the GPU's compute stream so far, not for the gradient's producer alone
# (tensorflow/core/common_runtime/gpu/gpu_util.cc, GPUUtil::CopyGPUTensorToCPU: "Wait for the
# sender's main stream to make sure the data are available", ThenWaitFor(send_stream)). How
# much that is depends on how far the executor's threads have queued the backward ahead of the
# GPU when the copy is issued, anything from the producer to the rest of the backward; taken as
# all of it (stated assumption, the bound, as session 9 read NcclManager's
# ThenWaitFor(tensor_stream) for `replicated`). The pull, queued at the step's start while the
# compute stream is idle, overlaps the forward layer by layer (``schedule.pull_stall``).
# Chosen among three schedules after seeing the tf_cnn_benchmarks rows (ablation.md, session
# 10): both overlapped (sessions 6-9) leave the K80 rows' loss to the shared straggler term;
# both not overlapped over-charge the P100 rows by ~5 points; this one over-charges them by 1-3.
PS_PUSH_OVERLAPS = False
# Variables on the GPUs (tf_cnn_benchmarks' default ``--local_parameter_device=gpu``) and no
# PCIe peer-to-peer between them (GeForce cards: ``without_p2p``): a GPU-to-GPU copy cannot go
# over the bus directly, so TF stages it through host memory, and every GPU's copies share the
# host's one path. Each tensor's N-1 pushes (and N-1 pulls) then take
# (N-1) x bytes / the link's no-P2P bandwidth (the ``*-nop2p`` presets' figure through host
# memory), one after another, with the same order as above (pushes after the backward, pulls
# against the forward); at 1 GPU nothing moves. Stated assumption (session 11), from the
# blind check on consumer GPUs: with P2P (server GPUs) a GPU parameter server keeps the
# per-GPU link exchange above (the shared tables' K80 rows; not distinguished).
PS_HOST_STAGED_WITHOUT_P2P = True


def ps_network_seconds(gradient_bytes: float, hosts: int) -> float:
    """Seconds one step's parameter-server exchange takes on each host's network link."""
    if hosts <= 1:
        return 0.0
    return 2 * (hosts - 1) / hosts * gradient_bytes / PS_NETWORK_BYTES_PER_S


# --------------------------------------------------------------- communication schemes


@dataclasses.dataclass(frozen=True)
class Scheme:
    """How a framework turns the backward pass's gradients into collective calls.

    kind: 'bucketed' (a bucket goes when all its gradients are ready; DDP, XLA combining,
    Paddle fusion), 'fusion' (Horovod: every cycle_s, the ready tensors go in buffers of
    bucket_bytes), 'per_tensor' (one NCCL call per gradient tensor, TF1 replicated) or
    'parameter_server' (push to / pull from the CPU over PCIe)."""

    name: str
    kind: str
    bucket_bytes: float
    source: str
    cycle_s: float = 0.0
    first_bucket_bytes: float = 0.0
    # False: the calls start only once the backward pass is over (nothing hidden)
    overlaps: bool = True


SCHEMES = {
    "ddp": Scheme(
        "ddp",
        "bucketed",
        25 * 2**20,
        "PyTorch DistributedDataParallel: bucket_cap_mb=25, buckets filled in reverse "
        "parameter order, first bucket 1 MiB (torch.distributed _DEFAULT_FIRST_BUCKET_BYTES)",
        first_bucket_bytes=2**20,
    ),
    "horovod": Scheme(
        "horovod",
        "fusion",
        64 * 2**20,
        "Horovod Tensor Fusion: HOROVOD_FUSION_THRESHOLD 64 MB and HOROVOD_CYCLE_TIME 5 ms, the "
        "defaults until v0.21.0 (docs/tensor-fusion.rst; v0.21.0 changed them to 1 ms, 128 MB)",
        cycle_s=5e-3,
    ),
    "xla": Scheme(
        "xla",
        "bucketed",
        30 * 2**20,
        "XLA GPU all-reduce combiner, combine threshold 30 MiB "
        "(xla_gpu_all_reduce_combine_threshold_bytes default)",
    ),
    "paddle": Scheme(
        "paddle", "bucketed", 32 * 2**20, "Paddle fleet DistributedStrategy fuse_grad_size_in_MB=32"
    ),
    "mxnet": Scheme(
        "mxnet",
        "bucketed",
        25 * 2**20,
        "MXNet KVStore documents no fusion size: 25 MB buckets assumed (stated assumption)",
    ),
    "tf1-replicated-nccl": Scheme(
        "tf1-replicated-nccl",
        "per_tensor",
        0.0,
        "tf_cnn_benchmarks --variable_update=replicated --use_nccl: one tf.contrib.nccl "
        "all_sum per gradient tensor (TensorFlow performance_models.md); taken as not "
        "overlapped with the backward (stated assumption: TF 1.x's executor gives the "
        "weight-gradient ops no priority, and each all_sum waits for every replica's tensor)",
        overlaps=False,
    ),
    "parameter-server": Scheme(
        "parameter-server",
        "parameter_server",
        0.0,
        "tf_cnn_benchmarks --variable_update=parameter_server (also replicated without NCCL and "
        "distributed_replicated): each GPU pushes gradients and pulls variables over PCIe; "
        "the pushes after the backward (TF 1.x's GPU-to-CPU copy waits for the compute "
        "stream), the pulls overlapped with the forward",
    ),
    "unknown": Scheme(
        "unknown",
        "bucketed",
        25 * 2**20,
        "unrecognised framework: PyTorch DDP's 25 MiB buckets assumed (the smallest documented)",
    ),
}

_FAMILIES = (
    ("pytorch", "pytorch"),
    ("torch", "pytorch"),
    ("tensorflow 2", "tensorflow2"),
    ("tensorflow2", "tensorflow2"),
    ("tf2", "tensorflow2"),
    ("tensorflow", "tensorflow1"),
    ("paddle", "paddle"),
    ("mxnet", "mxnet"),
    ("jax", "jax"),
    ("flax", "jax"),
    ("xla", "jax"),
)


def framework_family(text: str) -> str:
    """'pytorch', 'tensorflow1', 'tensorflow2', 'mxnet', 'paddle', 'jax' or 'unknown'."""
    low = (text or "").lower()
    low = low.replace("tensorflow 1", "tensorflow").replace("tensorflow1", "tensorflow")
    for keyword, family in _FAMILIES:
        if keyword in low:
            return family
    return "unknown"


def model_family(model_text: str) -> str:
    """A model's family: the first run of letters of its name, lower case, without a
    version letter before digits ('EfficientNet-B4 (v1)' and 'EfficientNet-v2-S' ->
    'efficientnet', 'ResNet-50 v1.5' -> 'resnet', 'ResNeXt101-32x4d' -> 'resnext',
    'InceptionV3' -> 'inception', 'VGG16' -> 'vgg', 'BERT-large' -> 'bert'); '' for a blank
    name. Sizes and versions of one design share a family (a crude reading:
    'SE-ResNeXt' reads 'se', a family of its own)."""
    # a version letter before the digits is not the family's ('InceptionV3', 'MobileNetV2')
    found = re.search(r"[a-z]+?(?=v?\d|[^a-z]|$)", (model_text or "").lower())
    return found.group(0) if found else ""


def _model_key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", (text or "").lower())


def _variable_update(notes: str, model: str) -> str | None:
    """The tf_cnn_benchmarks variable_update a row's notes give for its model: the clause
    naming the model when the notes list several ('InceptionV3/ResNet50 parameter_server,
    AlexNet/VGG16 replicated (with NCCL)'), else the one named."""
    low = (notes or "").lower()
    if "variable_update" not in low and "distributed_replicated" not in low:
        return None
    modes = r"distributed_replicated|parameter_server|replicated"
    clauses = [c for c in re.split(r"[;,]", low) if re.search(modes, c)]
    key = _model_key(model)
    for clause in clauses:
        names = re.split(r"[/\s:]+", clause)
        if any(n and _model_key(n) and _model_key(n) in key for n in names if len(n) > 3):
            return clause
    return clauses[0] if clauses else None


def scheme_for(framework_text: str, notes: str = "", model: str = "") -> tuple[Scheme, str]:
    """(scheme, why): Horovod when the framework or notes name it; tf_cnn_benchmarks'
    variable_update from the notes; else the framework family's documented default."""
    low = f"{framework_text} {notes}".lower()
    update = _variable_update(notes, model)
    if update is not None:
        if "replicated" in update and "without nccl" not in update and "distributed" not in update:
            if "parameter_server" not in update:
                return SCHEMES["tf1-replicated-nccl"], f"notes: {update.strip()}"
        return SCHEMES["parameter-server"], f"notes: {update.strip()}"
    if "horovod" in low:
        return SCHEMES["horovod"], "Horovod named"
    family = framework_family(framework_text)
    if "tf_cnn_benchmarks" in low:
        # tf_cnn_benchmarks' own default (--variable_update=parameter_server)
        return SCHEMES["parameter-server"], "tf_cnn_benchmarks default variable_update"
    by_family = {
        "pytorch": "ddp",
        "tensorflow1": "horovod",  # DeepLearningExamples' TF1 and TF2 scripts run Horovod
        "tensorflow2": "horovod",
        "paddle": "paddle",
        "mxnet": "mxnet",
        "jax": "xla",
    }
    name = by_family.get(family, "unknown")
    return SCHEMES[name], f"{family} default"


def ps_device(framework_text: str, notes: str = "", model: str = "") -> tuple[str, str]:
    """('cpu' | 'gpu', why): where a tf_cnn_benchmarks parameter server keeps the variables.
    The notes' ``local_parameter_device`` or the model's clause ('parameter_server(gpu)')
    when they say; else tf_cnn_benchmarks' own default, ``--local_parameter_device=gpu``
    (benchmark_cnn.py), which spreads the variables over the GPUs by size
    (``ParamServerDeviceSetter``)."""
    low = (notes or "").lower()
    stated = re.search(r"local_parameter_device\W{0,3}(cpu|gpu)", low)
    if stated:
        return stated.group(1), f"notes: local_parameter_device {stated.group(1)}"
    clause = _variable_update(notes, model) or ""
    named = re.search(r"\b(cpu|gpu)\b", clause)
    if named:
        return named.group(1), f"notes: {clause.strip()}"
    if "tf_cnn_benchmarks" in f"{framework_text} {notes}".lower():
        return "gpu", "tf_cnn_benchmarks' default --local_parameter_device=gpu (not stated)"
    return "cpu", "a parameter server on the host CPU (assumed)"


# Backward ≈ 2x forward in FLOPs, so two thirds of a step's compute is backward: the
# window in which gradients can be reduced (stated assumption).
BACKWARD_FRACTION = 2 / 3
# Gradients are all-reduced in fp32 (AMP keeps fp32 master weights), stated assumption.
GRADIENT_BYTES_PER_PARAM = 4
# Tables that do not print a per-GPU batch: DeepLearningExamples prints 64-512 elsewhere.
ASSUMED_BATCH_PER_GPU = 128


# --------------------------------------------------------------- host CPUs

# Host contention (fitted, ``fitted.json``) is the share of compute a full host loses while
# its CPUs decode every GPU's images: the same per-GPU loader work spread over fewer cores
# per GPU costs proportionally more. The fitted fractions are for a host of
# REFERENCE_CORES_PER_GPU physical cores a GPU (DGX-1: 2x 20-core Xeon E5-2698 v4, 8 GPUs);
# a row on another documented host scales its loss by reference / its cores a GPU, and a
# row on an unknown host is taken as the reference (stated assumption). Physical cores (not
# hyperthreads) and GPUs of documented hosts, from the vendors' datasheets and instance
# tables, matched on the ``gpu`` text:
REFERENCE_CORES_PER_GPU = 5.0
HOST_CORES = (
    (r"dgx[- ]?1\b", 40, 8, "DGX-1: 2x Xeon E5-2698 v4 (20 cores each), 8 GPUs"),
    (r"dgx[- ]?2", 48, 16, "DGX-2: 2x Xeon Platinum 8168 (24 cores each), 16 GPUs"),
    (r"dgx[- ]?a100", 128, 8, "DGX A100: 2x AMD EPYC 7742 (64 cores each), 8 GPUs"),
    (r"dgx[- ]?h100", 112, 8, "DGX H100: 2x Xeon Platinum 8480C (56 cores each), 8 GPUs"),
    (r"dgx[- ]?station", 20, 4, "DGX Station: 1x Xeon E5-2698 v4 (20 cores), 4 GPUs"),
    (r"p2\.8xlarge", 16, 8, "AWS p2.8xlarge: 32 vCPUs = 16 cores, 8 K80 GPUs"),
    (r"n1-standard-32", 16, 8, "GCE n1-standard-32: 32 vCPUs = 16 cores, 8 GPUs"),
)


# --------------------------------------------------------------- dual-GPU boards

# A dual-GPU board carries two GPUs on one card: one board power limit, one heat sink and
# one on-board PCIe switch for both (Tesla K80: two GK210, 300 W a board, passive cooling,
# base clock 562 MHz, boost up to 875 MHz, NVIDIA K80 board specification BD-07317 and the
# "GPU Boost and K80 Autoboost" post). A 1-GPU run has the board's second GPU idle; from 2
# GPUs on (devices in order fill a board's two GPUs) every board in use runs both, and the
# GPUs clock lower than one alone did. The share of compute lost is fitted (``fitted.json``,
# ``board_loss``); its plausible range is 0 to 1 - 562/875 = 0.36, the K80's base over its
# highest boost clock. Matched on the ``gpu`` text: Tesla K80, K10, M60, GeForce GTX 690,
# GTX Titan Z (two GPUs a board each, vendor datasheets).
DUAL_GPU_BOARD = r"\bk80\b|\bk10\b|\bm60\b|gtx ?690\b|titan ?z\b"
MAX_BOARD_LOSS = 1 - 562 / 875


def dual_gpu_board(gpu_text: str) -> bool:
    """True when the ``gpu`` column names a board that carries two GPUs."""
    return bool(re.search(DUAL_GPU_BOARD, (gpu_text or "").lower().replace("-", " ")))


def host_cores_per_gpu(gpu_text: str) -> tuple[float | None, str]:
    """(physical host cores a GPU of the documented host a ``gpu`` column names, source);
    (None, '') for a host not in ``HOST_CORES``."""
    low = (gpu_text or "").lower()
    for pattern, cores, gpus, source in HOST_CORES:
        if re.search(pattern, low):
            return cores / gpus, source
    return None, ""


def core_factor(cores_per_gpu: float | None) -> float:
    """How much more (or less) host contention a row's host has than the reference host."""
    if not cores_per_gpu or cores_per_gpu <= 0:
        return 1.0
    return REFERENCE_CORES_PER_GPU / cores_per_gpu


# Whose cores a CPU-decoding input pipeline spreads over. tf.data with AUTOTUNE, TensorFlow
# 2's scripts and tf_cnn_benchmarks (one process for every GPU) are taken to use the cores the
# host has, so fewer cores a GPU cost more (``core_factor``; stated assumption, sessions 7-9,
# not checked in their code). Two pipelines run a fixed number of loader workers or threads
# for each training process (one process a GPU) whatever the host holds, so the host's core
# count does not scale their contention:
# - PyTorch's DataLoader (``num_workers``; DeepLearningExamples' PyTorch ConvNets main.py:
#   ``--workers`` 5 by default, no CPU affinity by default). Measured (BUILD_NOTES, sessions
#   7 and 9): its AMP rows lose 13-16% at 8 GPUs on a DGX-1 (5 cores a GPU) and a DGX A100
#   (16) alike;
# - DeepLearningExamples' TensorFlow 1 ConvNets with Horovod (runtime/runner.py:
#   ``num_preprocessing_threads = 10 if not use_dali else 4``, the tf.data map's
#   ``num_parallel_calls``, and one intra-op thread a process). Scaled by the cores until
#   session 9, a TF1 value fitted on DGX A100 rows alone over-charged V100 rows by 12-21 points
#   leaving Volta out (BUILD_NOTES, session 10).
# Pairs (framework family, scheme name); '' for every scheme of the family.
FIXED_WORKER_LOADERS = (("pytorch", ""), ("tensorflow1", "horovod"))
# Synthetic input has no loader and nothing to decode on the host: no host contention.
SYNTHETIC_HOST_CONTENTION = False


def contention_factor(
    family: str, input_kind: str, cores_per_gpu: float | None, scheme: str = ""
) -> float:
    """A row's host contention against the fitted one (a reference host's): 0 for synthetic
    input, reference / the host's cores a GPU for CPU-decoded input whose loader spreads over
    the host's cores, else 1 (a fixed-worker loader, ``FIXED_WORKER_LOADERS``, or input the
    host does not decode)."""
    if input_kind == "synthetic" and not SYNTHETIC_HOST_CONTENTION:
        return 0.0
    fixed = (family, "") in FIXED_WORKER_LOADERS or (family, scheme) in FIXED_WORKER_LOADERS
    if input_kind == "cpu" and not fixed:
        return core_factor(cores_per_gpu)
    return 1.0


# --------------------------------------------------------------- row properties


def input_kind(data_source: str) -> str:
    """'synthetic'; 'gpu' when the host does no per-sample decoding (DALI decodes on the
    GPU; pre-tokenised text is read as is, a stated assumption); else 'cpu' (images decoded
    by a CPU loader, or an unknown source: the common case)."""
    low = (data_source or "").lower()
    if "synthetic" in low or "dummy" in low:
        return "synthetic"
    if "dali" in low and not re.search(r"dali[- _]?cpu", low):
        return "gpu"
    if re.search(
        r"\btext|token|sequence|wikipedia|squad|glue|wmt|bookcorpus|tfrecord of text", low
    ):
        return "gpu"
    return "cpu"


def precision_class(precision: str) -> str:
    """'reduced' (AMP, FP16, BF16, FP8: faster per GPU, more host work per second) or 'full'."""
    low = (precision or "").lower()
    return "reduced" if re.search(r"amp|mixed|fp16|bf16|half|fp8|int8", low) else "full"


_GENERATIONS = (
    ("kepler", r"\bk(10|20|40|80)\b|kepler"),
    ("maxwell", r"\bm(4|40|60)\b|maxwell|titan x\b(?!p)"),
    ("pascal", r"\bp(4|40|100)\b|gtx ?10[0-9]0|titan ?xp|pascal"),
    ("volta", r"\bv100\b|titan ?v\b|volta"),
    ("turing", r"\bt4\b|rtx ?20[0-9]0|titan ?rtx|quadro ?rtx|turing"),
    ("ampere", r"\ba(10|16|30|40|100|800)\b|rtx ?30[0-9]0|rtx ?a[0-9]{4}|ampere"),
    ("ada", r"\bl(4|40s?)\b|rtx ?40[0-9]0|rtx ?[0-9]{4} ?ada|ada"),
    ("hopper", r"\bh(100|200|800|20)\b|gh200|hopper"),
    ("blackwell", r"\bg?b(100|200|300)\b|rtx ?50[0-9]0|blackwell"),
)


def gpu_generation(gpu_text: str) -> str:
    """The GPU generation a ``gpu`` column names ('Tesla P100 (DGX-1)' -> 'pascal');
    'unknown' if none matches."""
    low = (gpu_text or "").lower().replace("-", " ")
    for name, pattern in _GENERATIONS:
        if re.search(pattern, low):
            return name
    return "unknown"


def infer_interconnect(text: str, generation: str) -> tuple[Interconnect | None, str]:
    """A preset from a free-text interconnect: exact name first, then keywords (nvlink,
    nvswitch, pcie/pci with its generation, p2p). None when nothing matches."""
    low = (text or "").strip().lower()
    if low in INTERCONNECTS:
        return INTERCONNECTS[low], ""
    no_p2p = bool(re.search(r"no[- _]?p2p|without p2p|p2p[- _]?(off|disabled)", low))
    if "pci" in low:
        gen = re.search(r"(?:gen|pcie|pci-e|pci)\s*([345])", low)
        name = f"pcie{gen.group(1) if gen else 3}" + ("-nop2p" if no_p2p else "")
        name = name if name in PRESETS else "pcie3"
        return PRESETS[name], f"interconnect {text!r} read as {name}"
    if "nvlink" in low or "nvswitch" in low:
        by_generation = {
            "pascal": "nvlink1-hybrid-cube-mesh",
            "volta": "nvlink2-nvswitch" if "switch" in low else "nvlink2-hybrid-cube-mesh",
            "ampere": "nvlink3-nvswitch",
            "hopper": "nvlink4-nvswitch",
            "blackwell": "nvlink5-nvswitch",
        }
        name = by_generation.get(generation)
        if name:
            return PRESETS[name], f"interconnect {text!r} read as {name} ({generation})"
    return None, ""


# When the interconnect column is blank or unreadable, the ``gpu`` column often still names
# the fabric: a DGX/HGX system or an SXM module means NVLink, a PCIe card means PCIe. NVIDIA's
# system datasheets: DGX-1 and HGX-1 join 8 SXM2 GPUs (P100, V100) in the hybrid cube-mesh;
# DGX-2/HGX-2 join 16 V100 SXM3 through NVSwitch; DGX/HGX A100, H100/H200 and B200 join 8 SXM
# GPUs through NVSwitch (B200 is only made as an HGX/DGX module). An SXM module is only made
# for such NVLink baseboards. A ``gpu`` text that says PCIe (or NVL, H200's PCIe card) is a
# PCIe card whatever else it names. (A DGX Station's 4 V100s are fully NVLinked: one quad of
# the cube-mesh.) Patterns are tried in order on the lower-cased text; the
# fabric's preset is then taken by GPU generation where it depends on it.
GPU_FABRICS = (
    (r"dgx[- ]?2\b|hgx[- ]?2\b|sxm3", "nvswitch", "DGX-2/HGX-2: 16 V100 SXM3 on NVSwitch"),
    (r"dgx[- ]?(1\b|station)|hgx[- ]?1\b|sxm2\b", "hybrid-cube-mesh", "DGX-1/HGX-1 or SXM2"),
    (r"[dh]gx|sxm|\bh200\b|\bg?b[23]00\b", "nvswitch", "a DGX/HGX system or SXM module"),
)
PCIE_CARD = r"pci|\bnvl\b"
# A card on PCIe (the ``gpu`` text says PCIe, or names no NVLink system): the PCIe generation
# of its GPU generation's era (Kepler to Volta and Turing PCIe 3.0, Ampere and Ada 4.0, Hopper
# and Blackwell 5.0; the vendors' product briefs), a stated assumption for a card whose form
# factor the row does not give (until session 9 every such row was taken as PCIe 3).
PCIE_BY_GENERATION = {"ampere": "pcie4", "ada": "pcie4", "hopper": "pcie5", "blackwell": "pcie5"}
_NVLINK_BY_GENERATION = {
    ("hybrid-cube-mesh", "pascal"): "nvlink1-hybrid-cube-mesh",
    ("hybrid-cube-mesh", "volta"): "nvlink2-hybrid-cube-mesh",
    ("nvswitch", "volta"): "nvlink2-nvswitch",
    ("nvswitch", "ampere"): "nvlink3-nvswitch",
    ("nvswitch", "hopper"): "nvlink4-nvswitch",
    ("nvswitch", "blackwell"): "nvlink5-nvswitch",
}


def interconnect_from_gpu(gpu_text: str, generation: str) -> tuple[Interconnect | None, str]:
    """A preset from the ``gpu`` column (a DGX/HGX system, an SXM module or a PCIe card), for
    rows whose interconnect column gives none; (None, '') for an unknown GPU generation."""
    low = (gpu_text or "").lower()
    if not re.search(PCIE_CARD, low):
        for pattern, fabric, why in GPU_FABRICS:
            name = _NVLINK_BY_GENERATION.get((fabric, generation))
            if name and re.search(pattern, low):
                return PRESETS[name], f"{name} from the gpu column {gpu_text!r} ({why})"
    if generation == "unknown":
        return None, ""
    name = PCIE_BY_GENERATION.get(generation, "pcie3")
    return PRESETS[name], (
        f"{name} from the gpu column {gpu_text!r} (a card of the {generation} generation on "
        f"PCIe: the PCIe generation of its era, stated assumption)"
    )


_CONSUMER = r"geforce|\bgtx\b|\brtx ?[2-5]0[0-9]0|titan"

# An NVLink *bridge* joins two PCIe cards (GeForce RTX 2080 Ti / 3090, Quadro RTX, RTX A6000,
# A100 PCIe: 2-way bridges only, NVIDIA's product pages), so past two GPUs the ring crosses PCIe
# between the pairs whatever the bridge does; an "NVLink" text on such a card is not an
# NVSwitch fabric. Even at two GPUs the bridge is not modelled: the only published bridged rows
# (Lambda's TensorFlow benchmark, 2-8 RTX 2080 Ti and Quadro RTX 8000, `results/
# scaling_validation/external/`) scale as the same file's unbridged ones (2x RTX 2080 Ti 9,177
# vs 9,224 images/s). The card's PCIe preset is taken (without P2P for GeForce), stated.


def nvlink_bridge(interconnect_text: str, gpu_text: str) -> bool:
    """An interconnect that says NVLink (not NVSwitch, not a preset name) on a known PCIe card:
    a GPU generation read from the ``gpu`` text, no DGX/HGX system and no SXM module there, so
    a 2-way bridge."""
    low, gpu = (interconnect_text or "").strip().lower(), (gpu_text or "").lower()
    if low in INTERCONNECTS or "nvlink" not in low or "switch" in low:
        return False
    if gpu_generation(gpu_text) == "unknown":
        return False
    return not any(re.search(pattern, gpu) for pattern, _, _ in GPU_FABRICS)


def bridged_link(generation: str) -> tuple[Interconnect, str]:
    """The PCIe preset of a bridged card's era (the bridge is not modelled, see above)."""
    name = PCIE_BY_GENERATION.get(generation, "pcie3")
    return PRESETS[name], (
        f"NVLink on a PCIe card: a 2-way bridge, not modelled; PCIe of its era ({name})"
    )


def without_p2p(link: Interconnect, gpu_text: str) -> tuple[Interconnect, str]:
    """GeForce/Titan cards do not do PCIe peer-to-peer (NVIDIA's driver disables it; only an
    NVLink bridge connects them directly): a P2P PCIe preset becomes its -nop2p one."""
    name = f"{link.name}-nop2p"
    if re.search(_CONSUMER, (gpu_text or "").lower()) and name in PRESETS:
        return PRESETS[name], f"consumer GPU {gpu_text!r}: no PCIe P2P, {name}"
    return link, ""


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
