"""Learning-curve and confusion-matrix PNGs.

Figures are built with `matplotlib.figure.Figure`, not pyplot: nothing global
is touched (no backend switch, no figure registry to leak), and the Agg canvas
renders without a display.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bcjax import files

__all__ = ["plot_learning_curves", "plot_confusion_matrix", "history_table"]

_SPLITS = ("train", "val")


def _lookup(record: Mapping[str, Any], split: str, metric: str) -> float:
    """record's value for split/metric, accepting the spellings the logs use:
    "val/loss", "val_loss" or nested {"val": {"loss": ...}}; NaN if absent."""
    for key in (f"{split}/{metric}", f"{split}_{metric}"):
        if key in record:
            value = record[key]
            break
    else:
        nested = record.get(split)
        value = nested.get(metric) if isinstance(nested, Mapping) else None
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def history_table(
    history: Sequence[Mapping[str, Any]] | Mapping[str, Sequence],
    metrics: Sequence[str] = ("loss", "accuracy"),
) -> dict[str, np.ndarray]:
    """Per-epoch arrays {"epoch", "train/loss", "val/loss", ...} from a history.

    `history` is either per-record mappings (e.g. `read_jsonl` of the metrics
    log: records of one epoch are merged, later values winning; records
    without an "epoch" are ignored when any has one), or a mapping of
    per-epoch lists. Missing values are NaN (plotted as gaps).
    """
    if isinstance(history, Mapping):
        length = max((len(v) for v in history.values()), default=0)
        history = [{k: v[i] for k, v in history.items() if i < len(v)} for i in range(length)]
    records = list(history)
    if any("epoch" in r for r in records):
        merged: dict[float, dict[str, Any]] = {}
        for r in records:
            if "epoch" in r and r["epoch"] is not None:
                merged.setdefault(r["epoch"], {}).update(r)
        epochs = sorted(merged)
        records = [merged[e] for e in epochs]
    else:
        epochs = list(range(1, len(records) + 1))
    table = {"epoch": np.asarray(epochs, np.float64)}
    for split in _SPLITS:
        for metric in metrics:
            table[f"{split}/{metric}"] = np.array(
                [_lookup(r, split, metric) for r in records], np.float64
            )
    return table


def _save(fig: Figure, path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    with files.atomic_file(path, "wb") as f:  # a kill mid-write leaves the old picture
        fig.savefig(f, format="png")
    return path


def _mark_epochs(ax, best_epoch, stop_epoch) -> None:
    if best_epoch is not None:
        ax.axvline(
            best_epoch, color="tab:green", lw=1.2, alpha=0.8, label=f"best (epoch {best_epoch:g})"
        )
    if stop_epoch is not None:
        ax.axvline(
            stop_epoch,
            color="tab:red",
            lw=1.2,
            ls="--",
            alpha=0.8,
            label=f"stopped (epoch {stop_epoch:g})",
        )


def plot_learning_curves(
    history,
    path: str | os.PathLike,
    *,
    stop_epoch: float | None = None,
    best_epoch: float | None = None,
    title: str | None = None,
) -> pathlib.Path:
    """Train/val loss and accuracy per epoch, best and stop epochs marked.

    Validation balanced accuracy and macro-F1 are drawn too where the history
    has them. `history`: see `history_table`. Returns the PNG path.
    """
    table = history_table(history, ("loss", "accuracy", "balanced_accuracy", "macro_f1"))
    epochs = table["epoch"]
    # Fixed margins (inches, as constrained layout chose them, with some room to spare):
    # with a layout engine savefig draws the figure twice (BUILD_NOTES, #23 session 10).
    width, height = 10.0, 4.0
    top = 0.32 if title else 0.1  # the title's line
    fig = Figure(figsize=(width, height), dpi=100)
    ax_loss, ax_acc = fig.subplots(
        1,
        2,
        gridspec_kw=dict(
            left=0.6 / width,
            right=1 - 0.1 / width,
            bottom=0.5 / height,
            top=1 - top / height,
            wspace=0.14,
        ),
    )
    styles = {"train": dict(color="tab:blue"), "val": dict(color="tab:orange")}
    for split in _SPLITS:
        for ax, metric in ((ax_loss, "loss"), (ax_acc, "accuracy")):
            values = table[f"{split}/{metric}"]
            if np.isfinite(values).any():
                ax.plot(epochs, values, marker="o", ms=3, label=f"{split}", **styles[split])
    for metric, color in (("balanced_accuracy", "tab:purple"), ("macro_f1", "tab:green")):
        values = table[f"val/{metric}"]
        if np.isfinite(values).any():
            ax_acc.plot(epochs, values, ls=":", color=color, label=f"val {metric}")
    if best_epoch is not None:
        best = np.flatnonzero(epochs == best_epoch)
        if best.size and np.isfinite(table["val/accuracy"][best[0]]):
            ax_acc.plot(
                best_epoch,
                table["val/accuracy"][best[0]],
                marker="*",
                ms=12,
                color="tab:green",
                zorder=5,
            )
    for ax, ylabel in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        _mark_epochs(ax, best_epoch, stop_epoch)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    ax_acc.set_ylim(-0.02, 1.02)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_confusion_matrix(
    cm,
    class_names: Sequence[str],
    path: str | os.PathLike,
    *,
    normalize: bool = True,
    title: str | None = None,
) -> pathlib.Path:
    """Confusion matrix (rows true, columns predicted) as a heat map.

    With `normalize`, colours are row fractions (per-class recall on the
    diagonal), so a rare class is as visible as a common one; each cell shows
    its count and, when normalised, its percentage. Returns the PNG path.
    """
    counts = np.asarray(cm, np.int64)
    k = len(class_names)
    if counts.shape != (k, k):
        raise ValueError(f"confusion matrix {counts.shape} for {k} class names")
    rows = counts.sum(axis=1, keepdims=True)
    shown = (
        np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
        if normalize
        else counts.astype(np.float64)
    )
    top = 1.0 if normalize else max(float(shown.max()), 1.0)
    size = 2.2 + 0.9 * k
    fig = Figure(figsize=(size + 1.0, size), dpi=100, layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=top)
    fig.colorbar(
        image,
        ax=ax,
        fraction=0.046,
        pad=0.04,
        label="fraction of true class" if normalize else "count",
    )
    for i in range(k):
        for j in range(k):
            text = f"{counts[i, j]}\n{shown[i, j]:.0%}" if normalize else f"{counts[i, j]}"
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=10,
                color="white" if shown[i, j] > 0.6 * top else "black",
            )
    ax.set_xticks(range(k), class_names, rotation=30, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"confusion matrix (n={int(counts.sum())})")
    return _save(fig, path)
