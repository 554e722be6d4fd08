"""What a user sees while a run trains (bcjax.train.console), driven by made-up times:
no training, no wall clock."""

import io
import logging

import pytest

from bcjax.train import console as console_lib


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _console(clock, *, tty, first_step=0, total_steps=800, steps_per_epoch=8, platform="cpu"):
    stream = io.StringIO()
    console = console_lib.Console(
        first_step=first_step,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        platform=platform,
        clock=clock,
        stream=stream,
        tty=tty,
    )
    return console, stream


def _record(epoch, epoch_time_s=104.0, val=True):
    record = {"epoch": epoch, "train": {"loss": 0.9, "accuracy": 0.5}, "epoch_time_s": epoch_time_s}
    if val:
        record["val"] = {"loss": 1.0, "accuracy": 0.4, "macro_f1": 0.3}
    return record


def _train(console, clock, steps, seconds_per_step, start=1):
    for step in range(start, start + steps):
        clock.now += seconds_per_step
        console.step(step)


def test_epoch_lines_carry_the_run_eta_and_the_estimate_comes_once(caplog):
    clock = FakeClock()
    console, stream = _console(clock, tty=False)
    caplog.set_level(logging.INFO, logger=console_lib.__name__)
    console.start()
    _train(console, clock, 8, 13.0)  # the design card's CPU run: 8 steps of 13 s per epoch
    line = console.epoch(_record(1), 8)
    # 792 steps left at 13 s: 2h51m36s.
    assert line.startswith("epoch 1/100: train loss 0.9000 acc 0.500 | val loss 1.0000")
    assert line.endswith("(104.0 s, ETA 2h51m)")
    estimates = [r.getMessage() for r in caplog.records if "Estimated run time" in r.getMessage()]
    assert len(estimates) == 1 and "about 2h53m for 800 steps" in estimates[0]
    # More than 15 minutes on a CPU: the quickstart config is suggested, once.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "configs/quickstart.py" in warnings[0]
    _train(console, clock, 8, 13.0, start=9)
    console.epoch(_record(2), 16)
    assert sum("Estimated" in r.getMessage() for r in caplog.records) == 1
    assert stream.getvalue() == ""  # not a terminal: no bar, only log lines


def test_a_short_run_or_an_accelerator_gets_no_quickstart_hint(caplog):
    for platform, per_step in (("cpu", 0.5), ("gpu", 13.0)):
        caplog.clear()
        clock = FakeClock()
        console, _ = _console(clock, tty=False, platform=platform, total_steps=80)
        caplog.set_level(logging.INFO, logger=console_lib.__name__)
        console.start()
        _train(console, clock, 8, per_step)
        assert any("Estimated run time" in r.getMessage() for r in caplog.records), platform
        assert not any(r.levelno == logging.WARNING for r in caplog.records), platform


def test_a_bar_only_on_a_terminal_and_only_inside_long_epochs():
    clock = FakeClock()
    console, stream = _console(clock, tty=True)
    console.start()
    _train(console, clock, 3, 3.0)  # 9 s into the epoch: below the 10 s threshold
    assert stream.getvalue() == ""
    _train(console, clock, 1, 3.0, start=4)  # 12 s: the bar appears, step 4 of 8
    bar = stream.getvalue()
    assert bar.startswith("\r  epoch 1/100 [") and "4/8" in bar and "ETA" in bar
    clock.now += 0.1
    console.step(5)  # within bar_every_s of the last draw: not redrawn
    assert stream.getvalue() == bar
    _train(console, clock, 3, 3.0, start=6)
    console.epoch(_record(1), 8)
    assert stream.getvalue().endswith("\r\x1b[K")  # the bar's line is cleared for the epoch line
    # A short epoch (the next one, timed from the epoch's end) shows no bar.
    drawn = stream.getvalue()
    _train(console, clock, 7, 1.0, start=9)
    assert stream.getvalue() == drawn


def test_resumed_run_counts_its_eta_from_where_it_resumed():
    clock = FakeClock()
    console, _ = _console(clock, tty=False, first_step=400)
    console.start()
    assert console.eta_s(400) is None  # nothing timed yet
    _train(console, clock, 8, 2.0, start=401)
    assert console.eta_s(408) == pytest.approx(392 * 2.0)


def test_last_epoch_line_has_no_eta_and_other_processes_log_nothing(caplog):
    clock = FakeClock()
    console, _ = _console(clock, tty=False, total_steps=16)
    console.start()
    _train(console, clock, 16, 1.0)
    assert "ETA" not in console.epoch(_record(2, val=False), 16)
    assert console.epoch(_record(2, val=False), 16).endswith("(104.0 s)")
    quiet, stream = _console(FakeClock(), tty=True)
    quiet.enabled = False
    caplog.clear()
    caplog.set_level(logging.INFO, logger=console_lib.__name__)
    quiet.start()
    _train(quiet, quiet.clock, 16, 5.0)
    quiet.epoch(_record(1), 8)
    assert not caplog.records and stream.getvalue() == ""


def test_heartbeat_speaks_every_period_while_a_compile_runs():
    beat = console_lib.Heartbeat("compiling the train step", started=100.0, every_s=30.0)
    assert beat.tick(110.0) is None
    assert beat.tick(131.0) == "... still compiling the train step (31s)"
    assert beat.tick(150.0) is None  # the next one is due 30 s after the last
    assert beat.tick(195.0) == "... still compiling the train step (1m35s)"


def test_announced_says_what_runs(caplog):
    caplog.set_level(logging.INFO, logger=console_lib.__name__)
    with console_lib.announced("compiling the train step", every_s=30.0):
        pass
    assert [r.getMessage() for r in caplog.records] == ["Compiling the train step ..."]
    caplog.clear()
    with console_lib.announced("compiling the train step", enabled=False):
        pass
    assert not caplog.records


def test_not_on_a_terminal_long_epochs_log_a_line_every_few_steps_short_ones_do_not(caplog):
    clock = FakeClock()
    stream = io.StringIO()
    console = console_lib.Console(
        first_step=0,
        total_steps=200,
        steps_per_epoch=40,
        platform="gpu",
        clock=clock,
        stream=stream,
        tty=False,
        log_every_steps=10,
    )
    caplog.set_level(logging.INFO, logger=console_lib.__name__)
    console.start()

    def step_lines():
        return [r.getMessage() for r in caplog.records if " step " in r.getMessage()]

    _train(console, clock, 40, 0.1)  # a 4 s epoch: only its own line
    console.epoch(_record(1), 40)
    assert step_lines() == []
    _train(console, clock, 39, 1.0, start=41)  # a 40 s epoch: steps 50, 60, 70 past 10 s
    # ETA = time so far / steps done x steps left: 14/50 x 150, 24/60 x 140, 34/70 x 130.
    assert step_lines() == [
        "  epoch 2/5 step 50/200  ETA 42s",
        "  epoch 2/5 step 60/200  ETA 56s",
        "  epoch 2/5 step 70/200  ETA 1m03s",
    ]
    assert stream.getvalue() == ""  # no bar off a terminal
