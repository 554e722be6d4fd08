"""Synthetic BUSI-like generator: layout, ratio, determinism, atomic writes."""
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from bcjax.data import busi, synthetic


def test_class_counts_follow_busi():
    assert synthetic.class_counts(780) == (133, 437, 210)
    assert sum(synthetic.class_counts(31)) == 31
    assert min(synthetic.class_counts(5)) >= 1


def test_layout_masks_and_determinism(tmp_path):
    a = synthetic.generate(tmp_path / "a", num=9, seed=4, min_size=40, max_size=60)
    b = synthetic.generate(tmp_path / "b", num=9, seed=4, min_size=40, max_size=60, workers=1)
    assert a.name == busi.DATASET_DIRNAME
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*.png"))
    assert names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*.png"))
    assert "benign/benign (1).png" in names and "benign/benign (1)_mask.png" in names
    for rel in names:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    for ex in busi.scan(a):
        im = Image.open(ex.image_path)
        assert im.mode == "RGB" and 40 * 0.7 <= min(im.size) and max(im.size) <= 60
        rgb = np.asarray(im)
        assert (rgb[..., 0] == rgb[..., 1]).all()  # grayscale content in RGB, as BUSI
        mask = busi.read_mask(ex)
        assert (mask.sum() > 0) == (ex.label != 0)
    c = synthetic.generate(tmp_path / "c", num=9, seed=5, min_size=40, max_size=60)
    assert (a / "benign/benign (1).png").read_bytes() != (c / "benign/benign (1).png").read_bytes()


def test_existing_folder(tmp_path):
    a = synthetic.generate(tmp_path, num=4, seed=0, min_size=40, max_size=48)
    stamp = (a / busi.SYNTHETIC_MARKER).stat().st_mtime_ns
    assert synthetic.generate(tmp_path, num=4, seed=0, min_size=40, max_size=48) == a  # reused
    assert (a / busi.SYNTHETIC_MARKER).stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError):
        synthetic.generate(tmp_path, num=5, seed=0, min_size=40, max_size=48)
    synthetic.generate(tmp_path, num=5, seed=0, min_size=40, max_size=48, overwrite=True)
    assert json.loads((a / busi.SYNTHETIC_MARKER).read_text())["num"] == 5
    assert [p.name for p in tmp_path.iterdir()] == [busi.DATASET_DIRNAME]  # no temp folders left


def test_failure_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "_write_one", boom)
    with pytest.raises(RuntimeError):
        synthetic.generate(tmp_path, num=4, seed=0, min_size=40, max_size=48)
    assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path), "--num", "6", "--seed", "1", "--min-size", "40", "--max-size", "48"])
    out = capsys.readouterr()
    assert "6/6 images" in out.err and "NOT real patient data" in out.out
    assert busi.class_counts(busi.scan(tmp_path)) == dict(zip(busi.CLASSES, synthetic.class_counts(6)))
