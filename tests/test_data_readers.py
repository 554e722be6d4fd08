"""Class folders and CSVs: the same Example records, classes from the data, and
every kind of bad input as an error naming the file or CSV line, raised by the
data phase (before anything compiles)."""

import importlib
import json
import pathlib
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from bcjax import specs
from bcjax.config_check import ConfigError
from bcjax.data import busi, datasets, readers, splits, synthetic
from bcjax.data import manifest as manifest_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _png(path, seed, size=(24, 20)):
    """A small noise image; distinct seeds give images no perceptual hash groups."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1] // 4, size[0] // 4), np.uint8)
    Image.fromarray(pixels).resize(size, Image.NEAREST).save(path)
    return path


def _mask(path, size=(24, 20)):
    a = np.zeros((size[1], size[0]), np.uint8)
    a[5:10, 5:10] = 255
    Image.fromarray(a).save(path)
    return path


def _folder_set(root, counts):
    """root/<class>/<class>_<k>.png, each with a mask beside it."""
    seed = 0
    for cls, n in counts.items():
        for k in range(1, n + 1):
            seed += 1
            _png(root / cls / f"{cls}_{k}.png", seed)
            _mask(root / cls / f"{cls}_{k}_mask.png")
    return root


def _csv(path, rows, header="image,label,mask,group"):
    path.write_text("\n".join([header] + [",".join(r) for r in rows]) + "\n")
    return path


def _config(**overrides):
    config = importlib.import_module("configs.quickstart").get_config()
    config.image_size = 32
    for k, v in overrides.items():
        config[k] = v
    return config


def _data(config):
    """The config's data spec: what bcjax.data.datasets reads."""
    return specs.from_config(config).data


def _prepare(config, workdir, **kwargs):
    """datasets.prepare of a config, as bcjax.train.run_setup calls it."""
    run_specs = specs.from_config(config)
    return datasets.prepare(
        run_specs.data, workdir, class_weights=run_specs.optimizer.class_weights, **kwargs
    )


# ----------------------------------------------------------------------------- folders


def test_folder_classes_sorted_masks_attached(tmp_path):
    root = _folder_set(tmp_path / "data", {"malignant": 3, "benign": 4})
    (root / "README.txt").write_text("exported 2026-11-30")
    with pytest.warns(UserWarning, match="ignoring file .*README.txt"):
        got = readers.read_folder(root)
    (root / "README.txt").unlink()
    assert got.class_names == ("benign", "malignant") and got.kind == "folder"
    assert got.class_counts() == {"benign": 4, "malignant": 3}
    names = [ex.name for ex in got.examples]
    assert names[:2] == ["benign/benign_1.png", "benign/benign_2.png"] and len(names) == 7
    assert not any("_mask" in n for n in names)  # masks never enter as images
    for ex in got.examples:
        assert got.class_names[ex.label] == ex.name.split("/")[0]
        assert [pathlib.Path(m).name for m in ex.mask_paths] == [
            pathlib.Path(ex.image_path).stem + "_mask.png"
        ]
        assert busi.read_mask(ex).sum() == 25

    given = readers.read_folder(root, class_names=("malignant", "benign"))
    assert given.class_names == ("malignant", "benign")
    assert {ex.name: ex.label for ex in given.examples} == {
        ex.name: 1 - ex.label for ex in got.examples
    }


