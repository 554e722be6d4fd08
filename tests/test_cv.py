"""bcjax.cv and bcjax.stats: k-fold cross-validation and its statistics.

The statistics and the report run on planted fold outputs (fast). One real
3-fold cross-validation of a tiny model (module fixture, interrupted after a
fold and resumed) serves the end-to-end checks: split, resume, aggregate,
ensemble.
"""

import csv
import json
import math
import pathlib
import shutil
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bcjax import cv, stats  # noqa: E402

# Student t, two-sided 95% (t_{0.975, dof}), from a printed table: checks the
# intervals without trusting scipy.
T_975 = {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 9: 2.262157}
CLASSES = ("normal", "benign", "malignant")


# ----------------------------------------------------------------- statistics


def _reference_ci(xs):
    n = len(xs)
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = T_975[n - 1] * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


@pytest.mark.parametrize(
    "xs",
    [[0.81, 0.86, 0.78], [0.7, 0.72, 0.69, 0.75, 0.74], [0.5, 0.9], [0.1 * i for i in range(10)]],
)
def test_mean_ci_matches_a_t_table(xs):
    mean, sd, low, high = _reference_ci(xs)
    got = stats.mean_ci(xs)
    assert got["n"] == len(xs)
    assert got["mean"] == pytest.approx(mean) and got["sd"] == pytest.approx(sd)
    assert got["low"] == pytest.approx(low, abs=1e-6) and got["high"] == pytest.approx(
        high, abs=1e-6
    )
    assert got["t"] == pytest.approx(T_975[len(xs) - 1], abs=1e-6)


def test_mean_ci_edge_cases():
    one = stats.mean_ci([0.8])
    assert one["mean"] == 0.8 and one["sd"] is None and one["low"] is None
    assert stats.mean_ci([])["mean"] is None
    # A missing value (an undefined AUC) drops out instead of turning all into NaN.
    assert stats.mean_ci([0.8, None, float("nan"), 0.9])["n"] == 2
    flat = stats.mean_ci([0.5, 0.5, 0.5])
    assert flat["low"] == flat["high"] == 0.5
    assert stats.format_ci(stats.mean_ci([0.8, 0.9])).startswith("0.850 ± ")


def test_paired_difference_separates_effect_from_noise():
    base = [0.70, 0.80, 0.75, 0.85, 0.78]  # large fold-to-fold spread
    better = [b + d for b, d in zip(base, (0.030, 0.025, 0.035, 0.028, 0.032))]
    got = stats.paired_difference(better, base)
    mean, _, low, high = _reference_ci([a - b for a, b in zip(better, base)])
    assert got["mean"] == pytest.approx(mean) and got["low"] == pytest.approx(low, abs=1e-6)
    assert got["high"] == pytest.approx(high, abs=1e-6)
    assert got["excludes_zero"] and got["verdict"] == "a > b"
    # Unpaired, the same 0.03 would vanish in the spread between folds.
    assert stats.mean_ci(better)["low"] < stats.mean_ci(base)["high"]
    assert stats.paired_difference(base, better)["verdict"] == "a < b"

    noisy = [b + d for b, d in zip(base, (0.03, -0.04, 0.02, -0.01, 0.0))]
    got = stats.paired_difference(noisy, base)
    assert not got["excludes_zero"] and got["verdict"] == "no clear difference"
    assert stats.paired_difference([0.8], [0.7])["verdict"] == "too few pairs"
    same = stats.paired_difference(base, list(base))
    assert same["verdict"] == "identical" and not same["excludes_zero"]
    assert stats.paired_difference([0.8, None, 0.9], [0.7, 0.6, 0.8])["n"] == 2
    with pytest.raises(ValueError):
        stats.paired_difference([0.8, 0.9], [0.7])


# ----------------------------------------------------------------- planted folds


def _report(probs, labels):
    from bcjax.eval import metrics

    return metrics.classification_report(probs, labels, list(CLASSES))


