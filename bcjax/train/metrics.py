"""Classification metrics: clu.metrics accumulation and a JSON-ready report.

On the host, `EvalAccumulator` takes each eval batch's logits (or
probabilities), labels and `valid` mask and keeps what one-vs-rest AUC needs:
every score. `compute()` returns the full report as plain Python types.

`classification_report(probs, labels, ...)` is the same report as a pure
function of whole arrays; `format_report(report)` renders it for the console.

Conventions (match scikit-learn's defaults, so numbers can be compared):
* confusion matrix rows are true classes, columns predicted classes;
* precision, recall and F1 of a class are 0 where their denominator is 0;
* balanced accuracy averages recall over classes present in the labels;
* macro precision/recall/F1 average over classes present in the labels or the
  predictions (a class never seen nor predicted does not drag the mean to 0);
* AUC of a class is None when the class has no positives or no negatives;
  macro AUC averages the defined ones (None when none is defined).
"""
# No `from __future__ import annotations`: clu's Collection reads the field
# annotations as classes.

from collections.abc import Mapping, Sequence
from typing import Any

from clu import metrics as clu_metrics
import flax
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

__all__ = [
    "ConfusionMatrix",
    "EvalAccumulator",
    "TrainAccumulator",
    "classification_report",
    "report_from_confusion",
    "binary_auc",
    "format_report",
    "flatten_scalars",
]


# --------------------------------------------------------------------------
# clu metrics


@flax.struct.dataclass
class ConfusionMatrix(clu_metrics.Metric):
    """Counts [num_classes, num_classes]; rows true class, columns predicted.

    `empty()` cannot know the number of classes, so it holds a 0x0 matrix that
    `merge` treats as the identity.
    """

    counts: jnp.ndarray

    @classmethod
    def empty(cls) -> "ConfusionMatrix":
        return cls(counts=jnp.zeros((0, 0), jnp.int32))

    @classmethod
    def from_model_output(cls, *, logits: jnp.ndarray, labels: jnp.ndarray,
                          mask: jnp.ndarray | None = None,
                          **_) -> "ConfusionMatrix":
        num_classes = logits.shape[-1]
        if mask is None:
            mask = jnp.ones(labels.shape, bool)
        # Padded rows may carry any label (even -1): point them at a valid cell
        # and add 0 there, so the scatter never goes out of bounds.
        labels = jnp.where(mask, labels, 0).astype(jnp.int32)
        preds = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        counts = jnp.zeros((num_classes, num_classes), jnp.int32)
        counts = counts.at[labels, preds].add(mask.astype(jnp.int32))
        return cls(counts=counts)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        if self.counts.size == 0:
            return other
        if other.counts.size == 0:
            return self
        return type(self)(counts=self.counts + other.counts)

    def compute(self) -> jnp.ndarray:
        return self.counts


@flax.struct.dataclass
class ScoresAndLabels(clu_metrics.CollectingMetric.from_outputs(
    ("probs", "labels"))):
    """Host-side store of every valid example's class probabilities and label;
    the AUC needs all of them, not a running sum."""


# --------------------------------------------------------------------------
# Pure numpy pieces


