"""Metric logs: JSON lines and TensorBoard event files, without TensorFlow.

clu's metric writers import TensorFlow, and the `tensorboard` package is not a
dependency, so the event file is written here directly: TFRecord framing
(length, masked CRC-32C, payload, masked CRC-32C) around `tensorflow.Event`
protobufs encoded by hand. Only the few fields TensorBoard needs for scalars
and images are produced; the field numbers are those of TensorBoard's
event.proto / summary.proto.

Only one process should write (pass `enabled=jax.process_index() == 0`); a
disabled writer creates no files and does nothing, so callers need no `if`.
A resumed run passes `resume_step`: the events it will log again are dropped
from the old event files, which needs the small reader below (TFRecord framing
and the top-level Event fields only, CRCs checked).
This module does not import JAX.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import pathlib
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "MetricWriter",
    "EventFileWriter",
    "read_tfrecords",
    "event_step",
    "trim_event_files",
    "logged_steps",
    "read_jsonl",
    "to_jsonable",
    "crc32c",
    "masked_crc32c",
]

# ------------------------------------------------------------------ CRC-32C


def _make_crc32c_table() -> tuple[int, ...]:
    poly = 0x82F63B78  # Castagnoli, bit-reversed
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of data, as TFRecord uses; pure Python.

    A PNG of a few tens of kB takes milliseconds, scalars microseconds.
    """
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    # TFRecord masks the CRC so that CRCs of data holding CRCs stay well mixed.
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ------------------------------------------------------- protobuf wire format


def _varint(value: int) -> bytes:
    if value < 0:
        value &= (1 << 64) - 1  # int64 negatives take ten bytes, as protobuf does
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


