"""Classification metrics as a JSON-ready report, and its rendering.

`classification_report(probs, labels, ...)` is the report as a pure function
of whole arrays; `report_from_confusion` is the same from confusion counts and
per-class AUCs (what bcjax.eval.accumulators.EvalAccumulator keeps over
batches); `format_report(report)` renders it for the console.

Conventions (match scikit-learn's defaults, so numbers can be compared):
* confusion matrix rows are true classes, columns predicted classes;
* precision, recall and F1 of a class are 0 where their denominator is 0;
* balanced accuracy averages recall over classes present in the labels;
* macro precision/recall/F1 average over classes present in the labels or the
  predictions (a class never seen nor predicted does not drag the mean to 0);
* AUC of a class is None when the class has no positives or no negatives;
  macro AUC averages the defined ones (None when none is defined);
* with two classes the report also names the positive class (the last, or the
  one asked for) and gives the binary AUC of its score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "binary_auc",
    "class_name_list",
    "classification_report",
    "confusion_counts",
    "flatten_scalars",
    "format_report",
    "positive_of",
    "report_from_confusion",
]


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num/den with 0 where den == 0, and no divide-by-zero warning."""
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    out = np.zeros(np.broadcast(num, den).shape, np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, ties sharing the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(x)]
    group_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    group_of_sorted = np.repeat(np.arange(len(starts)), ends - starts)
    ranks = np.empty(len(x), np.float64)
    ranks[order] = group_rank[group_of_sorted]
    return ranks


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """ROC AUC as the Mann-Whitney U statistic (ties count one half).

    None when there are no positives, no negatives or a non-finite score.
    """
    scores = np.asarray(scores, np.float64)
    positive = np.asarray(positive, bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0 or not np.all(np.isfinite(scores)):
        return None
    ranks = _average_ranks(scores)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def confusion_counts(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    flat = labels.astype(np.int64) * num_classes + preds.astype(np.int64)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def finite_or_none(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None


def class_name_list(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names {names} for {num_classes} classes")
    return names


def report_from_confusion(
    confusion: np.ndarray,
    class_names: Sequence[str] | None = None,
    *,
    loss: float | None = None,
    auc: Sequence[float | None] | None = None,
    positive_class: str | None = None,
) -> dict[str, Any]:
    """The report (see `classification_report`) from a confusion matrix.

    `auc` (one entry per class) comes from scores the matrix does not hold;
    without it the AUC fields are None. `positive_class`: see
    `classification_report`.
    """
    cm = np.asarray(confusion, np.int64)
    num_classes = cm.shape[0]
    if cm.shape != (num_classes, num_classes):
        raise ValueError(f"confusion matrix must be square, got {cm.shape}")
    names = class_name_list(class_names, num_classes)
    n = int(cm.sum())
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2.0 * tp, support + predicted)
    present = support > 0
    seen = present | (predicted > 0)
    if auc is None:
        auc = [None] * num_classes
    auc = [finite_or_none(a) for a in auc]
    defined_auc = [a for a in auc if a is not None]

    def mean_over(values, where):
        return float(values[where].mean()) if where.any() else None

    report = {
        "num_examples": n,
        "loss": finite_or_none(loss),
        "accuracy": float(tp.sum() / n) if n else None,
        "balanced_accuracy": mean_over(recall, present),
        "macro_precision": mean_over(precision, seen),
        "macro_recall": mean_over(recall, seen),
        "macro_f1": mean_over(f1, seen),
        "auc_macro": (float(np.mean(defined_auc)) if defined_auc else None),
        "per_class": {
            name: {
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
                "auc": auc[k],
                "support": int(support[k]),
            }
            for k, name in enumerate(names)
        },
        "class_names": names,
        "confusion_matrix": cm.tolist(),
    }
    if num_classes == 2:
        positive = positive_of(names, positive_class)
        report["positive_class"] = positive
        # The AUC of the positive class's score; the negative class's is the same
        # number, since its probability is one minus the positive's.
        report["binary_auc"] = auc[names.index(positive)]
    return report


def positive_of(class_names: Sequence[str], positive_class: str | None = None) -> str:
    """The positive class of a 2-class report: `positive_class`, else the last class."""
    names = list(class_names)
    if not positive_class:
        return names[-1]
    if positive_class not in names:
        raise ValueError(f"positive class {positive_class!r} is not one of {names}")
    return positive_class


def classification_report(
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str] | None = None,
    *,
    loss: float | None = None,
    positive_class: str | None = None,
) -> dict[str, Any]:
    """Every metric of a classifier from all its scores at once.

    Args:
      probs: [N, C] class probabilities (any per-class scores rank the same for
        AUC; the prediction is their argmax).
      labels: [N] int class ids in [0, C).
      class_names: C names (default "0".."C-1").
      loss: the mean loss to record, if known.
      positive_class: with two classes, the class called positive (default the
        last); ignored otherwise.

    Returns:
      A JSON-serialisable dict with keys num_examples, loss, accuracy,
      balanced_accuracy, macro_precision, macro_recall, macro_f1, auc_macro,
      per_class ({name: {precision, recall, f1, auc, support}}), class_names,
      confusion_matrix (list of lists, rows true); with two classes also
      positive_class and binary_auc (the AUC of the positive class's score).
      Undefined values are None.
    """
    probs = np.asarray(probs)
    labels = np.asarray(labels).astype(np.int64)
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"want probs [N, C] and labels [N], got {probs.shape} and {labels.shape}")
    num_classes = probs.shape[1]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels outside [0, {num_classes}): {sorted(set(labels.tolist()))}")
    cm = confusion_counts(np.argmax(probs, axis=-1), labels, num_classes)
    auc = [binary_auc(probs[:, k], labels == k) for k in range(num_classes)]
    return report_from_confusion(cm, class_names, loss=loss, auc=auc, positive_class=positive_class)


# --------------------------------------------------------------------------
# Rendering


def flatten_scalars(
    report: Mapping[str, Any],
    prefix: str = "",
) -> dict[str, float]:
    """Numeric scalars of a report as flat "prefix" + "name" keys, for logs.

    Per-class values become e.g. "val/recall/benign"; None values and the
    confusion matrix are left out.
    """
    out: dict[str, float] = {}
    for key, value in report.items():
        if key == "per_class":
            for name, stats in value.items():
                for stat, v in stats.items():
                    if v is not None:
                        out[f"{prefix}{stat}/{name}"] = float(v)
        elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def _fmt(x: float | None, width: int = 7) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.4f}"


