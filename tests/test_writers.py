"""Writers: the event files are read back with TensorBoard's own EventAccumulator
(tests/_events.py), including after a SIGKILL and a resume; the JSONL log line by line."""

import io
import json
import math
import os
import pathlib
import signal
import struct
import subprocess
import sys
import time
import zlib

import _events
import numpy as np
import pytest

from bcjax.train import writers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_png(width=40, height=20):
    """A valid RGBA PNG built by hand (no image library needed)."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    raw = b"".join(
        b"\x00" + b"".join(bytes([x * 6 % 256, y * 12 % 256, 128, 255]) for x in range(width))
        for y in range(height)
    )
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def event_files(logdir):
    return sorted((pathlib.Path(logdir) / "tensorboard").glob("events.out.tfevents.*"))


def jsonl_steps(logdir):
    return [r.get("step") for r in writers.read_jsonl(pathlib.Path(logdir) / "metrics.jsonl")]


# ------------------------------------------------------------- TensorBoard


def test_scalars_nested_leaves_and_images_read_back_in_tensorboard(tmp_path):
    from PIL import Image

    report = {
        "accuracy": np.float32(0.75),
        "loss": 0.5,
        "auc_macro": None,
        "per_class": {"benign": {"f1": 0.6, "support": 12}},
        "confusion_matrix": [[1, 2], [3, 4]],
        "class_names": ["a", "b"],
    }
    png = tiny_png()
    with writers.MetricWriter(tmp_path) as w:
        w.write_scalars(1, {"train/loss": 1.25, "train/accuracy": 0.5}, epoch=0)
        w.write_scalars(2, {"val": report, "lr": np.float64(0.1)}, epoch=1)
        w.write_scalars(3_000_000_000, {"big_step": 1})  # int64 steps
        w.write_image(2, "val/confusion", png)
    assert len(event_files(tmp_path)) == 1
    assert _events.scalars(tmp_path) == {
        "train/loss": [(1, 1.25)],
        "train/accuracy": [(1, 0.5)],
        "val/accuracy": [(2, 0.75)],
        "val/loss": [(2, 0.5)],
        "val/per_class/benign/f1": [(2, pytest.approx(0.6))],
        "val/per_class/benign/support": [(2, 12.0)],
        "lr": [(2, pytest.approx(0.1))],
        "big_step": [(3_000_000_000, 1.0)],
    }
    (image,) = _events.accumulator(tmp_path).Images("val/confusion")
    assert (image.step, image.width, image.height) == (2, 40, 20)
    with (
        Image.open(io.BytesIO(image.encoded_image_string)) as got,
        Image.open(io.BytesIO(png)) as sent,
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(sent))


def test_two_writers_opened_in_the_same_second_keep_both_files(tmp_path, monkeypatch):
    # tensorboardX names an event file by the second and the host only: the same name twice.
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.25)
    with writers.MetricWriter(tmp_path) as first, writers.MetricWriter(tmp_path) as second:
        first.write_scalars(1, {"first": 1.0})
        second.write_scalars(2, {"second": 2.0})
        first.write_scalars(3, {"first": 3.0})
    names = [p.name for p in event_files(tmp_path)]
    assert len(names) == 2 and all(".1800000000." in n for n in names)
    assert _events.scalars(tmp_path) == {"first": [(1, 1.0), (3, 3.0)], "second": [(2, 2.0)]}


# Writes steps 1..N, flushing each (one write_scalars call per epoch), says so on stdout, then
# waits to be killed. Its clock stands still, as does the resumed writer's in the test: every
# event file of the test opens in the same second, the case where the file names alone must
# keep the order in which TensorBoard reads the files.
_WRITER_TO_KILL = """
import sys, time
from bcjax.train import writers
time.time = lambda: 1_800_000_000.5
w = writers.MetricWriter(sys.argv[1], resume_step=0)
for step in range(1, int(sys.argv[2]) + 1):
    w.write_scalars(step, {"train/loss": float(step), "val": {"f1": step / 10}}, epoch=step)
    print(step, flush=True)
