"""A DICOM set end to end: the synthetic set written as DICOM (fake patients, region tags,
burned-in text) plus real ultrasound files of public test suites trains on the tiny config;
patients stay in one split; `evaluate` scores a one-class DICOM folder; and no header value of
any input reaches any file the run or the evaluation wrote."""

import json
import pathlib
import shutil

import numpy as np
import pydicom
import pytest
from _tiny import tiny_config
from pydicom.data import get_testdata_file

from bcjax import evaluate
from bcjax.data import synthetic
from bcjax.train import loop

# Real files added to the generated set's class folders (classes assigned for the test).
REAL = {
    "normal": ["ExplVR_BigEnd.dcm", "color-px.dcm"],
    "benign": ["OBXXXX1A.dcm", "US1_UNCR.dcm", "US1_J2KR.dcm", "examples_palette.dcm"],
    "malignant": [
        "gdcm-US-ALOKA-16.dcm",
        "JPGLosslessP14SV1_1s_1f_8b.dcm",
        "color3d_jpeg_baseline.dcm",
        "examples_ybr_color.dcm",
        "OBXXXX1A_rle_2frame.dcm",
    ],
}
# Header values that identify a patient, a site or a device: none may be written anywhere.
IDENTIFYING = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "InstitutionName",
    "InstitutionAddress",
    "Manufacturer",
    "ManufacturerModelName",
    "StationName",
    "ReferringPhysicianName",
    "OperatorsName",
    "AccessionNumber",
)


def _generate_dicom(out, seed):
    synthetic.main(
        ["--out", str(out), "--num", "36", "--seed", str(seed), "--min-size", "40"]
        + ["--max-size", "56", "--format", "dicom"]
    )
    return out / "Dataset_BUSI_with_GT"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = _generate_dicom(tmp_path_factory.mktemp("dicom_set"), seed=0)
    for cls, names in REAL.items():
        for name in names:
            shutil.copy(get_testdata_file(name), root / cls / f"real {name}")
    return root


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    """A one-class external set: malignant/ only, generated DICOMs and a real cine loop."""
    generated = _generate_dicom(tmp_path_factory.mktemp("ext_gen"), seed=5)
    root = tmp_path_factory.mktemp("ext") / "cancers"
    (root / "malignant").mkdir(parents=True)
    for path in sorted((generated / "malignant").glob("*.dcm")):
        shutil.copy(path, root / "malignant" / path.name)
    shutil.copy(get_testdata_file("color3d_jpeg_baseline.dcm"), root / "malignant" / "cine.dcm")
    return root


@pytest.fixture(scope="module")
def run(data_root, external, tmp_path_factory):
    config = tiny_config(data_root, dataset="folder", num_devices=1, strategy="jit")
    config.num_epochs = 2
    config.augment.enabled = False
    workdir = tmp_path_factory.mktemp("dicom_run")
    loop.train_and_evaluate(config, workdir)
    code = evaluate.main(["--workdir", str(workdir), "--data", str(external)])
    assert code == 0
    return workdir


def _headers(folder):
    """{file name: dataset} of every DICOM file below ``folder``."""
    return {
        p.relative_to(folder).as_posix(): pydicom.dcmread(p, stop_before_pixels=True)
        for p in sorted(folder.rglob("*.dcm"))
    }


