"""Labels that differ only in letter case or surrounding spaces are one class, in CSVs and in
folder names, with a warning, and the spellings recorded in the manifest."""

import json

import numpy as np
import pytest
from _tiny import tiny_config
from PIL import Image

from bcjax import specs
from bcjax.data import datasets, readers


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(path)


def _csv_set(tmp_path, labels):
    lines = ["image,label"]
    for k, label in enumerate(labels):
        _png(tmp_path / "img" / f"{k}.png", k)
        lines.append(f"img/{k}.png,{label}")
    path = tmp_path / "set.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_case_and_space_variants_are_one_class(tmp_path):
    labels = ["benign"] * 3 + ["Benign"] * 2 + ["malignant"] * 3 + ["Malignant "] * 1
    labels += ["MALIGNANT"] * 2
    path = _csv_set(tmp_path, labels)
    with pytest.warns(UserWarning) as caught:
        labelled = readers.read_csv(path)
    messages = sorted(str(w.message).split(": ", 1)[1] for w in caught)
    assert messages == [
        "labels 'Benign' (2), 'benign' (3) differ only in letter case or spaces: "
        "one class 'benign' (5 images)",
        "labels 'MALIGNANT' (2), 'Malignant' (1), 'malignant' (3) differ only in letter case "
        "or spaces: one class 'malignant' (6 images)",
    ]
    assert labelled.class_names == ("benign", "malignant")
    assert labelled.class_counts() == {"benign": 5, "malignant": 6}
    # The CSV's values are stripped when read ("Malignant " is "Malignant").
    assert labelled.label_variants == {
        "benign": {"Benign": 2, "benign": 3},
        "malignant": {"MALIGNANT": 2, "Malignant": 1, "malignant": 3},
    }
    by_name = {ex.name: labelled.class_names[ex.label] for ex in labelled.examples}
    assert by_name["img/3.png"] == "benign" and by_name["img/10.png"] == "malignant"


def test_surrounding_spaces_fold_too():
    with pytest.warns(UserWarning, match="one class 'benign'"):
        to_class, variants = readers.fold_labels({" benign ": 1, "benign": 2, "x": 1}, (), "here")
    assert to_class == {" benign ": "benign", "benign": "benign", "x": "x"}
    assert variants == {"benign": {" benign ": 1, "benign": 2}}


def test_the_spelling_is_config_class_names_or_the_most_used(tmp_path):
    path = _csv_set(tmp_path, ["Benign"] * 3 + ["benign"] + ["Malignant"] * 3)
    with pytest.warns(UserWarning):
        assert readers.read_csv(path).class_names == ("Benign", "Malignant")
    with pytest.warns(UserWarning) as caught:
        named = readers.read_csv(path, class_names=("benign", "malignant"))
    assert len(caught) == 2 and "one class 'benign' (4 images)" in str(caught[0].message)
    assert named.class_names == ("benign", "malignant")
    assert named.class_counts() == {"benign": 4, "malignant": 3}
    assert named.label_variants["malignant"] == {"Malignant": 3}  # spelt only otherwise


def test_folder_names_differing_in_case_are_one_class(tmp_path):
    for j, (folder, count) in enumerate((("Benign", 2), ("benign", 2), ("malignant", 3))):
        for k in range(count):
            _png(tmp_path / folder / f"{folder}{k}.png", 10 * j + k)
    with pytest.warns(UserWarning, match=r"'Benign' \(2\), 'benign' \(2\)"):
        labelled = readers.read_folder(tmp_path)
    assert labelled.class_names == ("Benign", "malignant")  # a tie: the first in sorted order
    names = [ex.name for ex in labelled.examples]
    # Each image keeps its own folder in its name: the manifest finds it again.
    assert names[:4] == [
        "Benign/Benign0.png",
        "Benign/Benign1.png",
        "benign/benign0.png",
        "benign/benign1.png",
    ]
    assert [ex.label for ex in labelled.examples] == [0, 0, 0, 0, 1, 1, 1]


def test_the_manifest_records_the_spellings(tmp_path):
    labels = ["benign"] * 4 + ["Benign"] * 2 + ["malignant"] * 6
    path = _csv_set(tmp_path / "data", labels)
    config = tiny_config(tmp_path, dataset="csv")
    config.data_csv = str(path)
    with pytest.warns(UserWarning):
        data = datasets.prepare(specs.from_config(config).data, tmp_path / "run")
    assert data.class_names == ("benign", "malignant")
    assert data.manifest["meta"]["label_variants"] == {"benign": {"Benign": 2, "benign": 4}}
    json.dumps(data.manifest)  # JSON-ready as saved