def _plant_cv(workdir: pathlib.Path, folds: int = 3, seed: int = 0) -> dict:
    """Fold folders as the loop writes them: results.json, manifest.json and
    predictions, the test part in a different order in every fold."""
    rng = np.random.default_rng(seed)
    names = [f"{c}/{c} ({i}).png" for c in CLASSES for i in range(1, 9)]
    labels = {n: CLASSES.index(n.split("/")[0]) for n in names}
    test = names[::4]
    rest = [n for n in names if n not in test]
    val_of = {n: i % folds for i, n in enumerate(rest)}
    planted = {"test_probs": [], "test_names": test}
    for k in range(folds):
        wd = workdir / f"fold_{k}"
        wd.mkdir(parents=True)
        val = [n for n in rest if val_of[n] == k]
        order = list(rng.permutation(test))
        out = {}
        for part, part_names in (("val", val), ("test", order)):
            y = np.array([labels[n] for n in part_names])
            p = rng.dirichlet(np.ones(3), size=len(y)) + np.eye(3)[y] * rng.uniform(
                0, 1.5, (len(y), 1)
            )
            p /= p.sum(1, keepdims=True)
            np.savez(wd / f"{part}_predictions.npz", names=np.array(part_names), labels=y, probs=p)
            out[part] = _report(p, y)
            if part == "test":
                planted["test_probs"].append(dict(zip(part_names, p)))
        (wd / "results.json").write_text(
            json.dumps(
                {
                    "model": "resnet18",
                    "dataset": "synthetic",
                    "num_devices": 1,
                    "num_epochs": 5,
                    "best_metric": "macro_f1",
                    "best_epoch": 2 + k,
                    "stopped_epoch": 4 + k % 2,
                    "stop_reason": "early_stopping" if k % 2 else "num_epochs",
                    "wall_time_s": 10.0 + k,
                    "val_best": out["val"],
                    "test": out["test"],
                    "warning": "SYNTHETIC",
                    "config": {"cv": {"folds": folds, "fold": k}},
                }
            )
        )
        (wd / "manifest.json").write_text(
            json.dumps(
                {
                    "train": [n for n in rest if val_of[n] != k],
                    "val": val,
                    "test": test,
                    "meta": {"duplicate_groups": [[rest[0], rest[1]]]},
                }
            )
        )  # folds 0 and 1: split
    return planted


