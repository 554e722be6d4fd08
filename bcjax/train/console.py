"""What a user sees while a run trains (process 0 only).

- ``epoch 2/100: train loss ... | val ... (105.1 s, ETA 2h51m)``: one line per epoch;
- inside an epoch once it has run ``bar_after_s`` (10 s): on a terminal a progress
  bar; elsewhere (a log file, a notebook's captured output) a line every
  ``log_every_steps`` steps, so short epochs leave one line each;
- once the first steps after warm-up are timed, one line estimating the whole
  run, and on a CPU, where that exceeds 15 minutes, a pointer to
  configs/quickstart.py;
- a line every ``every_s`` while a long compile runs (`Heartbeat`).

Time comes from an injected clock, so the tests drive it with made-up times.
Per step the loop pays one clock read and a few comparisons.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable

from bcjax import report

log = logging.getLogger(__name__)

SLOW_CPU_RUN_S = 15 * 60  # past this, a CPU run suggests the quickstart config


class Console:
    """Progress lines for one process's training, from `first_step` to `total_steps`.

    enabled: False on every process but the main one (nothing is shown).
    tty: whether `stream` is a terminal (default: asked of the stream).
    warmup_steps, timed_steps: the run's estimate comes after warmup_steps +
      timed_steps steps, from the timed ones (the first steps carry warm-up).
    """

    def __init__(
        self,
        *,
        first_step: int,
        total_steps: int,
        steps_per_epoch: int,
        platform: str,
        enabled: bool = True,
        clock: Callable[[], float] = time.perf_counter,
        stream=None,
        tty: bool | None = None,
        bar_after_s: float = 10.0,
        bar_every_s: float = 0.5,
        log_every_steps: int = 20,
        warmup_steps: int = 2,
        timed_steps: int = 5,
    ):
        self.first_step, self.total_steps = first_step, total_steps
        self.steps_per_epoch, self.platform = steps_per_epoch, platform
        self.enabled, self.clock = enabled, clock
        self.stream = stream if stream is not None else sys.stderr
        self.tty = tty if tty is not None else bool(getattr(self.stream, "isatty", bool)())
        self.bar_after_s, self.bar_every_s = bar_after_s, bar_every_s
        self.log_every_steps = log_every_steps
        self.warmup_steps, self.timed_steps = warmup_steps, timed_steps
        self._start: float | None = None
        self._epoch_start: float | None = None
        self._warm: tuple[float, int] | None = None  # (time, step) once warm-up is done
        self._estimated = False
        self._bar_shown_at: float | None = None

    @property
    def num_epochs(self) -> int:
        return self.total_steps // self.steps_per_epoch

    def start(self) -> None:
        """Training begins (the train step is compiled)."""
        self._start = self._epoch_start = self.clock()

    def eta_s(self, step: int) -> float | None:
        """Seconds left, at this process's pace so far (evaluation and checkpoints included)."""
        done = step - self.first_step
        if self._start is None or done <= 0:
            return None
        return (self.clock() - self._start) / done * (self.total_steps - step)

    def step(self, step: int) -> None:
        """After each step (`step` steps done)."""
        if not self.enabled:
            return
        done = step - self.first_step
        if done == self.warmup_steps:
            self._warm = (self.clock(), step)
        elif not self._estimated and done == self.warmup_steps + self.timed_steps:
            self._estimate(step)
        if not step % self.steps_per_epoch:
            return  # the epoch's own line follows
        if self.tty:
            self._draw_bar(step)
        elif step % self.log_every_steps == 0 and self._in_long_epoch():
            self._log_step(step)

    def _in_long_epoch(self) -> bool:
        return self.clock() - self._epoch_start >= self.bar_after_s

    def _log_step(self, step: int) -> None:
        eta = self.eta_s(step)
        log.info(
            "  epoch %d/%d step %d/%d  ETA %s",
            step // self.steps_per_epoch + 1,
            self.num_epochs,
            step,
            self.total_steps,
            report.short_duration(eta) if eta is not None else "–",
        )

    def _estimate(self, step: int) -> None:
        self._estimated = True
        t0, s0 = self._warm
        per_step = (self.clock() - t0) / (step - s0)
        whole = per_step * self.total_steps
        left = per_step * (self.total_steps - step)
        log.info(
            "Estimated run time: about %s for %d steps (%s per step, %s left); "
            "evaluation and checkpoints add to it.",
            report.short_duration(whole),
            self.total_steps,
            f"{per_step:.2f} s" if per_step < 100 else report.short_duration(per_step),
            report.short_duration(left),
        )
        if self.platform == "cpu" and left > SLOW_CPU_RUN_S:
            log.warning(
                "This run would take about %s on this CPU. For a first look in minutes, "
                "run --config=configs/quickstart.py (a small model on a small set), or "
                "train on a GPU/TPU.",
                report.short_duration(left),
            )

    def _draw_bar(self, step: int) -> None:
        if not self._in_long_epoch():
            return
        now = self.clock()
        if self._bar_shown_at is not None and now - self._bar_shown_at < self.bar_every_s:
            return
        self._bar_shown_at = now
        in_epoch = (step - 1) % self.steps_per_epoch + 1
        width = 24
        filled = width * in_epoch // self.steps_per_epoch
        eta = self.eta_s(step)
        self.stream.write(
            f"\r  epoch {step // self.steps_per_epoch + 1}/{self.num_epochs} "
            f"[{'#' * filled}{'.' * (width - filled)}] {in_epoch}/{self.steps_per_epoch}"
            + (f"  ETA {report.short_duration(eta)}" if eta is not None else "")
            + "\x1b[K"
        )
        self.stream.flush()

    def epoch(self, record: dict, step: int) -> str:
        """Logs an epoch's line (its metrics, time and the run's ETA); returns it."""
        eta = self.eta_s(step)
        self._epoch_start = self.clock()
        line = epoch_line(record, self.num_epochs, eta)
        if not self.enabled:
            return line
        if self._bar_shown_at is not None:  # the bar's line is cleared for the log line
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._bar_shown_at = None
        log.info(line)
        return line


