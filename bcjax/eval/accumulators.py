"""Accumulating metrics over batches: clu.metrics on the host, sums on the devices.

`EvalAccumulator` takes each eval batch's logits (or probabilities), labels and
`valid` mask and keeps what one-vs-rest AUC needs: every score (clu's
CollectingMetric), with the confusion counts (`ConfusionMatrix`, a clu Metric)
and the mean loss (clu's Average). `compute()` returns the report of
bcjax.eval.metrics as plain Python types.

`TrainAccumulator` averages the train step's metric sums over an epoch without
a host sync per step.
"""

# No `from __future__ import annotations`: clu's Collection reads the field
# annotations as classes.

from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics
from jax.experimental import multihost_utils

from bcjax.eval import metrics

__all__ = ["ConfusionMatrix", "EvalAccumulator", "TrainAccumulator"]


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
    def from_model_output(
        cls, *, logits: jnp.ndarray, labels: jnp.ndarray, mask: jnp.ndarray | None = None, **_
    ) -> "ConfusionMatrix":
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
class ScoresAndLabels(clu_metrics.CollectingMetric.from_outputs(("probs", "labels"))):
    """Host-side store of every valid example's class probabilities and label;
    the AUC needs all of them, not a running sum."""


# --------------------------------------------------------------------------
# Host arrays


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


# --------------------------------------------------------------------------
# Host accumulators


class EvalAccumulator:
    """Accumulates eval batches (padding masked out) into a full report.

    Usage:
      acc = EvalAccumulator(len(class_names), class_names)
      for batch in eval_batches:
        out = eval_step(state, batch)        # logits [B, C], maybe loss [B]
        acc.update(out["logits"], batch["label"], batch["valid"], out.get("loss"))
      report = acc.compute()

    Arrays may be numpy or JAX. A multi-process global jax.Array is gathered
    onto every process (so all processes must call `update` together); then
    each process computes the same report, and process 0 writes it.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        *,
        from_logits: bool = True,
        positive_class: str | None = None,
    ):
        """`from_logits=False` when `update` gets probabilities, not logits.

        positive_class: with two classes, the one the binary AUC is of (default
        the last); see `metrics.report_from_confusion`.
        """
        self.num_classes = int(num_classes)
        self.class_names = metrics.class_name_list(class_names, self.num_classes)
        self.from_logits = from_logits
        self.positive_class = positive_class
        self.reset()

    def reset(self) -> None:
        self._loss = clu_metrics.Average(total=np.float64(0.0), count=np.int64(0))
        self._confusion = ConfusionMatrix.empty()
        self._scores = ScoresAndLabels.empty()

    def update(self, scores: Any, labels: Any, valid: Any = None, loss: Any = None) -> None:
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
            raise ValueError(
                f"want scores [B, {self.num_classes}] for {len(labels)} labels, got {scores.shape}"
            )
        valid = (
            np.ones(len(labels), bool)
            if valid is None
            else _to_host(valid).astype(bool).reshape(-1)
        )
        if valid.shape != labels.shape:
            raise ValueError(f"valid {valid.shape} vs labels {labels.shape}")
        labels = labels[valid]
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"labels outside [0, {self.num_classes}): {sorted(set(labels.tolist()))}"
            )
        scores = scores[valid]
        probs = _softmax64(scores) if self.from_logits else scores.astype(np.float64)
        if loss is None:
            per_example = _cross_entropy64(probs, labels)
        else:
            loss = _to_host(loss)
            if loss.ndim == 0 or loss.size != len(valid):
                raise ValueError(f"loss must be per example [{len(valid)}], got shape {loss.shape}")
            per_example = loss.astype(np.float64).reshape(-1)[valid]
        self._loss = self._loss.merge(
            clu_metrics.Average(
                total=np.float64(per_example.sum()), count=np.int64(len(per_example))
            )
        )
        self._confusion = self._confusion.merge(
            ConfusionMatrix(
                counts=metrics.confusion_counts(np.argmax(probs, -1), labels, self.num_classes)
            )
        )
        self._scores = self._scores.merge(
            ScoresAndLabels(values={"probs": (probs,), "labels": (labels,)})
        )

    @property
    def num_examples(self) -> int:
        return int(self._loss.count)

    def compute(self) -> dict[str, Any]:
        """The report of `classification_report` over all valid examples seen."""
        if self.num_examples == 0:
            return metrics.report_from_confusion(
                np.zeros((self.num_classes,) * 2, np.int64),
                self.class_names,
                positive_class=self.positive_class,
            )
        collected = self._scores.compute()
        probs, labels = collected["probs"], collected["labels"]
        auc = [metrics.binary_auc(probs[:, k], labels == k) for k in range(self.num_classes)]
        return metrics.report_from_confusion(
            np.asarray(self._confusion.compute()),
            self.class_names,
            loss=float(self._loss.compute()),
            auc=auc,
            positive_class=self.positive_class,
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """All valid examples' probabilities [N, C] and labels [N] so far."""
        if self.num_examples == 0:
            return {"probs": np.zeros((0, self.num_classes)), "labels": np.zeros((0,), np.int64)}
        return self._scores.compute()


# Steps per call of `_reduce_chunk`: a fixed size, so the reducer compiles once
# per metric structure whatever the number of steps in an epoch (XLA's compile
# time grows with the operand count: ~0.3 s for 7 keys x 32 steps on a CPU).
_CHUNK = 32


@jax.jit
def _reduce_chunk(
    slots: tuple[tuple[jax.Array, ...], ...], n_valid: jax.Array
) -> tuple[jax.Array, ...]:
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
        x = jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))
        dtype = (
            jnp.promote_types(x.dtype, jnp.float32)
            if jnp.issubdtype(x.dtype, jnp.floating)
            else None
        )
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
                piece = tuple(slots[i][lo : lo + _CHUNK])
                n_valid.append(len(piece))
                pieces.append(piece + (piece[-1],) * (_CHUNK - len(piece)))
            calls.append((live, _reduce_chunk(tuple(pieces), np.asarray(n_valid, np.int32))))
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
        if not (
            "loss_sum" in step_metrics and "correct" in step_metrics and "count" in step_metrics
        ):
            missing = [k for k in self._REQUIRED if k not in step_metrics]
            raise KeyError(
                f"train step metrics lack {missing}; expected keys "
                f"{list(self._REQUIRED)} (sums over the global batch), "
                f"got {sorted(step_metrics)}"
            )
        self._buffer.append(dict(step_metrics))

    def _totals(self) -> list[tuple[list[str], int, dict[str, float], dict[str, int]]]:
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
                            (g, key, value.shape, value.dtype, value.sharding), []
                        ).append(value)
                    else:
                        sums[key] += float(np.asarray(value, np.float64).sum())
            result.append((keys, len(steps), sums, sizes))
        if slots:
            for (g, key, *_), total in zip(slots, _sum_device_slots(list(slots.values()))):
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
                    add(key[: -len("_sum")], sums[key], count)
                else:
                    add(key, sums[key], sizes[key])
        out: dict[str, Any] = {}
        for name, total in totals.items():
            if name != "_count":
                n = counts[name]
                out[name] = metrics.finite_or_none(total / n) if n else None
        out["count"] = int(round(totals["_count"])) if "_count" in totals else 0
        out["steps"] = len(self._buffer)
        return out
