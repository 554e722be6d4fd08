"""Duplicate-aware stratified splits and manifests."""

import shutil

import numpy as np
import pytest
from PIL import Image

from bcjax.data import busi, splits, synthetic
from bcjax.data import manifest as manifest_lib


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """36 images plus an exact and a near duplicate in one class and one copy filed under
    another class."""
    root = synthetic.generate(
        tmp_path_factory.mktemp("busi"), num=36, seed=2, min_size=48, max_size=72
    )
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
    smooth = np.asarray(
        Image.fromarray(a.astype(np.uint8)).resize((8, 8)).resize((64, 64), Image.BICUBIC), float
    )
    h = splits.phash_array(smooth)
    assert h == splits.phash_array(smooth * 0.9 + 10)  # brightness/contrast do not change it
    other = np.asarray(
        Image.fromarray(rng.integers(0, 255, (8, 8), np.uint8)).resize((64, 64), Image.BICUBIC),
        float,
    )
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
    path = manifest_lib.save_manifest(m, tmp_path / "run" / "manifest.json")
    assert not list(path.parent.glob("*.tmp"))
    back = manifest_lib.load_manifest(path)
    assert back == m
    train = manifest_lib.select(planted, back["train"])
    assert [ex.name for ex in train] == m["train"]
    with pytest.raises(busi.BusiError, match="not in the data set"):
        manifest_lib.select(planted[:5], back["train"])
    with pytest.raises(busi.BusiError, match="does not exist"):
        manifest_lib.load_manifest(tmp_path / "none.json")


def test_hash_disk_cache(planted, tmp_path):
    a = splits.phashes(planted[:6], cache_dir=tmp_path)
    assert (tmp_path / "phash-v1.json").is_file()
    splits._HASH_CACHE.clear()
    np.testing.assert_array_equal(a, splits.phashes(planted[:6], cache_dir=tmp_path))


def test_patient_groups_never_straddle_and_join_duplicates():
    rng = np.random.default_rng(7)
    n = 45
    hashes = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    hashes[33] = hashes[3] ^ np.uint64(1)  # p1's image 3 has a near duplicate, of no patient
    patient = {i: f"p{i // 3}" for i in range(15)}  # p0..p4, three images each
    patient[40] = "p0"  # and p0 has one more, filed far away in the list
    labels = [i % 3 for i in range(n)]  # so every patient has images of several classes
    examples = [
        busi.Example(
            f"{busi.CLASSES[labels[i]]}/{i}.png",
            labels[i],
            "/nonexistent",
            group=patient.get(i, ""),
        )
        for i in range(n)
    ]
    together = [[i for i in range(n) if patient.get(i) == f"p{k}"] for k in range(5)]
    together[1].append(33)
    for seed in range(4):
        manifests = [splits.make_split(examples, seed=seed, hashes=hashes)]
        manifests += [
            splits.kfold_split(examples, 3, k, seed=seed, hashes=hashes) for k in range(3)
        ]
        for m in manifests:
            part = _part_of(m)
            for members in together:
                assert len({part[examples[i].name] for i in members}) == 1, (seed, members)
            assert m["meta"]["conflicts"] == []  # one patient's benign and malignant: no conflict
            p0 = sorted(examples[i].name for i in together[0])
            assert m["meta"]["patient_groups"]["p0"] == p0
    # Without patients the split is the duplicate-aware one alone.
    plain = [busi.Example(ex.name, ex.label, ex.image_path) for ex in examples]
    assert "patient_groups" not in splits.make_split(plain, hashes=hashes)["meta"]
    assert splits.join_patient_groups([[0], [1, 2]], plain) == [[0], [1, 2]]
    assert splits.join_patient_groups([[0], [1], [2]], examples) == [[0, 1, 2]]


def test_class_names_are_recorded_and_count_the_labels(planted):
    two = [busi.Example(ex.name, min(ex.label, 1), ex.image_path) for ex in planted]
    m = splits.make_split(two, seed=0, class_names=("healthy", "lesion"))
    assert m["meta"]["class_names"] == ["healthy", "lesion"]
    assert manifest_lib.manifest_class_names(m) == ("healthy", "lesion")
    counts = m["meta"]["counts"]
    total = {c: sum(counts[p][c] for p in splits.SPLITS) for c in ("healthy", "lesion")}
    assert total == {
        "healthy": sum(ex.label == 0 for ex in two),
        "lesion": sum(ex.label > 0 for ex in two),
    }
    assert splits.make_split(planted, seed=0)["meta"]["class_names"] == list(busi.CLASSES)
    with pytest.raises(busi.BusiError, match="do not index the 2 class names"):
        splits.make_split(planted, seed=0, class_names=("a", "b"))
