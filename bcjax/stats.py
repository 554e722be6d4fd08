"""Small-sample statistics for comparing runs over folds or seeds.

With 5 or 10 folds a mean alone says little: fold-to-fold spread on a few
hundred images is often as large as the effect being claimed. These helpers
give the Student-t interval of a mean and of a paired difference, so a report
can say whether a difference is larger than that noise. Pure functions of
plain numbers (numpy and scipy only), usable without JAX.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np


def _finite(values: Iterable) -> np.ndarray:
    # A fold may lack a metric (an AUC is undefined when a class is absent):
    # it drops out of that metric's statistics instead of poisoning them.
    out = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return np.asarray(out, np.float64)


def t_critical(confidence: float, dof: int) -> float:
    """Two-sided Student t critical value, e.g. t_critical(0.95, 4) = 2.776."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    from scipy import stats as scipy_stats

    return float(scipy_stats.t.ppf(0.5 + confidence / 2, dof))


def mean_ci(values: Sequence[float | None], confidence: float = 0.95) -> dict:
    """Mean, sample standard deviation (ddof=1) and Student-t interval.

    Returns {n, mean, sd, sem, t, half_width, low, high, confidence}; with
    fewer than two values the spread and interval are None (one fold has no
    spread to estimate), and with none the mean is None too. None/NaN values
    are left out and n counts the rest.
    """
    x = _finite(values)
    n = int(x.size)
    out = {
        "n": n,
        "mean": float(x.mean()) if n else None,
        "sd": None,
        "sem": None,
        "t": None,
        "half_width": None,
        "low": None,
        "high": None,
        "confidence": confidence,
    }
    if n >= 2:
        sd = float(x.std(ddof=1))
        sem = sd / math.sqrt(n)
        t = t_critical(confidence, n - 1)
        out.update(
            sd=sd,
            sem=sem,
            t=t,
            half_width=t * sem,
            low=out["mean"] - t * sem,
            high=out["mean"] + t * sem,
        )
    return out


def paired_difference(
    a: Sequence[float | None], b: Sequence[float | None], confidence: float = 0.95
) -> dict:
    """a - b pair by pair (same fold, same seed), with the t-interval of its mean.

    Pairing removes what both runs share (which images a fold holds), so the
    interval measures only how consistently a differs from b. `verdict` is
    "a > b" or "a < b" when the interval excludes 0, "no clear difference"
    when it does not, "identical" when every pair is equal, "too few pairs"
    below two pairs. A pair with a missing
    value on either side is left out.
    """
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    diffs = [None if x is None or y is None else float(x) - float(y) for x, y in zip(a, b)]
    stats = mean_ci(diffs, confidence)
    excludes = stats["low"] is not None and (stats["low"] > 0 or stats["high"] < 0)
    if stats["n"] >= 1 and all(d == 0.0 for d in diffs if d is not None):
        verdict = "identical"  # e.g. the same model trained on another device count
    elif stats["n"] < 2:
        verdict = "too few pairs"
    elif excludes:
        verdict = "a > b" if stats["mean"] > 0 else "a < b"
    else:
        verdict = "no clear difference"
    return {**stats, "differences": diffs, "excludes_zero": bool(excludes), "verdict": verdict}


def format_ci(stats: dict, digits: int = 3) -> str:
    """'0.812 ± 0.031 [0.781, 0.843]' (mean ± half-width [interval]), or the mean alone."""
    if stats.get("mean") is None:
        return "–"
    if stats.get("half_width") is None:
        return f"{stats['mean']:.{digits}f}"
    return (
        f"{stats['mean']:.{digits}f} ± {stats['half_width']:.{digits}f} "
        f"[{stats['low']:.{digits}f}, {stats['high']:.{digits}f}]"
    )