def _to_host(x: Any) -> np.ndarray:
    """numpy view of a numpy/JAX array, gathering a multi-process global array.

    Every process must call this with the same global arrays (it is a
    collective then); each gets the full array back.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _softmax64(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _cross_entropy64(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    picked = probs[np.arange(len(labels)), labels]
    return -np.log(np.clip(picked, 1e-300, None))


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


def _confusion_numpy(preds: np.ndarray, labels: np.ndarray,
                     num_classes: int) -> np.ndarray:
    flat = labels.astype(np.int64) * num_classes + preds.astype(np.int64)
    return np.bincount(flat, minlength=num_classes**2).reshape(
        num_classes, num_classes)


def _float_or_none(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None


def _class_names(class_names: Sequence[str] | None,
                 num_classes: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names {names} for "
                         f"{num_classes} classes")
    return names


def report_from_confusion(
    confusion: np.ndarray,
    class_names: Sequence[str] | None = None,
    *,
    loss: float | None = None,
    auc: Sequence[float | None] | None = None,
) -> dict[str, Any]:
    """The report (see `classification_report`) from a confusion matrix.

    `auc` (one entry per class) comes from scores the matrix does not hold;
    without it the AUC fields are None.
    """
    cm = np.asarray(confusion, np.int64)
    num_classes = cm.shape[0]
    if cm.shape != (num_classes, num_classes):
        raise ValueError(f"confusion matrix must be square, got {cm.shape}")
    names = _class_names(class_names, num_classes)
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
    auc = [_float_or_none(a) for a in auc]
    defined_auc = [a for a in auc if a is not None]

    def mean_over(values, where):
        return float(values[where].mean()) if where.any() else None

    return {
        "num_examples": n,
        "loss": _float_or_none(loss),
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
            } for k, name in enumerate(names)
        },
        "class_names": names,
        "confusion_matrix": cm.tolist(),
    }


def classification_report(
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str] | None = None,
    *,
    loss: float | None = None,
) -> dict[str, Any]:
    """Every metric of a classifier from all its scores at once.

    Args:
      probs: [N, C] class probabilities (any per-class scores rank the same for
        AUC; the prediction is their argmax).
      labels: [N] int class ids in [0, C).
      class_names: C names (default "0".."C-1").
      loss: the mean loss to record, if known.

    Returns:
      A JSON-serialisable dict with keys num_examples, loss, accuracy,
      balanced_accuracy, macro_precision, macro_recall, macro_f1, auc_macro,
      per_class ({name: {precision, recall, f1, auc, support}}), class_names,
      confusion_matrix (list of lists, rows true). Undefined values are None.
    """
    probs = np.asarray(probs)
    labels = np.asarray(labels).astype(np.int64)
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"want probs [N, C] and labels [N], got {probs.shape} "
                         f"and {labels.shape}")
    num_classes = probs.shape[1]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels outside [0, {num_classes}): "
                         f"{sorted(set(labels.tolist()))}")
    cm = _confusion_numpy(np.argmax(probs, axis=-1), labels, num_classes)
    auc = [binary_auc(probs[:, k], labels == k) for k in range(num_classes)]
    return report_from_confusion(cm, class_names, loss=loss, auc=auc)


# --------------------------------------------------------------------------
# Host accumulators


class EvalAccumulator:
    """Accumulates eval batches (padding masked out) into a full report.

    Usage:
      acc = EvalAccumulator(3, ("normal", "benign", "malignant"))
      for batch in eval_batches:
        out = eval_step(state, batch)        # logits [B, C], maybe loss [B]
        acc.update(out["logits"], batch["label"], batch["valid"], out.get("loss"))
      report = acc.compute()

    Arrays may be numpy or JAX. A multi-process global jax.Array is gathered
    onto every process (so all processes must call `update` together); then
    each process computes the same report, and process 0 writes it.
    """

    def __init__(self, num_classes: int,
                 class_names: Sequence[str] | None = None,
                 *, from_logits: bool = True):
        """`from_logits=False` when `update` gets probabilities, not logits."""
        self.num_classes = int(num_classes)
        self.class_names = _class_names(class_names, self.num_classes)
        self.from_logits = from_logits
        self.reset()

    def reset(self) -> None:
        self._loss = clu_metrics.Average(total=np.float64(0.0), count=np.int64(0))
        self._confusion = ConfusionMatrix.empty()
        self._scores = ScoresAndLabels.empty()
        self._loss_missing = False

    def update(self, scores: Any, labels: Any, valid: Any = None,
               loss: Any = None) -> None:
        """Adds one batch.

        Args:
          scores: [B, C] logits (or probabilities if `from_logits=False`);
            leading axes (a pmap's [D, B/D, C]) are flattened, likewise below.
          labels: [B] int labels; those of padded rows are ignored.
          valid: [B] bool, False for padding; None means all valid.
          loss: [B] per-example loss (masked here), or None to use the plain
            cross-entropy of `scores`. A scalar is refused: a batch mean of a
            padded batch cannot be unmixed from its padding.
        """
        scores = _to_host(scores)
        labels = _to_host(labels).astype(np.int64).reshape(-1)
        if scores.ndim > 2:  # pmap outputs carry a leading device axis
            scores = scores.reshape(-1, scores.shape[-1])
        if scores.ndim != 2 or scores.shape != (len(labels), self.num_classes):
            raise ValueError(f"want scores [B, {self.num_classes}] for {len(labels)}"
                             f" labels, got {scores.shape}")
        valid = (np.ones(len(labels), bool) if valid is None
                 else _to_host(valid).astype(bool).reshape(-1))
        if valid.shape != labels.shape:
            raise ValueError(f"valid {valid.shape} vs labels {labels.shape}")
        labels = labels[valid]
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels outside [0, {self.num_classes}): "
                             f"{sorted(set(labels.tolist()))}")
        scores = scores[valid]
        probs = (_softmax64(scores) if self.from_logits
                 else scores.astype(np.float64))
        if loss is None:
            per_example = _cross_entropy64(probs, labels)
        else:
            loss = _to_host(loss)
            if loss.ndim == 0 or loss.size != len(valid):
                raise ValueError(f"loss must be per example [{len(valid)}], got shape "
                                 f"{loss.shape}")
            per_example = loss.astype(np.float64).reshape(-1)[valid]
        self._loss = self._loss.merge(clu_metrics.Average(
            total=np.float64(per_example.sum()),
            count=np.int64(len(per_example))))
        self._confusion = self._confusion.merge(ConfusionMatrix(
            counts=_confusion_numpy(np.argmax(probs, -1), labels,
                                    self.num_classes)))
        self._scores = self._scores.merge(ScoresAndLabels(
            values={"probs": (probs,), "labels": (labels,)}))

    @property
    def num_examples(self) -> int:
        return int(self._loss.count)

    def compute(self) -> dict[str, Any]:
        """The report of `classification_report` over all valid examples seen."""
        if self.num_examples == 0:
            return report_from_confusion(
                np.zeros((self.num_classes,) * 2, np.int64), self.class_names)
        collected = self._scores.compute()
        probs, labels = collected["probs"], collected["labels"]
        auc = [binary_auc(probs[:, k], labels == k)
               for k in range(self.num_classes)]
        return report_from_confusion(
            np.asarray(self._confusion.compute()), self.class_names,
            loss=float(self._loss.compute()), auc=auc)

    def arrays(self) -> dict[str, np.ndarray]:
        """All valid examples' probabilities [N, C] and labels [N] so far."""
        if self.num_examples == 0:
            return {"probs": np.zeros((0, self.num_classes)),
                    "labels": np.zeros((0,), np.int64)}
        return self._scores.compute()


# Steps per call of `_reduce_chunk`: a fixed size, so the reducer compiles once
# per metric structure whatever the number of steps in an epoch (XLA's compile
# time grows with the operand count: ~0.3 s for 7 keys x 32 steps on a CPU).
_CHUNK = 32


@jax.jit
def _reduce_chunk(slots: tuple[tuple[jax.Array, ...], ...],
                  n_valid: jax.Array) -> tuple[jax.Array, ...]:
    """Per slot, the sum of every element of its first `n_valid[i]` arrays.

    Each slot holds `_CHUNK` arrays of one shape and dtype; the tail past
    `n_valid[i]` repeats a real value as filler and is masked out (with
    `where`, so a NaN there cannot leak in). Floats are summed in at least
    float32, bools and ints as jnp.sum does (bool -> int).
    """
    out = []
    for i, vals in enumerate(slots):
        x = jnp.stack(vals)
        keep = jnp.arange(x.shape[0]) < n_valid[i]
        x = jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x,
                      jnp.zeros((), x.dtype))
        dtype = (jnp.promote_types(x.dtype, jnp.float32)
                 if jnp.issubdtype(x.dtype, jnp.floating) else None)
        out.append(jnp.sum(x, dtype=dtype))
    return tuple(out)


