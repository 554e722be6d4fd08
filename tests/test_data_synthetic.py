"""Synthetic BUSI-like generator: layout, ratio, determinism, atomic writes."""
import json
import logging
import os
import pathlib
import subprocess
import sys
import time

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


def test_stale_temporary_folders(tmp_path, monkeypatch, caplog):
    """A killed generation's folders go at the next one; live or foreign ones stay."""
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()  # reaped: no process has this pid now (barring an instant reuse)
    host, name = synthetic._host(), busi.DATASET_DIRNAME
    planted = {
        "dead_tmp": f".{name}.{host}.{dead.pid}.k3x_9abc.tmp",
        "dead_old": f".{name}.{host}.{dead.pid}.old",
        "live_tmp": f".{name}.{host}.{os.getpid()}.q1w2e3r4.tmp",  # a live writer's
        "other_host": f".{name}.not-{host}.{dead.pid}.a1b2c3d4.tmp",  # its pid means nothing here
        "no_owner": f".{name}.abc12345.tmp",  # made before owners were recorded
        # Dead-looking but recent: perhaps a live writer in another container.
        "dead_recent": f".{name}.{host}.{dead.pid}.z9y8x7w6.tmp",
    }
    old = time.time() - synthetic.STALE_AFTER_S - 60
    for key, folder in planted.items():
        (tmp_path / folder / "benign").mkdir(parents=True)
        (tmp_path / folder / "benign" / "benign (1).png").write_bytes(b"partial")
        if key != "dead_recent":
            os.utime(tmp_path / folder, (old, old))
    # The folder this run writes into is named so that it would be kept too.
    seen, write_one = [], synthetic._write_one

    def recording_write_one(folder, *args):
        seen.append(folder)
        write_one(folder, *args)

    monkeypatch.setattr(synthetic, "_write_one", recording_write_one)
    with caplog.at_level(logging.WARNING, logger=synthetic.__name__):
        synthetic.generate(tmp_path, num=3, seed=0, min_size=40, max_size=48)
    own = synthetic._OWNED.fullmatch(seen[0].name)
    assert own and (own["host"], int(own["pid"])) == (host, os.getpid())
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {busi.DATASET_DIRNAME} | {planted[k] for k in ("live_tmp", "other_host", "no_owner",
                                                                   "dead_recent")}
    removed = " ".join(r.getMessage() for r in caplog.records)
    assert planted["dead_tmp"] in removed and planted["dead_old"] in removed
    assert planted["live_tmp"] not in removed


def test_cli(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path), "--num", "6", "--seed", "1", "--min-size", "40", "--max-size", "48"])
    out = capsys.readouterr()
    assert "6/6 images" in out.err and "NOT real patient data" in out.out
    assert busi.class_counts(busi.scan(tmp_path)) == dict(zip(busi.CLASSES, synthetic.class_counts(6)))
