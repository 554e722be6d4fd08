"""Published multi-GPU tables -> one prediction per row.

A CSV with the shared ``published_scaling.csv``'s columns (only ``table_id``, ``gpus`` and a
throughput column are required; a missing column reads as blank and is assumed, with a
note). Rows with the same ``table_id`` form a series; its 1-GPU row is the measured input
and is never replaced by another series'. Each other row is predicted from it and from
properties any row can have: framework and its communication scheme, precision, GPU
generation, interconnect, GPUs per host, input kind (synthetic, decoded on the GPU, or on
the CPU), the per-GPU batch and the model's per-layer parameters. Throughput may be in any
unit (images/s, sequences/s) as long as ``batch_per_gpu`` counts the same items; a throughput
in tokens/s with a batch of sequences is converted with a sequence-length column, else that
row gets a reason (``_batch_in_throughput_units``).
"""

from __future__ import annotations

import csv
import functools
import math
import re

from bcjax.timing.scaling_model import presets, profiles, schedule
from bcjax.timing.scaling_model.fitted import SHIPPED, ModelParams
from bcjax.timing.scaling_model.terms import (
    allreduce_cost,
    expected_max_normal,
    host_count,
    host_share,
)

REQUIRED_COLUMNS = ("table_id", "gpus")
THROUGHPUT_COLUMNS = (
    "images_per_s",
    "throughput",
    "sequences_per_s",
    "samples_per_s",
    "tokens_per_s",
)
# A throughput in tokens/s (a column so named, a ``throughput_unit`` column or the notes say
# so) with ``batch_per_gpu`` in sequences gives no step time (batch / throughput mixes units).
_TOKENS_PER_S = re.compile(r"tok(?:en)?s?\s*/\s*s(?:ec)?\b|tokens?\s+per\s+s(?:ec(?:ond)?)?\b")
_BATCH_IN_TOKENS = re.compile(r"batch[_ a-z]*?\s+(?:in|of|counts?)\s+tokens")
SEQUENCE_LENGTH_COLUMNS = ("tokens_per_sequence", "seq_len", "sequence_length")
# A published efficiency this far above linear cannot come from data parallelism.
SUPERLINEAR = 1.02

__all__ = ["ModelParams", "SHIPPED", "read_published", "prepare", "predict_case", "zoo_params"]


def read_published(*paths) -> list[dict]:
    """Rows of one or more CSVs; a missing column reads as blank."""
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in fields]
            if missing or not any(c in fields for c in THROUGHPUT_COLUMNS):
                raise ValueError(
                    f"{path}: missing column(s) {', '.join(missing) or 'images_per_s'}; a "
                    f"published table needs {', '.join(REQUIRED_COLUMNS)} and a throughput "
                    f"column ({' or '.join(THROUGHPUT_COLUMNS)})"
                )
            for row in reader:
                # short lines leave None, long ones a None key: both read as blank / dropped
                clean = {k: v or "" for k, v in row.items() if k is not None}
                if not clean.get("images_per_s"):
                    column = next((c for c in THROUGHPUT_COLUMNS if clean.get(c)), "")
                    clean["images_per_s"] = clean.get(column, "")
                    if column == "tokens_per_s" and not clean.get("throughput_unit"):
                        clean["throughput_unit"] = "tokens/s"
                rows.append(clean)
    return rows


def _zoo_key(name: str) -> str:
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    return re.sub(r"v15$", "", key)  # "ResNet-50 v1.5" is the zoo's resnet50 (v1.5)


@functools.cache
def zoo_params(model_name: str, num_classes: int = 1000) -> int | None:
    """Trainable parameters of the bcjax zoo's model of that name (torchvision's counts at
    1000 classes), traced with jax.eval_shape; None when the zoo has no such model."""
    import bcjax.models
    from bcjax.models.convert import abstract_shapes

    by_key = {_zoo_key(n): n for n in bcjax.models.list_models()}
    name = by_key.get(_zoo_key(model_name))
    if name is None:
        return None
    shapes = abstract_shapes(name, num_classes)
    return sum(math.prod(shape) for path, shape in shapes.items() if path[0] == "params")


