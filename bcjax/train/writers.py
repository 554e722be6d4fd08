"""Metric logs: JSON lines and TensorBoard event files, without TensorFlow.

clu's metric writers import TensorFlow, and the `tensorboard` package is not a
dependency, so the event file is written here directly: TFRecord framing
(length, masked CRC-32C, payload, masked CRC-32C) around `tensorflow.Event`
protobufs encoded by hand. Only the few fields TensorBoard needs for scalars
and images are produced; the field numbers are those of TensorBoard's
event.proto / summary.proto.

Only one process should write (pass `enabled=jax.process_index() == 0`); a
disabled writer creates no files and does nothing, so callers need no `if`.
This module does not import JAX.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

__all__ = [
    "MetricWriter",
    "EventFileWriter",
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
    appended (a resumed run continues the file) and flushed at once. Nested
    values (a per-class dict, a confusion matrix) go to JSONL as they are;
    TensorBoard gets their numeric leaves as "val/per_class/benign/f1".
    """

    def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True,
                 jsonl_name: str = "metrics.jsonl", tensorboard: bool = True,
                 tensorboard_dir: str | os.PathLike | None = None):
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
            self._events = EventFileWriter(
                tensorboard_dir if tensorboard_dir is not None
                else self.logdir / "tensorboard")

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
