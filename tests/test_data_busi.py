"""BUSI folder/zip reading and bad-input errors, on a tiny generated set."""

import pathlib
import shutil
import warnings
import zipfile

import numpy as np
import pytest
from PIL import Image

from bcjax.data import busi, pipeline, synthetic

COUNTS = synthetic.class_counts(24)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return synthetic.generate(
        tmp_path_factory.mktemp("busi"), num=24, seed=1, min_size=40, max_size=64
    )


@pytest.fixture()
def root(tiny_root, tmp_path):
    """A private copy to damage."""
    return pathlib.Path(shutil.copytree(tiny_root, tmp_path / busi.DATASET_DIRNAME))


def test_counts_per_class_and_order(tiny_root):
    examples = busi.scan(tiny_root)
    assert busi.class_counts(examples) == dict(zip(busi.CLASSES, COUNTS))
    assert [ex.name for ex in examples[:2]] == ["normal/normal (1).png", "normal/normal (2).png"]
    benign = [ex.name for ex in examples if ex.label == 1]
    assert (
        benign[9] == "benign/benign (10).png"
    )  # natural order, not "benign (10)" after "benign (1)"


def test_masks_are_never_images(tiny_root):
    examples = busi.scan(tiny_root)
    files = list(pathlib.Path(tiny_root).glob("*/*.png"))
    assert len(examples) == sum("_mask" not in f.name for f in files)
    assert not any("_mask" in pathlib.Path(ex.image_path).name for ex in examples)
    assert all(
        len(ex.mask_paths) == 1 and ex.mask_paths[0].endswith("_mask.png") for ex in examples
    )


def test_multi_masks_are_united(root):
    folder = root / "benign"
    w, h = Image.open(folder / "benign (1).png").size
    a = np.zeros((h, w), np.uint8)
    a[:5, :5] = 255
    b = np.zeros((h, w), np.uint8)
    b[-5:, -5:] = 255
    Image.fromarray(np.zeros((h, w), np.uint8)).save(folder / "benign (1)_mask.png")
    Image.fromarray(a).save(folder / "benign (1)_mask_1.png")
    Image.fromarray(np.stack([b] * 3, -1)).save(folder / "benign (1)_mask_2.png")
    ex = next(e for e in busi.scan(root) if e.name == "benign/benign (1).png")
    assert [pathlib.Path(p).name for p in ex.mask_paths] == [
        "benign (1)_mask.png",
        "benign (1)_mask_1.png",
        "benign (1)_mask_2.png",
    ]
    m = busi.read_mask(ex)
    assert m.dtype == np.uint8 and m.shape == (h, w)
    assert m.sum() == 50 and m[:5, :5].all() and m[-5:, -5:].all()


def test_normal_masks_are_empty(tiny_root):
    for ex in busi.scan(tiny_root):
        m = busi.read_mask(ex)
        assert (m.sum() == 0) == (ex.label == 0)


def test_any_case_folder_parent_and_zip(root, tmp_path):
    (root / "benign").rename(root / "Benign")
    (root / "malignant").rename(root / "MALIGNANT")
    expected = dict(zip(busi.CLASSES, COUNTS))
    assert busi.class_counts(busi.scan(root)) == expected
    assert busi.class_counts(busi.scan(root.parent)) == expected  # folder holding it
    assert busi.find_busi(root.parent) == root
    zpath = tmp_path / "Dataset_BUSI_with_GT.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in root.rglob("*"):
            zf.write(f, f.relative_to(root.parent).as_posix())
        zf.writestr("__MACOSX/._junk", b"xx")
    shutil.rmtree(root)
    cache = tmp_path / "cache"
    assert busi.find_busi(tmp_path) == zpath
    examples = busi.scan(zpath, cache_dir=cache)
    assert busi.class_counts(examples) == expected
    assert [p.name for p in cache.iterdir()] and not list(cache.glob("*.tmp"))
    assert busi.class_counts(busi.scan(zpath, cache_dir=cache)) == expected  # reuses the extraction


def test_synthetic_marker(tiny_root):
    assert busi.is_synthetic(tiny_root)
    assert busi.synthetic_info(tiny_root)["num"] == 24


def _expect_error(root, fragment):
    with pytest.raises(busi.BusiError) as err:
        busi.scan(root)
    assert fragment in str(err.value), str(err.value)


def test_missing_class_folder(root):
    shutil.rmtree(root / "malignant")
    _expect_error(root, "malignant")


def test_empty_class_folder(root):
    for f in (root / "normal").iterdir():
        f.unlink()
    _expect_error(root, str(root / "normal"))


def test_text_file_named_png(root):
    bad = root / "benign" / "benign (2).png"
    bad.write_text("this is not an image")
    _expect_error(root, str(bad))


def test_truncated_png(root):
    bad = root / "malignant" / "malignant (1).png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    _expect_error(root, str(bad))
    with pytest.raises(busi.BusiError, match=r"malignant \(1\)\.png"):
        pipeline.decode_resize(bad, 32)  # also when decoding without a scan


def test_mask_without_image(root):
    (root / "benign" / "benign (3).png").unlink()
    _expect_error(root, str(root / "benign" / "benign (3)_mask.png"))


def test_mask_size_differs(root):
    mask = root / "benign" / "benign (4)_mask.png"
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(mask)
    _expect_error(root, str(mask))


def test_missing_dir(tmp_path):
    _expect_error(tmp_path / "nowhere", str(tmp_path / "nowhere"))
    _expect_error(tmp_path, str(tmp_path))  # exists, holds no BUSI


def test_unknown_folder_is_ignored_with_warning(root):
    (root / "extra").mkdir()
    (root / "extra" / "x (1).png").write_text("ignored")
    with pytest.warns(UserWarning, match="extra"):
        examples = busi.scan(root)
    assert busi.class_counts(examples) == dict(zip(busi.CLASSES, COUNTS))


def test_rgba_16bit_gray_are_accepted(root):
    folder = root / "benign"
    rgb = np.asarray(Image.open(folder / "benign (1).png"))
    gray = rgb[..., 0]
    Image.fromarray(np.dstack([rgb, np.full(gray.shape, 200, np.uint8)]), "RGBA").save(
        folder / "benign (1).png"
    )
    Image.fromarray(gray.astype(np.uint16) * 257).save(
        folder / "benign (2).png"
    )  # 16-bit grayscale PNG
    assert Image.open(folder / "benign (2).png").mode.startswith("I")
    Image.fromarray(gray, "L").save(folder / "benign (3).png")
    for n in (2, 3):  # same content, so the masks of image 1 fit
        shutil.copy(folder / "benign (1)_mask.png", folder / f"benign ({n})_mask.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        examples = busi.scan(root)
    by_name = {ex.name: ex for ex in examples}
    for n in (1, 2, 3):
        img = busi.read_image(by_name[f"benign/benign ({n}).png"].image_path)
        assert img.dtype == np.uint8 and img.shape == rgb.shape
        np.testing.assert_array_equal(img, rgb)
        small = pipeline.decode_resize(by_name[f"benign/benign ({n}).png"].image_path, 16)
        assert small.shape == (16, 16, 3) and small.dtype == np.uint8
