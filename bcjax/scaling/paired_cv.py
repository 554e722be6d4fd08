"""Cross-validation mode: every device count runs the same K folds, compared fold by fold.

Per count: the mean and Student-t interval over folds of each metric; then
each count against the smallest, fold by fold (paired difference, its
interval, and whether it excludes 0, i.e. exceeds the fold-to-fold noise).
Written as scaling_cv.md, scaling_cv.csv, scaling_cv_paired.csv,
scaling_cv.json and scaling_cv.png, each through bcjax.files.
"""

from __future__ import annotations

import math
import pathlib
import sys
from collections.abc import Mapping, Sequence

from bcjax import files, report
from bcjax.scaling.runs import fold_val_sets
from bcjax.scaling.tables import SIMULATED, SYNTHETIC

CV_METRICS = (
    ("test_accuracy", "test accuracy"),
    ("test_macro_f1", "test macro-F1"),
    ("test_auc_macro", "test AUC"),
    ("val_accuracy", "val accuracy"),
    ("val_macro_f1", "val macro-F1"),
    ("val_auc_macro", "val AUC"),
    ("wall_time_s", "wall s per fold"),
)
STATS = ("mean", "sd", "low", "high")
CV_CSV_COLUMNS = (
    "devices",
    "global_batch",
    "per_device_batch",
    "learning_rate",
    "folds",
    "complete",
    *(f"{k}_{s}" for k, _ in CV_METRICS for s in STATS),
    "ensemble_test_accuracy",
    "ensemble_test_macro_f1",
    "ensemble_test_auc_macro",
    "total_wall_s",
    "speedup",
    "platform",
    "simulated",
    "dataset",
)
PAIRED_CSV_COLUMNS = (
    "devices",
    "baseline",
    "metric",
    "mean",
    "sd",
    "low",
    "high",
    "excludes_zero",
    "verdict",
    "same_split",
    "differences",
)
_VERDICT = {
    "a > b": "higher",
    "a < b": "lower",
    "no clear difference": "within fold-to-fold noise",
    "too few pairs": "too few folds",
    "identical": "identical on every fold",
}


def cv_rows(summaries: Mapping[int, Mapping], plan: Sequence[Mapping]) -> list[dict]:
    """One row per device count: mean, sd and t-interval over folds of every
    CV metric, the fold ensemble's test scores and the summed wall time."""
    by_count = {r["devices"]: r for r in plan}
    rows = []
    for n in sorted(summaries):
        s, run = summaries[n], by_count.get(n, {})
        walls = [r.get("wall_time_s") for r in s["per_fold"]]
        ensemble = s.get("ensemble_test") or {}
        row = {
            "devices": n,
            "global_batch": run.get("global_batch"),
            "per_device_batch": run.get("per_device_batch"),
            "learning_rate": run.get("learning_rate"),
            "folds": len(s["completed_folds"]),
            "complete": bool(s.get("complete")),
            "stats": {k: s["stats"][k] for k, _ in CV_METRICS},
            "ensemble_test_accuracy": ensemble.get("accuracy"),
            "ensemble_test_macro_f1": ensemble.get("macro_f1"),
            "ensemble_test_auc_macro": ensemble.get("auc_macro"),
            "total_wall_s": None if None in walls else float(sum(walls)),
            "platform": s.get("platform"),
            "simulated": s.get("platform") == "cpu" and n > 1,
            "dataset": s.get("dataset"),
        }
        for k, _ in CV_METRICS:
            for stat in STATS:
                row[f"{k}_{stat}"] = s["stats"][k][stat]
        rows.append(row)
    if rows:
        # Per-fold totals differ only by the device count when every count ran
        # the same folds; a partial study's speedup would compare different work.
        base = rows[0]
        for r in rows:
            same_work = r["folds"] == base["folds"]
            r["speedup"] = (
                base["total_wall_s"] / r["total_wall_s"]
                if same_work and r["total_wall_s"] and base["total_wall_s"]
                else None
            )
    return rows


