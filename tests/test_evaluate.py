"""bcjax.evaluate on a tiny trained run: the report files on an external generated set, metrics
recomputed from the saved probabilities, scores equal to the run's own test part, class mapping,
a planted overlap with the training images, and the error for mismatched classes.

One run is trained per module; every evaluation shares the predictor's one compile.
"""

import csv
import json
import pathlib
import shutil

import numpy as np
import pytest
from _tiny import tiny_config
from PIL import Image

from bcjax import evaluate
from bcjax.data import class_map, synthetic
from bcjax.eval import metrics
from bcjax.train import loop

CLASSES = ("normal", "benign", "malignant")


def _generate(folder, seed, num):
    return synthetic.generate(folder, num=num, seed=seed, min_size=64, max_size=80)


@pytest.fixture(scope="module")
def training_root(tmp_path_factory):
    return _generate(tmp_path_factory.mktemp("busi"), seed=0, num=36)


@pytest.fixture(scope="module")
def run(training_root, tmp_path_factory):
    config = tiny_config(training_root, num_devices=1, strategy="jit", num_epochs=2)
    config.augment.enabled = False  # half of the train step's compile time
    workdir = tmp_path_factory.mktemp("run")
    loop.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def manifest(run):
    return json.loads((run / "manifest.json").read_text())


@pytest.fixture(scope="module")
def external(tmp_path_factory, training_root, manifest):
    """Another generated set with two of the run's training images planted in it: one copied
    byte for byte, one shrunk by 8% and re-encoded as JPEG. Returns (folder, planted), planted
    mapping each planted image's name to the training image's."""
    folder = tmp_path_factory.mktemp("ext")
    root = _generate(folder, seed=1, num=24)
    benign = next(n for n in manifest["train"] if n.startswith("benign/"))
    malignant = next(n for n in manifest["train"] if n.startswith("malignant/"))
    shutil.copyfile(training_root / benign, root / "benign" / "planted copy.png")
    with Image.open(training_root / malignant) as im:
        smaller = im.resize((im.width * 92 // 100, im.height * 92 // 100), Image.BICUBIC)
        smaller.convert("L").save(root / "malignant" / "planted resized.jpg", quality=90)
    planted = {"benign/planted copy.png": benign, "malignant/planted resized.jpg": malignant}
    return folder, planted


@pytest.fixture(scope="module")
def evaluated(run, external):
    """evaluate_external of the run on the external set: (metrics, its output folder, echo)."""
    lines = []
    result = evaluate.evaluate_external(run, external[0], echo=lines.append)
    return result, pathlib.Path(result["evaluation"]["out"]), lines


@pytest.fixture(scope="module")
def folder_set(tmp_path_factory):
    """Class folders benign, cancer (malignant images) and unsure (normal images)."""
    source = _generate(tmp_path_factory.mktemp("gen2"), seed=2, num=24)
    root = tmp_path_factory.mktemp("folders")
    for ours, theirs in (("benign", "benign"), ("cancer", "malignant"), ("unsure", "normal")):
        (root / ours).mkdir()
        for image in sorted((source / theirs).glob("*.png")):
            if "_mask" not in image.name:
                shutil.copyfile(image, root / ours / image.name)
    return root


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_files_and_metrics(evaluated, external, run):
    result, out, lines = evaluated
    name = external[0].name  # the data's folder names the outputs
    assert out == run / "external" / name
    predictions = out / f"{name}_predictions"
    for path in ["metrics.json", "confusion_matrix.png", "duplicates_with_training.json"]:
        assert (out / path).is_file(), path
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "metrics.json").read_text()) == result

    with np.load(f"{predictions}.npz") as saved, np.load(run / "test_predictions.npz") as t:
        assert sorted(saved.files) == sorted(t.files)
        names, labels, probs = saved["names"], saved["labels"], saved["probs"]
    assert len(names) == 24 + 2 and set(external[1]) <= set(names.tolist())
    # BUSI's layout and classes: each image scored as its own folder's class.
    assert [CLASSES[k] for k in labels] == [n.split("/")[0] for n in names]
    expected = metrics.classification_report(probs, labels, CLASSES)
    assert {k: result[k] for k in expected if k != "loss"} == {
        k: v for k, v in expected.items() if k != "loss"
    }
    cross_entropy = -np.log(probs.astype(np.float64)[np.arange(len(labels)), labels])
    assert result["loss"] == pytest.approx(cross_entropy.mean(), rel=1e-12)
    assert result["classes_absent"] == []

    rows = _csv_rows(f"{predictions}.csv")
    assert [r["name"] for r in rows] == names.tolist()
    np.testing.assert_allclose(
        [[float(r[f"p_{c}"]) for c in CLASSES] for r in rows], probs, rtol=1e-6
    )
    assert [r["predicted"] for r in rows] == [CLASSES[k] for k in probs.argmax(axis=1)]

    # Progress says which checkpoint (the best) and how many images.
    summary = json.loads((run / "results.json").read_text())
    best_step = summary["best_epoch"] * summary["steps_per_epoch"]
    assert result["evaluation"]["checkpoint_step"] == best_step
    assert any(f"checkpoint step {best_step}" in line and "26 images" in line for line in lines)


