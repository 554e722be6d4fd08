"""k-fold cross-validation: one training per fold, then honest statistics.

    python -m bcjax.main --config=configs/quickstart.py --workdir=runs/cv5 --config.cv.folds=5

Fold k trains in ``WORKDIR/fold_<k>`` (bcjax.train.loop, validating on fold k;
the test part is held out and the same for every fold). A fold whose
results.json exists is complete and is not trained again; an interrupted fold
resumes from its own checkpoints, so rerunning the command resumes the study.

The report (``aggregate``, recomputable from the fold folders alone) gives
per-fold validation and test metrics, their mean, standard deviation and
Student-t 95% interval, the out-of-fold validation score (every non-test
image scored once, by the model that did not train on it), and the test score
of the fold ensemble (fold models' test probabilities averaged per image):
cv_summary.json, cv_folds.csv, cv_report.md and cv_summary.png.
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import math
import pathlib
import time
from typing import Optional

import numpy as np

from bcjax import stats

log = logging.getLogger(__name__)

CLASSES = ("normal", "benign", "malignant")  # bcjax.data.busi.CLASSES, without importing the data stack
REPORT_METRICS = (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
                  ("macro_f1", "macro-F1"), ("auc_macro", "AUC"))
# Columns of the per-fold table; the statistics cover every numeric one.
FOLD_COLUMNS = ("fold", *(f"val_{m}" for m, _ in REPORT_METRICS), *(f"test_{m}" for m, _ in REPORT_METRICS),
                "val_loss", "test_loss", "best_epoch", "stopped_epoch", "stop_reason", "wall_time_s",
                "num_val", "num_test")
STAT_COLUMNS = tuple(c for c in FOLD_COLUMNS if c not in ("fold", "stop_reason"))
PLAN_FILE = "cv_plan.json"
_ONE_DECIMAL = ("best_epoch", "stopped_epoch", "wall_time_s")


class Interrupted(RuntimeError):
    """Raised by the `_stop_after_fold` test hook, standing in for a killed process."""


class CrossValidationError(ValueError):
    """The workdir holds folds of another cross-validation."""


def fold_dir(workdir, k: int) -> pathlib.Path:
    return pathlib.Path(workdir) / f"fold_{k}"


def fold_config(config, k: int, source: Optional[dict] = None):
    """A copy of `config` training fold k, on the images `source` resolved.

    Pointing every fold at one resolved folder is what makes the folds see the
    same images: left alone, each fold's workdir would get its own generated
    synthetic set.
    """
    c = copy.deepcopy(config)
    c.cv.fold = k
    if source is not None:
        c.data_dir = source["path"]
        if c.dataset == "synthetic":
            # "synthetic" always generates into the run's workdir; "auto" finds
            # the generated folder in data_dir and still records it as synthetic.
            c.dataset = "auto"
    return c


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _check_complete_fold(results: dict, expected_config, k: int) -> None:
    """A finished fold is reused only if it was trained for this very study."""
    from bcjax.train import checkpoint
    saved = results.get("config") or {}
    try:
        checkpoint.check_identity(checkpoint.run_metadata(saved), checkpoint.run_metadata(expected_config))
    except checkpoint.CheckpointMismatchError as e:
        raise CrossValidationError(f"{fold_dir('.', k)} holds a finished run of another study: {e}") from e


def run_cross_validation(config, workdir, *, _stop_after_fold: Optional[int] = None) -> dict:
    """Trains every fold of ``config.cv.folds`` (skipping finished ones) and
    writes the aggregate report; returns its summary (see `aggregate`).

    With ``config.cv.fold = k`` only fold k is trained (in ``WORKDIR/fold_<k>``,
    on the same data as the whole study), e.g. one fold per job on a cluster;
    the report is written once every fold is complete.

    `_stop_after_fold` (tests only) raises Interrupted right after fold index
    k has been trained by this call, as a kill between folds would.

    Multi-process runs call this on every process (each fold trains on all of
    them) and need a workdir all processes see; only process 0 writes the
    report, the others return None.
    """
    import jax

    from bcjax.data import datasets
    from bcjax.train import loop

    folds = int(config.cv.folds)
    if folds < 2:
        raise ValueError(f"config.cv.folds={folds}: cross-validation needs at least 2 folds.")
    if config.split_manifest:
        # A fixed manifest would give every fold the same train/val split.
        raise CrossValidationError("config.split_manifest and config.cv.folds >= 2 exclude each other: the folds "
                         "are cut from config.split_seed; clear one of them.")
    is_main = jax.process_index() == 0
    workdir = pathlib.Path(workdir).expanduser().resolve()
    loop.check_workdir(workdir)
    # Resolved once for all folds (the synthetic set is generated here once).
    source = datasets.resolve_source(config, workdir)
    plan = {"folds": folds, "split_seed": config.split_seed, "test_fraction": config.split_fractions[2],
            "source": source, "config": config.to_dict()}
    if is_main:
        (workdir / PLAN_FILE).write_text(json.dumps(plan, indent=1, default=str))
    log.info("[cv] %d-fold cross-validation of %s on %s data (%s) in %s", folds, config.model,
             source["dataset"], source["path"], workdir)

    trained_times = []
    for k in ([config.cv.fold] if config.cv.fold >= 0 else range(folds)):
        cfg = fold_config(config, k, source)
        wd = fold_dir(workdir, k)
        if (wd / "results.json").exists():
            try:
                _check_complete_fold(json.loads((wd / "results.json").read_text()), cfg, k)
                log.info("[cv] fold %d (%d of %d) is complete in %s; not trained again.", k, k + 1, folds, wd)
                continue
            except CrossValidationError:
                if not config.fresh_start:
                    raise
                if is_main:  # the fold's old run goes aside; the loop trains it afresh
                    loop.move_old_run_aside(wd)
        log.info("[cv] fold %d (%d of %d) starting in %s", k, k + 1, folds, wd)
        t0 = time.perf_counter()
        results = loop.train_and_evaluate(cfg, wd)
        trained_times.append(time.perf_counter() - t0)
        left = sum(not (fold_dir(workdir, j) / "results.json").exists() for j in range(k + 1, folds))
        test = results.get("test") or {}
        log.info("[cv] fold %d (%d of %d) done in %.1f s: test accuracy %s, macro-F1 %s; %d fold(s) left, "
                 "ETA %s", k, k + 1, folds, trained_times[-1], _num(test.get("accuracy")), _num(test.get("macro_f1")),
                 left, _eta(left * float(np.mean(trained_times))))
        if _stop_after_fold == k:
            raise Interrupted(f"stopped after fold {k} (test hook)")

    if not is_main:
        return None
    if not all((fold_dir(workdir, k) / "results.json").exists() for k in range(folds)):
        log.info("[cv] fold %d is done; the report follows once all %d folds are.", config.cv.fold, folds)
        return None
    summary = aggregate(workdir)
    log.info("[cv] report (%s):\n%s", workdir / "cv_report.md", summary["report_md"])
    if source.get("warning"):
        log.warning(source["warning"])
    return summary


# ----------------------------------------------------------------- aggregate

def _num(v, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _fold_row(k: int, results: dict) -> dict:
    val = results.get("val_best") or {}
    test = results.get("test") or {}
    row = {"fold": k}
    for m, _ in REPORT_METRICS:
        row[f"val_{m}"] = val.get(m)
        row[f"test_{m}"] = test.get(m)
    row.update(val_loss=val.get("loss"), test_loss=test.get("loss"), best_epoch=results.get("best_epoch"),
               # The last epoch trained: the early stop's, else every epoch ran
               # (older runs record neither field).
               stopped_epoch=(results.get("stopped_epoch") or results.get("epochs_trained")
                              or results.get("num_epochs")),
               stop_reason=results.get("stop_reason") or "all epochs", wall_time_s=results.get("wall_time_s"),
               num_val=val.get("num_examples"), num_test=test.get("num_examples"))
    return row


def _load_predictions(path: pathlib.Path) -> Optional[dict]:
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        return {"names": [str(n) for n in z["names"]], "labels": np.asarray(z["labels"], np.int64),
                "probs": np.asarray(z["probs"], np.float64)}


def ensemble_predictions(per_fold: list[dict]) -> dict:
    """The fold models' probabilities averaged per example name.

    Aligned by name, not by position: each fold writes its own order. Every
    fold must have scored the same examples with the same labels (the test
    part is shared), else the average would mix different images.
    """
    if not per_fold:
        raise ValueError("no fold predictions to average")
    names = sorted(per_fold[0]["names"])
    total = np.zeros((len(names), per_fold[0]["probs"].shape[1]), np.float64)
    labels = None
    for i, p in enumerate(per_fold):
        index = {n: j for j, n in enumerate(p["names"])}
        if sorted(index) != names or len(index) != len(p["names"]):
            raise ValueError(f"fold prediction set {i} holds other examples than the first "
                             f"({len(p['names'])} vs {len(names)} names); the test part must be shared")
        order = np.array([index[n] for n in names])
        fold_labels = p["labels"][order]
        if labels is None:
            labels = fold_labels
        elif not np.array_equal(labels, fold_labels):
            raise ValueError(f"fold prediction set {i} labels some examples differently from the first")
        total += p["probs"][order]
    return {"names": names, "labels": labels, "probs": total / len(per_fold)}


def _manifest_checks(manifests: dict[int, dict], folds: int) -> dict:
    """What the split promised, checked on the manifests the folds really used."""
    seen: dict[str, int] = {}
    repeated = []
    for k, m in manifests.items():
        for name in m["val"]:
            if name in seen:
                repeated.append(name)
            seen[name] = k
    tests = [sorted(m["test"]) for m in manifests.values()]
    out = {"val_folds_disjoint": not repeated, "test_identical": all(t == tests[0] for t in tests)}
    if len(manifests) == folds:
        first = next(iter(manifests.values()))
        pool = set(first["train"]) | set(first["val"])
        out["val_folds_cover_non_test"] = set(seen) == pool
    # A duplicate group split over two validation folds would let a model
    # validate on a near-copy of a training image.
    split_groups = []
    for m in manifests.values():
        for group in (m.get("meta") or {}).get("duplicate_groups", []):
            where = {seen.get(n) for n in group if n in seen}
            if len(where) > 1:
                split_groups.append(group)
        break  # the groups are the same in every fold's manifest
    out["duplicate_groups_within_one_fold"] = not split_groups
    return out


def aggregate(workdir, *, confidence: float = 0.95, write: bool = True) -> dict:
    """The cross-validation summary from the fold folders alone.

    Reads fold_<k>/results.json, manifest.json and *_predictions.npz, and (with
    `write`) writes cv_summary.json, cv_folds.csv, cv_report.md, cv_summary.png
    and cv_ensemble_test_predictions.npz into `workdir`.
    """
    from bcjax.train import metrics as metrics_lib

    workdir = pathlib.Path(workdir)
    plan = json.loads((workdir / PLAN_FILE).read_text()) if (workdir / PLAN_FILE).exists() else {}
    done = sorted(int(p.parent.name.split("_", 1)[1]) for p in workdir.glob("fold_*/results.json")
                  if p.parent.name.split("_", 1)[1].isdigit())
    if not done:
        raise FileNotFoundError(f"no finished fold (fold_<k>/results.json) in {workdir}")
    results = {k: json.loads((fold_dir(workdir, k) / "results.json").read_text()) for k in done}
    folds = int(plan.get("folds") or (results[done[0]].get("config") or {}).get("cv", {}).get("folds")
                or len(done))
    rows = [_fold_row(k, results[k]) for k in done]
    summary_stats = {c: stats.mean_ci([r[c] for r in rows], confidence) for c in STAT_COLUMNS}

    def predictions(kind):
        loaded = {k: _load_predictions(fold_dir(workdir, k) / f"{kind}_predictions.npz") for k in done}
        return {k: p for k, p in loaded.items() if p is not None}

    test_preds = predictions("test")
    ensemble = None
    if test_preds:
        ens = ensemble_predictions(list(test_preds.values()))
        ensemble = metrics_lib.classification_report(ens["probs"], ens["labels"], list(CLASSES))
        ensemble["folds"] = sorted(test_preds)
        if write:
            np.savez(workdir / "cv_ensemble_test_predictions.npz", names=np.array(ens["names"]),
                     labels=ens["labels"], probs=ens["probs"])
    val_preds = predictions("val")
    oof = None
    if val_preds:
        names = [n for p in val_preds.values() for n in p["names"]]
        if len(set(names)) == len(names):  # out-of-fold means each example once
            oof = metrics_lib.classification_report(
                np.concatenate([p["probs"] for p in val_preds.values()]),
                np.concatenate([p["labels"] for p in val_preds.values()]), list(CLASSES))
            oof["folds"] = sorted(val_preds)
    manifests = {k: json.loads((fold_dir(workdir, k) / "manifest.json").read_text()) for k in done
                 if (fold_dir(workdir, k) / "manifest.json").exists()}
    first = results[done[0]]
    summary = {
        "folds": folds, "completed_folds": done, "complete": len(done) == folds,
        "confidence": confidence, "model": first.get("model"), "dataset": first.get("dataset"),
        "data_path": first.get("data_path"), "warning": first.get("warning"),
        "num_devices": first.get("num_devices"), "platform": first.get("platform"),
        "best_metric": first.get("best_metric"),
        "per_fold": rows, "stats": summary_stats,
        "ensemble_test": ensemble, "out_of_fold_val": oof,
        "checks": _manifest_checks(manifests, folds) if manifests else {},
    }
    summary["report_md"] = markdown(summary)
    if write:
        (workdir / "cv_summary.json").write_text(json.dumps(summary, indent=1, default=str))
        write_csv(rows, summary_stats, workdir / "cv_folds.csv")
        (workdir / "cv_report.md").write_text(summary["report_md"] + "\n")
        plot(summary, workdir / "cv_summary.png")
    return summary


# ----------------------------------------------------------------- writing

def write_csv(rows: list[dict], summary_stats: dict, path: pathlib.Path) -> None:
    """One line per fold, then mean, sd, ci_low and ci_high lines."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FOLD_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c) for c in FOLD_COLUMNS})
        for label, key in (("mean", "mean"), ("sd", "sd"), ("ci_low", "low"), ("ci_high", "high")):
            w.writerow({"fold": label, **{c: summary_stats[c][key] for c in STAT_COLUMNS}})