def _field_varint(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(int(value))


def _field_double(field: int, value: float) -> bytes:
    return _key(field, 1) + struct.pack("<d", value)


def _field_float(field: int, value: float) -> bytes:
    return _key(field, 5) + struct.pack("<f", value)


def _field_bytes(field: int, value: bytes) -> bytes:
    return _key(field, 2) + _varint(len(value)) + value


# tensorflow.Event / Summary / Summary.Value / Summary.Image field numbers.
_EVENT_WALL_TIME, _EVENT_STEP, _EVENT_FILE_VERSION, _EVENT_SUMMARY = 1, 2, 3, 5
_SUMMARY_VALUE = 1
_VALUE_TAG, _VALUE_SIMPLE, _VALUE_IMAGE = 1, 2, 4
_IMAGE_HEIGHT, _IMAGE_WIDTH, _IMAGE_COLORSPACE, _IMAGE_ENCODED = 1, 2, 3, 4


def _scalar_value(tag: str, value: float) -> bytes:
    return (_field_bytes(_VALUE_TAG, tag.encode()) +
            _field_float(_VALUE_SIMPLE, value))


def _png_info(png: bytes) -> tuple[int, int, int]:
    """(height, width, colorspace) from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG image")
    width, height = struct.unpack(">II", png[16:24])
    # PNG colour type -> Summary.Image colorspace (1 grey, 2 grey+alpha,
    # 3 RGB, 4 RGBA); a palette decodes to RGB.
    colorspace = {0: 1, 4: 2, 2: 3, 6: 4, 3: 3}.get(png[25], 3)
    return height, width, colorspace


def _image_value(tag: str, png: bytes) -> bytes:
    height, width, colorspace = _png_info(png)
    image = (_field_varint(_IMAGE_HEIGHT, height) +
             _field_varint(_IMAGE_WIDTH, width) +
             _field_varint(_IMAGE_COLORSPACE, colorspace) +
             _field_bytes(_IMAGE_ENCODED, png))
    return _field_bytes(_VALUE_TAG, tag.encode()) + _field_bytes(
        _VALUE_IMAGE, image)


def _event(wall_time: float, step: int | None = None, *,
           file_version: str | None = None,
           values: list[bytes] | None = None) -> bytes:
    out = _field_double(_EVENT_WALL_TIME, wall_time)
    if step is not None:
        out += _field_varint(_EVENT_STEP, step)
    if file_version is not None:
        out += _field_bytes(_EVENT_FILE_VERSION, file_version.encode())
    if values:
        summary = b"".join(_field_bytes(_SUMMARY_VALUE, v) for v in values)
        out += _field_bytes(_EVENT_SUMMARY, summary)
    return out


def _tfrecord(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return (length + struct.pack("<I", masked_crc32c(length)) + payload +
            struct.pack("<I", masked_crc32c(payload)))


# ------------------------------------------------------------------- reading


def read_tfrecords(path: str | os.PathLike) -> tuple[list[bytes], bool]:
    """(payloads, torn) of a TFRecord file, both CRCs of each record checked.

    A record cut short by the end of the file is what a process killed
    mid-write leaves: it is dropped and torn is True. A complete record with a
    wrong CRC is damage, not a kill (writes are cut, not garbled): ValueError.
    """
    data = pathlib.Path(path).read_bytes()
    payloads, pos = [], 0
    while pos < len(data):
        if len(data) - pos < 12:
            return payloads, True
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        if length_crc != masked_crc32c(header):
            raise ValueError(f"{path}: bad length CRC in the record at byte {pos}")
        end = pos + 12 + length + 4
        if end > len(data):
            return payloads, True
        payload = data[pos + 12:end - 4]
        (data_crc,) = struct.unpack("<I", data[end - 4:end])
        if data_crc != masked_crc32c(payload):
            raise ValueError(f"{path}: bad data CRC in the record at byte {pos}")
        payloads.append(payload)
        pos = end
    return payloads, False


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("bad varint in an event")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _event_fields(event: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field, wire type, value) of an Event's top-level fields; length-
    delimited values as bytes (not parsed further), fixed-size ones as ints."""
    pos = 0
    while pos < len(event):
        key, pos = _read_varint(event, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(event, pos)
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value = int.from_bytes(event[pos:pos + size], "little")
            pos += size
        elif wire_type == 2:
            size, pos = _read_varint(event, pos)
            value = event[pos:pos + size]
            pos += size
        else:  # groups (3, 4) are not in event.proto
            raise ValueError(f"unexpected wire type {wire_type} in an event")
        if pos > len(event):
            raise ValueError("event cut short")
        yield field, wire_type, value


def event_step(event: bytes) -> int:
    """The step of a serialized Event; 0 when it has none (as protobuf reads
    a missing int64), e.g. the file_version event."""
    step = 0
    for field, wire_type, value in _event_fields(event):
        if field == _EVENT_STEP and wire_type == 0:
            step = value - (1 << 64) if value >= 1 << 63 else value
    return step


def logged_steps(logdir: str | os.PathLike) -> list[int]:
    """Sorted steps of every event but the file headers, over all event files
    under logdir: what TensorBoard will plot, without TensorFlow."""
    steps = []
    for path in pathlib.Path(logdir).glob("**/*tfevents*"):
        payloads, _ = read_tfrecords(path)
        steps += [event_step(p) for p in payloads if not _is_file_version(p)]
    return sorted(steps)


def _is_file_version(event: bytes) -> bool:
    return any(field == _EVENT_FILE_VERSION
               for field, _, _ in _event_fields(event))


def _trim_event_file(path: pathlib.Path, step: int) -> bool:
    """Rewrites one event file without its events after `step` (and without a
    torn last record); True when the file changed."""
    payloads, torn = read_tfrecords(path)
    kept = [p for p in payloads if _is_file_version(p) or event_step(p) <= step]
    if len(kept) == len(payloads) and not torn:
        return False
    # The temporary name lacks "tfevents", so TensorBoard never reads it.
    fd, tmp = tempfile.mkstemp(prefix=".trim.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"".join(_tfrecord(p) for p in kept))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return True


def trim_event_files(logdir: str | os.PathLike, step: int) -> list[pathlib.Path]:
    """Drops the events after `step` from every event file in logdir; returns
    the files rewritten.

    A run resumed from a checkpoint at `step` logs the later steps again, in a
    new file; without this TensorBoard would show them twice. Each file is
    replaced atomically (a kill leaves the old or the new file, never half of
    one). A damaged file is left as it is, with a warning: losing the plots is
    not worth stopping a resumed run for.
    """
    logdir = pathlib.Path(logdir)
    if not logdir.is_dir():
        return []
    for leftover in logdir.glob(".trim.*.tmp"):  # a trim killed before its rename
        leftover.unlink(missing_ok=True)
    changed = []
    for path in sorted(logdir.glob("*tfevents*")):
        if not path.is_file():
            continue
        try:
            if _trim_event_file(path, step):
                changed.append(path)
        except (ValueError, OSError) as e:  # damaged, or not writable here
            log.warning("Not trimming %s to step %d: %s", path, step, e)
    return changed


# ------------------------------------------------------------------- writers

_FILE_COUNTER = itertools.count()


class EventFileWriter:
    """Appends TensorBoard events to a new `events.out.tfevents.*` file."""

    def __init__(self, logdir: str | os.PathLike):
        self.logdir = pathlib.Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        name = (f"events.out.tfevents.{int(time.time()):010d}."
                f"{socket.gethostname()}.{os.getpid()}.{next(_FILE_COUNTER)}")
        self.path = self.logdir / name
        self._file = open(self.path, "wb")
        # TensorBoard takes the first event's file_version to know the format.
        self._write(_event(time.time(), file_version="brain.Event:2"))
        self.flush()

    def _write(self, event: bytes) -> None:
        self._file.write(_tfrecord(event))

    def add_scalars(self, step: int, scalars: Mapping[str, float],
                    wall_time: float | None = None) -> None:
        """One event holding every scalar of the step."""
        if scalars:
            values = [_scalar_value(t, float(v)) for t, v in scalars.items()]
            self._write(_event(wall_time or time.time(), step, values=values))

    def add_image(self, step: int, tag: str, png: bytes,
                  wall_time: float | None = None) -> None:
        self._write(_event(wall_time or time.time(), step,
                           values=[_image_value(tag, png)]))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def to_jsonable(value: Any) -> Any:
    """Plain JSON types from numpy/JAX values; NaN and inf become None
    (strict JSON has no NaN, and a diverged loss must not break the log)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (str, type(None))):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if hasattr(value, "__array__"):  # numpy or JAX array
        return to_jsonable(np.asarray(value).tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")


def _numeric_leaves(tree: Mapping[str, Any],
                    prefix: str = "") -> Iterator[tuple[str, float]]:
    """Numeric scalars of a nested mapping as ("a/b", value); lists, strings,
    booleans and None are not scalars to plot and are skipped."""
    for key, value in tree.items():
        tag = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _numeric_leaves(value, tag + "/")
        elif isinstance(value, (bool, np.bool_)) or value is None:
            continue
        elif isinstance(value, (int, float, np.number)):
            yield tag, float(value)
        elif hasattr(value, "__array__") and np.ndim(value) == 0:
            yield tag, float(np.asarray(value))


class MetricWriter:
    """Writes each step's metrics to `<logdir>/metrics.jsonl` and TensorBoard.

      writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
      writer.write_scalars(step, {"train/loss": 0.3, "val": report}, epoch=2)
      writer.close()

    JSONL: one object per call, {"step", "epoch" (if given), "time", **metrics},
    appended (a resumed run continues the file) and flushed at once.
    TensorBoard: a new event file per writer; with resume_step=S the existing
    event files first lose their events after step S (see trim_event_files),
    as the resumed run logs those steps again. None keeps them all. Nested
    values (a per-class dict, a confusion matrix) go to JSONL as they are;
    TensorBoard gets their numeric leaves as "val/per_class/benign/f1".
    """

    def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True,
                 jsonl_name: str = "metrics.jsonl", tensorboard: bool = True,
                 tensorboard_dir: str | os.PathLike | None = None,
                 resume_step: int | None = None):
        self.enabled = enabled
        self.logdir = pathlib.Path(logdir)
        self.jsonl_path = self.logdir / jsonl_name
        self._jsonl = None
        self._events = None
        if not enabled:
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        if tensorboard:
            events_dir = (tensorboard_dir if tensorboard_dir is not None
                          else self.logdir / "tensorboard")
            if resume_step is not None:
                trim_event_files(events_dir, int(resume_step))
            self._events = EventFileWriter(events_dir)

    @property
    def event_file(self) -> pathlib.Path | None:
        return self._events.path if self._events else None

    def write_scalars(self, step: int, metrics: Mapping[str, Any], *,
                      epoch: int | None = None) -> None:
        if not self.enabled:
            return
        clash = {"step", "epoch", "time"} & set(metrics)
        if clash:
            raise ValueError(f"metric names {sorted(clash)} are reserved")
        now = time.time()
        record = {"step": int(step)}
        if epoch is not None:
            record["epoch"] = int(epoch)
        record["time"] = now
        record.update(metrics)
        self.write_record(record)
        if self._events:
            self._events.add_scalars(int(step), dict(_numeric_leaves(metrics)), now)
            self._events.flush()

    def write_record(self, record: Mapping[str, Any]) -> None:
        """Appends any JSON-able mapping as one line (e.g. a final summary)."""
        if not self.enabled:
            return
        self._jsonl.write(
            json.dumps(to_jsonable(record), allow_nan=False) + "\n")
        self._jsonl.flush()

    def write_image(self, step: int, tag: str,
                    png: bytes | str | os.PathLike) -> None:
        """A PNG (bytes or a file path) to TensorBoard's image tab."""
        if not self.enabled or not self._events:
            return
        if not isinstance(png, bytes):
            png = pathlib.Path(png).read_bytes()
        self._events.add_image(int(step), tag, png)
        self._events.flush()

    def flush(self) -> None:
        if self._jsonl:
            self._jsonl.flush()
        if self._events:
            self._events.flush()

    def close(self) -> None:
        if self._jsonl and not self._jsonl.closed:
            self._jsonl.close()
        if self._events:
            self._events.close()

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSONL log; a torn last line (a crash mid-write) is dropped,
    a bad line elsewhere is an error."""
    lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not JSON: {line[:80]!r}") from None
    return records