sys.stdin.read()
"""


def test_killed_then_resumed_writer_logs_every_step_once(tmp_path, monkeypatch):
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER_TO_KILL, str(tmp_path), "6"],
        env=dict(os.environ, PYTHONPATH=path),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while (line := child.stdout.readline()) != "6\n":
            assert line, child.stderr.read()  # "": the writer ended before step 6
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    # What was flushed survives the kill, though the file was never closed.
    assert _events.logged_steps(tmp_path) == {
        "train/loss": [1, 2, 3, 4, 5, 6],
        "val/f1": [1, 2, 3, 4, 5, 6],
    }

    # The checkpoint was at step 3: the resumed run logs 4-8, with other values.
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.75)
    with writers.MetricWriter(tmp_path, resume_step=3) as w:
        for step in range(4, 9):
            w.write_scalars(step, {"train/loss": 100.0 + step, "val": {"f1": step}}, epoch=step)
    assert len(event_files(tmp_path)) == 2
    assert _events.scalars(tmp_path) == {
        "train/loss": [(1, 1.0), (2, 2.0), (3, 3.0)] + [(s, 100.0 + s) for s in range(4, 9)],
        "val/f1": [(s, pytest.approx(s / 10)) for s in (1, 2, 3)] + [(s, s) for s in range(4, 9)],
    }
    records = writers.read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["train/loss"]) for r in records] == (
        [(1, 1.0), (2, 2.0), (3, 3.0)] + [(s, 100.0 + s) for s in range(4, 9)]
    )


def test_resume_step_none_keeps_old_events_and_zero_hides_them(tmp_path):
    for steps in (range(1, 4), range(2, 4)):
        with writers.MetricWriter(tmp_path, resume_step=None) as w:
            for step in steps:
                w.write_scalars(step, {"loss": float(step)})
    # Without a restart marker TensorBoard shows both runs' steps 2 and 3.
    assert _events.logged_steps(tmp_path) == {"loss": [1, 2, 3, 2, 3]}
    assert jsonl_steps(tmp_path) == [1, 2, 3, 2, 3]
    with writers.MetricWriter(tmp_path, resume_step=0) as w:  # a fresh start
        w.write_scalars(1, {"loss": 10.0})
    assert _events.scalars(tmp_path) == {"loss": [(1, 10.0)]}
    assert jsonl_steps(tmp_path) == [1]


# -------------------------------------------------------------------- JSONL


def test_resume_drops_later_and_torn_lines_atomically(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with writers.MetricWriter(tmp_path, tensorboard=False) as w:
        for step in range(1, 5):
            w.write_scalars(step, {"loss": float(step)}, epoch=step)
        w.write_record({"note": "a record without a step is kept"})
    with open(path, "a") as f:
        f.write('{"step": 5, "lo')  # a kill in the middle of a line
    with writers.MetricWriter(tmp_path, tensorboard=False, resume_step=2) as w:
        w.write_scalars(3, {"loss": 30.0}, epoch=3)
    assert jsonl_steps(tmp_path) == [1, 2, None, 3]
    assert path.read_text().endswith("\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file left

    # Nothing after the resume step: the file is not rewritten (the same inode, appended to).
    inode = path.stat().st_ino
    with writers.MetricWriter(tmp_path, tensorboard=False, resume_step=3) as w:
        w.write_scalars(4, {"loss": 40.0}, epoch=4)
    assert path.stat().st_ino == inode
    assert jsonl_steps(tmp_path) == [1, 2, None, 3, 4]

    with writers.MetricWriter(tmp_path, tensorboard=False, resume_step=0) as w:  # fresh start
        w.write_scalars(1, {"loss": 0.5}, epoch=1)
    assert [(r.get("step"), r.get("loss")) for r in writers.read_jsonl(path)] == [
        (None, None),
        (1, 0.5),
    ]


def test_jsonl_appends_across_restarts_and_sanitises(tmp_path):
    with writers.MetricWriter(tmp_path, tensorboard=False) as w:
        w.write_scalars(
            1,
            {
                "train/loss": np.float32(0.5),
                "val/loss": float("nan"),
                "cm": np.array([[1, 0], [0, 2]]),
            },
            epoch=0,
        )
        # A reader sees the line before close: it is flushed at once.
        assert len(writers.read_jsonl(w.jsonl_path)) == 1
    with writers.MetricWriter(tmp_path, tensorboard=False) as w:
        w.write_scalars(2, {"train/loss": 0.25}, epoch=1)
        w.write_record({"final": {"test_accuracy": 0.9}})
    assert not (tmp_path / "tensorboard").exists()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert first["step"] == 1 and first["epoch"] == 0
    assert first["train/loss"] == 0.5 and first["val/loss"] is None
    assert first["cm"] == [[1, 0], [0, 2]]
    assert isinstance(first["time"], float)
    assert json.loads(lines[1])["step"] == 2
    assert json.loads(lines[2]) == {"final": {"test_accuracy": 0.9}}


def test_read_jsonl_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert writers.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError, match=":2:"):
        writers.read_jsonl(path)


def test_disabled_writer_writes_nothing(tmp_path):
    logdir = tmp_path / "not_process_0"
    with writers.MetricWriter(logdir, enabled=False, resume_step=0) as w:
        w.write_scalars(1, {"loss": 1.0})
        w.write_record({"a": 1})
        w.write_image(1, "x", b"not even a png")
        w.flush()
    assert not logdir.exists()
    # Nor does it trim another process's log.
    logdir.mkdir()
    (logdir / "metrics.jsonl").write_text('{"step": 5}\n')
    writers.MetricWriter(logdir, enabled=False, resume_step=0).close()
    assert (logdir / "metrics.jsonl").read_text() == '{"step": 5}\n'
    assert sorted(p.name for p in logdir.iterdir()) == ["metrics.jsonl"]


def test_reserved_names_and_unserialisable_values(tmp_path):
    with writers.MetricWriter(tmp_path, tensorboard=False) as w:
        with pytest.raises(ValueError, match="reserved"):
            w.write_scalars(1, {"step": 3})
        with pytest.raises(TypeError, match="JSON"):
            w.write_record({"x": object()})
    assert writers.to_jsonable({"a": (np.int64(2), np.bool_(True), math.inf)}) == {
        "a": [2, True, None]
    }


# -------------------------------------------------------------------- plots


def assert_png(path, min_bytes=8_000):
    from PIL import Image

    path = pathlib.Path(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > min_bytes
    with Image.open(path) as image:
        image.load()
        width, height = image.size
        # Not a blank canvas: a plot has many distinct colours.
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
    assert width > 300 and height > 300
    assert len(colours) > 50


def test_learning_curves_from_jsonl_log(tmp_path):
    from bcjax.eval import plots

    with writers.MetricWriter(tmp_path, tensorboard=False) as w:
        for epoch in range(1, 9):
            w.write_scalars(
                epoch * 10,
                {"train/loss": 1.0 / epoch, "train/accuracy": 1 - 0.5 / epoch},
                epoch=epoch,
            )
            if epoch != 4:  # a missing eval is a gap, not an error
                w.write_scalars(
                    epoch * 10,
                    {"val": {"loss": 1.2 / epoch, "accuracy": 0.8 - 0.3 / epoch, "macro_f1": 0.7}},
                    epoch=epoch,
                )
        w.write_record({"final": {"test/accuracy": 0.8}})  # no epoch: ignored
    history = writers.read_jsonl(tmp_path / "metrics.jsonl")
    table = plots.history_table(history)
    assert table["epoch"].tolist() == list(range(1, 9))
    assert table["train/loss"][1] == 0.5
    assert np.isnan(table["val/loss"][3]) and table["val/loss"][1] == 0.6
    out = plots.plot_learning_curves(
        history, tmp_path / "plots" / "curves.png", best_epoch=6, stop_epoch=8
    )
    assert out == tmp_path / "plots" / "curves.png"
    assert_png(out)


def test_learning_curves_from_lists(tmp_path):
    from bcjax.eval import plots

    history = {
        "train_loss": [1.0, 0.6, 0.4],
        "val_loss": [1.1, 0.8],
        "train_accuracy": [0.5, 0.7, 0.9],
        "val_accuracy": [0.4, 0.6],
    }
    table = plots.history_table(history)
    assert table["epoch"].tolist() == [1, 2, 3]
    assert np.isnan(table["val/accuracy"][2])
    assert_png(plots.plot_learning_curves(history, tmp_path / "c.png"))


def test_confusion_matrix_png(tmp_path):
    from bcjax.eval import plots

    names = ["normal", "benign", "malignant"]
    cm = [[20, 5, 2], [3, 80, 4], [0, 0, 0]]  # an empty row must not divide by 0
    with np.errstate(all="raise"):
        out = plots.plot_confusion_matrix(cm, names, tmp_path / "cm.png")
    assert_png(out)
    assert_png(plots.plot_confusion_matrix(cm, names, tmp_path / "cm_n.png", normalize=False))
    with pytest.raises(ValueError, match="class names"):
        plots.plot_confusion_matrix(cm, names[:2], tmp_path / "bad.png")
