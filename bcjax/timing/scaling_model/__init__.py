"""The scaling model: what N GPUs would do, checked against published multi-GPU tables.

One model (it absorbed ``bcjax.timing.ring_model``): a data-parallel step costs the
per-device compute, the gradient communication left exposed after the backward pass
(scheduled layer by layer as the framework issues it: ``profiles``, ``schedule``), a
synchronisation term (the slowest of N devices, and past one host the slowest host), the
host's CPU contention and, on a dual-GPU board (K80), the clocks lost once both its GPUs work
(published rows only). ``terms`` holds the terms, ``presets`` every constant and its
source, ``fitted`` the fitted numbers, ``published`` and ``validate`` the check against
published tables
(``python -m bcjax.timing.scaling_model validate --published CSV --out DIR``).
"""

from bcjax.timing.scaling_model.presets import (
    INTERCONNECTS,
    PRESETS,
    Interconnect,
    interconnect,
    with_bus_bandwidth,
)
from bcjax.timing.scaling_model.terms import (
    ComputeModel,
    allreduce_cost,
    batch_for_efficiency,
    bucket_costs,
    expected_max_normal,
    exposed_allreduce,
    format_markdown,
    predict,
    ring_allreduce_time,
    step_time,
    strong_scaling_table,
    table,
    weak_scaling,
)

__all__ = [
    "INTERCONNECTS",
    "PRESETS",
    "Interconnect",
    "interconnect",
    "with_bus_bandwidth",
    "ComputeModel",
    "batch_for_efficiency",
    "allreduce_cost",
    "bucket_costs",
    "exposed_allreduce",
    "expected_max_normal",
    "format_markdown",
    "predict",
    "ring_allreduce_time",
    "step_time",
    "strong_scaling_table",
    "table",
    "weak_scaling",
]
