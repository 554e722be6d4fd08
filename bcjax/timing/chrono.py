"""Keeps a run's clock: compile apart from steps, input wait, phases.

Steps are not synchronised one by one (that would stall the pipeline of
asynchronous dispatch); in steady state the interval between two dispatches
equals the device's step time because the donated state makes each step wait
for the previous one. The synchronised measurement lives in bcjax.timing.breakdown.

Phases are exclusive (a phase opened inside another is not also counted in
it), so with the process's start-up they add up to the wall time; what no
phase covers shows as ``phases_s.unattributed``.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pathlib
import threading
import time

import numpy as np

_startup_claimed = False


def process_age_s() -> float | None:
    """Seconds since this process started (Linux's /proc), None where unknown."""
    try:
        stat = pathlib.Path("/proc/self/stat").read_text()
        # Field 22, starttime, in clock ticks after boot; the command name
        # (field 2, in parentheses) may hold spaces, so count after its ")".
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
        return max(now - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux
        return None


def claim_startup_s() -> float:
    """The process's start-up (interpreter, imports, flags) for the first run it holds.

    A process starts once: when it runs several trainings (cross-validation
    folds, tests), the first one's timing holds the start-up and the others 0.
    """
    global _startup_claimed
    if _startup_claimed:
        return 0.0
    _startup_claimed = True
    return process_age_s() or 0.0


@contextlib.contextmanager
def cache_events():
    """Counts JAX's persistent-compilation-cache events ("cache_hits",
    "cache_misses", ...) inside the block, via jax.monitoring.

    Only this thread's: JAX records a compile's events on the thread that
    compiles, so a compile elsewhere in the process (another thread's) is not
    counted as this one's.
    """
    import jax.monitoring as monitoring

    counts: collections.Counter = collections.Counter()
    prefix = "/jax/compilation_cache/"
    thread = threading.get_ident()

    def listener(event: str, **kwargs) -> None:
        if event.startswith(prefix) and threading.get_ident() == thread:
            counts[event[len(prefix) :]] += 1

    monitoring.register_event_listener(listener)
    try:
        yield counts
    finally:
        unregister = getattr(monitoring, "unregister_event_listener", None)
        if unregister is not None:
            unregister(listener)


def cache_outcome(counts) -> str:
    """ "hit" (read from the persistent cache), "miss" (compiled and written),
    or "off" (no persistent cache in use)."""
    if counts.get("cache_hits"):
        return "hit"
    if counts.get("cache_misses"):
        return "miss"
    return "off"


def timed_lower(fn, *args) -> tuple:
    """``(lowered, seconds)`` of ``fn.lower(*args)`` (tracing; Python, holds the GIL)."""
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    return lowered, time.perf_counter() - t0


def timed_compile_lowered(lowered) -> tuple:
    """``(compiled, {"compile_s", "persistent_cache"})`` of ``lowered.compile()``."""
    with cache_events() as events:
        t0 = time.perf_counter()
        compiled = lowered.compile()
        t1 = time.perf_counter()
    return compiled, {"compile_s": t1 - t0, "persistent_cache": cache_outcome(events)}


def timed_compile(fn, *args) -> tuple:
    """``(lowered, compiled, {"lower_s", "compile_s", "persistent_cache"})``
    for a jitted ``fn``; persistent_cache: "hit" (a warm compile, read back
    from disk), "miss" (compiled cold) or "off"."""
    lowered, lower_s = timed_lower(fn, *args)
    compiled, times = timed_compile_lowered(lowered)
    return lowered, compiled, {"lower_s": lower_s, **times}


class Chrono:
    """A run's clock, started when created.

    startup_s: time the process spent before this run began (``claim_startup_s``);
      it is the summary's first phase and part of its wall time.
    """

    def __init__(self, warmup_steps: int = 3, *, startup_s: float = 0.0):
        self.warmup_steps = warmup_steps
        self.startup_s = startup_s
        self.compile_s: dict[str, dict[str, float]] = {}
        self.phases: dict[str, float] = {}
        self.input_wait_s: list[float] = []
        self._dispatch_times: list[float] = []
        self._open_phases: list[str] = []
        self.records: dict[str, object] = {}
        self._start = time.perf_counter()

    def elapsed_s(self) -> float:
        """Seconds since this clock was created (the run's own wall time so far)."""
        return time.perf_counter() - self._start

    def compile(self, name: str, jitted, *args):
        """Lowers and compiles `jitted` for `args`, timing both; returns the executable.

        Records whether the executable came from the persistent compilation
        cache ("persistent_cache": hit / miss / off): a hit is a warm compile.
        """
        _, compiled, self.compile_s[name] = timed_compile(jitted, *args)
        return compiled

    @contextlib.contextmanager
    def phase(self, name: str):
        """Adds the block's time to phase ``name`` (and takes it out of the enclosing phase)."""
        t0 = time.perf_counter()
        self._open_phases.append(name)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - t0
            self._open_phases.pop()
            self.phases[name] = self.phases.get(name, 0.0) + elapsed
            if self._open_phases:
                outer = self._open_phases[-1]
                self.phases[outer] = self.phases.get(outer, 0.0) - elapsed

    @contextlib.contextmanager
    def input_wait(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.input_wait_s.append(time.perf_counter() - t0)

    def record(self, name: str, value) -> None:
        """Adds a JSON-able section to the summary, e.g. the compute/collective
        breakdown: ``chrono.record("breakdown", breakdown.measure(...))``."""
        self.records[name] = value

    def step_dispatched(self) -> None:
        self._dispatch_times.append(time.perf_counter())

    def pause(self) -> None:
        """Marks a break in the steps (evaluation, checkpointing): the next
        interval would include it, so it is not counted as a step time."""
        if self._dispatch_times and self._dispatch_times[-1] is not None:
            self._dispatch_times.append(None)

    def step_times(self) -> np.ndarray:
        """Intervals between dispatches after warm-up (seconds)."""
        t = np.asarray(
            [np.nan if x is None else x for x in self._dispatch_times[self.warmup_steps :]], float
        )
        d = np.diff(t) if t.size > 1 else np.zeros(0)
        return d[np.isfinite(d)]

    def summary(self) -> dict:
        """JSON-able timing; ``wall_s`` is start-up plus this clock's time so far."""
        steps = self.step_times()
        wait = np.asarray(self.input_wait_s[self.warmup_steps :])

        def pct(a, q):
            return float(np.percentile(a, q)) if a.size else None

        wall = self.startup_s + self.elapsed_s()
        phases = {"startup": self.startup_s, **self.phases}
        phases["unattributed"] = wall - sum(phases.values())
        return {
            "wall_s": wall,
            "compile": self.compile_s,
            "phases_s": phases,
            "steps_timed": int(steps.size),
            "step_time_s": {"median": pct(steps, 50), "p10": pct(steps, 10), "p90": pct(steps, 90)},
            "input_wait_s": {
                "median": pct(wait, 50),
                "mean": float(wait.mean()) if wait.size else None,
                "p90": pct(wait, 90),
                "total": float(np.sum(self.input_wait_s)),
            },
            "steps_total": sum(x is not None for x in self._dispatch_times),
            **self.records,
        }