def _number(text) -> float | None:
    try:
        value = float(str(text).replace(",", "").strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def source_of(row: dict) -> str:
    """One publisher's document: the source path without its commit (a README at two
    commits is one source), else the repository, else 'unknown'."""
    path = (row.get("source_path") or "").split("@")[0].strip()
    return path or (row.get("source_repo") or "").strip() or "unknown"


def source_of_case(case: dict) -> str:
    return case["source"]


def prepare(rows: list[dict], *, bus_bandwidth: float | None = None) -> list[dict]:
    """Each row with what the model needs, or ``reason`` saying why it cannot be predicted.

    ``bus_bandwidth`` (bytes/s) replaces every preset's; a ``busbw_GBps`` column does the
    same per row.
    """
    first_gpu_row: dict = {}
    for r in rows:
        if _number(r.get("gpus")) == 1 and _number(r.get("images_per_s")):
            first_gpu_row.setdefault(r.get("table_id", ""), r)
    largest: dict = {}
    for r in rows:
        n = _number(r.get("gpus"))
        if n:
            largest[r.get("table_id", "")] = max(largest.get(r.get("table_id", ""), 0), int(n))
    cases = []
    for r in rows:
        case = {
            "row": r,
            "table_id": r.get("table_id", ""),
            "source": source_of(r),
            "reason": "",
            "assumptions": [],
        }
        cases.append(case)
        try:
            _prepare_case(case, first_gpu_row, largest, bus_bandwidth)
        except Exception as e:  # noqa: BLE001 - an odd row gets a reason, never a crash
            case["reason"] = f"row could not be read: {type(e).__name__}: {e}"
    return cases


def _prepare_case(case: dict, first_gpu_row: dict, largest: dict, bus_bandwidth) -> None:
    r = case["row"]
    gpus, ips = _number(r.get("gpus")), _number(r.get("images_per_s"))
    if gpus is None or ips is None or gpus < 1 or ips <= 0:
        case["reason"] = "gpus or throughput is not a positive number"
        return
    case["gpus"], case["images_per_s"] = int(gpus), ips
    base = first_gpu_row.get(case["table_id"])
    if base is None:
        case["reason"] = "series has no 1-GPU row to predict from"
        return
    case["images_per_s_1"] = _number(base["images_per_s"])
    case["published_efficiency"] = ips / (gpus * case["images_per_s_1"])
    if gpus == 1:
        case["reason"] = "1-GPU row: the series' measured input"
        return
    case.update(
        _inputs(r, bus_bandwidth, case["assumptions"], largest.get(case["table_id"], 0), int(gpus))
    )
    if case.get("reason"):
        return
    case.update(_communication(case))
    if case["published_efficiency"] > SUPERLINEAR:
        case["unmatchable"] = (
            f"published efficiency {case['published_efficiency']:.2f} is above linear: "
            f"inconsistent source figures (no data-parallel term gives it)"
        )


def _params_and_profile(r: dict, assumptions: list) -> tuple[int | None, tuple | None]:
    params = _number(r.get("params", ""))
    layered = profiles.from_text(r.get("layer_params", ""))
    built = profiles.documented(r.get("model", ""))
    if layered:
        profile = layered
        assumptions.append("per-layer profile from layer_params")
    elif built:
        profile = built
    else:
        profile = None
    if params is None and profile is not None:
        params = profiles.total_params(profile)
        assumptions.append("params from the documented layer shapes")
    if params is None and profiles.known_params(r.get("model", "")):
        params, cite = profiles.known_params(r.get("model", ""))
        assumptions.append(f"params: {cite}")
    if params is None:
        params = zoo_params(r.get("model", "")) if r.get("model") else None
        if params is not None:
            assumptions.append("params from bcjax's zoo")
    if params is None:
        return None, None
    if profile is None:
        assumptions.append("no per-layer profile: gradients ready evenly through the backward")
        return int(params), profiles.uniform(int(params))
    total = profiles.total_params(profile)
    if abs(total - params) > 0.05 * params:  # keep the layer shape, scale to the count given
        profile = tuple((n, p * params / total, f) for n, p, f in profile)
    return int(params), profile


def _link(
    r: dict, generation: str, bus_bandwidth, assumptions: list, largest: int = 0, gpus: int = 2
):
    text = r.get("interconnect", "")
    if presets.nvlink_bridge(text, r.get("gpu", "")):
        link, note = presets.bridged_link(generation)
    else:
        link, note = presets.infer_interconnect(text, generation)
    if note:
        assumptions.append(note)
    if link is None:
        link, note = presets.interconnect_from_gpu(r.get("gpu", ""), generation)
        if link is None:
            link, note = presets.PRESETS["pcie3"], "PCIe 3 (pcie3) assumed"
        assumptions.append(f"unknown interconnect {text!r}: {note}")
    link, note = presets.without_p2p(link, r.get("gpu", ""))
    if note:
        assumptions.append(note)
    measured = _number(r.get("busbw_GBps", "")) or None
    measured = measured * 1e9 if measured else bus_bandwidth
    if measured:
        return presets.with_bus_bandwidth(link, measured)
    if generation in presets.NCCL1_GENERATIONS:
        link = presets.nccl1_link(link, gpus)
        assumptions.append(f"{generation}: {link.note}")
    per_host = _number(r.get("gpus_per_host", "") or r.get("gpus_per_node", ""))
    if per_host:
        link = presets.dataclasses.replace(link, gpus_per_node=int(per_host))
    elif largest and link.name.split()[0].split("-")[0] in ("pcie3", "pcie4", "pcie5"):
        # a generic PCIe box holds the series' largest run when that fits one host: its
        # CPUs are provisioned for that many GPUs (stated assumption)
        link = presets.dataclasses.replace(link, gpus_per_node=min(link.gpus_per_node, largest))
    return link


def _inputs(
    r: dict, bus_bandwidth: float | None, assumptions: list, largest: int = 0, gpus: int = 2
) -> dict:
    batch = _number(r.get("batch_per_gpu", ""))
    if batch is None or batch <= 0:
        batch = presets.ASSUMED_BATCH_PER_GPU
        assumptions.append(f"batch_per_gpu blank: {batch} assumed")
    batch, unit_reason = _batch_in_throughput_units(r, batch, assumptions)
    if unit_reason:
        return {"reason": unit_reason}
    params, profile = _params_and_profile(r, assumptions)
    if params is None:
        return {
            "reason": f"params blank and {r.get('model', '')!r} is neither in bcjax's zoo nor "
            f"a documented shape (give params, or layer_params)"
        }
    generation = presets.gpu_generation(r.get("gpu", ""))
    if generation == "unknown":
        assumptions.append(f"GPU generation of {r.get('gpu', '')!r} not recognised")
    scheme, why = presets.scheme_for(r.get("framework", ""), r.get("notes", ""), r.get("model"))
    if scheme.name == "unknown":
        assumptions.append(scheme.source)
    ps_device = "cpu"
    if scheme.kind == "parameter_server":
        ps_device, where = presets.ps_device(
            r.get("framework", ""), r.get("notes", ""), r.get("model", "")
        )
        assumptions.append(f"parameter server on the {ps_device.upper()}s ({where})")
    family = presets.framework_family(r.get("framework", ""))
    if presets.dual_gpu_board(r.get("gpu", "")):
        assumptions.append("two GPUs a board: from 2 GPUs on, both of a board's GPUs work")
    link = _link(r, generation, bus_bandwidth, assumptions, largest, gpus)
    return {
        "params": params,
        "profile": profile,
        "link": link,
        "cores_per_gpu": _cores_per_gpu(r, link, assumptions),
        "batch": batch,
        "scheme": scheme,
        "scheme_why": why,
        "ps_device": ps_device,
        "family": family,
        "model_family": presets.model_family(r.get("model", "")),
        "input": presets.input_kind(r.get("data_source", "")),
        "precision": presets.precision_class(r.get("precision", "")),
        "generation": generation,
        "dual_board": presets.dual_gpu_board(r.get("gpu", "")),
    }


def _batch_in_throughput_units(r: dict, batch: float, assumptions: list):
    """(batch, reason): the per-GPU batch in the throughput's unit. Efficiency is a ratio
    within a series whatever the unit, but the step time (batch / throughput) needs one unit:
    a tokens/s throughput with a batch of sequences is converted with a sequence-length column
    (``SEQUENCE_LENGTH_COLUMNS``), else the row gets a reason instead of a meaningless step."""
    said = f"{r.get('throughput_unit', '')} {r.get('notes', '')}".lower()
    if not _TOKENS_PER_S.search(said):
        return batch, ""
    if _BATCH_IN_TOKENS.search(f"{r.get('batch_unit', '')} {said}") or re.search(
        r"tok", r.get("batch_unit", "").lower()
    ):
        assumptions.append("throughput in tokens/s and batch_per_gpu in tokens")
        return batch, ""
    length = next((_number(r.get(c, "")) for c in SEQUENCE_LENGTH_COLUMNS if r.get(c)), None)
    if length and length > 0:
        assumptions.append(f"throughput in tokens/s: batch_per_gpu x {length:g} tokens a sequence")
        return batch * length, ""
    return batch, (
        "throughput in tokens/s while batch_per_gpu counts sequences: no step time (give "
        f"{' or '.join(SEQUENCE_LENGTH_COLUMNS)}, or throughput and batch in one unit)"
    )


def _cores_per_gpu(r: dict, link, assumptions: list) -> float | None:
    """Physical host cores a GPU: a ``host_cores`` column over the host's GPUs (the link's,
    from ``gpus_per_host`` when given), else a documented host named in the ``gpu`` column
    (``presets.HOST_CORES``); None when unknown."""
    cores = _number(r.get("host_cores", ""))
    if cores:
        per_gpu, source = cores / link.gpus_per_node, "host_cores column"
    else:
        per_gpu, source = presets.host_cores_per_gpu(r.get("gpu", ""))
    if not per_gpu:
        return None
    assumptions.append(f"{per_gpu:g} host cores a GPU ({source})")
    return per_gpu


def _exposed(case: dict, n: int, compute_s: float) -> float:
    """Seconds of gradient communication left exposed at ``n`` GPUs for this case."""
    scheme, link, profile = case["scheme"], case["link"], case["profile"]
    bpp = presets.GRADIENT_BYTES_PER_PARAM
    backward = presets.BACKWARD_FRACTION * compute_s
    grads = schedule.ready_times(profile, backward, bpp)
    if scheme.kind != "parameter_server":
        if n == 1:
            return 0.0
        return schedule.exposed_time(grads, scheme, allreduce_cost(n, link), backward)
    nodes = host_count(n, link.gpus_per_node)
    if _host_staged(case):
        # variables spread over GPUs that cannot reach each other: every copy goes through
        # host memory, shared by all the GPUs (``presets.PS_HOST_STAGED_WITHOUT_P2P``)
        if n == 1:
            return 0.0
        forward = compute_s - backward
        between_hosts = presets.ps_network_seconds(sum(b for _, b in grads), nodes)

        def staged(nbytes):
            return (n - 1) * nbytes / link.bus_bandwidth

        pushes = [(backward, b) for _, b in grads]
        return (
            schedule.finish_after(pushes, staged, backward)
            + schedule.pull_stall(profile, forward, staged, bpp)
            + between_hosts
        )
    # one GPU has its PCIe link to itself; from two on, two GPUs share one upstream link
    per_gpu = presets.PS_BYTES_PER_S_PER_GPU * (2 if n == 1 else 1)
    net = 0.0 if nodes == 1 else (nodes - 1) / nodes / presets.PS_NETWORK_BYTES_PER_S
    if presets.PS_NETWORK_OVERLAPS:

        def cost(nbytes):
            return nbytes / per_gpu + nbytes * net

        between_hosts = 0.0
    else:

        def cost(nbytes):
            return nbytes / per_gpu

        between_hosts = presets.ps_network_seconds(sum(b for _, b in grads), nodes)
    forward = compute_s - backward
    # the pushes start when the backward ends (``presets.PS_PUSH_OVERLAPS``), one after
    # another on the GPU's link; the pulls overlap the next forward, input layer first
    pushes = grads if presets.PS_PUSH_OVERLAPS else [(backward, b) for _, b in grads]
    return (
        schedule.finish_after(pushes, cost, backward)
        + schedule.pull_stall(profile, forward, cost, bpp)
        + between_hosts
    )


def _host_staged(case: dict) -> bool:
    """A parameter server on GPUs without PCIe peer-to-peer: copies staged through the host."""
    return (
        presets.PS_HOST_STAGED_WITHOUT_P2P
        and case.get("ps_device") == "gpu"
        and "nop2p" in case["link"].name
    )


def _communication(case: dict) -> dict:
    """The parameter-free part of a case's step: compute, exposed communication, and the
    factors the fitted terms multiply (E[max] of GPUs and hosts, the host share: the share
    of the host's GPUs in use, times ``presets.contention_factor``: 0 for synthetic input,
    for images decoded on the host's CPUs by a loader that spreads over them the reference
    host's cores a GPU over this host's; and 1 where a dual-GPU board runs both its GPUs,
    from 2 GPUs on, ``presets.dual_gpu_board``)."""
    n, link = case["gpus"], case["link"]
    step_1 = case["batch"] / case["images_per_s_1"]
    compute = step_1
    if case["scheme"].kind == "parameter_server":
        # the 1-GPU step already holds its own push/pull: compute is what is left
        compute = max(step_1 - _exposed(case, 1, step_1), 0.5 * step_1)
        compute = max(step_1 - _exposed(case, 1, compute), 0.5 * step_1)
    nodes = host_count(n, link.gpus_per_node)
    return {
        "step_1_s": step_1,
        "compute_s": compute,
        "exposed_1_s": step_1 - compute,
        "exposed_s": _exposed(case, n, compute),
        "e_gpus": expected_max_normal(n),
        "e_nodes": expected_max_normal(nodes),
        "share": host_share(n, link.gpus_per_node)
        * presets.contention_factor(
            case["family"], case["input"], case["cores_per_gpu"], case["scheme"].name
        ),
        "nodes": nodes,
        "board": 1.0 if case["dual_board"] and n >= 2 else 0.0,
    }


def predict_case(case: dict, params: ModelParams = SHIPPED) -> dict | None:
    """The model's row for a prepared case; None when it cannot be predicted."""
    if case["reason"]:
        return None
    c = case["compute_s"]
    contention, contention_from = params.host_contention(
        case["family"], case["input"], case["precision"], case.get("model_family", "")
    )
    sync = (params.sync_cv * case["e_gpus"] + params.node_sync_cv * case["e_nodes"]) * c
    host = contention * case["share"] * c
    board = params.board_loss * case["board"] * c
    step = c + case["exposed_s"] + sync + host + board
    efficiency = min(1.0, case["step_1_s"] / step)
    losses = {
        "all-reduce" if case["scheme"].kind != "parameter_server" else "parameter-server": (
            case["exposed_s"] - case["exposed_1_s"]
        ),
        "sync": sync,
        "host": host,
        "board": board,
    }
    limit = "compute" if efficiency >= 0.99 else max(losses, key=losses.get)
    return {
        "compute_s": c,
        "exposed_collective_s": case["exposed_s"],
        "sync_s": sync,
        "contention_s": host,
        "contention_from": contention_from,
        "board_s": board,
        "step_s": step,
        "efficiency": efficiency,
        "images_per_s": efficiency * case["gpus"] * case["images_per_s_1"],
        "limit": limit,
    }
