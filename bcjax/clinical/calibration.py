"""Are the probabilities honest? Top-label ECE, Brier score, temperature scaling.

Conventions (Guo et al. 2017, "On Calibration of Modern Neural Networks"):
* confidence = the largest class probability, the prediction its argmax;
* ECE over `bins` equal-width bins of confidence, bin m = ((m-1)/M, m/M]
  (a confidence of 0 joins the first bin): sum over bins of
  (examples in bin / N) * |accuracy in bin - mean confidence in bin|;
* Brier score, multi-class: mean over examples of sum_k (p_k - [y = k])^2,
  from 0 (perfect) to 2;
* temperature scaling divides the log-probabilities by one T > 0 fitted to
  minimise the validation negative log-likelihood; softmax(log p / T) equals
  softmax(logits / T), so stored probabilities are enough. T > 1 softens an
  over-confident model. It never changes the argmax, so accuracy stays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "ECE_BINS",
    "apply_temperature",
    "brier_score",
    "calibration_section",
    "expected_calibration_error",
    "fit_temperature",
    "log_probabilities",
    "negative_log_likelihood",
    "reliability_bins",
]

ECE_BINS = 15
# The fit searches T in [1/20, 20]: beyond that the model's probabilities are
# nearly one-hot or uniform and the exact T no longer matters.
_LOG_T_BOUNDS = (-np.log(20.0), np.log(20.0))
# The fitted log T is exact to this (the NLL is flat near its minimum: a change of
# 1e-9 in log T moves no reported number). scipy.optimize would do the same search;
# this module keeps to numpy because importing scipy costs every run ≈ 0.5 s.
_LOG_T_TOLERANCE = 1e-9
_GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0  # 0.618...


def _check(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"want probs [N, C] and labels [N], got {probs.shape} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels outside [0, {probs.shape[1]})")
    return probs, labels


def log_probabilities(probs) -> np.ndarray:
    """log p in float64; a probability that underflowed to 0 becomes the smallest
    normal float64, so that the log stays finite."""
    return np.log(np.clip(np.asarray(probs, np.float64), np.finfo(np.float64).tiny, None))


def apply_temperature(probs, temperature: float) -> np.ndarray:
    """softmax(log p / T), float64 [N, C]."""
    scaled = log_probabilities(probs) / float(temperature)
    e = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """log(sum(exp(x))) over the last axis, without overflow."""
    top = x.max(axis=-1)
    return top + np.log(np.exp(x - top[..., None]).sum(axis=-1))


def minimize_unimodal(f, low: float, high: float, tolerance: float) -> float:
    """The x in [low, high] minimising a unimodal f, to within `tolerance`: golden-section
    search (each step keeps the bracket holding the smaller of two inner values)."""
    a, b = low, high
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tolerance:
        if fc <= fd:  # the minimum is in [a, d]
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:  # in [c, b]
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
    # The ends too: a minimum at a bound is approached, never evaluated, by the search.
    return min((a + b) / 2, low, high, key=f)


def negative_log_likelihood(probs, labels) -> float | None:
    probs, labels = _check(probs, labels)
    if not labels.size:
        return None
    picked = log_probabilities(probs[np.arange(len(labels)), labels])
    return float(-picked.mean())


def brier_score(probs, labels) -> float | None:
    """Mean over examples of sum_k (p_k - onehot_k)^2 (0 best, 2 worst)."""
    probs, labels = _check(probs, labels)
    if not labels.size:
        return None
    onehot = np.eye(probs.shape[1])[labels]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def reliability_bins(probs, labels, bins: int = ECE_BINS) -> dict[str, Any]:
    """Per confidence bin: edges, example count, mean confidence and accuracy
    (None for an empty bin), the data of a reliability diagram."""
    probs, labels = _check(probs, labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    # digitize(right=True) gives i with edges[i-1] < c <= edges[i]: bin i - 1.
    which = np.clip(np.digitize(confidence, edges, right=True) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=bins)
    correct_sum = np.bincount(which, weights=correct.astype(np.float64), minlength=bins)
    return {
        "edges": edges.tolist(),
        "count": count.tolist(),
        "confidence": [float(c / n) if n else None for c, n in zip(conf_sum, count)],
        "accuracy": [float(a / n) if n else None for a, n in zip(correct_sum, count)],
    }


def expected_calibration_error(probs, labels, bins: int = ECE_BINS) -> float | None:
    """Top-label ECE with `bins` equal-width bins (see the module docstring)."""
    table = reliability_bins(probs, labels, bins)
    n = sum(table["count"])
    if not n:
        return None
    gaps = [
        count * abs(acc - conf)
        for count, acc, conf in zip(table["count"], table["accuracy"], table["confidence"])
        if count
    ]
    return float(sum(gaps) / n)


def fit_temperature(probs, labels) -> float:
    """The T minimising the NLL of softmax(log p / T) on (probs, labels).

    A 1-D bounded search over log T (golden section); the NLL is convex in 1/T, so
    the minimum is unique (and the NLL unimodal in log T). Returns 1.0 for an empty set.
    """
    probs, labels = _check(probs, labels)
    if not labels.size:
        return 1.0
    logp = log_probabilities(probs)
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        scaled = logp / np.exp(log_t)
        return float(np.mean(_logsumexp(scaled) - scaled[rows, labels]))

    return float(np.exp(minimize_unimodal(nll, *_LOG_T_BOUNDS, _LOG_T_TOLERANCE)))


def _scores(probs, labels, bins: int) -> dict[str, Any]:
    probs, labels = _check(probs, labels)
    return {
        "ece": expected_calibration_error(probs, labels, bins),
        "brier": brier_score(probs, labels),
        "nll": negative_log_likelihood(probs, labels),
        "mean_confidence": float(probs.max(axis=1).mean()) if len(labels) else None,
        "accuracy": float(np.mean(probs.argmax(axis=1) == labels)) if len(labels) else None,
        "reliability": reliability_bins(probs, labels, bins),
    }


def calibration_section(
    val_probs, val_labels, test_probs, test_labels, bins: int = ECE_BINS
) -> dict[str, Any]:
    """The `calibration` section: T fitted on validation, test scored before and after.

    {"bins", "temperature", "fitted_on": "validation",
     "validation": {"nll_before", "nll_after"},
     "test": {"before": scores, "after": scores}} with scores =
    {"ece", "brier", "nll", "mean_confidence", "accuracy",
     "reliability": {"edges", "count", "confidence", "accuracy"}}.
    """
    temperature = fit_temperature(val_probs, val_labels)
    return {
        "bins": bins,
        "temperature": temperature,
        "fitted_on": "validation",
        "validation": {
            "nll_before": negative_log_likelihood(val_probs, val_labels),
            "nll_after": negative_log_likelihood(
                apply_temperature(val_probs, temperature), val_labels
            ),
        },
        "test": {
            "before": _scores(test_probs, test_labels, bins),
            "after": _scores(apply_temperature(test_probs, temperature), test_labels, bins),
        },
    }
