"""The cross-validation report of a summary (bcjax.cv.aggregate): table, CSV and plot."""

from __future__ import annotations

import pathlib

import numpy as np

from bcjax import files, report, stats

REPORT_METRICS = (
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("macro_f1", "macro-F1"),
    ("auc_macro", "AUC"),
)
# Columns of the per-fold table; the statistics cover every numeric one.
FOLD_COLUMNS = (
    "fold",
    *(f"val_{m}" for m, _ in REPORT_METRICS),
    *(f"test_{m}" for m, _ in REPORT_METRICS),
    "val_loss",
    "test_loss",
    "best_epoch",
    "stopped_epoch",
    "stop_reason",
    "wall_time_s",
    "num_val",
    "num_test",
)
STAT_COLUMNS = tuple(c for c in FOLD_COLUMNS if c not in ("fold", "stop_reason"))
_ONE_DECIMAL = ("best_epoch", "stopped_epoch", "wall_time_s")


def write_csv(rows: list[dict], summary_stats: dict, path: pathlib.Path) -> None:
    """One line per fold, then mean, sd, ci_low and ci_high lines."""
    stat_rows = [
        {"fold": label, **{c: summary_stats[c][key] for c in STAT_COLUMNS}}
        for label, key in (("mean", "mean"), ("sd", "sd"), ("ci_low", "low"), ("ci_high", "high"))
    ]
    report.write_csv([*rows, *stat_rows], path, FOLD_COLUMNS)


def markdown(summary: dict) -> str:
    conf = summary["confidence"]
    cols = (
        [("fold", "fold")]
        + [(f"val_{m}", f"val {label}") for m, label in REPORT_METRICS]
        + [(f"test_{m}", f"test {label}") for m, label in REPORT_METRICS]
        + [
            ("best_epoch", "best epoch"),
            ("stopped_epoch", "stopped epoch"),
            ("wall_time_s", "wall s"),
        ]
    )
    title = f"{summary['folds']}-fold cross-validation: {summary['model']}"
    lines = [f"# {title} on {summary['dataset']} data", ""]
    if summary.get("class_names"):  # absent in summaries written before it was recorded
        positive = summary.get("positive_class")
        lines += [
            f"Classes: {', '.join(summary['class_names'])}"
            + (f" (positive: {positive}; AUC is its binary AUC)." if positive else "."),
            "",
        ]
    if not summary["complete"]:
        lines += [
            f"**Incomplete: folds {summary['completed_folds']} of {summary['folds']} finished.**",
            "",
        ]
    lines.append("| " + " | ".join(label for _, label in cols) + " |")
    lines.append("|" + "---|" * len(cols))

    def cell(c, v):
        if v is None:
            return "–"
        if c in ("fold", "best_epoch", "stopped_epoch"):
            return str(v)
        return report.number(v, 1 if c in _ONE_DECIMAL else 3)

    for r in summary["per_fold"]:
        lines.append("| " + " | ".join(cell(c, r.get(c)) for c, _ in cols) + " |")
    for label, key in (
        ("mean", "mean"),
        ("sd", "sd"),
        (f"{conf:.0%} CI low", "low"),
        (f"{conf:.0%} CI high", "high"),
    ):
        lines.append(
            f"| **{label}** | "
            + " | ".join(
                report.number(summary["stats"][c][key], 1 if c in _ONE_DECIMAL else 3)
                for c, _ in cols[1:]
            )
            + " |"
        )
    n = summary["stats"]["test_accuracy"]["n"]
    lines += [
        "",
        f"Mean ± Student-t {conf:.0%} interval over {n} folds (sd with ddof=1; "
        f"t({0.5 + conf / 2:.3f}, {max(n - 1, 1)}) × sd / √n). Validation: the best epoch by "
        f"{summary.get('best_metric')}; test: that epoch's checkpoint on the held-out part, "
        "the same images for every fold. The interval assumes a symmetric spread, so it can "
        "pass 1 when folds score near 1.",
        "",
    ]
    for key, title in (("test", "Test"), ("val", "Validation")):
        parts = [
            f"{label} {stats.format_ci(summary['stats'][f'{key}_{m}'])}"
            for m, label in REPORT_METRICS
        ]
        lines.append(f"- {title}: " + "; ".join(parts))
    ens = summary.get("ensemble_test")
    if ens:
        lines.append(
            f"- Fold ensemble on test (mean of {len(ens['folds'])} models' probabilities): "
            + "; ".join(f"{label} {report.number(ens.get(m))}" for m, label in REPORT_METRICS)
        )
    oof = summary.get("out_of_fold_val")
    if oof:
        lines.append(
            f"- Out-of-fold validation ({oof['num_examples']} images, each scored by the model "
            "that did not train on it): "
            + "; ".join(f"{label} {report.number(oof.get(m))}" for m, label in REPORT_METRICS)
        )
    checks = summary.get("checks") or {}
    if checks:
        lines.append(
            "- Split checks: "
            + ", ".join(f"{k} {'yes' if v else '**NO**'}" for k, v in checks.items())
        )
    if summary.get("clinical"):
        from bcjax.eval import clinical_outputs

        lines += ["", clinical_outputs.format_folds(summary["clinical"])]
    if summary.get("dataset") == "synthetic":
        lines += [
            "",
            "Data: the SYNTHETIC BUSI-like set; these numbers say nothing about real ultrasound.",
        ]
    return "\n".join(lines)