def test_aggregate_from_planted_folds(tmp_path):
    planted = _plant_cv(tmp_path, folds=3)
    summary = cv.aggregate(tmp_path)
    results = [json.loads((tmp_path / f"fold_{k}" / "results.json").read_text()) for k in range(3)]
    assert summary["complete"] and summary["completed_folds"] == [0, 1, 2]
    for key, part in (
        ("test_macro_f1", "test"),
        ("val_accuracy", "val_best"),
        ("val_auc_macro", "val_best"),
    ):
        metric = key.split("_", 1)[1]
        xs = [r[part][metric] for r in results]
        mean, sd, low, high = _reference_ci(xs)
        s = summary["stats"][key]
        assert s["mean"] == pytest.approx(mean) and s["sd"] == pytest.approx(sd)
        assert s["low"] == pytest.approx(low, abs=1e-6) and s["high"] == pytest.approx(
            high, abs=1e-6
        )
    assert summary["stats"]["best_epoch"]["mean"] == pytest.approx(3.0)
    assert [r["stopped_epoch"] for r in summary["per_fold"]] == [4, 5, 4]

    # Ensemble: the per-name mean of the folds' test probabilities.
    names = sorted(planted["test_names"])
    mean_probs = np.mean([[fold[n] for n in names] for fold in planted["test_probs"]], axis=0)
    saved = np.load(tmp_path / "cv_ensemble_test_predictions.npz")
    assert list(saved["names"]) == names
    np.testing.assert_allclose(saved["probs"], mean_probs, rtol=1e-12)
    labels = np.array([CLASSES.index(n.split("/")[0]) for n in names])
    expected = _report(mean_probs, labels)
    assert summary["ensemble_test"]["accuracy"] == pytest.approx(expected["accuracy"])
    assert summary["ensemble_test"]["auc_macro"] == pytest.approx(expected["auc_macro"])
    assert summary["out_of_fold_val"]["num_examples"] == 24 - len(names)
    assert summary["checks"] == {
        "val_folds_disjoint": True,
        "test_identical": True,
        "val_folds_cover_non_test": True,
        "duplicate_groups_within_one_fold": False,
    }

    for name in ("cv_summary.json", "cv_folds.csv", "cv_report.md", "cv_summary.png"):
        assert (tmp_path / name).is_file(), name
    with open(tmp_path / "cv_folds.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["fold"] for r in table] == ["0", "1", "2", "mean", "sd", "ci_low", "ci_high"]
    assert float(table[3]["test_accuracy"]) == pytest.approx(
        summary["stats"]["test_accuracy"]["mean"]
    )
    md = (tmp_path / "cv_report.md").read_text()
    assert "3-fold" in md and "ensemble" in md and "SYNTHETIC" in md and "**NO**" in md
    assert (tmp_path / "cv_summary.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "cv_summary.json").read_text())["stats"] == json.loads(
        json.dumps(summary["stats"])
    )


def test_aggregate_of_an_unfinished_study(tmp_path):
    _plant_cv(tmp_path, folds=3)
    shutil.rmtree(tmp_path / "fold_2")
    (tmp_path / cv.PLAN_FILE).write_text(json.dumps({"folds": 3}))
    summary = cv.aggregate(tmp_path, write=False)
    assert not summary["complete"] and summary["completed_folds"] == [0, 1]
    assert (
        "Incomplete" in summary["report_md"] and "val_folds_cover_non_test" not in summary["checks"]
    )
    with pytest.raises(FileNotFoundError):
        cv.aggregate(tmp_path / "nothing")


def test_ensemble_refuses_different_examples():
    a = {"names": ["x", "y"], "labels": np.array([0, 1]), "probs": np.eye(3)[[0, 1]]}
    b = {"names": ["y", "z"], "labels": np.array([1, 2]), "probs": np.eye(3)[[1, 2]]}
    with pytest.raises(ValueError, match="other examples"):
        cv.ensemble_predictions([a, b])
    c = {"names": ["y", "x"], "labels": np.array([2, 0]), "probs": np.eye(3)[[1, 0]]}
    with pytest.raises(ValueError, match="labels"):
        cv.ensemble_predictions([a, c])


# ----------------------------------------------------------------- a real cross-validation

FOLDS = 3


def _tiny_config(data_dir, **overrides):
    """tests/_tiny.py's run, 1 device, 2 epochs, as a FOLDS-fold study."""
    from _tiny import tiny_config

    config = tiny_config(data_dir, num_devices=1, num_epochs=2, log_every_steps=100)
    # Compiling is what this test waits for; augmentation only adds to it.
    config.augment.enabled = False
    config.cv.folds = FOLDS
    config.cv.fold = -1
    for k, v in overrides.items():
        config[k] = v
    return config


def test_fold_configs_share_one_data_folder_and_refuse_other_studies(tmp_path):
    config = _tiny_config(tmp_path / "elsewhere", dataset="synthetic")
    source = {"dataset": "synthetic", "path": str(tmp_path / "synthetic" / "Dataset_BUSI_with_GT")}
    fold = cv.fold_config(config, 2, source)
    assert fold.cv.fold == 2 and fold.data_dir == source["path"] and fold.dataset == "auto"
    assert (
        config.cv.fold == -1 and config.dataset == "synthetic"
    )  # the study's config is left alone
    cv._check_complete_fold({"config": fold.to_dict()}, fold, 2)
    other = cv.fold_config(_tiny_config(tmp_path, dataset="synthetic", image_size=48), 2, source)
    with pytest.raises(cv.CrossValidationError, match="image_size"):
        cv._check_complete_fold({"config": other.to_dict()}, fold, 2)
    with pytest.raises(cv.CrossValidationError, match="split_manifest"):
        cv.run_cross_validation(_tiny_config(tmp_path, split_manifest="m.json"), tmp_path / "cv")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One 3-fold CV, killed after fold 1 and run again; every training counted."""
    from bcjax.data import synthetic
    from bcjax.train import loop

    root = synthetic.generate(
        tmp_path_factory.mktemp("busi"), num=36, seed=0, min_size=40, max_size=56
    )
    # Planted exact duplicates (BUSI has many): the split must keep each
    # group inside one fold.
    for cls, src, dst in (("benign", 1, 90), ("benign", 1, 91), ("malignant", 2, 92)):
        for suffix in ("", "_mask"):
            shutil.copy(
                root / cls / f"{cls} ({src}){suffix}.png", root / cls / f"{cls} ({dst}){suffix}.png"
            )
    workdir = tmp_path_factory.mktemp("cv")
    calls = []
    real = loop.train_and_evaluate

    def counted(config, wd, **kw):
        calls.append(int(config.cv.fold))
        return real(config, wd, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "train_and_evaluate", counted)
        # One fold alone (config.cv.fold = 0, as one job of a cluster array would):
        # no report yet, and the whole study below reuses it.
        single = _tiny_config(root)
        single.cv.fold = 0
        assert cv.run_cross_validation(single, workdir) is None
        single_calls = list(calls)
        calls.clear()
        with pytest.raises(loop.Interrupted):
            cv.run_cross_validation(
                _tiny_config(root), workdir, on_fold_end=lambda fold, results: fold == 1
            )
        first_calls = list(calls)
        finished = {
            k: (
                (workdir / f"fold_{k}" / "results.json").read_bytes(),
                (workdir / f"fold_{k}" / "results.json").stat().st_mtime_ns,
            )
            for k in (0, 1)
        }
        summary = cv.run_cross_validation(_tiny_config(root), workdir)
        second_calls = calls[len(first_calls) :]
        # A finished study is not trained again; only its report is rebuilt.
        again = cv.run_cross_validation(_tiny_config(root), workdir)
        third_calls = calls[len(first_calls) + len(second_calls) :]
    return {
        "root": root,
        "workdir": workdir,
        "summary": summary,
        "again": again,
        "finished": finished,
        "calls": (first_calls, second_calls, third_calls),
        "single_calls": single_calls,
    }


def test_resume_skips_finished_folds(study):
    first, second, third = study["calls"]
    assert study["single_calls"] == [0]
    assert first == [1] and second == [2] and third == []
    for k, (content, mtime) in study["finished"].items():
        path = study["workdir"] / f"fold_{k}" / "results.json"
        assert path.read_bytes() == content and path.stat().st_mtime_ns == mtime
    assert study["again"]["stats"] == study["summary"]["stats"]


def test_folds_partition_the_data(study):
    wd = study["workdir"]
    manifests = [json.loads((wd / f"fold_{k}" / "manifest.json").read_text()) for k in range(FOLDS)]
    vals = [set(m["val"]) for m in manifests]
    non_test = set(manifests[0]["train"]) | vals[0]
    assert all(m["test"] == manifests[0]["test"] for m in manifests)  # one held-out test part
    assert sorted(n for v in vals for n in v) == sorted(
        non_test
    )  # each example in exactly one val fold
    assert not non_test & set(manifests[0]["test"])
    for k, m in enumerate(manifests):
        assert set(m["train"]) == non_test - vals[k]
    # Every fold read the same images: one data folder, nothing generated per fold.
    paths = {
        json.loads((wd / f"fold_{k}" / "results.json").read_text())["data_path"]
        for k in range(FOLDS)
    }
    assert len(paths) == 1 and not list(wd.glob("fold_*/synthetic"))

    groups = manifests[0]["meta"]["duplicate_groups"]
    planted = [
        {"benign/benign (1).png", "benign/benign (90).png", "benign/benign (91).png"},
        {"malignant/malignant (2).png", "malignant/malignant (92).png"},
    ]
    assert all(any(p <= set(g) for g in groups) for p in planted), groups
    for group in groups:
        where = {
            ("test" if n in manifests[0]["test"] else next(k for k, v in enumerate(vals) if n in v))
            for n in group
        }
        assert len(where) == 1, group
    assert all(study["summary"]["checks"].values()), study["summary"]["checks"]


def test_aggregate_equals_the_fold_results(study):
    wd, summary = study["workdir"], study["summary"]
    results = [json.loads((wd / f"fold_{k}" / "results.json").read_text()) for k in range(FOLDS)]
    assert summary["complete"] and [r["fold"] for r in summary["per_fold"]] == [0, 1, 2]
    for part, key in (("test", "test"), ("val_best", "val")):
        for metric in ("accuracy", "balanced_accuracy", "macro_f1", "auc_macro"):
            xs = [r[part][metric] for r in results]
            assert [row[f"{key}_{metric}"] for row in summary["per_fold"]] == xs
            s = summary["stats"][f"{key}_{metric}"]
            if len(set(xs)) > 1:
                mean, sd, low, high = _reference_ci(xs)
                assert s["mean"] == pytest.approx(mean) and s["sd"] == pytest.approx(sd)
                assert s["low"] == pytest.approx(low, abs=1e-6) and s["high"] == pytest.approx(
                    high, abs=1e-6
                )
    assert [row["best_epoch"] for row in summary["per_fold"]] == [r["best_epoch"] for r in results]
    # Recomputed from the files alone, the same numbers.
    assert cv.aggregate(wd, write=False)["stats"] == summary["stats"]
    saved = json.loads((wd / "cv_summary.json").read_text())
    assert saved["stats"]["test_accuracy"] == pytest.approx(summary["stats"]["test_accuracy"])


def test_ensemble_is_the_mean_of_fold_probabilities(study):
    wd, summary = study["workdir"], study["summary"]
    preds = [np.load(wd / f"fold_{k}" / "test_predictions.npz") for k in range(FOLDS)]
    names = sorted(str(n) for n in preds[0]["names"])
    per_fold = [dict(zip((str(n) for n in p["names"]), p["probs"])) for p in preds]
    mean = np.mean([[f[n] for n in names] for f in per_fold], axis=0)
    ens = np.load(wd / "cv_ensemble_test_predictions.npz")
    assert [str(n) for n in ens["names"]] == names
    np.testing.assert_allclose(ens["probs"], mean, rtol=1e-6)
    labels = dict(zip((str(n) for n in preds[0]["names"]), preds[0]["labels"]))
    assert sum(map(sum, summary["ensemble_test"]["confusion_matrix"])) == len(names)
    acc = np.mean(np.argmax(mean, 1) == np.array([labels[n] for n in names]))
    assert summary["ensemble_test"]["accuracy"] == pytest.approx(acc)
    for name in ("cv_summary.json", "cv_folds.csv", "cv_report.md", "cv_summary.png"):
        assert (wd / name).is_file(), name