def markdown(summary: dict) -> str:
    conf = summary["confidence"]
    cols = [("fold", "fold")] + [(f"val_{m}", f"val {label}") for m, label in REPORT_METRICS] + \
           [(f"test_{m}", f"test {label}") for m, label in REPORT_METRICS] + \
           [("best_epoch", "best epoch"), ("stopped_epoch", "stopped epoch"), ("wall_time_s", "wall s")]
    lines = [f"# {summary['folds']}-fold cross-validation: {summary['model']} on {summary['dataset']} data", ""]
    if not summary["complete"]:
        lines += [f"**Incomplete: folds {summary['completed_folds']} of {summary['folds']} finished.**", ""]
    lines.append("| " + " | ".join(label for _, label in cols) + " |")
    lines.append("|" + "---|" * len(cols))

    def cell(c, v):
        if v is None:
            return "–"
        if c in ("fold", "best_epoch", "stopped_epoch"):
            return str(v)
        return _num(v, 1 if c in _ONE_DECIMAL else 3)

    for r in summary["per_fold"]:
        lines.append("| " + " | ".join(cell(c, r.get(c)) for c, _ in cols) + " |")
    for label, key in (("mean", "mean"), ("sd", "sd"), (f"{conf:.0%} CI low", "low"),
                       (f"{conf:.0%} CI high", "high")):
        lines.append(f"| **{label}** | " + " | ".join(
            _num(summary["stats"][c][key], 1 if c in _ONE_DECIMAL else 3) for c, _ in cols[1:]) + " |")
    n = summary["stats"]["test_accuracy"]["n"]
    lines += ["", f"Mean ± Student-t {conf:.0%} interval over {n} folds (sd with ddof=1; "
                  f"t({0.5 + conf / 2:.3f}, {max(n - 1, 1)}) × sd / √n). Validation: the best epoch by "
                  f"{summary.get('best_metric')}; test: that epoch's checkpoint on the held-out part, "
                  "the same images for every fold. The interval assumes a symmetric spread, so it can "
                  "pass 1 when folds score near 1.", ""]
    for key, title in (("test", "Test"), ("val", "Validation")):
        parts = [f"{label} {stats.format_ci(summary['stats'][f'{key}_{m}'])}" for m, label in REPORT_METRICS]
        lines.append(f"- {title}: " + "; ".join(parts))
    ens = summary.get("ensemble_test")
    if ens:
        lines.append(f"- Fold ensemble on test (mean of {len(ens['folds'])} models' probabilities): " +
                     "; ".join(f"{label} {_num(ens.get(m))}" for m, label in REPORT_METRICS))
    oof = summary.get("out_of_fold_val")
    if oof:
        lines.append(f"- Out-of-fold validation ({oof['num_examples']} images, each scored by the model "
                     "that did not train on it): " +
                     "; ".join(f"{label} {_num(oof.get(m))}" for m, label in REPORT_METRICS))
    checks = summary.get("checks") or {}
    if checks:
        lines.append("- Split checks: " + ", ".join(f"{k} {'yes' if v else '**NO**'}"
                                                   for k, v in checks.items()))
    if summary.get("dataset") == "synthetic":
        lines += ["", "Data: the SYNTHETIC BUSI-like set; these numbers say nothing about real ultrasound."]
    return "\n".join(lines)


