"""TFDS builder: array_record round trip, without TensorFlow."""

import importlib.util

import numpy as np
import pytest
import tensorflow_datasets as tfds  # a core dependency: never skipped

from bcjax.data import busi, synthetic


def test_no_tensorflow_installed():
    assert importlib.util.find_spec("tensorflow") is None


def test_round_trip(tmp_path):
    from bcjax.data import busi_tfds

    root = synthetic.generate(tmp_path / "manual", num=8, seed=6, min_size=40, max_size=52)
    builder = busi_tfds.prepare(tmp_path / "manual", tmp_path / "tfds")
    assert builder.info.features["label"].names == list(busi.CLASSES)
    assert list(builder.info.splits.keys()) == ["train"]
    source = tfds.data_source("busi", data_dir=str(tmp_path / "tfds"), split="train")
    examples = {ex.name: ex for ex in busi.scan(root)}
    assert len(source) == len(examples)
    seen = set()
    for i in range(len(source)):
        rec = source[i]
        ex = examples[busi_tfds.file_name(rec)]
        np.testing.assert_array_equal(rec["image"], busi.read_image(ex.image_path))
        np.testing.assert_array_equal(rec["mask"], busi.read_mask(ex))
        assert int(rec["label"]) == ex.label
        seen.add(ex.name)
    assert seen == set(examples)
    arrays = busi_tfds.to_array_set(source, 16)
    assert arrays.names == list(examples) and arrays.images.shape == (8, 16, 16, 3)
    import sys

    assert "tensorflow" not in sys.modules


def test_bad_manual_dir(tmp_path):
    from bcjax.data import busi_tfds

    with pytest.raises(busi.BusiError, match="nowhere"):
        busi_tfds.prepare(tmp_path / "nowhere", tmp_path / "tfds")
    assert not (tmp_path / "tfds").exists()
    root = synthetic.generate(tmp_path / "manual", num=4, seed=6, min_size=40, max_size=52)
    bad = root / "benign" / "benign (1).png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(busi.BusiError, match=r"benign \(1\)\.png"):
        busi_tfds.prepare(tmp_path / "manual", tmp_path / "tfds2")
    assert not list((tmp_path / "tfds2").rglob("*.array_record*"))
    assert not list((tmp_path / "tfds2").rglob("dataset_info.json"))
