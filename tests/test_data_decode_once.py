"""pipeline.load_arrays_and_phashes: the arrays and duplicate hashes of separate
load_arrays and splits.phashes calls, from one decode per image."""

import shutil

import numpy as np
import pytest
from PIL import Image

from bcjax.data import busi, pipeline, splits, synthetic
from bcjax.data import manifest as manifest_lib

S = 16


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """A small set with an exact duplicate, a copy filed under another class, a
    grayscale PNG and a JPEG (whose reduced-scale decode differs between the two)."""
    root = synthetic.generate(
        tmp_path_factory.mktemp("busi"), num=18, seed=4, min_size=40, max_size=96
    )
    ben, mal, nor = root / "benign", root / "malignant", root / "normal"
    shutil.copy(ben / "benign (2).png", ben / "benign (100).png")
    shutil.copy(ben / "benign (4).png", mal / "malignant (100).png")
    with Image.open(ben / "benign (5).png") as im:
        im.convert("L").save(ben / "benign (101).png")
        im.convert("RGB").save(nor / "normal (100).jpg", quality=90)
    return busi.scan(root)


def _clear_hash_memo():
    splits._HASH_CACHE.clear()  # a new process's state: nothing hashed yet


def test_same_arrays_hashes_and_split_from_one_decode(examples, opens):
    _clear_hash_memo()
    hashes = splits.phashes(examples)
    split = splits.make_split(examples, seed=0)
    parts = {
        p: pipeline.load_arrays(manifest_lib.select(examples, split[p]), S) for p in splits.SPLITS
    }
    assert len(opens) == 2 * len(examples)

    _clear_hash_memo()
    opens.clear()
    everything, hashes_once = pipeline.load_arrays_and_phashes(examples, S)
    jpegs = [ex for ex in examples if ex.image_path.endswith(".jpg")]
    assert len(jpegs) == 1
    assert len(opens) == len(examples) + len(jpegs)  # a JPEG's hash decodes on its own
    np.testing.assert_array_equal(hashes_once, hashes)
    split_once = splits.make_split(examples, seed=0, hashes=hashes_once)
    assert split_once == split
    assert len(split["meta"]["duplicate_groups"]) >= 2 and split["meta"]["conflicts"]
    for p in splits.SPLITS:
        part = everything.select(split_once[p])
        np.testing.assert_array_equal(part.images, parts[p].images)
        np.testing.assert_array_equal(part.labels, parts[p].labels)
        assert part.names == parts[p].names


def test_a_later_run_reads_both_caches(examples, opens, tmp_path):
    _clear_hash_memo()
    first, first_hashes = pipeline.load_arrays_and_phashes(examples, S, cache_dir=tmp_path)
    assert (tmp_path / "phash-v1.json").is_file() and len(list(tmp_path.glob("*.npz"))) == 1
    _clear_hash_memo()
    opens.clear()
    again, again_hashes = pipeline.load_arrays_and_phashes(examples, S, cache_dir=tmp_path)
    assert opens == []
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again_hashes, first_hashes)
    # The separate calls read the same caches.
    np.testing.assert_array_equal(splits.phashes(examples, cache_dir=tmp_path), first_hashes)
    np.testing.assert_array_equal(
        pipeline.load_arrays(examples, S, cache_dir=tmp_path).images, first.images
    )
    assert opens == []