def plot(summary: dict, path: pathlib.Path) -> None:
    """Per-fold points, mean and interval for each metric; the ensemble as a star."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [
        (f"{part}_{m}", f"{part}\n{label}")
        for part in ("val", "test")
        for m, label in REPORT_METRICS
    ]
    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    rows = summary["per_fold"]
    offsets = np.linspace(-0.18, 0.18, max(len(rows), 1)) if len(rows) > 1 else [0.0]
    for x, (key, _) in enumerate(keys):
        for off, r in zip(offsets, rows):
            if r.get(key) is not None:
                ax.plot(
                    x + off,
                    r[key],
                    "o",
                    color="tab:blue",
                    alpha=0.6,
                    ms=5,
                    label="fold" if x == 0 and off == offsets[0] else None,
                )
        s = summary["stats"][key]
        if s["mean"] is not None:
            err = None if s["half_width"] is None else [[s["half_width"]], [s["half_width"]]]
            ax.errorbar(
                x + 0.32,
                s["mean"],
                yerr=err,
                fmt="s",
                color="black",
                capsize=4,
                label=f"mean, {summary['confidence']:.0%} CI" if x == 0 else None,
            )
        ens = summary.get("ensemble_test")
        if ens and key.startswith("test_") and ens.get(key[5:]) is not None:
            ax.plot(
                x + 0.32,
                ens[key[5:]],
                "*",
                color="tab:red",
                ms=11,
                label="fold ensemble" if key == "test_accuracy" else None,
            )
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([label for _, label in keys], fontsize=8)
    ax.axvline(len(REPORT_METRICS) - 0.5, color="grey", lw=0.5)
    # Zoomed on the data: metrics of a few folds often sit within 0.2 of each
    # other, and an interval may pass 1 (see the report).
    shown = [
        v
        for key, _ in keys
        for v in [
            *(r.get(key) for r in rows),
            summary["stats"][key]["low"],
            summary["stats"][key]["high"],
        ]
        if v is not None
    ]
    if shown:
        ax.set_ylim(max(min(shown) - 0.05, 0.0), max(max(shown) + 0.03, 1.02))
    ax.axhline(1.0, color="grey", lw=0.5, ls=":")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="lower right")
    title = f"{summary['folds']}-fold CV, {summary.get('model')} on {summary.get('dataset')} data"
    ax.set_title(title + ("" if summary["complete"] else " (incomplete)"))
    fig.tight_layout()
    with files.atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")
