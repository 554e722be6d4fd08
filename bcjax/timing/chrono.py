"""Keeps a run's clock: compile apart from steps, input wait, phases.

Steps are not synchronised one by one (that would stall the pipeline of
asynchronous dispatch); in steady state the interval between two dispatches
equals the device's step time because the donated state makes each step wait
for the previous one. The synchronised measurement lives in bcjax.timing.breakdown.
"""
from __future__ import annotations

import collections
import contextlib
import time

import numpy as np


@contextlib.contextmanager
def cache_events():
    """Counts JAX's persistent-compilation-cache events ("cache_hits",
    "cache_misses", ...) inside the block, via jax.monitoring."""
    import jax.monitoring as monitoring

    counts: collections.Counter = collections.Counter()
    prefix = "/jax/compilation_cache/"

    def listener(event: str, **kwargs) -> None:
        if event.startswith(prefix):
            counts[event[len(prefix):]] += 1

    monitoring.register_event_listener(listener)
    try:
        yield counts
    finally:
        unregister = getattr(monitoring, "unregister_event_listener", None)
        if unregister is not None:
            unregister(listener)


def cache_outcome(counts) -> str:
    """"hit" (read from the persistent cache), "miss" (compiled and written),
    or "off" (no persistent cache in use)."""
    if counts.get("cache_hits"):
        return "hit"
    if counts.get("cache_misses"):
        return "miss"
    return "off"


def timed_compile(fn, *args) -> tuple:
    """``(lowered, compiled, {"lower_s", "compile_s", "persistent_cache"})``
    for a jitted ``fn``; persistent_cache: "hit" (a warm compile, read back
    from disk), "miss" (compiled cold) or "off"."""
    with cache_events() as events:
        t0 = time.perf_counter()
        lowered = fn.lower(*args)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    return lowered, compiled, {"lower_s": t1 - t0, "compile_s": t2 - t1,
                               "persistent_cache": cache_outcome(events)}


class Chrono:
    def __init__(self, warmup_steps: int = 3):
        self.warmup_steps = warmup_steps
        self.compile_s: dict[str, dict[str, float]] = {}
        self.phases: dict[str, float] = {}
        self.input_wait_s: list[float] = []
        self._dispatch_times: list[float] = []
        self.records: dict[str, object] = {}

    def compile(self, name: str, jitted, *args):
        """Lowers and compiles `jitted` for `args`, timing both; returns the executable.

        Records whether the executable came from the persistent compilation
        cache ("persistent_cache": hit / miss / off): a hit is a warm compile.
        """
        _, compiled, self.compile_s[name] = timed_compile(jitted, *args)
        return compiled

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0

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
        t = np.asarray([np.nan if x is None else x for x in self._dispatch_times[self.warmup_steps:]], float)
        d = np.diff(t) if t.size > 1 else np.zeros(0)
        return d[np.isfinite(d)]

    def summary(self) -> dict:
        steps = self.step_times()
        wait = np.asarray(self.input_wait_s[self.warmup_steps:])

        def pct(a, q):
            return float(np.percentile(a, q)) if a.size else None

        return {
            "compile": self.compile_s,
            "phases_s": self.phases,
            "steps_timed": int(steps.size),
            "step_time_s": {"median": pct(steps, 50), "p10": pct(steps, 10), "p90": pct(steps, 90)},
            "input_wait_s": {"median": pct(wait, 50), "mean": float(wait.mean()) if wait.size else None,
                             "p90": pct(wait, 90), "total": float(np.sum(self.input_wait_s))},
            "steps_total": sum(x is not None for x in self._dispatch_times),
            **self.records,
        }
