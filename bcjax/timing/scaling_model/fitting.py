"""Fitting the model's free quantities, and judging them on rows they did not see.

Declared fit subset: rows of DeepLearningExamples' *current* tables, i.e. whose ``notes``
do not say HISTORICAL; the historical tables are held out. Rows whose published efficiency
is above linear (``unmatchable``) are never fitted on.

- ``sync_cv`` (one number) first, on the one-host rows whose host decodes no images (DALI,
  synthetic data) with no ceiling: grid 0 ... 0.05 in steps of 0.0005, least absolute error.
- ``node_sync_cv`` (one number), grid 0 ... 0.15 in steps of 0.005: for each value the
  groups' host terms (below) are fitted given it, and the value with the least absolute
  error over all rows wins (only rows spanning several hosts depend on it).
- per (input pipeline, host) group seen in the rows, given the two: its host contention
  and input ceiling together, least absolute error over the group's rows (``_fit_group``;
  the error is near piecewise linear in each, so the values matching single rows, "none"
  and the published figures are the candidates). Either is kept only if it cuts the group's
  error by ``MIN_GROUP_GAIN``. A pipeline never seen on a host gets neither: a loader's
  ceiling does not carry over to another framework's pipeline (TensorFlow 2's EfficientNet
  pipeline on DGX-1 delivers ~4,500-4,900 images/s, TensorFlow 1's ResNet-50 pipeline
  9,510; leaving one framework out with a per-loader fallback gave 7.1 points, not 5.1).

Judged by leaving one framework (or one source file) out: fit on the rest, predict it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from bcjax.timing.scaling_model import presets
from bcjax.timing.scaling_model.published import ModelParams, predict_case
from bcjax.timing.scaling_model.terms import host_count, host_share

CV_GRID = [i * 0.0005 for i in range(101)]
NODE_CV_GRID = [i * 0.005 for i in range(31)]
# A ceiling (or contention) must cut its group's summed absolute error by at least this
# much (1 point of efficiency), else the group gets none: a ceiling fitted to shave 0.1
# point off rows that scale at 97% caps a later, faster run of the same pipeline (MXNet's
# 2022 A100 table at 62% when its README is left out). Chosen by leaving one source out
# among 0, 0.01, 0.03, 0.05 and 0.1: 4.05, 3.81, 3.89, 3.86 and 4.09 points (in sample
# 2.06 ... 2.27).
MIN_GROUP_GAIN = 0.01


def in_fit_subset(case: dict) -> bool:
    return "historical" not in case["row"].get("notes", "").lower()


def fittable(cases: Iterable[dict]) -> list[dict]:
    return [c for c in cases if not c["reason"] and not c.get("unmatchable")]


def _abs_errors(cases, params) -> float:
    return sum(
        abs(predict_case(c, params)["efficiency"] - c["published_efficiency"]) for c in cases
    )


def _one_host(case: dict) -> bool:
    return host_count(case["gpus"], case["link"].gpus_per_node) == 1


def _fit_cv(cases: list[dict]) -> float:
    return min(CV_GRID, key=lambda cv: (_abs_errors(cases, ModelParams(cv, (), 0.0, ())), cv))


def _fit_group(cases: list[dict], cv: float, node_cv: float) -> tuple[float, float]:
    """One (pipeline, host) group's (contention, ceiling), together, least absolute error.

    With its step s0 and compute c from the other terms, a row's throughput is
    min(n b / (s0 + f share c), nodes * ceiling). Candidates for f: 0 and the value that
    matches each row alone; for the ceiling, given f: none, each row's throughput and each
    published figure per host (the error's kinks). Ties go to the smaller f and the larger
    ceiling; either is kept only if it cuts the group's error by ``MIN_GROUP_GAIN``.
    """
    rows = []
    for c in cases:
        p = predict_case(c, ModelParams(cv, (), node_cv, ()))
        n, batch = c["gpus"], c["batch"]
        rows.append(
            (
                p["step_s"],
                host_share(n, c["link"].gpus_per_node) * p["compute_s"],
                n * batch,
                host_count(n, c["link"].gpus_per_node),
                n * c["images_per_s_1"],
                c,
            )
        )
    can_cap = cases[0]["loader"] != "synthetic"

    def throughputs(f):
        return [work / (step + f * shared) for step, shared, work, *_ in rows]

    def error(f, ceiling):
        return sum(
            abs(min(ips, nodes * ceiling) / linear - c["published_efficiency"])
            for ips, (*_, nodes, linear, c) in zip(throughputs(f), rows)
        )

    def best_ceiling(f):
        if not can_cap:
            return math.inf
        candidates = {math.inf}
        for ips, (*_, nodes, _linear, c) in zip(throughputs(f), rows):
            candidates.update((ips / nodes, c["images_per_s"] / nodes))
        best = min(candidates, key=lambda ceiling: (error(f, ceiling), -ceiling))
        return best if error(f, math.inf) - error(f, best) >= MIN_GROUP_GAIN else math.inf

    fs = {0.0}
    for step, shared, work, *_rest, c in rows:
        if shared > 0 and work / c["images_per_s"] > step:
            fs.add(round((work / c["images_per_s"] - step) / shared, 4))
    scored = {f: (error(f, best_ceiling(f)), f) for f in fs}
    f = min(fs, key=lambda value: scored[value])
    if scored[0.0][0] - scored[f][0] < MIN_GROUP_GAIN:
        f = 0.0
    ceiling = best_ceiling(f)
    return f, (ceiling if math.isinf(ceiling) else round(ceiling))


def _groups(cases: list[dict]) -> dict:
    """Rows by (pipeline, host): what one ceiling and one contention figure describe."""
    groups: dict = {}
    for c in cases:
        if c["host"] is not None:
            groups.setdefault((c["pipeline"], c["host"]), []).append(c)
    return dict(sorted(groups.items()))


def _fit_host_terms(cases: list[dict], cv: float, node_cv: float) -> ModelParams:
    """Each (pipeline, host) group's contention and ceiling, given cv and node_cv."""
    fitted = {key: _fit_group(group, cv, node_cv) for key, group in _groups(cases).items()}
    contention = {key: f for key, (f, _) in fitted.items() if f > 0}
    ceilings = {key: cap for key, (_, cap) in fitted.items() if not math.isinf(cap)}
    return ModelParams(
        cv, tuple(sorted(ceilings.items())), node_cv, tuple(sorted(contention.items()))
    )


def fit(cases: Iterable[dict]) -> ModelParams:
    """sync_cv on the one-host rows whose host does no image decoding (DALI on the GPU,
    synthetic data; all one-host rows if there are none), so that it cannot trade off
    against a CPU loader's ceiling; then node_sync_cv with each group's host terms."""
    cases = fittable(cases)
    if not cases:
        return ModelParams(0.0, (), 0.0, ())
    one_host = [c for c in cases if _one_host(c)] or cases
    no_cpu = [c for c in one_host if c["loader"] not in presets.CPU_LOADERS] or one_host
    cv = _fit_cv(no_cpu)
    best = None
    for node_cv in NODE_CV_GRID:
        params = _fit_host_terms(cases, cv, node_cv)
        error = _abs_errors(cases, params)
        if best is None or error < best[0] - 1e-12:
            best = (error, params)
    return best[1]


def leave_one_out(cases: list[dict], label: Callable[[dict], str]) -> list[dict]:
    """For each label: fit on every other label's rows, predict this label's rows."""
    usable = fittable(cases)
    out = []
    for name in sorted({label(c) for c in usable}):
        held = [c for c in usable if label(c) == name]
        params = fit(c for c in usable if label(c) != name)
        errors = [
            abs(predict_case(c, params)["efficiency"] - c["published_efficiency"]) for c in held
        ]
        naive = [abs(1.0 - c["published_efficiency"]) for c in held]
        out.append(
            {
                "left_out": name,
                "rows": len(held),
                "mae": sum(errors) / len(held),
                "max": max(errors),
                "naive_mae": sum(naive) / len(held),
                "sync_cv": params.sync_cv,
                "node_sync_cv": params.node_sync_cv,
            }
        )
    return out
