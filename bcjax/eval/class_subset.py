"""What a labelled set holding only some of a model's classes can say about the model.

An external set of 50 biopsy-proven cancers has one class; its question is
sensitivity. Such a set defines, for each class it has images of:

- recall (the fraction of its images called that class), with a bootstrap
  interval (resampling within the class, bcjax.clinical.bootstrap);
- its confusion row (what its images were called, over all the model's classes);
- the mean probability the model gave the true class;

and over all its images the top-label calibration (ECE, Brier, NLL, reliability
bins; bcjax.clinical.calibration) and the predictions themselves. What it cannot
define is listed with the reason in ``undefined``: an AUC needs images of the
class and of another; a class without images has no recall; where every image is
of one class, that class's precision has no images of other classes that could be
false positives, and specificity has no negatives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bcjax.clinical import bootstrap, calibration

__all__ = ["format_subset", "subset_report"]


def _recall_interval(correct: np.ndarray, resamples: int, seed: int, confidence: float) -> dict:
    """Recall of one class's images with its percentile bootstrap interval."""
    weights = bootstrap.stratified_weights(np.zeros(len(correct), np.int64), resamples, seed)
    resampled = (weights @ correct.astype(np.float64)) / len(correct)
    low, high = bootstrap.percentile_interval(resampled, confidence)
    return {"value": float(correct.mean()), "low": low, "high": high}


def subset_report(
    probs,
    labels,
    class_names: Sequence[str],
    *,
    resamples: int = bootstrap.RESAMPLES,
    seed: int = 0,
    confidence: float = bootstrap.CONFIDENCE,
) -> dict[str, Any]:
    """{"classes_present", "classes_absent", "per_class": {class: {"support", "recall":
    {"value", "low", "high"}, "confusion_row": {class: n}, "mean_probability_true"}},
    "calibration": {...}, "undefined": [{"metric", "why"}], "bootstrap": {...}}."""
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels).astype(np.int64)
    names = list(class_names)
    preds = probs.argmax(axis=1)
    present = [c for k, c in enumerate(names) if np.any(labels == k)]
    absent = [c for c in names if c not in present]
    per_class = {}
    for c in present:
        k = names.index(c)
        mine = labels == k
        per_class[c] = {
            "support": int(mine.sum()),
            "recall": _recall_interval(preds[mine] == k, resamples, seed, confidence),
            "confusion_row": {
                other: int(np.sum(preds[mine] == j)) for j, other in enumerate(names)
            },
            "mean_probability_true": float(probs[mine, k].mean()),
        }
    scores = {
        "ece": calibration.expected_calibration_error(probs, labels),
        "brier": calibration.brier_score(probs, labels),
        "nll": calibration.negative_log_likelihood(probs, labels),
        "mean_confidence": float(probs.max(axis=1).mean()) if len(labels) else None,
        "accuracy": float(np.mean(preds == labels)) if len(labels) else None,
        "reliability": calibration.reliability_bins(probs, labels),
    }
    undefined = []
    for c in names:
        if c in present and len(present) > 1:
            continue
        if c in present:
            why = f"needs images of {c!r} and of another class; the set has only {c!r}"
        else:
            why = f"needs images of {c!r}; the set has none"
        undefined.append({"metric": f"auc/{c}", "why": why})
    if len(present) < 2:
        undefined.append(
            {"metric": "auc_macro", "why": "no class has both positives and negatives here"}
        )
    for c in absent:
        undefined.append({"metric": f"recall/{c}", "why": f"the set has no images of {c!r}"})
    if len(present) == 1:
        only = present[0]
        undefined.append(
            {
                "metric": f"precision/{only}",
                "why": f"every image is {only!r}: no image of another class could be called "
                f"{only!r} wrongly (the report's value is not informative)",
            }
        )
        undefined.append({"metric": "specificity", "why": f"no negatives: every image is {only!r}"})
    return {
        "classes_present": present,
        "classes_absent": absent,
        "per_class": per_class,
        "calibration": scores,
        "undefined": undefined,
        "bootstrap": {
            "resamples": int(resamples),
            "seed": int(seed),
            "confidence": confidence,
            "method": "resampled within each class, percentile interval",
        },
    }


def format_subset(section: Mapping[str, Any]) -> str:
    """The console lines of ``subset_report``'s dict."""
    level = int(round(100 * section["bootstrap"]["confidence"]))
    lines = [f"Classes with images: {', '.join(section['classes_present'])}"]
    for c, entry in section["per_class"].items():
        r = entry["recall"]
        row = ", ".join(f"{k} {n}" for k, n in entry["confusion_row"].items())
        lines.append(
            f"  {c}: recall {r['value']:.3f} ({level}% CI {r['low']:.3f}-{r['high']:.3f}) "
            f"of {entry['support']}; called: {row}"
        )
    cal = section["calibration"]
    if cal["ece"] is not None:
        lines.append(f"Calibration: ECE {cal['ece']:.3f}, Brier {cal['brier']:.3f}")
    if section["undefined"]:
        lines.append("Undefined on this set:")
        lines.extend(f"  {u['metric']}: {u['why']}" for u in section["undefined"])
    return "\n".join(lines)
