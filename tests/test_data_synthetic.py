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
    assert left == {busi.DATASET_DIRNAME} | {
        planted[k] for k in ("live_tmp", "other_host", "no_owner", "dead_recent")
    }
    removed = " ".join(r.getMessage() for r in caplog.records)
    assert planted["dead_tmp"] in removed and planted["dead_old"] in removed
    assert planted["live_tmp"] not in removed


def test_cli(tmp_path, capsys):
    synthetic.main(
        [
            "--out",
            str(tmp_path),
            "--num",
            "6",
            "--seed",
            "1",
            "--min-size",
            "40",
            "--max-size",
            "48",
        ]
    )
    out = capsys.readouterr()
    assert "6/6 images" in out.err and "NOT real patient data" in out.out
    assert busi.class_counts(busi.scan(tmp_path)) == dict(
        zip(busi.CLASSES, synthetic.class_counts(6))
    )


# ------------------------------------------------------------------------ planted mark (issue 16)


def _pixels(path):
    return np.asarray(Image.open(path))[..., 0].astype(int)


def _changed_box(plain, marked):
    ys, xs = np.nonzero(_pixels(plain) != _pixels(marked))
    return ys.min(), ys.max(), xs.min(), xs.max()


def _in_corner(box, corner, shape):
    (y0, y1, x0, x1), (h, w) = box, shape
    vertical = y1 < h / 2 if corner.startswith("top") else y0 >= h / 2
    horizontal = x1 < 0.6 * w if corner.endswith("left") else x0 >= 0.4 * w
    return vertical and horizontal


@pytest.mark.parametrize("mark", synthetic.MARKS)
def test_mark_only_on_malignant_images_in_a_corner(tmp_path, mark):
    sizes = dict(num=20, seed=4, min_size=64, max_size=80)
    plain = synthetic.generate(tmp_path / "plain", **sizes)
    marked = synthetic.generate(tmp_path / "marked", mark=mark, mark_prob=0.75, **sizes)
    info = busi.synthetic_info(marked)["mark"]
    assert info["kind"] == mark and info["prob"] == 0.75 and info["placement"] == "malignant"
    malignant = [ex.name for ex in busi.scan(plain) if ex.label == 2]
    assert set(info["marked"]) < set(malignant) and len(info["marked"]) >= len(malignant) // 2
    for ex in busi.scan(plain):
        other = marked / ex.name
        mask = ex.mask_paths[0]
        marked_mask = marked / pathlib.Path(mask).relative_to(plain)
        assert marked_mask.read_bytes() == pathlib.Path(mask).read_bytes()
        if ex.name not in info["marked"]:  # every other image is the unmarked one, byte for byte
            assert other.read_bytes() == pathlib.Path(ex.image_path).read_bytes(), ex.name
            continue
        corner = info["marked"][ex.name]
        assert _in_corner(_changed_box(ex.image_path, other), corner, _pixels(other).shape), ex.name
        changed = _pixels(other)[_pixels(ex.image_path) != _pixels(other)]
        assert changed.min() >= 225  # a bright overlay, as scanners draw them
    again = synthetic.generate(tmp_path / "again", mark=mark, mark_prob=0.75, **sizes, workers=1)
    for path in marked.rglob("*.png"):
        assert path.read_bytes() == (again / path.relative_to(marked)).read_bytes()
    assert synthetic.cache_key(20, 4, min_size=64, max_size=80, mark=mark, mark_prob=0.75) == (
        f"20-4-v{synthetic.GENERATOR_VERSION}-64to80px-{mark}0.75"
    )


def test_random_mark_copy_marks_any_class(tmp_path):
    sizes = dict(num=24, seed=5, min_size=48, max_size=56)
    plain = synthetic.generate(tmp_path / "plain", **sizes)
    source = synthetic.generate(tmp_path / "shortcut", mark="calliper", mark_prob=0.5, **sizes)
    copy = synthetic.random_mark_copy(source, tmp_path / "random")
    info = busi.synthetic_info(copy)["mark"]
    assert info["placement"] == "random" and info["kind"] == "calliper" and info["prob"] == 0.5
    classes = {name.split("/")[0] for name in info["marked"]}
    assert {"normal", "benign"} & classes  # the mark no longer tells the class
    assert info["marked"] != busi.synthetic_info(source)["mark"]["marked"]
    assert [ex.name for ex in busi.scan(copy)] == [ex.name for ex in busi.scan(source)]
    for ex in busi.scan(plain):
        unchanged = (copy / ex.name).read_bytes() == pathlib.Path(ex.image_path).read_bytes()
        assert unchanged == (ex.name not in info["marked"]), ex.name
    with pytest.raises(ValueError, match="no synthetic set with a planted mark"):
        synthetic.random_mark_copy(plain, tmp_path / "none")
    with pytest.raises(ValueError, match="mark must be"):
        synthetic.generate(tmp_path / "bad", num=3, mark="arrow")