def paired_comparisons(
    summaries: Mapping[int, Mapping],
    *,
    confidence: float = 0.95,
    val_sets: Mapping[int, Mapping[int, list]] | None = None,
) -> list[dict]:
    """Each device count against the smallest, fold by fold, for every CV metric.

    Folds pair up by index: with the same data, split seed and fold count the
    fold-k images are the same for every count (checked on the manifests when
    ``val_sets`` is given), so the pairing removes the fold-to-fold spread.
    """
    from bcjax import stats

    counts = sorted(summaries)
    if len(counts) < 2:
        return []
    base = counts[0]
    base_folds = {r["fold"]: r for r in summaries[base]["per_fold"]}
    out = []
    for n in counts[1:]:
        these = {r["fold"]: r for r in summaries[n]["per_fold"]}
        folds = sorted(base_folds.keys() & these.keys())
        same_split = None
        if val_sets is not None and base in val_sets and n in val_sets:
            same_split = all(val_sets[n].get(k) == val_sets[base].get(k) for k in folds)
        for key, label in CV_METRICS:
            d = stats.paired_difference(
                [these[k][key] for k in folds], [base_folds[k][key] for k in folds], confidence
            )
            verdict = _VERDICT[d["verdict"]]
            if d["verdict"] in ("a > b", "a < b"):
                verdict += f" on {n} device(s)"
            out.append(
                {
                    "devices": n,
                    "baseline": base,
                    "metric": key,
                    "label": label,
                    "folds": folds,
                    "differences": d["differences"],
                    "mean": d["mean"],
                    "sd": d["sd"],
                    "low": d["low"],
                    "high": d["high"],
                    "excludes_zero": d["excludes_zero"],
                    "verdict": verdict,
                    "same_split": same_split,
                }
            )
    return out


def _mean_pm(mean, half, digits: int) -> str:
    if mean is None:
        return report.number(None)
    return f"{mean:.{digits}f}" + ("" if half is None else f" ± {half:.{digits}f}")


def _signed(value, digits: int) -> str:
    return report.number(None) if value is None else f"{value:+.{digits}f}"


def _digits(metric: str) -> int:
    return 1 if metric == "wall_time_s" else 3


def cv_markdown(
    rows: Sequence[dict], comparisons: Sequence[dict], *, title: str = "", confidence: float = 0.95
) -> str:
    lines = [title, ""] if title else []
    head = [
        "devices",
        "global batch",
        "per device",
        "folds",
        *(label for _, label in CV_METRICS),
        "ensemble test accuracy",
        "total wall s",
        "speedup",
    ]
    table = []
    for r in rows:
        cells = [
            str(r["devices"]),
            report.number(r["global_batch"]),
            report.number(r["per_device_batch"]),
            f"{r['folds']}" + ("" if r["complete"] else " (incomplete)"),
        ]
        for k, _ in CV_METRICS:
            st = r["stats"][k]
            cells.append(_mean_pm(st["mean"], st["half_width"], _digits(k)))
        cells += [
            report.number(r["ensemble_test_accuracy"], 3),
            report.number(r["total_wall_s"], None),
            report.number(r["speedup"], None),
        ]
        table.append(dict(zip(head, cells)))
    lines.append(report.markdown_table(table, head, fmt=lambda v, c: v))
    baseline = rows[0]["devices"] if rows else 1
    lines += [
        "",
        f"Mean ± half-width of the Student-t {confidence:.0%} interval over folds "
        "(sd ddof=1). Ensemble: the fold models' test probabilities averaged. speedup: "
        f"total training wall time against {baseline} device(s). Each count's first "
        "fold also pays its compile (later folds load it from the compilation cache).",
    ]
    if comparisons:
        base = comparisons[0]["baseline"]
        paired_head = [
            "devices",
            "metric",
            "per-fold differences",
            "mean",
            f"{confidence:.0%} CI",
            "verdict",
        ]
        paired = []
        for c in comparisons:
            digits = _digits(c["metric"])
            ci = (
                "–"
                if c["low"] is None
                else f"[{_signed(c['low'], digits)}, {_signed(c['high'], digits)}]"
            )
            paired.append(
                dict(
                    zip(
                        paired_head,
                        (
                            str(c["devices"]),
                            c["label"],
                            ", ".join(_signed(d, digits) for d in c["differences"]),
                            _signed(c["mean"], digits),
                            ci,
                            f"**{c['verdict']}**" if c["excludes_zero"] else c["verdict"],
                        ),
                    )
                )
            )
        lines += [
            "",
            f"Paired against {base} device(s), fold by fold (difference = N devices minus {base}):",
            "",
            report.markdown_table(paired, paired_head, fmt=lambda v, c: v),
            "",
            "A difference counts (bold) only when its interval excludes 0, i.e. it is "
            "larger than the fold-to-fold noise.",
        ]
        if any(c["same_split"] is False for c in comparisons):
            lines += [
                "",
                "**Warning: the device counts did not validate on the same folds "
                "(their manifests differ), so the pairing is not valid.**",
            ]
    if any(r.get("simulated") for r in rows):
        lines += ["", f"**{SIMULATED}.**"]
    if any(r.get("dataset") == "synthetic" for r in rows):
        lines += ["", SYNTHETIC]
    return "\n".join(lines)


