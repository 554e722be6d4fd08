"""What sensitivity for malignant lesions at a specificity a clinic would accept?

One class (the positive one, "malignant" on BUSI) against the rest, scored by
its probability; an image is called positive when that score >= a threshold
(scikit-learn's convention, so thresholds are score values). Each operating
point's threshold is chosen on validation and then applied unchanged to test,
so nothing is tuned on test:

* sensitivity at specificity >= s: the threshold with the highest validation
  sensitivity among those with validation specificity >= s; of equals, the
  highest threshold (the most specific);
* specificity at sensitivity >= s: the highest validation specificity among
  thresholds with validation sensitivity >= s; of equals, the lowest threshold
  (the most sensitive).

A threshold of +inf (call nothing positive) is stored as None in the report.
ROC and precision-recall points follow `sklearn.metrics.roc_curve(...,
drop_intermediate=False)` and `precision_recall_curve`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "SPECIFICITY_TARGETS",
    "SENSITIVITY_TARGETS",
    "apply_threshold",
    "auc_from_roc",
    "average_precision",
    "describe_point",
    "operating_points_section",
    "point_name",
    "pr_points",
    "roc_points",
    "threshold_for_sensitivity",
    "threshold_for_specificity",
    "thresholds_of",
]

SPECIFICITY_TARGETS = (0.90, 0.95)
SENSITIVITY_TARGETS = (0.90, 0.95)
# Rates are ratios of counts; a rate equal to its target must count as reaching it.
_EPS = 1e-12


def _binary(scores, positive) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, np.float64).reshape(-1)
    positive = np.asarray(positive, bool).reshape(-1)
    if scores.shape != positive.shape:
        raise ValueError(f"scores {scores.shape} vs positive {positive.shape}")
    return scores, positive


def roc_points(scores, positive) -> dict[str, np.ndarray]:
    """{"thresholds" (descending, +inf first), "fpr", "tpr", "tp", "fp"}.

    Point i calls positive every score >= thresholds[i]; one point per distinct
    score plus the (0, 0) point at +inf. Rates are NaN without negatives or
    positives.
    """
    scores, positive = _binary(scores, positive)
    order = np.argsort(-scores, kind="mergesort")
    s, p = scores[order], positive[order]
    last_of_value = np.r_[s[1:] != s[:-1], True] if len(s) else np.zeros(0, bool)
    tp = np.r_[0, np.cumsum(p)[last_of_value]]
    fp = np.r_[0, np.cumsum(~p)[last_of_value]]
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tp / n_pos if n_pos else np.full(len(tp), np.nan)
        fpr = fp / n_neg if n_neg else np.full(len(fp), np.nan)
    return {
        "thresholds": np.r_[np.inf, s[last_of_value]],
        "fpr": fpr,
        "tpr": tpr,
        "tp": tp,
        "fp": fp,
    }


def pr_points(scores, positive) -> dict[str, np.ndarray]:
    """Precision-recall points as `sklearn.metrics.precision_recall_curve` gives
    them: one per distinct score, thresholds ascending, then the (recall 0,
    precision 1) end point with no threshold."""
    roc = roc_points(scores, positive)
    tp, fp, thresholds = roc["tp"][1:], roc["fp"][1:], roc["thresholds"][1:]
    if not len(tp) or tp[-1] == 0:
        return {"precision": np.ones(1), "recall": np.zeros(1), "thresholds": np.zeros(0)}
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    return {
        "precision": np.r_[precision[::-1], 1.0],
        "recall": np.r_[recall[::-1], 0.0],
        "thresholds": thresholds[::-1],
    }


def average_precision(scores, positive) -> float | None:
    """sum_n (R_n - R_{n-1}) P_n over thresholds from high to low (no
    interpolation; scikit-learn's definition). None without positives."""
    scores, positive = _binary(scores, positive)
    if not positive.any():
        return None
    pr = pr_points(scores, positive)
    return float(-np.sum(np.diff(pr["recall"]) * pr["precision"][:-1]))


def auc_from_roc(roc: dict[str, np.ndarray]) -> float | None:
    """Trapezoidal area under the ROC points (ties are the diagonal segments)."""
    if np.isnan(roc["fpr"]).any() or np.isnan(roc["tpr"]).any():
        return None
    return float(np.trapezoid(roc["tpr"], roc["fpr"]))


def threshold_for_specificity(scores, positive, target: float) -> float:
    """The threshold with the highest sensitivity at specificity >= target (see module)."""
    roc = roc_points(scores, positive)
    ok = 1.0 - roc["fpr"] >= target - _EPS  # the +inf point always qualifies
    best = np.max(roc["tpr"][ok])
    return float(roc["thresholds"][np.flatnonzero(ok & (roc["tpr"] == best))[0]])


def threshold_for_sensitivity(scores, positive, target: float) -> float:
    """The threshold with the highest specificity at sensitivity >= target (see module)."""
    roc = roc_points(scores, positive)
    ok = roc["tpr"] >= target - _EPS  # the lowest score always qualifies
    best = np.min(roc["fpr"][ok])
    return float(roc["thresholds"][np.flatnonzero(ok & (roc["fpr"] == best))[-1]])


def apply_threshold(scores, positive, threshold: float) -> dict[str, float | None]:
    """Sensitivity and specificity when score >= threshold is called positive."""
    scores, positive = _binary(scores, positive)
    called = scores >= threshold
    return {
        "sensitivity": float(called[positive].mean()) if positive.any() else None,
        "specificity": float((~called[~positive]).mean()) if (~positive).any() else None,
    }


def describe_point(point: dict[str, Any]) -> str:
    """ "sensitivity at 90% specificity" for a point of an `operating_points` section."""
    ((other, target),) = point["target"].items()
    return f"{point['rate']} at {100 * target:.0f}% {other}"


def point_name(rate: str, target: float) -> str:
    """ "sensitivity_at_90_specificity" for the sensitivity at 90% specificity."""
    other = "specificity" if rate == "sensitivity" else "sensitivity"
    return f"{rate}_at_{round(100 * target)}_{other}"


def _curves(probs: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    out = {}
    for k, name in enumerate(names):
        positive = labels == k
        roc = roc_points(probs[:, k], positive)
        pr = pr_points(probs[:, k], positive)
        out[name] = {
            "auc": auc_from_roc(roc),
            "average_precision": average_precision(probs[:, k], positive),
            "positives": int(positive.sum()),
            "roc": {"fpr": roc["fpr"].tolist(), "tpr": roc["tpr"].tolist()},
            "pr": {"precision": pr["precision"].tolist(), "recall": pr["recall"].tolist()},
        }
    return out


def operating_points_section(
    val_probs, val_labels, test_probs, test_labels, class_names: Sequence[str], positive_class: str
) -> dict[str, Any]:
    """The `operating_points` section.

    {"positive_class", "rule",
     "validation_auc", "test_auc"              (positive class vs the rest),
     "points": {name: {"rate": "sensitivity" | "specificity",
                       "target": {the other rate: value},
                       "threshold" (None = +inf),
                       "validation": {"sensitivity", "specificity"},
                       "test": {"sensitivity", "specificity"}}},
     "curves": {class: {"auc", "average_precision", "positives",
                        "roc": {"fpr", "tpr"}, "pr": {"precision", "recall"}}}  (test)}
    with names point_name(...), e.g. "sensitivity_at_90_specificity". Points are
    None when validation lacks positives or negatives.
    """
    names = list(class_names)
    if positive_class not in names:
        raise ValueError(f"positive class {positive_class!r} is not one of {names}")
    k = names.index(positive_class)
    val_probs, test_probs = np.asarray(val_probs, np.float64), np.asarray(test_probs, np.float64)
    val_pos = np.asarray(val_labels) == k
    test_pos = np.asarray(test_labels) == k
    val_score, test_score = val_probs[:, k], test_probs[:, k]
    can_choose = val_pos.any() and (~val_pos).any()
    points: dict[str, Any] = {}
    for rate, targets, choose in (
        ("sensitivity", SPECIFICITY_TARGETS, threshold_for_specificity),
        ("specificity", SENSITIVITY_TARGETS, threshold_for_sensitivity),
    ):
        other = "specificity" if rate == "sensitivity" else "sensitivity"
        for target in targets:
            if not can_choose:
                points[point_name(rate, target)] = None
                continue
            threshold = choose(val_score, val_pos, target)
            points[point_name(rate, target)] = {
                "rate": rate,
                "target": {other: target},
                "threshold": threshold if np.isfinite(threshold) else None,
                "validation": apply_threshold(val_score, val_pos, threshold),
                "test": apply_threshold(test_score, test_pos, threshold),
            }
    return {
        "positive_class": positive_class,
        "rule": f"positive when p({positive_class}) >= threshold; thresholds chosen on "
        "validation, applied to test",
        "validation_auc": auc_from_roc(roc_points(val_score, val_pos)),
        "test_auc": auc_from_roc(roc_points(test_score, test_pos)),
        "points": points,
        "curves": _curves(test_probs, np.asarray(test_labels), names),
    }


def thresholds_of(section: dict[str, Any]) -> dict[str, float]:
    """{point name: threshold} of an `operating_points` section (+inf for None),
    for evaluating the same points on other data (the bootstrap)."""
    return {
        name: (np.inf if p["threshold"] is None else float(p["threshold"]))
        for name, p in section["points"].items()
        if p is not None
    }
