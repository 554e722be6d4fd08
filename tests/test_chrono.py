"""bcjax.timing.chrono: phases add up to the wall time (made-up times, no training)."""

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


def test_the_start_up_is_counted_once_per_process():
    age = chrono_lib.process_age_s()
    assert age is None or age > 0  # None off Linux
    chrono_lib.claim_startup_s()  # whoever ran first in this process has claimed it
    assert chrono_lib.claim_startup_s() == 0.0
