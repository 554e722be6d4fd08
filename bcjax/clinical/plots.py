"""The clinical figures: reliability diagram, ROC and precision-recall curves,
and the test images whose heat maps fall least on the lesion.

Built with `matplotlib.figure.Figure` and the Agg canvas (as bcjax.eval.plots):
no pyplot, no global backend, nothing left registered. Each function draws
from a report section (plain dicts, as in results.json) and returns the path.

Margins are fixed (in inches, what constrained layout chose for these figures,
with room for longer tick labels): with a layout engine, `savefig` draws every
figure twice, once to lay it out and once to render it, which was about a third
of the run's time spent on these figures (BUILD_NOTES, #23 session 10).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bcjax.clinical import grounding, operating_points

__all__ = [
    "plot_least_grounded",
    "plot_pr_curves",
    "plot_reliability",
    "plot_roc_curves",
    "write_clinical_plots",
]

FILE_NAMES = {
    "reliability": "reliability.png",
    "roc": "roc_curves.png",
    "pr": "pr_curves.png",
    "least_grounded": "least_grounded.png",
}


def _margins(fig: Figure, left: float, bottom: float, right: float, top: float, **space):
    """Subplot margins given in inches from each edge of the figure."""
    width, height = fig.get_size_inches()
    return dict(
        left=left / width,
        bottom=bottom / height,
        right=1 - right / width,
        top=1 - top / height,
        **space,
    )


def _save(fig: Figure, path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png")
    return path


def _bars(ax, table: Mapping[str, Any], color: str, label: str, offset: float) -> None:
    edges = np.asarray(table["edges"])
    width = np.diff(edges)
    filled = [i for i, n in enumerate(table["count"]) if n]
    ax.bar(
        edges[filled] + offset * width[filled],
        [table["accuracy"][i] for i in filled],
        width=width[filled] / 2,
        align="edge",
        color=color,
        alpha=0.8,
        label=label,
    )


def plot_reliability(calibration: Mapping[str, Any], path) -> pathlib.Path:
    """Accuracy per confidence bin, before and after temperature scaling, over the
    diagonal of perfect calibration; below, how many test images each bin holds."""
    before, after = calibration["test"]["before"], calibration["test"]["after"]
    fig = Figure(figsize=(6, 6.5), dpi=100)
    top, bottom = fig.subplots(
        2,
        1,
        height_ratios=(3, 1),
        sharex=True,
        gridspec_kw=_margins(fig, 0.7, 0.48, 0.15, 0.26, hspace=0.06),
    )
    top.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfectly calibrated")
    _bars(top, before["reliability"], "tab:red", f"raw (ECE {before['ece']:.3f})", 0.0)
    _bars(
        top,
        after["reliability"],
        "tab:blue",
        f"T = {calibration['temperature']:.2f} (ECE {after['ece']:.3f})",
        0.5,
    )
    top.set_ylabel("accuracy in bin")
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"reliability on test ({calibration['bins']} bins, top label)", y=1.0)
    for table, color, offset in (
        (before["reliability"], "tab:red", 0.0),
        (after["reliability"], "tab:blue", 0.5),
    ):
        edges = np.asarray(table["edges"])
        width = np.diff(edges)
        bottom.bar(
            edges[:-1] + offset * width,
            table["count"],
            width=width / 2,
            align="edge",
            color=color,
            alpha=0.8,
        )
    bottom.set_xlabel("confidence (largest class probability)")
    bottom.set_ylabel("images")
    bottom.set_xlim(0, 1)
    return _save(fig, path)


def _curve_figure(
    curves: Mapping[str, Any],
    x_key: str,
    y_key: str,
    kind: str,
    xlabel: str,
    ylabel: str,
    score: str,
    title: str,
):
    fig = Figure(figsize=(6, 5.5), dpi=100)
    ax = fig.subplots(gridspec_kw=_margins(fig, 0.6, 0.48, 0.1, 0.26))
    for name, c in curves.items():
        if c[score] is None:
            continue
        ax.plot(
            c[kind][x_key],
            c[kind][y_key],
            lw=1.6,
            drawstyle="steps-post" if kind == "pr" else "default",
            label=f"{name} ({score.replace('_', ' ')} {c[score]:.3f}, n={c['positives']})",
        )
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, y=1.0)  # no tick labels on top: where automatic placement puts it
    ax.grid(alpha=0.3)
    return fig, ax


def plot_roc_curves(points: Mapping[str, Any], path) -> pathlib.Path:
    """Test ROC curve of every class (one vs rest); the operating points of the
    positive class (thresholds from validation) marked where they land on test."""
    fig, ax = _curve_figure(
        points["curves"],
        "fpr",
        "tpr",
        "roc",
        "1 - specificity",
        "sensitivity",
        "auc",
        "ROC on test, one class vs the rest",
    )
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
    for marker, p in zip("os^D", points["points"].values()):
        if p is not None:
            ax.plot(
                1 - p["test"]["specificity"],
                p["test"]["sensitivity"],
                marker=marker,
                ls="none",
                color="black",
                ms=7,
                mfc="none",
                label=f"{operating_points.describe_point(p)} (threshold from validation)",
            )
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)


def plot_pr_curves(points: Mapping[str, Any], path) -> pathlib.Path:
    """Test precision-recall curve of every class (one vs rest); a dotted line at
    each class's prevalence, the precision of a guess."""
    fig, ax = _curve_figure(
        points["curves"],
        "recall",
        "precision",
        "pr",
        "recall",
        "precision",
        "average_precision",
        "precision-recall on test, one class vs the rest",
    )
    total = sum(c["positives"] for c in points["curves"].values())
    for line, c in zip(
        ax.get_lines(), (c for c in points["curves"].values() if c["average_precision"] is not None)
    ):
        ax.axhline(c["positives"] / total, color=line.get_color(), ls=":", lw=1)
    ax.legend(loc="lower left", fontsize=7)
    return _save(fig, path)