# ------------------------------------------------------------------------- cache across workdirs


def test_cache_is_shared_and_keyed(tmp_path, monkeypatch):
    monkeypatch.setenv("BCJAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BCJAX_CACHE", raising=False)
    written, write_one = [], synthetic._write_one

    def counting_write_one(*args):
        written.append(args[2:4])
        write_one(*args)

    monkeypatch.setattr(synthetic, "_write_one", counting_write_one)
    sizes = dict(min_size=40, max_size=48)
    first = synthetic.cached(6, 1, **sizes)
    key = f"6-1-v{synthetic.GENERATOR_VERSION}-40to48px"
    assert first == tmp_path / "cache" / "synthetic" / key / busi.DATASET_DIRNAME
    assert len(written) == 6
    assert synthetic.cached(6, 1, **sizes) == first and len(written) == 6  # reused
    marked = synthetic.cached(6, 1, mark="text", mark_prob=1.0, **sizes)
    assert marked.parent.name.endswith("-text1") and len(written) == 12
    # A damaged cached set (its marker no longer fits) is made again.
    (first / busi.SYNTHETIC_MARKER).write_text("{}")
    assert synthetic.cached(6, 1, **sizes) == first and len(written) == 18
    assert busi.synthetic_info(first) == synthetic.set_info(6, 1, **sizes)
    cache = tmp_path / "cache" / "synthetic"
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no temporary folders
    # The older variable name still works when the documented one is not set.
    monkeypatch.delenv("BCJAX_CACHE_DIR")
    monkeypatch.setenv("BCJAX_CACHE", str(tmp_path / "old"))
    assert synthetic.default_cache_dir() == tmp_path / "old" / "synthetic"


_RACE = """
import pathlib, sys, time
from bcjax.data import synthetic
calls, write_one = [], synthetic._write_one
def slow_write_one(*args):
    calls.append(1)
    time.sleep(float(sys.argv[4]))  # a window for the other process to arrive meanwhile
    write_one(*args)
synthetic._write_one = slow_write_one
# A barrier on marker files: each announces it has imported bcjax, then waits for the other.
barrier = pathlib.Path(sys.argv[2])
(barrier / f"ready-{sys.argv[3]}").touch()
deadline = time.time() + 120
while len(list(barrier.glob("ready-*"))) < 2 and time.time() < deadline:
    time.sleep(0.005)
start = time.time()
path = synthetic.cached(6, 0, cache_dir=sys.argv[1], min_size=40, max_size=48, workers=1)
print(len(calls), start, time.time(), path)
"""


def _race(cache_dir, barrier, sleep_s):
    """Two processes asking for one set at once: [(images written, start, end, path)]."""
    cache_dir.mkdir()
    barrier.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE, str(cache_dir), str(barrier), str(i), str(sleep_s)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    runs = []
    for out, _ in outs:
        count, start, end, path = out.split(maxsplit=3)
        runs.append((int(count), float(start), float(end), path.strip()))
    return runs


def test_two_processes_racing_generate_once(tmp_path):
    """The two calls of cached() must be seen to overlap in time (each records its start and
    end); a try where they did not proves nothing about the lock and is run again, slower."""
    for attempt, sleep_s in enumerate((0.2, 0.5, 1.0)):
        cache_dir = tmp_path / f"try{attempt}"
        runs = _race(cache_dir, tmp_path / f"barrier{attempt}", sleep_s)
        if max(r[1] for r in runs) < min(r[2] for r in runs):
            break
    else:
        pytest.fail(f"the two processes never ran cached() at the same time: {runs}")
    counts = sorted(r[0] for r in runs)
    paths = {r[3] for r in runs}
    assert counts == [0, 6]  # one generated, the other waited on the lock and took that copy
    waiter = next(r for r in runs if r[0] == 0)
    generator = next(r for r in runs if r[0] == 6)
    # The waiter came while the set was being written and left only once it was there.
    assert generator[1] <= waiter[2] and waiter[1] < generator[2]
    assert waiter[2] - waiter[1] > 0.5 * sleep_s  # it waited at least part of the writing
    assert len(paths) == 1
    counts = busi.class_counts(busi.scan(paths.pop()))
    assert tuple(counts.values()) == synthetic.class_counts(6)
    key = f"6-0-v{synthetic.GENERATOR_VERSION}-40to48px"
    assert sorted(p.name for p in cache_dir.iterdir()) == [key, f"{key}.lock"]