def epoch_line(record: dict, num_epochs: int, eta_s: float | None) -> str:
    """``epoch 2/100: train loss 0.9012 acc 0.512 | val loss ... (105.1 s, ETA 2h51m)``.

    A metric reads "–" when undefined (e.g. every step of the epoch skipped for NaN).
    """
    train = record["train"]
    parts = [
        f"epoch {record['epoch']}/{num_epochs}: train loss {report.number(train['loss'], 4)} "
        f"acc {report.number(train['accuracy'])}"
    ]
    if "val" in record:
        val = record["val"]
        parts.append(
            f"val loss {report.number(val['loss'], 4)} acc {report.number(val['accuracy'])} "
            f"macro-F1 {report.number(val['macro_f1'])}"
        )
    timing = f"{record['epoch_time_s']:.1f} s"
    if eta_s is not None and record["epoch"] < num_epochs:
        timing += f", ETA {report.short_duration(eta_s)}"
    return " | ".join(parts) + f" ({timing})"


class Heartbeat:
    """A line every `every_s` while something long runs: `tick(now)` says what, if due."""

    def __init__(self, what: str, started: float, every_s: float = 30.0):
        self.what, self.started, self.every_s = what, started, every_s
        self._next = started + every_s

    def tick(self, now: float) -> str | None:
        if now < self._next:
            return None
        self._next = now + self.every_s
        return f"... still {self.what} ({report.short_duration(now - self.started)})"


@contextlib.contextmanager
def announced(what: str, *, enabled: bool = True, every_s: float = 30.0, clock=time.monotonic):
    """Says `what` is running and, from a background thread, that it still is every
    `every_s` (a compile of a big model on a CPU takes minutes, with no other sign of life)."""
    if not enabled:
        yield
        return
    log.info("%s%s ...", what[0].upper(), what[1:])
    beat, done = Heartbeat(what, clock(), every_s), threading.Event()

    def beat_until_done():
        while not done.wait(min(every_s, 5.0)):
            message = beat.tick(clock())
            if message:
                log.info(message)

    thread = threading.Thread(target=beat_until_done, name="bcjax-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