def test_patients_stay_in_one_split_and_the_manifest_says_what_was_done(run, data_root):
    manifest = json.loads((run / "manifest.json").read_text())
    part_of = {n: part for part in ("train", "val", "test") for n in manifest[part]}
    assert len(part_of) == len(list(data_root.rglob("*.dcm")))
    patients = {}
    for name, ds in _headers(data_root).items():
        patients.setdefault(str(ds.get("PatientID") or ds.StudyInstanceUID), []).append(name)
    shared = [names for names in patients.values() if len(names) > 1]
    assert len(shared) >= 8  # the generator gives most patients two or three images
    for names in shared:
        assert len({part_of[n] for n in names}) == 1, names
    # Groups are hashes; the per-file record is header facts only.
    groups = manifest["meta"]["patient_groups"]
    assert all(g.startswith(("patient-", "study-")) for g in groups)
    assert sorted(map(sorted, groups.values())) == sorted(map(sorted, shared))
    record = manifest["meta"]["dicom"]
    synthetic_file = record["benign/benign (1).dcm"]
    assert synthetic_file["crop"] is not None and synthetic_file["burned_in"]
    assert synthetic_file["group_source"] == "PatientID"
    cine = record["malignant/real color3d_jpeg_baseline.dcm"]
    assert (cine["frames"], cine["frame"]) == (120, 60)
    assert record["benign/real examples_palette.dcm"]["crop"] is None


def test_one_class_external_dicom_set(run, external):
    out = run / "external" / "cancers"
    result = json.loads((out / "metrics.json").read_text())
    subset = result["class_subset"]
    assert subset["classes_present"] == ["malignant"]
    assert result["class_names"] == ["benign", "malignant", "normal"]  # a folder set: sorted
    assert result["classes_absent"] == ["benign", "normal"]
    with np.load(out / "cancers_predictions.npz") as saved:
        probs, labels = saved["probs"], saved["labels"]
    assert len(labels) == len(list(external.rglob("*.dcm")))
    k = 1  # malignant
    recall = subset["per_class"]["malignant"]["recall"]
    assert recall["value"] == pytest.approx(np.mean(probs.argmax(axis=1) == k), abs=1e-12)
    assert recall["low"] <= recall["value"] <= recall["high"]
    row = subset["per_class"]["malignant"]["confusion_row"]
    assert list(row.values()) == np.bincount(probs.argmax(axis=1), minlength=3).tolist()
    undefined = {u["metric"] for u in subset["undefined"]}
    assert {"auc/malignant", "auc_macro", "specificity", "precision/malignant"} <= undefined
    assert result["auc_macro"] is None


def test_predict_reads_a_dicom_file_as_evaluate_did(run, external):
    """`predict --images scan.dcm`: the same frame, crop and resize, so the same probabilities."""
    from bcjax import predict

    with np.load(run / "external" / "cancers" / "cancers_predictions.npz") as saved:
        names, probs = saved["names"].tolist(), saved["probs"]
    got = predict.Predictor.from_workdir(run).predict([external / "malignant" / "cine.dcm"])
    np.testing.assert_allclose(got[0], probs[names.index("malignant/cine.dcm")], atol=1e-5)


def _identifying_values(folder):
    values = set()
    for ds in _headers(folder).values():
        for tag in IDENTIFYING:
            value = str(ds.get(tag) or "").strip()
            # Name parts too (family and given names alone); short codes ("204") could
            # turn up by chance in binary files.
            for part in [value, *value.split("^")]:
                if len(part) >= 5:
                    values.add(part)
    return values


def test_no_header_value_reaches_any_output(run, data_root, external):
    training_values = _identifying_values(data_root)
    values = training_values | _identifying_values(external)
    assert len(values) > 100  # the fake patients' values, and the real files'
    # The search finds them where they are: in the input files themselves.
    inputs = b"".join(p.read_bytes() for p in sorted(data_root.rglob("*.dcm")))
    assert all(v.encode() in inputs for v in training_values)
    written = [p for p in pathlib.Path(run).rglob("*") if p.is_file()]
    kinds = {p.suffix for p in written}
    assert {".json", ".csv", ".npz", ".png"} <= kinds  # results, predictions, plots, ...
    assert any("tfevents" in p.name for p in written)  # TensorBoard
    assert (run / "external" / "cancers" / "duplicates_with_training.json").is_file()
    leaks = []
    for path in written:
        data = path.read_bytes()
        leaks.extend((path.name, v) for v in values if v.encode() in data)
    assert leaks == []