def _sum_device_slots(slots: Sequence[Sequence[jax.Array]]) -> list[float]:
    """Sum of all elements of all arrays of each slot, as float64 host floats.

    All arrays of a slot share shape, dtype and sharding. Slots are reduced in
    chunks of `_CHUNK` steps, one `_reduce_chunk` call per chunk and sharding
    (arrays on different devices cannot meet in one computation); the chunk
    sums come back in one `device_get` and are added in float64.
    """
    by_sharding: dict[Any, list[int]] = {}
    for i, vals in enumerate(slots):
        by_sharding.setdefault(vals[0].sharding, []).append(i)
    calls = []
    for idx in by_sharding.values():
        longest = max(len(slots[i]) for i in idx)
        for lo in range(0, longest, _CHUNK):
            live = [i for i in idx if len(slots[i]) > lo]
            pieces, n_valid = [], []
            for i in live:
                piece = tuple(slots[i][lo:lo + _CHUNK])
                n_valid.append(len(piece))
                pieces.append(piece + (piece[-1],) * (_CHUNK - len(piece)))
            calls.append((live, _reduce_chunk(tuple(pieces),
                                              np.asarray(n_valid, np.int32))))
    totals = [0.0] * len(slots)
    for live, sums in jax.device_get(calls):
        for i, s in zip(live, sums):
            totals[i] += float(s)
    return totals


