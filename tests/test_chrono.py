"""bcjax.timing.chrono: phases add up to the wall time (made-up times, no training)."""

import os
import subprocess
import sys
import time

import pytest

from bcjax.timing import chrono as chrono_lib


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def test_nested_phases_are_exclusive_and_the_rest_is_unattributed(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(chrono_lib.time, "perf_counter", clock)
    chrono = chrono_lib.Chrono(startup_s=2.0)
    with chrono.phase("train"):
        clock.advance(3.0)
        with chrono.phase("eval"):  # inside training, counted once: as eval
            clock.advance(2.0)
    clock.advance(0.5)  # in no phase
    with chrono.phase("train"):
        clock.advance(1.0)
    summary = chrono.summary()
    assert summary["wall_s"] == pytest.approx(2.0 + 6.5)
    assert summary["phases_s"] == pytest.approx(
        {"startup": 2.0, "train": 4.0, "eval": 2.0, "unattributed": 0.5}
    )
    assert list(summary["phases_s"])[0] == "startup"


def test_process_age_is_bounded_by_what_the_parent_saw():
    # A child that sleeps 1 s, then reads its own age: at least that second, and no
    # more than the parent measured from before starting it to after it ended
    # (plus one clock tick, the resolution of /proc's start time).
    if chrono_lib.process_age_s() is None:
        pytest.skip("no /proc: the process age is Linux's")
    code = (
        "import time\n"
        "time.sleep(1.0)\n"
        "from bcjax.timing import chrono\n"
        "print(chrono.process_age_s(), chrono.claim_startup_s(), chrono.claim_startup_s())\n"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    parent_saw = time.perf_counter() - t0
    age, first_claim, second_claim = (float(x) for x in out.stdout.split())
    tick = 1 / os.sysconf("SC_CLK_TCK")
    assert 1.0 <= age <= parent_saw + tick
    # The first run of a process holds its start-up, later ones (folds, tests) none.
    assert age <= first_claim <= parent_saw + tick and second_claim == 0.0


def test_step_times_drop_the_warm_up_and_the_pauses(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(chrono_lib.time, "perf_counter", clock)
    chrono = chrono_lib.Chrono(warmup_steps=2)
    for gap in (5.0, 3.0, 0.1, 0.2, 0.3):  # two warm-up steps (compile), then steady ones
        clock.advance(gap)
        chrono.step_dispatched()
    chrono.pause()  # evaluation: the interval across it is no step
    clock.advance(9.0)
    chrono.step_dispatched()
    clock.advance(0.4)
    chrono.step_dispatched()
    assert chrono.step_times() == pytest.approx([0.2, 0.3, 0.4])
    summary = chrono.summary()
    assert summary["steps_timed"] == 3 and summary["steps_total"] == 7
    assert summary["step_time_s"]["median"] == pytest.approx(0.3)
