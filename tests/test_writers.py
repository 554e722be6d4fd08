"""Writers: the event file is read back with an independent reader (bitwise
CRC-32C here, protobuf's own parser on a schema declared here with
TensorBoard's field numbers), and the JSONL log line by line."""

import io
import json
import math
import pathlib
import struct
import zlib

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from bcjax.train import writers

# ------------------------------------------------ independent event reader


def bitwise_crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def masked(crc):
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path):
    data = pathlib.Path(path).read_bytes()
    stream, records = io.BytesIO(data), []
    while stream.tell() < len(data):
        header = stream.read(8)
        (length,) = struct.unpack("<Q", header)
        (len_crc,) = struct.unpack("<I", stream.read(4))
        assert len_crc == masked(bitwise_crc32c(header))
        payload = stream.read(length)
        (data_crc,) = struct.unpack("<I", stream.read(4))
        assert data_crc == masked(bitwise_crc32c(payload))
        records.append(payload)
    return records


def event_class():
    """tensorflow.Event with the fields used, numbered as in event.proto."""
    f = descriptor_pb2.FileDescriptorProto(
        name="test_event.proto", package="tbtest", syntax="proto3")
    t = descriptor_pb2.FieldDescriptorProto

    def message(name, fields):
        m = f.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            m.field.add(name=fname, number=number, type=ftype, label=label,
                        type_name=type_name)

    opt, rep = t.LABEL_OPTIONAL, t.LABEL_REPEATED
    message("Image", [("height", 1, t.TYPE_INT32, opt, None),
                      ("width", 2, t.TYPE_INT32, opt, None),
                      ("colorspace", 3, t.TYPE_INT32, opt, None),
                      ("encoded_image_string", 4, t.TYPE_BYTES, opt, None)])
    message("Value", [("tag", 1, t.TYPE_STRING, opt, None),
                      ("simple_value", 2, t.TYPE_FLOAT, opt, None),
                      ("image", 4, t.TYPE_MESSAGE, opt, ".tbtest.Image")])
    message("Summary", [("value", 1, t.TYPE_MESSAGE, rep, ".tbtest.Value")])
    message("Event", [("wall_time", 1, t.TYPE_DOUBLE, opt, None),
                      ("step", 2, t.TYPE_INT64, opt, None),
                      ("file_version", 3, t.TYPE_STRING, opt, None),
                      ("summary", 5, t.TYPE_MESSAGE, opt, ".tbtest.Summary")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tbtest.Event"))


def read_events(path):
    cls = event_class()
    events = []
    for payload in read_records(path):
        event = cls()
        event.ParseFromString(payload)
        events.append(event)
    return events


def tiny_png(width=40, height=20):
    """A valid RGBA PNG built by hand (no image library needed)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data +
                struct.pack(">I", zlib.crc32(kind + data)))
    raw = b"".join(
        b"\x00" + b"".join(bytes([x * 6 % 256, y * 12 % 256, 128, 255])
                           for x in range(width)) for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
            chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# -------------------------------------------------------------------- tests


def test_crc32c_known_vectors():
    assert writers.crc32c(b"123456789") == 0xE3069283  # the standard check
    assert writers.crc32c(b"") == 0
    rng = np.random.default_rng(0)
    for n in (1, 7, 64, 1000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert writers.crc32c(data) == bitwise_crc32c(data)
        assert writers.masked_crc32c(data) == masked(bitwise_crc32c(data))


def test_event_file_round_trip(tmp_path):
    report = {"accuracy": np.float32(0.75), "loss": 0.5, "auc_macro": None,
              "per_class": {"benign": {"f1": 0.6, "support": 12}},
              "confusion_matrix": [[1, 2], [3, 4]], "class_names": ["a", "b"]}
    png = tiny_png()
    with writers.MetricWriter(tmp_path) as w:
        w.write_scalars(1, {"train/loss": 1.25, "train/accuracy": 0.5}, epoch=0)
        w.write_scalars(2, {"val": report, "lr": np.float64(0.1)}, epoch=1)
        w.write_scalars(3_000_000_000, {"big_step": 1})  # int64 steps
        w.write_image(2, "val/confusion", png)
        event_path = w.event_file
    assert event_path.parent == tmp_path / "tensorboard"
    assert event_path.name.startswith("events.out.tfevents.")
    events = read_events(event_path)
    assert events[0].file_version == "brain.Event:2"
    assert events[0].wall_time > 1e9
    scalars = {(e.step, v.tag): v.simple_value
               for e in events[1:] for v in e.summary.value
               if not v.HasField("image")}
    assert scalars == {
        (1, "train/loss"): 1.25, (1, "train/accuracy"): 0.5,
        (2, "val/accuracy"): 0.75, (2, "val/loss"): 0.5,
        (2, "val/per_class/benign/f1"): pytest.approx(0.6),
        (2, "val/per_class/benign/support"): 12.0,
        (2, "lr"): pytest.approx(0.1), (3_000_000_000, "big_step"): 1.0}
    image = events[-1].summary.value[0]
    assert (events[-1].step, image.tag) == (2, "val/confusion")
    assert image.image.encoded_image_string == png
    assert (image.image.width, image.image.height) == (40, 20)
    assert image.image.colorspace == 4  # RGBA


def test_jsonl_appends_across_restarts_and_sanitises(tmp_path):
    with writers.MetricWriter(tmp_path, tensorboard=False) as w:
        w.write_scalars(1, {"train/loss": np.float32(0.5),
                            "val/loss": float("nan"),
                            "cm": np.array([[1, 0], [0, 2]])}, epoch=0)
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
    with writers.MetricWriter(logdir, enabled=False) as w:
        w.write_scalars(1, {"loss": 1.0})
        w.write_record({"a": 1})
        w.write_image(1, "x", b"not even a png")
        assert w.event_file is None
    assert not logdir.exists()


def test_reserved_names_and_unserialisable_values(tmp_path):
    with writers.MetricWriter(tmp_path, tensorboard=False) as w:
        with pytest.raises(ValueError, match="reserved"):
            w.write_scalars(1, {"step": 3})
        with pytest.raises(TypeError, match="JSON"):
            w.write_record({"x": object()})
    assert writers.to_jsonable({"a": (np.int64(2), np.bool_(True), math.inf)}
                               ) == {"a": [2, True, None]}


# ------------------------------------------------------------------ resume


def steps_and_loss(path):
    """[(step, train/loss)] of an event file, read by the independent reader
    (which fails on any bad CRC or torn record)."""
    events = read_events(path)
    assert events[0].file_version == "brain.Event:2"
    return [(e.step, e.summary.value[0].simple_value) for e in events[1:]]


def log_steps(logdir, steps, loss, **kwargs):
    with writers.MetricWriter(logdir, **kwargs) as w:
        for step in steps:
            w.write_scalars(step, {"train/loss": loss + step})
        return w.event_file


def test_resume_drops_events_after_the_checkpoint(tmp_path):
    old = log_steps(tmp_path, range(1, 7), 0.0)
    new = log_steps(tmp_path, range(4, 7), 100.0, resume_step=3)
    assert old != new and old.parent == new.parent
    # Steps 1-3 once from the first run, then 4-6 once from the resumed one.
    assert (steps_and_loss(old) + steps_and_loss(new) ==
            [(1, 1.0), (2, 2.0), (3, 3.0), (4, 104.0), (5, 105.0), (6, 106.0)])
    assert sorted(p.name for p in old.parent.iterdir()) == sorted(
        [old.name, new.name])  # no temporary file left
    # A second resume at the same step changes nothing it need not change.
    before = old.read_bytes()
    log_steps(tmp_path, [], 0.0, resume_step=6)
    assert old.read_bytes() == before


def test_resume_drops_a_torn_last_record(tmp_path):
    old = log_steps(tmp_path, range(1, 4), 0.0)
    complete = old.read_bytes()
    log_steps(tmp_path / "other", [4], 0.0)
    record = writers.read_tfrecords(
        next((tmp_path / "other/tensorboard").iterdir()))[0][1]
    full = writers._tfrecord(record)
    # Cut inside the length, after its CRC, inside the payload, inside its CRC.
    for cut in (5, 12, 20, len(full) - 2):
        old.write_bytes(complete + full[:cut])
        payloads, torn = writers.read_tfrecords(old)
        assert torn and [writers.event_step(p) for p in payloads] == [0, 1, 2, 3]
    new = log_steps(tmp_path, [3], 50.0, resume_step=2)
    assert steps_and_loss(old) == [(1, 1.0), (2, 2.0)]
    assert steps_and_loss(new) == [(3, 53.0)]


def test_reader_rejects_bad_crcs_and_resume_leaves_such_a_file(tmp_path):
    old = log_steps(tmp_path, range(1, 4), 0.0)
    data = bytearray(old.read_bytes())
    data[-30] ^= 0xFF  # inside the last payload: the data CRC fails
    old.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="data CRC"):
        writers.read_tfrecords(old)
    log_steps(tmp_path, [], 0.0, resume_step=1)  # a warning, not an error
    assert old.read_bytes() == bytes(data)
    data[3] ^= 0xFF  # the first record's length
    old.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="length CRC"):
        writers.read_tfrecords(old)


def test_resume_step_none_keeps_everything(tmp_path):
    old = log_steps(tmp_path, range(1, 7), 0.0)
    before = old.read_bytes()
    log_steps(tmp_path, range(4, 7), 100.0)
    assert old.read_bytes() == before
    assert [s for s, _ in steps_and_loss(old)] == [1, 2, 3, 4, 5, 6]


def test_event_step_reads_int64_steps_and_skips_other_fields():
    assert writers.event_step(writers._event(1.0, 3_000_000_000)) == 3_000_000_000
    assert writers.event_step(writers._event(1.0, -2)) == -2
    assert writers.event_step(writers._event(1.0, file_version="x")) == 0
    # An unknown 32-bit field (wire type 5) before the step is skipped.
    assert writers.event_step(writers._field_float(9, 1.5) +
                              writers._event(1.0, 7)) == 7


def test_rewritten_event_file_reads_in_tensorboard(tmp_path):
    # TensorBoard's own reader (a test dependency) is the independent reference.
    from tensorboard.backend.event_processing import event_accumulator
    old = log_steps(tmp_path, range(1, 7), 0.0)
    log_steps(tmp_path, range(4, 7), 100.0, resume_step=3)

    def scalars(path):
        # Without TensorBoard's clean-up of out-of-order steps: the files
        # themselves must hold each step once.
        acc = event_accumulator.EventAccumulator(str(path), purge_orphaned_data=False)
        acc.Reload()
        return [(e.step, e.value) for e in acc.Scalars("train/loss")]

    assert scalars(old) == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert scalars(old.parent) == [(1, 1.0), (2, 2.0), (3, 3.0),
                                   (4, 104.0), (5, 105.0), (6, 106.0)]


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
    from bcjax.train import plots
    with writers.MetricWriter(tmp_path, tensorboard=False) as w:
        for epoch in range(1, 9):
            w.write_scalars(epoch * 10, {"train/loss": 1.0 / epoch,
                                         "train/accuracy": 1 - 0.5 / epoch},
                            epoch=epoch)
            if epoch != 4:  # a missing eval is a gap, not an error
                w.write_scalars(epoch * 10, {"val": {"loss": 1.2 / epoch,
                                                     "accuracy": 0.8 - 0.3 / epoch,
                                                     "macro_f1": 0.7}}, epoch=epoch)
        w.write_record({"final": {"test/accuracy": 0.8}})  # no epoch: ignored
    history = writers.read_jsonl(tmp_path / "metrics.jsonl")
    table = plots.history_table(history)
    assert table["epoch"].tolist() == list(range(1, 9))
    assert table["train/loss"][1] == 0.5
    assert np.isnan(table["val/loss"][3]) and table["val/loss"][1] == 0.6
    out = plots.plot_learning_curves(history, tmp_path / "plots" / "curves.png",
                                     best_epoch=6, stop_epoch=8)
    assert out == tmp_path / "plots" / "curves.png"
    assert_png(out)


def test_learning_curves_from_lists(tmp_path):
    from bcjax.train import plots
    history = {"train_loss": [1.0, 0.6, 0.4], "val_loss": [1.1, 0.8],
               "train_accuracy": [0.5, 0.7, 0.9], "val_accuracy": [0.4, 0.6]}
    table = plots.history_table(history)
    assert table["epoch"].tolist() == [1, 2, 3]
    assert np.isnan(table["val/accuracy"][2])
    assert_png(plots.plot_learning_curves(history, tmp_path / "c.png"))


def test_confusion_matrix_png(tmp_path):
    from bcjax.train import plots
    names = ["normal", "benign", "malignant"]
    cm = [[20, 5, 2], [3, 80, 4], [0, 0, 0]]  # an empty row must not divide by 0
    with np.errstate(all="raise"):
        out = plots.plot_confusion_matrix(cm, names, tmp_path / "cm.png")
    assert_png(out)
    assert_png(plots.plot_confusion_matrix(cm, names, tmp_path / "cm_n.png",
                                           normalize=False))
    with pytest.raises(ValueError, match="class names"):
        plots.plot_confusion_matrix(cm, names[:2], tmp_path / "bad.png")