def test_folder_bad_input(tmp_path):
    root = _folder_set(tmp_path / "data", {"benign": 3, "malignant": 3})
    with pytest.raises(busi.BusiError, match=r"unknown label\(s\) 'malignant'.*class_names"):
        readers.read_folder(root, class_names=("benign", "normal2"))
    with pytest.raises(busi.BusiError, match=r"'normal' of config.class_names have no images"):
        readers.read_folder(root, class_names=("benign", "malignant", "normal"))
    bad = root / "benign" / "benign_2.png"
    bad.write_text("not an image")
    with pytest.raises(busi.BusiError, match=f"not a decodable image: {bad}"):
        readers.read_folder(root)
    _png(bad, 99)
    mask = root / "malignant" / "malignant_1_mask.png"
    _mask(mask, size=(12, 12))
    with pytest.raises(
        busi.BusiError, match=f"mask size 12x12 differs from image size 24x20: {mask}"
    ):
        readers.read_folder(root)
    with pytest.raises(busi.BusiError, match="only one class folder"):
        readers.read_folder(_folder_set(tmp_path / "one", {"benign": 2}))
    with pytest.raises(busi.BusiError, match="does not exist"):
        readers.read_folder(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- CSV


def test_csv_rows_paths_masks_groups_and_class_order(tmp_path):
    data = tmp_path / "export"
    for k in range(1, 7):
        _png(data / "img" / f"case{k}.png", k)
    _mask(data / "img" / "case1_a.png")
    _mask(data / "img" / "case1_b.png")
    outside = _png(tmp_path / "elsewhere" / "x.png", 50)
    csv = _csv(
        data / "labels.csv",
        [
            ("img/case3.png", "malignant", "", "p2"),
            ("img/case1.png", "benign", "img/case1_a.png; img/case1_b.png", "p1"),
            ("img/case2.png", "benign", "", "p1"),
            (str(outside), "malignant", "", ""),
            ("img/case4.png", "benign", "", ""),
            ("img/case5.png", "malignant", "", "p2"),
        ],
    )
    got = readers.read_csv(csv)
    assert got.class_names == ("benign", "malignant") and got.kind == "csv"
    by_name = {ex.name: ex for ex in got.examples}
    assert set(by_name) == {
        "img/case1.png",
        "img/case2.png",
        "img/case3.png",
        "img/case4.png",
        "img/case5.png",
        outside.resolve().as_posix(),
    }
    case1 = by_name["img/case1.png"]
    assert case1.label == 0 and case1.group == "p1"
    assert [pathlib.Path(m).name for m in case1.mask_paths] == ["case1_a.png", "case1_b.png"]
    assert by_name["img/case4.png"].group == "" and by_name["img/case3.png"].label == 1
    # Ordered by class, then name: the rows' order does not change the split.
    assert [ex.label for ex in got.examples] == [0, 0, 0, 1, 1, 1]
    assert readers.read_csv(csv, class_names=("malignant", "benign")).class_names == (
        "malignant",
        "benign",
    )
    assert readers.detect(csv) == "csv" and readers.detect(data) == "folder"


@pytest.mark.parametrize(
    "case,rows,fragment",
    [
        ("missing image", [("img/gone.png", "benign", "", "")], "line 4: image file not found"),
        ("unreadable image", [("img/text.png", "benign", "", "")], "line 4: not a decodable image"),
        ("empty label", [("img/c.png", " ", "", "")], "line 4: empty label"),
        ("unknown label", [("img/c.png", "cyst", "", "")], "line 4: unknown label 'cyst'"),
        (
            "duplicate row",
            [("./img/a.png", "benign", "", "")],
            "line 4: duplicate row: image './img/a.png' is already listed on line 2",
        ),
        (
            "mask of another size",
            [("img/c.png", "benign", "img/small_mask.png", "")],
            "line 4: mask size 8x8 differs from image size 24x20",
        ),
        (
            "missing mask",
            [("img/c.png", "benign", "img/none_mask.png", "")],
            "line 4: mask file not found",
        ),
        (
            "mask listed as an image",
            [("img/c.png", "benign", "img/a.png", "")],
            "is listed as an image on line 2",
        ),
    ],
)
def test_csv_bad_input_names_the_line(tmp_path, case, rows, fragment):
    data = tmp_path / "d"
    for k, name in enumerate(("a", "b", "c")):
        _png(data / "img" / f"{name}.png", k)
    (data / "img" / "text.png").write_text("hello")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(data / "img" / "small_mask.png")
    csv = _csv(
        data / "set.csv",
        [("img/a.png", "benign", "", ""), ("img/b.png", "malignant", "", "")] + rows,
    )
    with pytest.raises(busi.BusiError) as error:
        readers.read_csv(csv, class_names=("benign", "malignant"))
    message = str(error.value)
    assert message.startswith(f"{csv} line") and fragment in message, (case, message)


def test_csv_bad_files(tmp_path):
    with pytest.raises(busi.BusiError, match="CSV file does not exist"):
        readers.read_csv(tmp_path / "none.csv")
    _png(tmp_path / "a.png", 1)
    with pytest.raises(busi.BusiError, match=r"lacks the column\(s\) label"):
        readers.read_csv(_csv(tmp_path / "x.csv", [("a.png",)], header="image"))
    with pytest.raises(busi.BusiError, match="lists no images"):
        readers.read_csv(_csv(tmp_path / "y.csv", [], header="image,label"))
    with pytest.raises(busi.BusiError, match="one label only"):
        readers.read_csv(_csv(tmp_path / "z.csv", [("a.png", "benign")], header="Image, Label"))


# ----------------------------------------------------------------------------- config -> RunData


def test_csv_with_groups_through_prepare(tmp_path):
    """Patients never straddle the split: checked from the manifest the run saves."""
    data = tmp_path / "data"
    rows, patient_of = [], {}
    for k in range(40):
        name = f"img/{k}.png"
        _png(data / name, 100 + k)
        patient = f"patient{k // 4}" if k < 24 else ""
        label = ("benign", "malignant", "normal")[k % 3]
        rows.append((name, label, "", patient))
        patient_of[name] = patient
    csv = _csv(data / "set.csv", rows)
    config = _config(
        dataset="csv", data_csv=str(csv), class_names=("normal", "benign", "malignant")
    )
    run = _prepare(config, tmp_path / "work")
    assert (
        run.class_names == ("normal", "benign", "malignant") and run.positive_class == "malignant"
    )
    assert run.manifest["meta"]["class_names"] == ["normal", "benign", "malignant"]
    assert run.manifest["meta"]["source"] == {"dataset": "csv", "path": str(csv)}
    part_of = {n: p for p in splits.SPLITS for n in run.manifest[p]}
    assert sorted(part_of) == sorted(patient_of)
    for patient in {p for p in patient_of.values() if p}:
        assert len({part_of[n] for n, p in patient_of.items() if p == patient}) == 1, patient
    assert run.manifest["meta"]["patient_groups"]["patient0"] == [f"img/{k}.png" for k in range(4)]
    labels = {
        ex_name: ("benign", "malignant", "normal")[int(ex_name[4:-4]) % 3] for ex_name in part_of
    }
    for arrays in (run.train, run.val, run.test):
        assert [run.class_names[k] for k in arrays.labels] == [labels[n] for n in arrays.names]
        assert arrays.images.shape[1:] == (32, 32, 3)

    # k-fold: the same guarantee in every fold.
    for fold in range(3):
        folded = _prepare(_cv_config(csv, fold), tmp_path / f"fold{fold}")
        part_of = {n: p for p in splits.SPLITS for n in folded.manifest[p]}
        for patient in {p for p in patient_of.values() if p}:
            assert len({part_of[n] for n, p in patient_of.items() if p == patient}) == 1, (
                fold,
                patient,
            )


def _cv_config(csv, fold):
    config = _config(dataset="csv", data_csv=str(csv))
    config.cv.folds, config.cv.fold = 3, fold
    return config


def test_two_class_folder_through_prepare(tmp_path):
    root = _folder_set(tmp_path / "data", {"malignant": 5, "benign": 7})
    run = _prepare(_config(dataset="folder", data_dir=str(root)), tmp_path / "work")
    assert run.class_names == ("benign", "malignant") and run.positive_class == "malignant"
    assert run.source == {"dataset": "folder", "path": str(root), "warning": None}
    assert (
        sorted(np.concatenate([run.train.labels, run.val.labels, run.test.labels]).tolist())
        == [0] * 7 + [1] * 5
    )
    saved = json.loads(json.dumps(run.manifest))
    assert saved["meta"]["counts"]["test"].keys() == {"benign", "malignant"}

    run = _prepare(
        _config(dataset="folder", data_dir=str(root), positive_class="benign"), tmp_path / "w2"
    )
    assert run.positive_class == "benign"
    with pytest.raises(
        ConfigError, match="config.positive_class='cancer' is not one of the data's classes"
    ):
        _prepare(
            _config(dataset="folder", data_dir=str(root), positive_class="cancer"), tmp_path / "w3"
        )
    with pytest.raises(
        ConfigError, match="config.class_weights has 3 weights but the data has 2 classes"
    ):
        _prepare(
            _config(dataset="folder", data_dir=str(root), class_weights=(1.0, 1.0, 2.0)),
            tmp_path / "w4",
        )


def test_a_class_too_small_for_the_split(tmp_path):
    root = _folder_set(tmp_path / "data", {"benign": 6, "malignant": 2})
    with pytest.raises(busi.BusiError, match="needs at least 3 per class.*'malignant' has 2"):
        _prepare(_config(dataset="folder", data_dir=str(root)), tmp_path / "work")
    _folder_set(tmp_path / "data", {"benign": 6, "malignant": 4})
    config = _config(dataset="folder", data_dir=str(root))
    config.cv.folds, config.cv.fold = 5, 0
    with pytest.raises(
        busi.BusiError, match="5-fold cross-validation.*at least 6 per class.*'malignant' has 4"
    ):
        _prepare(config, tmp_path / "work")


def test_manifests_and_class_names(tmp_path):
    root = synthetic.generate(tmp_path / "busi", num=15, seed=1, min_size=40, max_size=48)
    config = _config(dataset="busi", data_dir=str(root))
    run = _prepare(config, tmp_path / "work")
    assert run.class_names == busi.CLASSES and run.manifest["meta"]["class_names"] == list(
        busi.CLASSES
    )
    # A manifest from before class names were recorded still loads: BUSI's three.
    old = json.loads(json.dumps(run.manifest))
    del old["meta"]["class_names"], old["meta"]["source"]
    manifest_lib.save_manifest(old, tmp_path / "old.json")
    assert manifest_lib.manifest_class_names(old) == busi.CLASSES
    again = _prepare(
        _config(dataset="busi", data_dir=str(root), split_manifest=str(tmp_path / "old.json")),
        tmp_path / "work2",
    )
    assert again.class_names == busi.CLASSES
    assert [again.manifest[p] for p in splits.SPLITS] == [run.manifest[p] for p in splits.SPLITS]
    # Class order is part of what a manifest means.
    reordered = ("malignant", "benign", "normal")
    recorded = manifest_lib.save_manifest(run.manifest, tmp_path / "new.json")
    with pytest.raises(
        busi.BusiError, match=r"made for the classes \['normal', 'benign', 'malignant'\]"
    ):
        _prepare(
            _config(
                dataset="busi",
                data_dir=str(root),
                class_names=reordered,
                split_manifest=str(recorded),
            ),
            tmp_path / "work3",
        )
    run = _prepare(
        _config(dataset="busi", data_dir=str(root), class_names=reordered), tmp_path / "w4"
    )
    assert run.class_names == reordered and run.positive_class == "normal"
    by_name = {n: reordered[k] for n, k in zip(run.train.names, run.train.labels)}
    assert all(n.split("/")[0] == c for n, c in by_name.items())


# ------------------------------------------------------------------------ the synthetic set's cache


def test_synthetic_set_is_shared_by_workdirs_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("BCJAX_CACHE_DIR", str(tmp_path / "cache"))
    written, write_one = [], synthetic._write_one
    monkeypatch.setattr(
        synthetic, "_write_one", lambda *args: written.append(args) or write_one(*args)
    )
    config = _config(dataset="synthetic", synthetic_num=12)
    key = f"12-0-v{synthetic.GENERATOR_VERSION}"
    first = _prepare(config, tmp_path / "a")
    second = datasets.resolve_source(_data(config), tmp_path / "b")
    assert len(written) == 12  # generated once, for both workdirs
    assert (
        first.source["path"]
        == second["path"]
        == str(tmp_path / "cache" / "synthetic" / key / busi.DATASET_DIRNAME)
    )
    assert (
        first.source["synthetic_set"] == key
        and first.manifest["meta"]["source"]["synthetic_set"] == key
    )
    for workdir in ("a", "b"):
        record = json.loads((tmp_path / workdir / datasets.SYNTHETIC_RECORD).read_text())
        assert record["key"] == key and record["info"] == synthetic.set_info(12, 0)
    # The same workdir with other settings is refused, as when the set lived in it.
    with pytest.raises(busi.BusiError, match="other settings.*fresh_start"):
        datasets.resolve_source(
            _data(_config(dataset="synthetic", synthetic_num=12, synthetic_mark="text")),
            tmp_path / "a",
        )

    # A workdir of a run from before the cache holds its own set: it resumes on that one.
    old = tmp_path / "old" / "synthetic" / busi.DATASET_DIRNAME
    shutil.copytree(second["path"], old)
    assert datasets.resolve_source(_data(config), tmp_path / "old")["path"] == str(old)
    assert not (tmp_path / "old" / datasets.SYNTHETIC_RECORD).exists() and len(written) == 12


def test_a_mark_asked_for_real_busi_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("BCJAX_CACHE_DIR", str(tmp_path / "cache"))
    real = synthetic.generate(tmp_path / "data", num=6, seed=0, min_size=40, max_size=48)
    (real / busi.SYNTHETIC_MARKER).unlink()  # as far as bcjax can tell, the user's BUSI
    config = _config(dataset="auto", data_dir=str(tmp_path / "data"), synthetic_mark="calliper")
    with pytest.raises(
        busi.BusiError, match="synthetic_mark='calliper' plants a mark.*BUSI was found"
    ):
        datasets.resolve_source(_data(config), tmp_path / "work")


def test_detect_tells_busi_from_class_folders_named_like_some_of_its_classes(tmp_path):
    from bcjax.data import readers

    busi_like = tmp_path / "busi"
    for c in ("normal", "benign", "malignant"):
        (busi_like / c).mkdir(parents=True)
    two_class = tmp_path / "two"
    for c in ("benign", "malignant"):
        (two_class / c).mkdir(parents=True)
    (tmp_path / "set.csv").write_text("image,label\n")
    assert readers.detect(busi_like) == "busi"
    assert readers.detect(two_class) == "folder"
    assert readers.detect(tmp_path / "set.csv") == "csv"