def plot(summary: dict, path: pathlib.Path) -> None:
    """Per-fold points, mean and interval for each metric; the ensemble as a star."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [(f"{part}_{m}", f"{part}\n{label}") for part in ("val", "test") for m, label in REPORT_METRICS]
    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    rows = summary["per_fold"]
    offsets = np.linspace(-0.18, 0.18, max(len(rows), 1)) if len(rows) > 1 else [0.0]
    for x, (key, _) in enumerate(keys):
        for off, r in zip(offsets, rows):
            if r.get(key) is not None:
                ax.plot(x + off, r[key], "o", color="tab:blue", alpha=0.6, ms=5,
                        label="fold" if x == 0 and off == offsets[0] else None)
        s = summary["stats"][key]
        if s["mean"] is not None:
            err = None if s["half_width"] is None else [[s["half_width"]], [s["half_width"]]]
            ax.errorbar(x + 0.32, s["mean"], yerr=err, fmt="s", color="black", capsize=4,
                        label=f"mean, {summary['confidence']:.0%} CI" if x == 0 else None)
        ens = summary.get("ensemble_test")
        if ens and key.startswith("test_") and ens.get(key[5:]) is not None:
            ax.plot(x + 0.32, ens[key[5:]], "*", color="tab:red", ms=11,
                    label="fold ensemble" if key == "test_accuracy" else None)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([label for _, label in keys], fontsize=8)
    ax.axvline(len(REPORT_METRICS) - 0.5, color="grey", lw=0.5)
    # Zoomed on the data: metrics of a few folds often sit within 0.2 of each
    # other, and an interval may pass 1 (see the report).
    shown = [v for key, _ in keys for v in [*(r.get(key) for r in rows),
                                             summary["stats"][key]["low"], summary["stats"][key]["high"]]
             if v is not None]
    if shown:
        ax.set_ylim(max(min(shown) - 0.05, 0.0), max(max(shown) + 0.03, 1.02))
    ax.axhline(1.0, color="grey", lw=0.5, ls=":")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="lower right")
    title = f"{summary['folds']}-fold CV, {summary.get('model')} on {summary.get('dataset')} data"
    ax.set_title(title + ("" if summary["complete"] else " (incomplete)"))
    fig.tight_layout()
    fig.savefig(path)
