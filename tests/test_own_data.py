"""Your own data end to end: classes from the data, patient groups, predict, failed starts.

A 2-class folder set (benign and malignant only) and a CSV set of the same
images with patient groups train on the tiny config; their identical shapes
let the session's compilation cache compile the steps once.
"""

import csv
import json
import pathlib
import shutil
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _tiny import tiny_config  # noqa: E402

from bcjax import predict  # noqa: E402
from bcjax.config_check import ConfigError  # noqa: E402
from bcjax.data import synthetic  # noqa: E402
from bcjax.train import checkpoint, loop  # noqa: E402

CLASSES = ["benign", "malignant"]


def _config(data_dir="unused", **overrides):
    # jit and no augmentation: the quickest compile; 2 epochs still choose a best one.
    settings = {"num_epochs": 2, "strategy": "jit", "num_devices": 1, **overrides}
    config = tiny_config(data_dir, **settings)
    config.augment.enabled = False
    return config


@pytest.fixture(scope="module")
def two_class_root(tmp_path_factory):
    """benign/ and malignant/ of a generated set, masks included; no normal/."""
    generated = synthetic.generate(
        tmp_path_factory.mktemp("generated"), num=48, seed=0, min_size=40, max_size=56
    )
    root = tmp_path_factory.mktemp("own") / "two_class"
    for name in CLASSES:
        shutil.copytree(generated / name, root / name)
    return root


@pytest.fixture(scope="module")
def folder_run(two_class_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("folder_run")
    loop.train_and_evaluate(_config(dataset="folder", data_dir=str(two_class_root)), workdir)
    return workdir


@pytest.fixture(scope="module")
def groups_csv(two_class_root):
    """A CSV beside the class folders: relative paths, two images per patient."""
    path = two_class_root.parent / "labels.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "label", "group"])
        for name in CLASSES:
            images = sorted(p for p in (two_class_root / name).iterdir() if "_mask" not in p.name)
            for i, image in enumerate(images):
                writer.writerow(
                    [image.relative_to(path.parent).as_posix(), name, f"{name}-{i // 2}"]
                )
    return path


def test_two_class_folder_set_trains_with_its_classes(folder_run):
    results = json.loads((folder_run / "results.json").read_text())
    assert results["dataset"] == "folder" and results["warning"] is None
    assert results["class_names"] == CLASSES == results["test"]["class_names"]
    assert results["positive_class"] == "malignant"  # the last class by default
    test = results["test"]
    assert np.shape(test["confusion_matrix"]) == (2, 2)
    assert test["positive_class"] == "malignant"
    assert test["binary_auc"] is not None
    assert test["binary_auc"] == test["per_class"]["malignant"]["auc"]
    held_out = np.load(folder_run / "test_predictions.npz")
    assert held_out["probs"].shape == (test["num_examples"], 2)
    manifest = json.loads((folder_run / "manifest.json").read_text())
    assert manifest["meta"]["class_names"] == CLASSES
    identity = checkpoint.saved_metadata(folder_run / "checkpoints")["identity"]
    assert identity["class_names"] == CLASSES  # resolved from the data
    assert identity["dataset"] == "folder"


def test_csv_set_keeps_patients_in_one_split(groups_csv, tmp_path):
    config = _config(dataset="csv", data_csv=str(groups_csv), positive_class="benign")
    results = loop.train_and_evaluate(config, tmp_path)
    assert results["dataset"] == "csv" and results["class_names"] == CLASSES
    assert results["positive_class"] == "benign" == results["test"]["positive_class"]
    assert results["test"]["binary_auc"] == results["test"]["per_class"]["benign"]["auc"]

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    part_of = {name: part for part in ("train", "val", "test") for name in manifest[part]}
    with open(groups_csv, newline="") as fh:
        written = {}
        for row in csv.DictReader(fh):
            written.setdefault(row["group"], []).append(row["image"])
    patients = manifest["meta"]["patient_groups"]
    assert patients == {g: sorted(m) for g, m in written.items() if len(m) > 1}
    assert len(patients) >= 10
    for group, members in patients.items():
        assert len({part_of[m] for m in members}) == 1, group
    assert {part_of[m] for members in patients.values() for m in members} == {
        "train",
        "val",
        "test",
    }


def test_predict_writes_the_runs_classes(folder_run, two_class_root, tmp_path, capsys):
    images = [next((two_class_root / c).glob("* (1).png")) for c in CLASSES]
    out = tmp_path / "predictions"
    args = ["--workdir", str(folder_run), "--images", *map(str, images), "--out", str(out)]
    assert predict.main([*args, "--no-overlays", "--class", "malignant"]) == 0
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["file", "p_benign", "p_malignant", "predicted"]
    for row in rows:
        assert float(row["p_benign"]) + float(row["p_malignant"]) == pytest.approx(1, abs=1e-5)
        assert row["predicted"] in CLASSES
    with pytest.raises(SystemExit) as exit_info:  # normal is BUSI's class, not this run's
        predict.main([*args, "--class", "normal"])
    assert exit_info.value.code == 2
    assert "the run's classes: benign, malignant" in capsys.readouterr().err


def test_a_start_that_failed_before_its_first_checkpoint_does_not_claim_the_workdir(
    two_class_root, tmp_path
):
    # Weights of another model (a MobileNet key) given to the ResNet.
    wrong = tmp_path / "mobilenet.npz"
    np.savez(wrong, **{"features.0.0.weight": np.zeros((32, 3, 3, 3), np.float32)})
    workdir = tmp_path / "run"
    config = _config(dataset="folder", data_dir=str(two_class_root))
    config.pretrained = str(wrong)
    with pytest.raises(ConfigError, match="config.pretrained="):
        loop.train_and_evaluate(config, workdir)
    left = checkpoint.saved_metadata(workdir / "checkpoints")
    assert left["identity"]["pretrained"] == str(wrong)  # what used to refuse the retry
    assert not checkpoint.committed_steps(workdir / "checkpoints")

    config.pretrained = ""  # the corrected command, same workdir
    results = loop.train_and_evaluate(config, workdir)
    assert results["epochs_trained"] == 2
    identity = checkpoint.saved_metadata(workdir / "checkpoints")["identity"]
    assert identity["pretrained"] == "" and identity["class_names"] == CLASSES
