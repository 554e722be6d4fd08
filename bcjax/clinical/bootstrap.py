"""How wide is a single run's uncertainty? A stratified, seeded bootstrap of test metrics.

Each resample draws, within every true class, as many examples as the class
has, with replacement: the class mix of the test set stays fixed (as the
split fixed it) and every class stays present, so every metric is defined in
every resample. The interval is the percentile one: the 2.5th and 97.5th
percentiles of the resampled values (numpy's linear interpolation).

A resample is a row of counts w[b, i] (how often example i was drawn), so every
metric below is a weighted metric of the original arrays and all resamples are
computed at once with array operations: 2,000 resamples of a few hundred
examples take milliseconds.

Conventions match bcjax.eval.metrics (and scikit-learn): macro-F1 averages the
classes present in the labels or the predictions; macro AUC averages the
one-vs-rest AUCs (Mann-Whitney, ties count one half) of classes with both
positives and negatives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "CONFIDENCE",
    "RESAMPLES",
    "bootstrap_section",
    "percentile_interval",
    "stratified_weights",
    "weighted_auc",
    "weighted_metrics",
]

RESAMPLES = 2000
CONFIDENCE = 0.95


def stratified_weights(labels, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """int32 [resamples, N]: how often each example is drawn in each resample.

    Within each class (in class order) the draws come from one seeded
    generator, so the result depends only on (labels, resamples, seed).
    """
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    rng = np.random.default_rng(seed)
    n = len(labels)
    drawn = []
    for k in np.unique(labels):
        members = np.flatnonzero(labels == k)
        drawn.append(members[rng.integers(0, len(members), size=(resamples, len(members)))])
    if not drawn:
        return np.zeros((resamples, 0), np.int32)
    index = np.concatenate(drawn, axis=1)  # [B, N] example ids
    flat = (np.arange(resamples)[:, None] * n + index).reshape(-1)
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(np.int32)


def weighted_auc(weights: np.ndarray, scores, positive) -> np.ndarray:
    """One-vs-rest ROC AUC per row of `weights` [B, N]: the weighted
    Mann-Whitney statistic, P(score_pos > score_neg) + 1/2 P(equal); NaN for a
    row without positive or negative weight."""
    weights = np.asarray(weights, np.float64)
    scores = np.asarray(scores, np.float64)
    positive = np.asarray(positive, bool)
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if len(s) else np.zeros(0, int)
    w = weights[:, order]
    # Weight of positives and negatives per distinct score value, ascending.
    pos = np.add.reduceat(w * positive[order], starts, axis=1)
    neg = np.add.reduceat(w * ~positive[order], starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    wins = np.sum(pos * (neg_below + 0.5 * neg), axis=1)
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / pairs, np.nan)


def weighted_metrics(
    weights,
    probs,
    labels,
    *,
    positive_index: int | None = None,
    thresholds: Mapping[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Each metric as an array [B], one value per row of example weights [B, N].

    Keys: accuracy, balanced_accuracy, macro_f1, auc_macro and, for every
    {name: threshold} in `thresholds` (score of class `positive_index` >=
    threshold is positive), "<name>/sensitivity" and "<name>/specificity".
    A row of ones gives the plain metrics of (probs, labels).
    """
    weights = np.atleast_2d(np.asarray(weights, np.float64))
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels).astype(np.int64)
    num_classes = probs.shape[1]
    preds = probs.argmax(axis=1)
    # Confusion matrix per row [B, C, C] (rows true): weights times a one-hot of the cell.
    cell = np.eye(num_classes * num_classes)[labels * num_classes + preds]
    confusion = (weights @ cell).reshape(-1, num_classes, num_classes)
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    support = confusion.sum(axis=2)
    predicted = confusion.sum(axis=1)
    total = support.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
        present = support > 0
        seen = present | (predicted > 0)
        out = {
            "accuracy": tp.sum(axis=1) / total,
            "balanced_accuracy": (recall * present).sum(axis=1) / present.sum(axis=1),
            "macro_f1": (f1 * seen).sum(axis=1) / seen.sum(axis=1),
        }
        aucs = np.stack(
            [weighted_auc(weights, probs[:, k], labels == k) for k in range(num_classes)]
        )
        defined = np.isfinite(aucs)
        out["auc_macro"] = np.where(defined, aucs, 0.0).sum(axis=0) / defined.sum(axis=0)
        if thresholds:
            if positive_index is None:
                raise ValueError("thresholds need positive_index")
            is_pos = labels == positive_index
            pos_weight = weights @ is_pos
            neg_weight = weights @ ~is_pos
            for name, threshold in thresholds.items():
                called = probs[:, positive_index] >= threshold
                out[f"{name}/sensitivity"] = (weights @ (called & is_pos)) / pos_weight
                out[f"{name}/specificity"] = (weights @ (~called & ~is_pos)) / neg_weight
    return out


def percentile_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """(low, high) percentiles of the finite values; None when there are none."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return None
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _interval(estimate: float, resampled: np.ndarray, confidence: float) -> dict[str, Any]:
    bounds = percentile_interval(resampled, confidence)
    return {
        "value": None if not np.isfinite(estimate) else float(estimate),
        "low": None if bounds is None else bounds[0],
        "high": None if bounds is None else bounds[1],
    }


def bootstrap_section(
    probs,
    labels,
    *,
    positive_index: int | None = None,
    thresholds: Mapping[str, float] | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """The `bootstrap` section for one set of test predictions.

    {"resamples", "seed", "confidence", "method",
     "metrics": {"accuracy" | "balanced_accuracy" | "macro_f1" | "auc_macro":
                 {"value", "low", "high"}},
     "operating_points": {name: {"sensitivity": {...}, "specificity": {...}}}}
    "value" is the metric on the test set itself; thresholds stay fixed (those
    chosen on validation), only the test examples are resampled.
    """
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels).astype(np.int64)
    weights = stratified_weights(labels, resamples, seed)
    resampled = weighted_metrics(
        weights, probs, labels, positive_index=positive_index, thresholds=thresholds
    )
    observed = weighted_metrics(
        np.ones((1, len(labels))),
        probs,
        labels,
        positive_index=positive_index,
        thresholds=thresholds,
    )
    metrics = {
        name: _interval(observed[name][0], resampled[name], confidence)
        for name in ("accuracy", "balanced_accuracy", "macro_f1", "auc_macro")
    }
    points: dict[str, Any] = {}
    for name in thresholds or {}:
        points[name] = {
            rate: _interval(observed[f"{name}/{rate}"][0], resampled[f"{name}/{rate}"], confidence)
            for rate in ("sensitivity", "specificity")
        }
    return {
        "resamples": int(resamples),
        "seed": int(seed),
        "confidence": confidence,
        "method": "stratified by true class, percentile interval",
        "metrics": metrics,
        "operating_points": points,
    }
