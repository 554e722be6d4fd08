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
cv_summary.json, cv_folds.csv, cv_report.md and cv_summary.png (drawn by
bcjax.cv.study_report).
"""

from __future__ import annotations

import copy
import json
import logging
import pathlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bcjax import files, report, specs, stats
from bcjax.cv import study_report as cv_report
from bcjax.cv.study_report import REPORT_METRICS, STAT_COLUMNS

log = logging.getLogger(__name__)

PLAN_FILE = "cv_plan.json"


class CrossValidationError(ValueError):
    """The workdir holds folds of another cross-validation."""


def fold_dir(workdir, k: int) -> pathlib.Path:
    return pathlib.Path(workdir) / f"fold_{k}"


def fold_config(config, k: int, source: dict | None = None):
    """A copy of `config` training fold k, on the images `source` resolved.

    Pointing every fold at one resolved folder is what makes the folds see the
    same images: left alone, each fold's workdir would get its own generated
    synthetic set.
    """
    c = copy.deepcopy(config)
    c.cv.fold = k
    if source is not None and source["dataset"] == "csv":
        c.data_csv = source["path"]  # the CSV names its images
    elif source is not None:
        c.data_dir = source["path"]
        if c.dataset == "synthetic":
            # "synthetic" always generates into the run's workdir; "auto" finds
            # the generated folder in data_dir and still records it as synthetic.
            c.dataset = "auto"
    return c


def _check_complete_fold(results: dict, expected_config, k: int) -> None:
    """A finished fold is reused only if it was trained for this very study."""
    from bcjax.train import checkpoint

    saved = results.get("config") or {}
    try:
        checkpoint.check_identity(
            checkpoint.run_metadata(saved), checkpoint.run_metadata(expected_config)
        )
    except checkpoint.CheckpointMismatchError as e:
        raise CrossValidationError(
            f"{fold_dir('.', k)} holds a finished run of another study: {e}"
        ) from e


def run_cross_validation(
    config, workdir, *, on_fold_end: Callable[[int, dict], Any] | None = None
) -> dict:
    """Trains every fold of ``config.cv.folds`` (skipping finished ones) and
    writes the aggregate report; returns its summary (see `aggregate`).

    With ``config.cv.fold = k`` only fold k is trained (in ``WORKDIR/fold_<k>``,
    on the same data as the whole study), e.g. one fold per job on a cluster;
    the report is written once every fold is complete.

    on_fold_end(k, results): called after fold k has been trained by this call;
    when it returns True the study stops there as a kill between folds would
    (bcjax.train.loop.Interrupted is raised; tests use it to interrupt and resume).

    Multi-process runs call this on every process (each fold trains on all of
    them) and need a workdir all processes see; only process 0 writes the
    report, the others return None.
    """
    from bcjax.train import run_lock

    run_specs = specs.from_config(config)  # the config's one reading; folds get configs
    folds, only_fold = run_specs.data.cv_folds, run_specs.data.cv_fold
    if folds < 2:
        raise ValueError(f"config.cv.folds={folds}: cross-validation needs at least 2 folds.")
    if run_specs.data.split_manifest:
        # A fixed manifest would give every fold the same train/val split.
        raise CrossValidationError(
            "config.split_manifest and config.cv.folds >= 2 exclude each other: the folds "
            "are cut from config.split_seed; clear one of them."
        )
    workdir = pathlib.Path(workdir).expanduser().resolve()
    # A whole study holds its workdir, as under bcjax.main (which took it already: re-entered
    # here), so a second whole study is refused; a one-fold job locks only its fold (the loop
    # does), beside the other folds' jobs.
    with run_lock.hold_on_process_0([workdir] if only_fold < 0 else [], reenter=True):
        return _cross_validate(config, workdir, run_specs, on_fold_end)


def _cross_validate(config, workdir: pathlib.Path, run_specs, on_fold_end) -> dict | None:
    import jax

    from bcjax.data import datasets
    from bcjax.train import loop
    from bcjax.train.workdir import check_workdir, move_old_run_aside

    folds, only_fold = run_specs.data.cv_folds, run_specs.data.cv_fold
    is_main = jax.process_index() == 0
    check_workdir(workdir)
    # Resolved once for all folds (the synthetic set is generated here once).
    source = datasets.resolve_source(run_specs.data, workdir)
    plan = {
        "folds": folds,
        "split_seed": run_specs.data.split_seed,
        "test_fraction": run_specs.data.split_fractions[2],
        "source": source,
        "config": run_specs.config,
    }
    if is_main:
        files.write_json(plan, workdir / PLAN_FILE, default=str)
    log.info(
        "[cv] %d-fold cross-validation of %s on %s data (%s) in %s",
        folds,
        run_specs.model.name,
        source["dataset"],
        source["path"],
        workdir,
    )

    trained_times = []
    for k in [only_fold] if only_fold >= 0 else range(folds):
        cfg = fold_config(config, k, source)
        wd = fold_dir(workdir, k)
        if (wd / "results.json").exists():
            try:
                _check_complete_fold(json.loads((wd / "results.json").read_text()), cfg, k)
                log.info(
                    "[cv] fold %d (%d of %d) is complete in %s; not trained again.",
                    k,
                    k + 1,
                    folds,
                    wd,
                )
                continue
            except CrossValidationError:
                if not run_specs.run.fresh_start:
                    raise
                if is_main:  # the fold's old run goes aside; the loop trains it afresh
                    move_old_run_aside(wd)
        log.info("[cv] fold %d (%d of %d) starting in %s", k, k + 1, folds, wd)
        fold_start = time.perf_counter()
        results = loop.train_and_evaluate(cfg, wd)
        trained_times.append(time.perf_counter() - fold_start)
        left = sum(
            not (fold_dir(workdir, j) / "results.json").exists() for j in range(k + 1, folds)
        )
        test = results.get("test") or {}
        log.info(
            "[cv] fold %d (%d of %d) done in %.1f s: test accuracy %s, macro-F1 %s; "
            "%d fold(s) left, ETA %s",
            k,
            k + 1,
            folds,
            trained_times[-1],
            report.number(test.get("accuracy")),
            report.number(test.get("macro_f1")),
            left,
            report.duration(left * float(np.mean(trained_times))),
        )
        if on_fold_end is not None and on_fold_end(k, results):
            raise loop.Interrupted(f"stopped after fold {k} (on_fold_end)")

    if not is_main:
        return None
    if not all((fold_dir(workdir, k) / "results.json").exists() for k in range(folds)):
        log.info(
            "[cv] fold %d is done; the report follows once all %d folds are.", only_fold, folds
        )
        return None
    summary = aggregate(workdir)
    log.info("[cv] report (%s):\n%s", workdir / "cv_report.md", summary["report_md"])
    if source.get("warning"):
        log.warning(source["warning"])
    return summary


# ----------------------------------------------------------------- aggregate


def _fold_row(k: int, results: dict) -> dict:
    val = results.get("val_best") or {}
    test = results.get("test") or {}
    row = {"fold": k}
    for m, _ in REPORT_METRICS:
        row[f"val_{m}"] = val.get(m)
        row[f"test_{m}"] = test.get(m)
    row.update(
        val_loss=val.get("loss"),
        test_loss=test.get("loss"),
        best_epoch=results.get("best_epoch"),
        # The last epoch trained: the early stop's, else every epoch ran
        # (older runs record neither field).
        stopped_epoch=(
            results.get("stopped_epoch")
            or results.get("epochs_trained")
            or results.get("num_epochs")
        ),
        stop_reason=results.get("stop_reason") or "all epochs",
        wall_time_s=results.get("wall_time_s"),
        num_val=val.get("num_examples"),
        num_test=test.get("num_examples"),
    )
    return row


def _load_predictions(path: pathlib.Path) -> dict | None:
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        return {
            "names": [str(n) for n in z["names"]],
            "labels": np.asarray(z["labels"], np.int64),
            "probs": np.asarray(z["probs"], np.float64),
        }


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
            raise ValueError(
                f"fold prediction set {i} holds other examples than the first "
                f"({len(p['names'])} vs {len(names)} names); the test part must be shared"
            )
        order = np.array([index[n] for n in names])
        fold_labels = p["labels"][order]
        if labels is None:
            labels = fold_labels
        elif not np.array_equal(labels, fold_labels):
            raise ValueError(
                f"fold prediction set {i} labels some examples differently from the first"
            )
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
    from bcjax.eval import metrics as metrics_lib

    workdir = pathlib.Path(workdir)
    plan = json.loads((workdir / PLAN_FILE).read_text()) if (workdir / PLAN_FILE).exists() else {}
    done = sorted(
        int(p.parent.name.split("_", 1)[1])
        for p in workdir.glob("fold_*/results.json")
        if p.parent.name.split("_", 1)[1].isdigit()
    )
    if not done:
        raise FileNotFoundError(f"no finished fold (fold_<k>/results.json) in {workdir}")
    results = {k: json.loads((fold_dir(workdir, k) / "results.json").read_text()) for k in done}
    folds = int(
        plan.get("folds")
        or (results[done[0]].get("config") or {}).get("cv", {}).get("folds")
        or len(done)
    )
    rows = [_fold_row(k, results[k]) for k in done]
    summary_stats = {c: stats.mean_ci([r[c] for r in rows], confidence) for c in STAT_COLUMNS}

    def predictions(kind):
        loaded = {
            k: _load_predictions(fold_dir(workdir, k) / f"{kind}_predictions.npz") for k in done
        }
        return {k: p for k, p in loaded.items() if p is not None}

    # The classes the folds were trained on (every fold has the same data); runs from
    # before results.json recorded them have them in their test report.
    first = results[done[0]]
    class_names = list(first.get("class_names") or first["test"]["class_names"])
    positive_class = first.get("positive_class")
    test_preds = predictions("test")
    ensemble = None
    clinical = None
    if test_preds:
        ens = ensemble_predictions(list(test_preds.values()))
        ensemble = metrics_lib.classification_report(
            ens["probs"], ens["labels"], class_names, positive_class=positive_class
        )
        ensemble["folds"] = sorted(test_preds)
        if all(results[k].get("calibration") for k in sorted(test_preds)):
            from bcjax.eval import clinical_outputs

            clinical = clinical_outputs.aggregate_folds(
                [results[k] for k in sorted(test_preds)],
                ens["probs"],
                ens["labels"],
                class_names,
                positive_class,
                seed=int((first.get("config") or {}).get("seed", 0)),
                folds=sorted(test_preds),
            )
        if write:
            files.save_npz(
                workdir / "cv_ensemble_test_predictions.npz",
                names=np.array(ens["names"]),
                labels=ens["labels"],
                probs=ens["probs"],
            )
    val_preds = predictions("val")
    oof = None
    if val_preds:
        names = [n for p in val_preds.values() for n in p["names"]]
        if len(set(names)) == len(names):  # out-of-fold means each example once
            oof = metrics_lib.classification_report(
                np.concatenate([p["probs"] for p in val_preds.values()]),
                np.concatenate([p["labels"] for p in val_preds.values()]),
                class_names,
                positive_class=positive_class,
            )
            oof["folds"] = sorted(val_preds)
    manifests = {
        k: json.loads((fold_dir(workdir, k) / "manifest.json").read_text())
        for k in done
        if (fold_dir(workdir, k) / "manifest.json").exists()
    }
    summary = {
        "folds": folds,
        "completed_folds": done,
        "complete": len(done) == folds,
        "confidence": confidence,
        "model": first.get("model"),
        "dataset": first.get("dataset"),
        "data_path": first.get("data_path"),
        "class_names": class_names,
        "positive_class": metrics_lib.positive_of(class_names, positive_class)
        if len(class_names) == 2
        else None,
        "warning": first.get("warning"),
        "num_devices": first.get("num_devices"),
        "platform": first.get("platform"),
        "best_metric": first.get("best_metric"),
        "per_fold": rows,
        "stats": summary_stats,
        "ensemble_test": ensemble,
        "clinical": clinical,
        "out_of_fold_val": oof,
        "checks": _manifest_checks(manifests, folds) if manifests else {},
    }
    summary["report_md"] = cv_report.markdown(summary)
    if write:
        files.write_json(summary, workdir / "cv_summary.json", default=str)
        cv_report.write_csv(rows, summary_stats, workdir / "cv_folds.csv")
        files.write_text(summary["report_md"] + "\n", workdir / "cv_report.md")
        cv_report.plot(summary, workdir / "cv_summary.png")
    return summary
