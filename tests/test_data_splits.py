"""Duplicate-aware stratified splits and manifests."""
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from bcjax.data import busi, splits, synthetic


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """36 images plus an exact and a near duplicate in one class and one copy filed under another class."""
    root = synthetic.generate(tmp_path_factory.mktemp("busi"), num=36, seed=2, min_size=48, max_size=72)
    ben, mal = root / "benign", root / "malignant"
    shutil.copy(ben / "benign (3).png", ben / "benign (100).png")
    shutil.copy(ben / "benign (3)_mask.png", ben / "benign (100)_mask.png")
    near = np.asarray(Image.open(ben / "benign (5).png")).astype(np.float32) * 1.1 + 6
    Image.fromarray(np.clip(near, 0, 255).astype(np.uint8)).save(ben / "benign (101).png")
    shutil.copy(ben / "benign (5)_mask.png", ben / "benign (101)_mask.png")
    shutil.copy(ben / "benign (7).png", mal / "malignant (100).png")
    shutil.copy(ben / "benign (7)_mask.png", mal / "malignant (100)_mask.png")
    return busi.scan(root)


def _part_of(split):
    return {n: p for p in splits.SPLITS for n in split[p]}


def test_phash_basics():
    rng = np.random.default_rng(0)
    a = rng.random((64, 64)) * 255
    smooth = np.asarray(Image.fromarray(a.astype(np.uint8)).resize((8, 8)).resize((64, 64), Image.BICUBIC), float)
    h = splits.phash_array(smooth)
    assert h == splits.phash_array(smooth * 0.9 + 10)  # brightness/contrast do not change it
    other = np.asarray(Image.fromarray(rng.integers(0, 255, (8, 8), np.uint8)).resize((64, 64), Image.BICUBIC), float)
    assert bin(h ^ splits.phash_array(other)).count("1") > splits.DEFAULT_HASH_THRESHOLD
    groups = splits.duplicate_groups(np.array([h, h ^ 1, splits.phash_array(other)], np.uint64))
    assert groups == [[0, 1], [2]]


def test_planted_duplicates_stay_together(planted):
    m = splits.make_split(planted, seed=0)
    part = _part_of(m)
    assert sorted(part) == sorted(ex.name for ex in planted)  # every example exactly once
    assert part["benign/benign (3).png"] == part["benign/benign (100).png"]
    assert part["benign/benign (5).png"] == part["benign/benign (101).png"]
    groups = [sorted(g) for g in m["meta"]["duplicate_groups"]]
    assert ["benign/benign (100).png", "benign/benign (3).png"] in groups
    assert ["benign/benign (101).png", "benign/benign (5).png"] in groups
    assert m["meta"]["conflicts"] == [["benign/benign (7).png", "malignant/malignant (100).png"]]
    assert m["meta"]["excluded"] == []
    assert part["benign/benign (7).png"] == part["malignant/malignant (100).png"]


def test_conflicts_can_be_excluded(planted):
    m = splits.make_split(planted, seed=0, exclude_conflicts=True)
    part = _part_of(m)
    assert "benign/benign (7).png" not in part and "malignant/malignant (100).png" not in part
    assert len(part) == len(planted) - 2
    assert m["meta"]["excluded"] == ["benign/benign (7).png", "malignant/malignant (100).png"]


def test_stratified_and_seeded(planted):
    a = splits.make_split(planted, seed=3)
    assert a == splits.make_split(planted, seed=3)
    assert a != splits.make_split(planted, seed=4)
    counts = a["meta"]["counts"]
    for c in busi.CLASSES:
        total = sum(counts[p][c] for p in splits.SPLITS)
        assert abs(counts["train"][c] - 0.7 * total) <= 2.5
        assert abs(counts["test"][c] - 0.2 * total) <= 2.5


def test_kfold(planted):
    folds = [splits.kfold_split(planted, 4, k, seed=1) for k in range(4)]
    assert all(f["test"] == folds[0]["test"] for f in folds)  # the test part is fixed over folds
    vals = [n for f in folds for n in f["val"]]
    assert len(vals) == len(set(vals))
    assert sorted(vals) == sorted(folds[0]["train"] + folds[0]["val"])
    for f in folds:
        part = _part_of(f)
        assert part["benign/benign (3).png"] == part["benign/benign (100).png"]
        assert not set(f["train"]) & set(f["val"])
    with pytest.raises(ValueError):
        splits.kfold_split(planted, 4, 4)


def test_manifest_round_trip(planted, tmp_path):
    m = splits.make_split(planted, seed=5)
    path = splits.save_manifest(m, tmp_path / "run" / "manifest.json")
    assert not list(path.parent.glob("*.tmp"))
    back = splits.load_manifest(path)
    assert back == m
    train = splits.select(planted, back["train"])
    assert [ex.name for ex in train] == m["train"]
    with pytest.raises(busi.BusiError, match="not in the data set"):
        splits.select(planted[:5], back["train"])
    with pytest.raises(busi.BusiError, match="does not exist"):
        splits.load_manifest(tmp_path / "none.json")


def test_hash_disk_cache(planted, tmp_path):
    a = splits.phashes(planted[:6], cache_dir=tmp_path)
    assert (tmp_path / "phash-v1.json").is_file()
    splits._HASH_CACHE.clear()
    np.testing.assert_array_equal(a, splits.phashes(planted[:6], cache_dir=tmp_path))