def plot_least_grounded(
    images, masks, cams, grounding_section: Mapping[str, Any], path, *, alpha: float = 0.45
) -> pathlib.Path:
    """A grid of the `least_grounded` images of a grounding section: each image
    with its Grad-CAM overlaid and the lesion mask outlined (white: the mask,
    dashed: the pointing-game tolerance), titled with class and scores."""
    worst = grounding_section["least_grounded"]
    columns = 4
    rows = max(1, -(-len(worst) // columns))
    fig = Figure(figsize=(3 * columns, 3.3 * rows), dpi=100)
    # Above each row its two-line titles (0.41 in), above all the figure's title.
    space = _margins(fig, 0.12, 0.04, 0.12, 0.68, wspace=0.084, hspace=0.148)
    axes = np.atleast_1d(fig.subplots(rows, columns, gridspec_kw=space)).reshape(-1)
    radius = grounding_section["tolerance_px"]
    for ax in axes:
        ax.set_axis_off()
    for ax, entry in zip(axes, worst):
        i = entry["index"]
        image = np.asarray(images[i])
        mask = np.asarray(masks[i]) > 0
        cam = grounding.resize_maps(np.asarray(cams[i])[None], mask.shape)[0]
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        ax.imshow(cam, cmap="jet", alpha=alpha, vmin=0.0, vmax=max(float(cam.max()), 1e-12))
        ax.contour(mask, levels=[0.5], colors="white", linewidths=1.2)
        ax.contour(
            grounding.dilate(mask[None], radius)[0],
            levels=[0.5],
            colors="white",
            linewidths=0.8,
            linestyles="dashed",
        )
        ax.set_title(
            f"#{i} true {entry['true']}, pred {entry['predicted']}\n"
            f"mass in {entry['mass_inside']:.0%} (chance {entry['mask_fraction']:.0%})"
            f", point {entry['pointing']:.0%}",
            fontsize=8,
            # Where automatic placement puts it (the axes are off: nothing to clear); given,
            # it spares the per-axes search for tick labels (≈ a third of this figure's time).
            y=1.0,
        )
    fig.suptitle(
        "test images whose Grad-CAM falls least on the lesion",
        y=1 - 0.06 / fig.get_size_inches()[1],  # its top 0.06 in below the figure's
    )
    return _save(fig, path)


def write_clinical_plots(
    report: Mapping[str, Any], out_dir, *, images=None, masks=None, cams=None
) -> dict[str, pathlib.Path]:
    """Every figure whose section is in `report` (a results dict, or
    clinical_report's output with "grounding" added) into `out_dir`:
    reliability.png, roc_curves.png, pr_curves.png and, given the test
    `images`, `masks` and `cams` the grounding section was computed from,
    least_grounded.png. Returns {figure: path}."""
    out_dir = pathlib.Path(out_dir)
    written = {}
    if report.get("calibration"):
        written["reliability"] = plot_reliability(
            report["calibration"], out_dir / FILE_NAMES["reliability"]
        )
    if report.get("operating_points"):
        written["roc"] = plot_roc_curves(report["operating_points"], out_dir / FILE_NAMES["roc"])
        written["pr"] = plot_pr_curves(report["operating_points"], out_dir / FILE_NAMES["pr"])
    ground = report.get("grounding")
    if ground and ground["least_grounded"] and images is not None:
        written["least_grounded"] = plot_least_grounded(
            images, masks, cams, ground, out_dir / FILE_NAMES["least_grounded"]
        )
    return written