def test_scores_equal_the_runs_own_test_part(run, manifest, training_root, tmp_path):
    """The run's test images listed in a CSV (whose sorted classes are in another order than
    the model's) score as the run scored them: same decoding, resizing and classes by name."""
    table = tmp_path / "test_part.csv"
    table.write_text(
        "image,label\n"
        + "".join(f"{training_root / n},{n.split('/')[0]}\n" for n in manifest["test"])
    )
    result = evaluate.evaluate_external(run, table, tmp_path / "out")
    with np.load(tmp_path / "out" / "test_part_predictions.npz") as saved:
        ours = {
            pathlib.PurePath(n).name: (label, p)
            for n, label, p in zip(saved["names"], saved["labels"], saved["probs"])
        }
    with np.load(run / "test_predictions.npz") as theirs:
        for name, label, probs in zip(theirs["names"], theirs["labels"], theirs["probs"]):
            assert ours[pathlib.PurePath(name).name][0] == label
            np.testing.assert_allclose(ours[pathlib.PurePath(name).name][1], probs, atol=1e-5)
    summary = json.loads((run / "results.json").read_text())["test"]
    assert result["confusion_matrix"] == summary["confusion_matrix"]
    # The split keeps every near duplicate of a training image out of the test part.
    duplicates = json.loads((tmp_path / "out" / "duplicates_with_training.json").read_text())
    assert duplicates["checked"] and duplicates["num_duplicates"] == 0


def test_duplicates_with_training(evaluated, external, manifest):
    out = evaluated[1]
    report = json.loads((out / "duplicates_with_training.json").read_text())
    assert report["checked"] and report["training_images"] == len(manifest["train"])
    assert report["hash_threshold"] == manifest["meta"]["hash_threshold"]
    found = {d["external"]: d for d in report["duplicates"]}
    assert sorted(found) == sorted(external[1])  # both planted images, and nothing else
    for name, train_name in external[1].items():
        assert [m["train"] for m in found[name]["matches"]] == [train_name]
    copy, resized = found["benign/planted copy.png"], found["malignant/planted resized.jpg"]
    assert copy["kind"] == "exact" and copy["matches"][0]["distance"] == 0
    assert resized["kind"] == "near" and not resized["matches"][0]["exact"]
    assert resized["matches"][0]["distance"] <= report["hash_threshold"]
    assert evaluated[0]["evaluation"]["duplicates_with_training"] == 2


def test_class_mapping(run, folder_set, tmp_path, capsys):
    """A benign/cancer/unsure set scored on the 3-class model: cancer mapped, unsure dropped."""
    out = tmp_path / "mapped"
    args = ["--workdir", str(run), "--data", str(folder_set), "--out", str(out)]
    assert evaluate.main([*args, "--class-map", "cancer=malignant", "--drop-class", "unsure"]) == 0
    num_normal, num_benign, num_malignant = synthetic.class_counts(24)
    printed = capsys.readouterr().out
    assert (
        f"unsure: dropped ({num_normal} images)" in printed
        and "cancer: scored as malignant" in printed
    )
    assert "Note: The external set has no images of normal" in printed

    result = json.loads((out / "metrics.json").read_text())
    assert result["classes_absent"] == ["normal"]
    assert result["evaluation"]["class_map"] == {"cancer": "malignant"}
    assert result["evaluation"]["dropped"] == {"unsure": num_normal}
    predictions = out / f"{folder_set.name}_predictions"
    with np.load(f"{predictions}.npz") as saved:
        names, labels, probs = saved["names"], saved["labels"], saved["probs"]
    assert probs.shape == (len(names), 3)  # the model's full probability vector
    by_folder = {"benign": CLASSES.index("benign"), "cancer": CLASSES.index("malignant")}
    assert labels.tolist() == [by_folder[n.split("/")[0]] for n in names]
    assert result["num_examples"] == num_benign + num_malignant

    expected = metrics.classification_report(probs, labels, CLASSES)
    for key in ("accuracy", "balanced_accuracy", "auc_macro", "per_class", "confusion_matrix"):
        assert result[key] == expected[key], key
    assert result["confusion_matrix"][0] == [0, 0, 0]  # normal: no images
    for key in ("precision", "recall", "f1"):  # averaged over benign and malignant only
        present = [expected["per_class"][c][key] for c in ("benign", "malignant")]
        assert result[f"macro_{key}"] == pytest.approx(np.mean(present), abs=1e-15)
    rows = _csv_rows(f"{predictions}.csv")
    assert {(r["external_label"], r["label"]) for r in rows} == {
        ("benign", "benign"),
        ("cancer", "malignant"),
    }


