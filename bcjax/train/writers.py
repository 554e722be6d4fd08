"""Metric logs: JSON lines, and TensorBoard event files written by tensorboardX (no TensorFlow).

Only one process should write (pass `enabled=jax.process_index() == 0`); a disabled writer
creates no files and does nothing, so callers need no `if`.

A run resumed from its checkpoint at step S redoes the steps after S and logs them again.
`MetricWriter(resume_step=S)` keeps each step logged once:
- metrics.jsonl first loses its lines after step S (rewritten atomically, through bcjax.files);
- the new event file starts with the restart marker that tensorboardX's
  `SummaryWriter(purge_step=S + 1)` writes: TensorBoard's readers then drop the events that
  earlier files hold from step S + 1 on, and show the new ones.
This module does not import JAX.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import pathlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from tensorboardX import summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog

from bcjax import files

__all__ = ["MetricWriter", "read_jsonl", "to_jsonable"]

_writer_count = itertools.count()  # per process, for unique event file names


class _EventFile:
    """A new TensorBoard event file, written synchronously.

    Not tensorboardX's SummaryWriter: it hands events to a writer thread, and its flush()
    (2.6.2.2 to 2.6.5) does not wait for that thread. A process SIGKILLed right after flushing
    an epoch lost that epoch's events in 6 of 6 tries. EventsWriter is the synchronous writer
    the thread itself uses.
    """

    def __init__(self, logdir: pathlib.Path, purge_step: int | None):
        logdir.mkdir(parents=True, exist_ok=True)
        # tensorboardX names the file events.out.tfevents.<second>.<host><suffix> and opens it
        # with "wb": without a suffix of its own, a second writer in the same second truncates
        # the first one's file. TensorBoard reads a run's files in name order, and the restart
        # marker below drops only events read before it; the nanoseconds make the name order
        # the order in which the files were opened, also for two processes in one second.
        suffix = f".{time.time_ns()}.{os.getpid()}.{next(_writer_count)}"
        self._writer = EventsWriter(str(logdir / "events"), suffix)
        if purge_step is not None:
            restart = SessionLog(status=SessionLog.START)
            self._writer.write_event(
                Event(wall_time=time.time(), step=purge_step, session_log=restart)
            )
            self.flush()

    def add_scalar(self, tag: str, value: float, step: int, wall_time: float) -> None:
        """One event per scalar, as SummaryWriter.add_scalar writes it."""
        event = Event(wall_time=wall_time, step=step, summary=summary.scalar(tag, value))
        self._writer.write_event(event)

    def add_image(self, tag: str, png: bytes, step: int) -> None:
        from PIL import Image  # only images pay for PIL

        with Image.open(io.BytesIO(png)) as image:
            pixels = np.asarray(image.convert("RGBA"))
        image_summary = summary.image(tag, pixels, dataformats="HWC")
        self._writer.write_event(Event(wall_time=time.time(), step=step, summary=image_summary))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


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


def _numeric_leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
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


def _drop_lines_after(path: pathlib.Path, step: int) -> None:
    """Rewrites a JSONL log without its records after `step` and without a torn last line.

    Records without a step (a final summary) are kept. The file is replaced atomically, and
    only when something is dropped.
    """
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8")
    records = _parse_jsonl(text, path)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) < len(records) or (text and not text.endswith("\n")):
        files.write_text("".join(json.dumps(r) + "\n" for r in kept), path)


class MetricWriter:
    """Writes each step's metrics to `<logdir>/metrics.jsonl` and TensorBoard.

      writer = MetricWriter(workdir, enabled=jax.process_index() == 0, resume_step=0)
      writer.write_scalars(step, {"train/loss": 0.3, "val": report}, epoch=2)
      writer.close()

    JSONL: one object per call, {"step", "epoch" (if given), "time", **metrics}, appended and
    flushed at once. TensorBoard: a new event file in `tensorboard_dir` (default
    `<logdir>/tensorboard`) per writer, flushed at each write_scalars call (one per epoch).
    Nested values (a per-class dict, a confusion matrix) go to JSONL as they are; TensorBoard
    gets their numeric leaves as "val/per_class/benign/f1".

    resume_step=S: the steps after S are logged again by this writer, so metrics.jsonl first
    loses its lines after S and TensorBoard hides the older events from S + 1 on (see the
    module doc). A fresh start passes 0; None keeps everything logged before.
    """

    def __init__(
        self,
        logdir: str | os.PathLike,
        *,
        enabled: bool = True,
        jsonl_name: str = "metrics.jsonl",
        tensorboard: bool = True,
        tensorboard_dir: str | os.PathLike | None = None,
        resume_step: int | None = None,
    ):
        self.enabled = enabled
        self.logdir = pathlib.Path(logdir)
        self.jsonl_path = self.logdir / jsonl_name
        self._jsonl = None
        self._events = None
        if not enabled:
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            _drop_lines_after(self.jsonl_path, int(resume_step))
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        if tensorboard:
            events_dir = pathlib.Path(
                tensorboard_dir if tensorboard_dir is not None else self.logdir / "tensorboard"
            )
            purge_step = None if resume_step is None else int(resume_step) + 1
            self._events = _EventFile(events_dir, purge_step)

    def write_scalars(
        self, step: int, metrics: Mapping[str, Any], *, epoch: int | None = None
    ) -> None:
        """Logs one epoch's metrics and flushes both files."""
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
            for tag, value in _numeric_leaves(metrics):
                self._events.add_scalar(tag, value, int(step), now)
            self._events.flush()

    def write_record(self, record: Mapping[str, Any]) -> None:
        """Appends any JSON-able mapping as one line (e.g. a final summary)."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(to_jsonable(record), allow_nan=False) + "\n")
        self._jsonl.flush()

    def write_image(self, step: int, tag: str, png: bytes | str | os.PathLike) -> None:
        """A PNG (bytes or a file path) to TensorBoard's image tab."""
        if not self.enabled or not self._events:
            return
        if not isinstance(png, bytes):
            png = pathlib.Path(png).read_bytes()
        self._events.add_image(tag, png, int(step))
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
            self._events = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parse_jsonl(text: str, path: str | os.PathLike) -> list[dict[str, Any]]:
    lines = text.splitlines()
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


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSONL log; a torn last line (a crash mid-write) is dropped,
    a bad line elsewhere is an error."""
    return _parse_jsonl(pathlib.Path(path).read_text(encoding="utf-8"), path)