def format_report(report: Mapping[str, Any]) -> str:
    """A small console table: summary line, per-class table, confusion matrix."""
    names = list(report["class_names"])
    w = max(9, *(len(n) for n in names)) + 1
    lines = [
        f"n={report['num_examples']}  loss {_fmt(report['loss'], 0).strip()}"
        f"  acc {_fmt(report['accuracy'], 0).strip()}"
        f"  bal_acc {_fmt(report['balanced_accuracy'], 0).strip()}"
        f"  macro_f1 {_fmt(report['macro_f1'], 0).strip()}"
        f"  auc {_fmt(report['auc_macro'], 0).strip()}",
        f"{'class':<{w}}{'precision':>10}{'recall':>8}{'f1':>8}{'auc':>8}{'support':>9}",
    ]
    for name in names:
        s = report["per_class"][name]
        lines.append(
            f"{name:<{w}}{_fmt(s['precision'], 10)}{_fmt(s['recall'], 8)}"
            f"{_fmt(s['f1'], 8)}{_fmt(s['auc'], 8)}{s['support']:>9d}"
        )
    cw = max(7, *(len(n) for n in names)) + 1
    corner = "true\\pred"
    lines.append(f"{corner:<{w}}" + "".join(f"{n:>{cw}}" for n in names))
    for name, row in zip(names, report["confusion_matrix"]):
        lines.append(f"{name:<{w}}" + "".join(f"{c:>{cw}d}" for c in row))
    if report.get("positive_class"):  # a 2-class report
        lines.append(
            f"positive class {report['positive_class']}: "
            f"binary AUC {_fmt(report.get('binary_auc'), 0).strip()}"
        )
    return "\n".join(lines)