@pytest.mark.parametrize(
    "extra, expected",
    [
        ([], ["do not match", "'cancer', 'unsure'", "without external images: 'normal'"]),
        (["--class-map", "cancer=tumour"], ["onto 'tumour'", "'normal', 'benign', 'malignant'"]),
        (["--drop-class", "normal"], ["--drop-class names 'normal'", "'benign', 'cancer'"]),
        (["--class-map", "cancer"], ["EXTERNAL=MODEL pairs, got 'cancer'"]),
    ],
)
def test_class_errors(run, folder_set, tmp_path, capsys, extra, expected):
    out = tmp_path / "never"
    args = ["--workdir", str(run), "--data", str(folder_set), "--out", str(out), *extra]
    assert evaluate.main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and "Traceback" not in captured.err
    for text in expected:
        assert text in captured.err
    assert not out.exists()


def test_map_classes_rules():
    model = ("normal", "benign", "malignant")
    many_to_one = class_map.map_classes(
        model, ("cyst", "fibroadenoma", "malignant"), {"cyst": "benign", "fibroadenoma": "benign"}
    )
    assert many_to_one == {"cyst": "benign", "fibroadenoma": "benign", "malignant": "malignant"}
    assert class_map.parse_class_map(["a=b, c=d", "e=f"]) == {"a": "b", "c": "d", "e": "f"}
    with pytest.raises(evaluate.EvaluateError, match="both mapped and dropped"):
        class_map.map_classes(model, ("benign", "x"), {"x": "benign"}, drop=["x"])
    with pytest.raises(evaluate.EvaluateError, match="leaves no class"):
        class_map.map_classes(model, ("benign", "x"), {}, drop=["benign", "x"])
    with pytest.raises(evaluate.EvaluateError, match="maps 'a' twice"):
        class_map.parse_class_map(["a=b,a=c"])


def test_a_one_class_set_reports_what_it_defines(run, tmp_path, capsys):
    """50 cancers from elsewhere, in small: malignant/ only. Recall with its interval, the
    confusion row, calibration and predictions; AUC listed as undefined, with the reason."""
    source = _generate(tmp_path / "gen", seed=3, num=24)
    root = tmp_path / "cancers"
    shutil.copytree(source / "malignant", root / "malignant")
    out = tmp_path / "out"
    args = ["--workdir", str(run), "--data", str(root), "--out", str(out)]
    assert evaluate.main(args) == 0
    printed = capsys.readouterr().out
    assert "Undefined on this set:" in printed and "auc/malignant: needs images" in printed
    result = json.loads((out / "metrics.json").read_text())
    with np.load(out / "cancers_predictions.npz") as saved:
        probs, labels = saved["probs"], saved["labels"]
    assert set(labels.tolist()) == {CLASSES.index("malignant")}
    subset = result["class_subset"]
    entry = subset["per_class"]["malignant"]
    called = probs.argmax(axis=1)
    assert entry["support"] == len(labels) == synthetic.class_counts(24)[2]
    assert entry["recall"]["value"] == pytest.approx(np.mean(called == 2), abs=1e-12)
    # The interval: the same resampling drawn independently here.
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(labels), size=(2000, len(labels)))
    resampled = (called[draws] == 2).mean(axis=1)
    low, high = np.percentile(resampled, [2.5, 97.5])
    assert (entry["recall"]["low"], entry["recall"]["high"]) == pytest.approx((low, high))
    assert entry["confusion_row"] == {c: int(np.sum(called == k)) for k, c in enumerate(CLASSES)}
    assert result["confusion_matrix"][2] == list(entry["confusion_row"].values())
    from bcjax.clinical import calibration

    assert subset["calibration"]["ece"] == pytest.approx(
        calibration.expected_calibration_error(probs, labels)
    )
    why = {u["metric"]: u["why"] for u in subset["undefined"]}
    assert "auc/malignant" in why and "only 'malignant'" in why["auc/malignant"]
    assert "recall/normal" in why and "specificity" in why
    assert result["auc_macro"] is None and result["per_class"]["malignant"]["auc"] is None