def cv_plot(
    rows: Sequence[dict],
    comparisons: Sequence[dict],
    summaries: Mapping[int, Mapping],
    path: pathlib.Path,
    *,
    title: str = "",
) -> None:
    """Test metrics (folds, mean and interval), paired differences against the
    smallest count, and wall time per fold, over the device counts."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = [r["devices"] for r in rows]
    fig = Figure(figsize=(13, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    # Evenly spaced: counts are usually powers of two.
    pos = {d: i for i, d in enumerate(counts)}

    def with_ci(ax, key, offset, marker, label, color):
        for r in rows:
            ys = [f[key] for f in summaries[r["devices"]]["per_fold"] if f.get(key) is not None]
            ax.plot(
                [pos[r["devices"]] + offset] * len(ys), ys, marker, alpha=0.25, ms=4, color=color
            )
        means = [r["stats"][key]["mean"] for r in rows]
        halves = [r["stats"][key]["half_width"] or 0.0 for r in rows]
        ax.errorbar(
            [pos[d] + offset for d in counts],
            [math.nan if m is None else m for m in means],
            yerr=halves,
            fmt=marker + "-",
            capsize=3,
            label=label,
            color=color,
        )

    for i, (key, marker, label) in enumerate(
        (
            ("test_accuracy", "o", "test accuracy"),
            ("test_macro_f1", "s", "test macro-F1"),
            ("test_auc_macro", "^", "test AUC"),
        )
    ):
        with_ci(ax1, key, 0.1 * i, marker, label, f"C{i}")
    # Metrics live in [0, 1]; with few folds a t-interval can be far wider,
    # and the clipped bar then says just that.
    ax1.set_ylim(-0.02, 1.05)
    ax1.set_title("test metrics over folds (mean, 95% CI)")
    ax1.legend(fontsize=8)

    ax2.axhline(0.0, color="k", lw=0.8)
    for offset, (key, marker) in zip((0.0, 0.1), (("test_accuracy", "o"), ("test_macro_f1", "s"))):
        cs = [c for c in comparisons if c["metric"] == key and c["mean"] is not None]
        lows = [c["mean"] - c["low"] if c["low"] is not None else 0.0 for c in cs]
        highs = [c["high"] - c["mean"] if c["high"] is not None else 0.0 for c in cs]
        ax2.errorbar(
            [pos[c["devices"]] + offset for c in cs],
            [c["mean"] for c in cs],
            yerr=[lows, highs],
            fmt=marker,
            capsize=3,
            label=key.replace("_", " "),
        )
    ax2.set_title(f"paired difference vs {counts[0]} device(s), 95% CI")
    ax2.legend(fontsize=8)

    with_ci(ax3, "wall_time_s", 0.0, "o", "wall s per fold", "C0")
    walls = [
        f["wall_time_s"]
        for d in counts
        for f in summaries[d]["per_fold"]
        if f.get("wall_time_s") is not None
    ]
    if walls:
        ax3.set_ylim(0, max(walls) * 1.3)
    ax3.set_title("training wall time per fold (s)")
    for ax in (ax1, ax2, ax3):
        ax.set_xlim(-0.4, len(counts) - 0.4)
        ax.set_xticks(range(len(counts)))
        ax.set_xticklabels([str(d) for d in counts])
        ax.set_xlabel("devices")
        ax.grid(alpha=0.3)
    fig.suptitle(title or "bcjax scaling, cross-validation")
    fig.tight_layout()
    with files.atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")


def write_cv_outputs(
    rows: Sequence[dict],
    comparisons: Sequence[dict],
    summaries: Mapping[int, Mapping],
    out_dir: pathlib.Path,
    *,
    title: str = "",
    mode: str = "",
    folds: int = 0,
) -> str:
    """The scaling_cv.* files; returns the markdown."""
    out_dir = pathlib.Path(out_dir)
    md = cv_markdown(rows, comparisons, title=title)
    files.write_text(md + "\n", out_dir / "scaling_cv.md")
    report.write_csv(rows, out_dir / "scaling_cv.csv", CV_CSV_COLUMNS)
    paired_rows = [
        {**c, "differences": " ".join("nan" if d is None else f"{d:.6g}" for d in c["differences"])}
        for c in comparisons
    ]
    report.write_csv(paired_rows, out_dir / "scaling_cv_paired.csv", PAIRED_CSV_COLUMNS)
    files.write_json(
        {
            "mode": mode,
            "folds": folds,
            "rows": rows,
            "paired": comparisons,
            "simulated": any(r.get("simulated") for r in rows),
        },
        out_dir / "scaling_cv.json",
        default=str,
    )
    cv_plot(rows, comparisons, summaries, out_dir / "scaling_cv.png", title=title)
    return md


def cv_report(
    workdir: pathlib.Path, plan: Sequence[Mapping], *, mode: str, folds: int
) -> tuple[list, list]:
    """Recomputes every count's CV summary from its fold folders, then the
    table and the paired comparison."""
    from bcjax import cv

    summaries, val_sets = {}, {}
    for run in plan:
        wd = workdir / f"dev{run['devices']}"
        if not list(wd.glob("fold_*/results.json")):
            print(f"[scaling] no finished fold in {wd}; skipped", flush=True)
            continue
        # A summary file marks a count as done (runs.is_done): a look at a
        # half-finished study must not write one, or its missing folds would
        # never be trained.
        summary = cv.aggregate(wd, write=False)
        summaries[run["devices"]] = cv.aggregate(wd) if summary["complete"] else summary
        val_sets[run["devices"]] = fold_val_sets(wd)
    if not summaries:
        sys.exit("no finished cross-validation folds to tabulate")
    rows = cv_rows(summaries, plan)
    comparisons = paired_comparisons(summaries, val_sets=val_sets)
    first = summaries[rows[0]["devices"]]
    title = (
        f"bcjax scaling, {folds}-fold cross-validation: {first.get('model')} on "
        f"{first.get('dataset')} data, mode {mode}"
    )
    md = write_cv_outputs(
        rows, comparisons, summaries, workdir, title=title, mode=mode, folds=folds
    )
    print(md)
    print(
        f"\nwrote {workdir / 'scaling_cv.md'}, scaling_cv.csv, scaling_cv_paired.csv, "
        "scaling_cv.json, scaling_cv.png"
    )
    return rows, comparisons
