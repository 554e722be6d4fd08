"""Published multi-GPU tables → one prediction per row.

A CSV with the shared ``published_scaling.csv``'s columns. Rows with the same ``table_id``
form a series whose 1-GPU row is the measured input; every other row of the series is
predicted from it, the parameter count, the per-GPU batch, the interconnect, the framework
and the data source. Precision enters through the measured 1-GPU throughput.

One check of the input itself: when another series of the same framework, model, GPU chip,
precision, batch and data loader ran more than ``presets.PEER_GAP`` times faster on one GPU,
the chip's compute is taken from that faster 1-GPU row (the row's ``assumptions`` say so)
while the efficiency stays relative to the series' own printed 1-GPU figure.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import re

from bcjax.timing.scaling_model import presets
from bcjax.timing.scaling_model.terms import weak_scaling

REQUIRED_COLUMNS = (
    "table_id",
    "framework",
    "model",
    "gpu",
    "gpus",
    "batch_per_gpu",
    "precision",
    "images_per_s",
    "params",
    "interconnect",
    "data_source",
)
# A published efficiency this far above linear cannot come from data parallelism.
SUPERLINEAR = 1.02


@dataclasses.dataclass(frozen=True)
class ModelParams:
    """The fitted part of the model (presets.py holds the shipped values)."""

    sync_cv: float = presets.SYNC_CV
    input_ceilings: tuple = tuple(sorted(presets.INPUT_CEILINGS.items()))
    node_sync_cv: float = presets.NODE_SYNC_CV
    host_contention: tuple = tuple(sorted(presets.HOST_CONTENTION.items()))

    def contention(self, pipeline: str, host: str | None) -> float:
        """Fraction of compute a full host loses to CPU contention; 0 where none was fitted."""
        return dict(self.host_contention).get((pipeline, host), 0.0)

    def ceiling(self, pipeline: str, loader: str, host: str | None) -> float | None:
        """images/s one host's data path delivers; None (no cap) for a pipeline never fitted
        on that host, and for synthetic data."""
        if loader == "synthetic":
            return None
        return dict(self.input_ceilings).get((pipeline, host))


def read_published(path) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {', '.join(missing)}; a published "
                f"table needs {', '.join(REQUIRED_COLUMNS)}"
            )
        # short lines leave None, long ones a None key: both read as blank / dropped
        return [{k: v or "" for k, v in row.items() if k is not None} for row in reader]


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


def _number(text: str) -> float | None:
    try:
        value = float(str(text).replace(",", "").strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def prepare(rows: list[dict], *, bus_bandwidth: float | None = None) -> list[dict]:
    """Each row with what the model needs, or ``reason`` saying why it cannot be predicted.

    ``bus_bandwidth`` (bytes/s) replaces every preset's; a ``busbw_GBps`` column does the
    same per row.
    """
    first_gpu_row: dict = {}
    for r in rows:
        if _number(r["gpus"]) == 1 and _number(r["images_per_s"]):
            first_gpu_row.setdefault(r["table_id"], r)
    fastest_peer = _fastest_peers(first_gpu_row.values())
    cases = []
    for r in rows:
        case = {"row": r, "table_id": r["table_id"], "reason": "", "assumptions": []}
        cases.append(case)
        gpus, ips = _number(r["gpus"]), _number(r["images_per_s"])
        if gpus is None or ips is None or gpus < 1:
            case["reason"] = "gpus or images_per_s is not a number"
            continue
        case["gpus"], case["images_per_s"] = int(gpus), ips
        base = first_gpu_row.get(r["table_id"])
        if base is None:
            case["reason"] = "series has no 1-GPU row to predict from"
            continue
        case["images_per_s_1"] = _number(base["images_per_s"])
        case["published_efficiency"] = ips / (gpus * case["images_per_s_1"])
        if gpus == 1:
            case["reason"] = "1-GPU row: the series' measured input"
            continue
        case.update(_inputs(r, bus_bandwidth, case["assumptions"]))
        if case.get("reason"):
            continue
        peer = fastest_peer.get(_peer_key(base))
        peer_ips = _number(peer["images_per_s"]) if peer else None
        if peer_ips and peer_ips > presets.PEER_GAP * case["images_per_s_1"]:
            own = case["images_per_s_1"]
            case["compute_images_per_s"] = peer_ips
            case["peer_note"] = (
                f"1-GPU row ({own:g} img/s) is {peer_ips / own:.2f}x "
                f"slower than table {peer['table_id']}'s ({peer_ips:g}) for the same framework, "
                f"model, GPU chip, precision, batch and loader: compute taken from table "
                f"{peer['table_id']}"
            )
            case["assumptions"].append(case["peer_note"])
        elif case["published_efficiency"] > SUPERLINEAR:
            case["unmatchable"] = (
                f"published efficiency {case['published_efficiency']:.2f} is "
                f"above linear: inconsistent source figures"
            )
    return cases


def _peer_key(row: dict) -> tuple:
    return (
        row["framework"].strip().lower(),
        _zoo_key(row["model"]),
        presets.gpu_chip(row["gpu"]),
        row["precision"].strip().lower(),
        _number(row["batch_per_gpu"]),
        presets.loader_kind(row["data_source"]),  # a synthetic-data peer is no peer of real data
    )


def _fastest_peers(one_gpu_rows) -> dict:
    """The fastest 1-GPU row of each (framework, model, chip, precision, batch, loader)."""
    best: dict = {}
    for r in one_gpu_rows:
        key = _peer_key(r)
        if key not in best or _number(r["images_per_s"]) > _number(best[key]["images_per_s"]):
            best[key] = r
    return best


def _inputs(r: dict, bus_bandwidth: float | None, assumptions: list) -> dict:
    params = _number(r["params"])
    if params is None:
        params = zoo_params(r["model"])
        if params is None:
            return {"reason": f"params blank and {r['model']!r} is not in bcjax's zoo"}
        assumptions.append("params from bcjax's zoo")
    link = presets.INTERCONNECTS.get(r["interconnect"].strip().lower())
    measured = _number(r.get("busbw_GBps", "")) or None
    measured = measured * 1e9 if measured else bus_bandwidth
    if measured:
        link = presets.with_bus_bandwidth(link, measured)
    elif link is None:
        return {
            "reason": f"unknown interconnect {r['interconnect']!r} (presets: "
            f"{', '.join(presets.PRESETS)}; or give a measured busbw)"
        }
    batch = _number(r["batch_per_gpu"])
    if batch is None:
        batch = presets.ASSUMED_BATCH_PER_GPU
        assumptions.append(f"batch_per_gpu blank: {batch} assumed")
    fw = presets.framework(r["framework"])
    loader, host = presets.loader_kind(r["data_source"]), presets.host_system(r["gpu"])
    if fw.name == "unknown":
        assumptions.append(fw.source)
    if host is None and loader != "synthetic":
        assumptions.append("host system not recognised: no input ceiling")
    return {
        "params": int(params),
        "link": link,
        "batch": batch,
        "framework": fw,
        "loader": loader,
        "pipeline": presets.pipeline(r["framework"], loader),
        "host": host,
    }


def predict_case(case: dict, params: ModelParams = ModelParams()) -> dict | None:
    """The model's row for a prepared case; None when it cannot be predicted."""
    if case["reason"]:
        return None
    ceiling = params.ceiling(case["pipeline"], case["loader"], case["host"])
    return weak_scaling(
        case["images_per_s_1"],
        case["batch"],
        case["params"] * presets.GRADIENT_BYTES_PER_PARAM,
        case["gpus"],
        case["link"],
        input_ceiling=ceiling,
        compute_images_per_s=case.get("compute_images_per_s"),
        bucket_bytes=case["framework"].bucket_bytes,
        sync_cv=params.sync_cv,
        node_sync_cv=params.node_sync_cv,
        host_contention=params.contention(case["pipeline"], case["host"]),
    )