class TrainAccumulator:
    """Averages per-step training metrics over an epoch without a host sync.

    Each `update` takes one step's metric dict (numpy or JAX scalars; arrays,
    e.g. from several scanned steps or a pmap's device axis, are summed).
    Expected keys, sums over the step's GLOBAL batch with padding excluded:
      "loss_sum":   sum of (possibly class-weighted) per-example losses,
      "correct":    number of correctly classified examples,
      "count":      number of examples,
      "weight_sum": optional; the sum of loss weights, the denominator of
                    "loss_sum" when class weights are used (else "count").
    A step's "loss" (its mean) is ignored: the epoch mean is recomputed exactly
    from the sums. Any other "<name>_sum" key is averaged per example as
    "<name>"; every other key (grad_norm, learning_rate, a bool such as
    grads_finite -> the fraction of steps where it held) is averaged per step.
    A key missing from some steps is averaged over the steps that have it.

    `update` only checks the keys and keeps (a shallow copy of) the dict: no
    device work and no host sync per step, so the arrays must stay alive (not
    donated or deleted) until `compute()`. `compute()` sums the buffered steps
    on device, a few jitted calls of fixed size (compiled once per set of keys,
    shapes and dtypes), and reads the totals back once; numpy values are summed
    on the host in float64.

    `compute()` -> {"loss", "accuracy", ..., "count", "steps"}: floats (None
    where nothing was counted) and ints.
    """

    _REQUIRED = ("loss_sum", "correct", "count")
    _CONSUMED = ("loss", "loss_sum", "weight_sum", "correct", "count")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._buffer: list[dict[str, Any]] = []

    def update(self, step_metrics: Mapping[str, Any]) -> None:
        if not ("loss_sum" in step_metrics and "correct" in step_metrics
                and "count" in step_metrics):
            missing = [k for k in self._REQUIRED if k not in step_metrics]
            raise KeyError(f"train step metrics lack {missing}; expected keys "
                           f"{list(self._REQUIRED)} (sums over the global batch), "
                           f"got {sorted(step_metrics)}")
        self._buffer.append(dict(step_metrics))

    def _totals(self) -> list[tuple[list[str], int, dict[str, float],
                                    dict[str, int]]]:
        """Per set of keys (in order of first appearance): its keys in the
        order of its first step, its number of steps, and per key the sum over
        those steps of all elements and the number of elements."""
        groups: dict[frozenset, list[dict[str, Any]]] = {}
        for step in self._buffer:
            groups.setdefault(frozenset(step), []).append(step)
        slots: dict[tuple, list[jax.Array]] = {}
        result = []
        for g, steps in enumerate(groups.values()):
            keys = list(steps[0])
            sums = dict.fromkeys(keys, 0.0)
            sizes = dict.fromkeys(keys, 0)
            for key in keys:
                for step in steps:
                    value = step[key]
                    sizes[key] += np.size(value)
                    if isinstance(value, jax.Array):
                        slots.setdefault(
                            (g, key, value.shape, value.dtype, value.sharding),
                            []).append(value)
                    else:
                        sums[key] += float(np.asarray(value, np.float64).sum())
            result.append((keys, len(steps), sums, sizes))
        if slots:
            for (g, key, *_), total in zip(
                    slots, _sum_device_slots(list(slots.values()))):
                result[g][2][key] += total
        return result

    def compute(self) -> dict[str, Any]:
        totals: dict[str, float] = {}
        counts: dict[str, float] = {}

        def add(name: str, total: float, count: float) -> None:
            totals[name] = totals.get(name, 0.0) + total
            counts[name] = counts.get(name, 0.0) + count

        for keys, n_steps, sums, sizes in self._totals():
            count = sums["count"]
            add("loss", sums["loss_sum"], sums.get("weight_sum", count))
            add("accuracy", sums["correct"], count)
            add("_count", count, n_steps)
            for key in keys:
                if key in self._CONSUMED:
                    continue
                if key.endswith("_sum"):
                    add(key[:-len("_sum")], sums[key], count)
                else:
                    add(key, sums[key], sizes[key])
        out: dict[str, Any] = {}
        for name, total in totals.items():
            if name != "_count":
                n = counts[name]
                out[name] = _float_or_none(total / n) if n else None
        out["count"] = int(round(totals["_count"])) if "_count" in totals else 0
        out["steps"] = len(self._buffer)
        return out


# --------------------------------------------------------------------------
# Rendering


def flatten_scalars(report: Mapping[str, Any], prefix: str = "",
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
        elif isinstance(value, (int, float, np.number)) and not isinstance(
            value, bool):
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
        f"{'class':<{w}}{'precision':>10}{'recall':>8}{'f1':>8}{'auc':>8}"
        f"{'support':>9}",
    ]
    for name in names:
        s = report["per_class"][name]
        lines.append(f"{name:<{w}}{_fmt(s['precision'], 10)}{_fmt(s['recall'], 8)}"
                     f"{_fmt(s['f1'], 8)}{_fmt(s['auc'], 8)}{s['support']:>9d}")
    cw = max(7, *(len(n) for n in names)) + 1
    corner = "true\\pred"
    lines.append(f"{corner:<{w}}" + "".join(f"{n:>{cw}}" for n in names))
    for name, row in zip(names, report["confusion_matrix"]):
        lines.append(f"{name:<{w}}" + "".join(f"{c:>{cw}d}" for c in row))
    return "\n".join(lines)
