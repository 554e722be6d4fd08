"""One run per workdir at a time (bcjax.train.run_lock, taken by bcjax.main and by the loop).

The holders here are real processes, kept alive until the second start has been
refused, so the refusals are of two processes that overlapped.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from bcjax.train import run_lock

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Holds the workdir's lock as bcjax.main does, says so, and keeps it until stdin closes.
HOLDER = (
    "import sys\n"
    "from bcjax.train import run_lock\n"
    "with run_lock.hold(sys.argv[1], heartbeat_s=float(sys.argv[2])):\n"
    "    print('held', flush=True)\n"
    "    sys.stdin.readline()\n"
)


def start_holder(workdir, heartbeat_s=30.0):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(workdir), str(heartbeat_s)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def lock_record(workdir) -> dict:
    return json.loads((pathlib.Path(workdir) / run_lock.LOCK_NAME).read_text())


def bcjax_main(workdir, *overrides):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "bcjax.main",
            "--config=configs/quickstart.py",
            f"--workdir={workdir}",
            *overrides,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_bcjax_main_is_refused_naming_the_holder(tmp_path):
    holder = start_holder(tmp_path)
    try:
        record = lock_record(tmp_path)
        second = bcjax_main(tmp_path)
        # The holder was alive all through the second start: the two overlapped.
        assert holder.poll() is None
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert second.returncode != 0
    err = second.stderr
    assert "in use by another bcjax run" in err and "Traceback" not in err
    assert f"PID {holder.pid} on host {socket.gethostname()}" in err
    assert f"started {record['started']}" in err
    # Refused before it touched the run: only the holder's lock was ever there.
    assert not [p.name for p in tmp_path.iterdir() if p.name != run_lock.LOCK_NAME]
    assert holder.returncode == 0
    assert not (tmp_path / run_lock.LOCK_NAME).exists()  # released on exit


def test_after_sigkill_of_the_holder_the_next_start_proceeds(tmp_path):
    holder = start_holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert lock_record(tmp_path)["pid"] == holder.pid  # left behind: a kill runs no cleanup
    # The next run takes the stale lock over and gets as far as its data (which is
    # missing here, so it stops there with a data error instead of training).
    missing = tmp_path / "no-such-busi"
    run = bcjax_main(tmp_path, "--config.dataset=busi", f"--config.data_dir={missing}")
    assert run.returncode != 0
    assert "in use by another bcjax run" not in run.stderr
    assert f"Taking over the lock {tmp_path / run_lock.LOCK_NAME}" in run.stderr
    assert str(missing) in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / run_lock.LOCK_NAME).exists()  # released on its exit


# Holds two workdirs' locks, nested, as a cross-validation study does.
NESTED_HOLDER = (
    "import sys\n"
    "from bcjax.train import run_lock\n"
    "with run_lock.hold(sys.argv[1]), run_lock.hold(sys.argv[2]):\n"
    "    print('held', flush=True)\n"
    "    sys.stdin.readline()\n"
)


def test_sigterm_releases_every_lock(tmp_path):
    first, second = tmp_path / "study", tmp_path / "study" / "fold_0"
    holder = subprocess.Popen(
        [sys.executable, "-c", NESTED_HOLDER, str(first), str(second)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    assert (first / run_lock.LOCK_NAME).exists() and (second / run_lock.LOCK_NAME).exists()
    holder.send_signal(signal.SIGTERM)
    assert holder.wait(timeout=60) == -signal.SIGTERM  # still ends as SIGTERM ends a process
    assert not list(tmp_path.rglob(run_lock.LOCK_NAME))


def write_lock(workdir, **fields) -> pathlib.Path:
    record = {**run_lock.this_process(), **fields}
    path = pathlib.Path(workdir) / run_lock.LOCK_NAME
    path.write_text(json.dumps(record))
    return path


def test_a_lock_of_a_dead_pid_is_taken_over(tmp_path, caplog):
    pid = dead_pid()
    write_lock(tmp_path, pid=pid, process_start_ticks=None)
    with run_lock.hold(tmp_path):
        assert lock_record(tmp_path)["pid"] == os.getpid()
    assert f"its process {pid} is gone" in caplog.text
    assert not (tmp_path / run_lock.LOCK_NAME).exists()


def test_a_reused_pid_is_told_apart_by_its_start_time(tmp_path):
    parent = os.getppid()  # alive for the whole test
    started = run_lock.process_start_ticks(parent)
    if started is None:
        pytest.skip("no /proc: process start times are Linux's")
    write_lock(tmp_path, pid=parent, process_start_ticks=started + 1)
    with run_lock.hold(tmp_path):  # the recorded process is not the one with that PID now
        pass
    write_lock(tmp_path, pid=parent, process_start_ticks=started, started="2026-01-02T03:04:05")
    with pytest.raises(run_lock.WorkdirLockedError) as refused:
        run_lock.RunLock(tmp_path).acquire()
    message = str(refused.value)
    assert f"PID {parent} on host {socket.gethostname()}" in message
    assert "started 2026-01-02T03:04:05" in message


def test_another_hosts_lock_is_stale_only_without_heartbeat(tmp_path):
    path = write_lock(tmp_path, host="elsewhere.example", boot_id="other", pid=1)
    with pytest.raises(run_lock.WorkdirLockedError, match="PID 1 on host elsewhere.example"):
        run_lock.RunLock(tmp_path).acquire()
    old = time.time() - run_lock.STALE_AFTER_S - 60
    os.utime(path, (old, old))
    with run_lock.hold(tmp_path):
        assert lock_record(tmp_path)["host"] == socket.gethostname()


def test_an_unreadable_lock_is_stale_only_when_old(tmp_path):
    path = tmp_path / run_lock.LOCK_NAME
    path.write_text('{"host": "tor')  # its writer was killed mid-way, or is writing it now
    with pytest.raises(run_lock.WorkdirLockedError, match="cannot be read"):
        run_lock.RunLock(tmp_path).acquire()
    old = time.time() - run_lock.STALE_AFTER_S - 60
    os.utime(path, (old, old))
    with run_lock.hold(tmp_path):
        assert lock_record(tmp_path)["pid"] == os.getpid()


def test_the_holder_keeps_its_heartbeat(tmp_path):
    with run_lock.hold(tmp_path, heartbeat_s=0.05) as lock:
        old = time.time() - 3600
        os.utime(lock.path, (old, old))
        deadline = time.time() + 30
        while lock.path.stat().st_mtime < old + 1800 and time.time() < deadline:
            time.sleep(0.05)
        assert lock.path.stat().st_mtime > old + 1800


def test_release_leaves_another_runs_lock_alone(tmp_path):
    lock = run_lock.RunLock(tmp_path).acquire()
    lock.path.unlink()
    other = write_lock(tmp_path, token="someone-else")
    lock.release()
    assert json.loads(other.read_text())["token"] == "someone-else"


def test_of_several_takers_of_one_stale_lock_exactly_one_wins(tmp_path):
    write_lock(tmp_path, pid=dead_pid(), process_start_ticks=None)
    barrier = threading.Barrier(6)
    outcomes, held = [], []

    def take():
        lock = run_lock.RunLock(tmp_path, heartbeat_s=3600)
        barrier.wait()
        try:
            held.append(lock.acquire())
            outcomes.append("won")
        except run_lock.WorkdirLockedError:
            outcomes.append("refused")

    threads = [threading.Thread(target=take) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["refused"] * 5 + ["won"]
    assert lock_record(tmp_path)["token"] == held[0].record["token"]
    held[0].release()


def test_an_unwritable_workdir_is_a_lock_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(run_lock.RunLockError, match="cannot create the run's lock"):
        run_lock.RunLock(blocker / "workdir").acquire()


# ------------------------------------------------- bcjax.main's use of the lock


def main_lock(config, workdir):
    """The locks bcjax.main takes for ``config``, held until the returned stack closes."""
    import contextlib

    from bcjax import main

    with contextlib.ExitStack() as stack:  # a refusal releases what was taken
        main._lock_workdir(stack, config, workdir)
        return stack.pop_all()


def test_fold_jobs_share_a_study_workdir_but_not_a_fold(tmp_path):
    from ml_collections import ConfigDict

    def cv(fold):
        return ConfigDict({"cv": {"folds": 3, "fold": fold}})

    with main_lock(cv(2), tmp_path):
        assert lock_record(tmp_path / "fold_2")["pid"] == os.getpid()
        assert not (tmp_path / run_lock.LOCK_NAME).exists()
        with main_lock(cv(1), tmp_path):  # another fold's job, beside it
            assert (tmp_path / "fold_1" / run_lock.LOCK_NAME).exists()
            # A whole study would train folds 1 and 2 too: refused, and it leaves no lock.
            with pytest.raises(run_lock.WorkdirLockedError, match="fold_1 is in use"):
                main_lock(cv(-1), tmp_path)
            assert not (tmp_path / "fold_0" / run_lock.LOCK_NAME).exists()
    with main_lock(cv(-1), tmp_path):
        held = sorted(p.parent.name for p in tmp_path.rglob(run_lock.LOCK_NAME))
        assert held == ["fold_0", "fold_1", "fold_2", tmp_path.name]
        with pytest.raises(run_lock.WorkdirLockedError, match="fold_0 is in use"):
            main_lock(cv(0), tmp_path)
    assert not list(tmp_path.rglob(run_lock.LOCK_NAME))


def test_only_process_0_locks_and_its_refusal_ends_every_process(tmp_path, monkeypatch):
    import jax
    from jax.experimental import multihost_utils
    from ml_collections import ConfigDict

    config = ConfigDict({"cv": {"folds": 0, "fold": -1}})
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    # What process 0 broadcasts: 0, it holds the lock; 1, it was refused.
    broadcast = {"value": 0}
    monkeypatch.setattr(
        multihost_utils, "broadcast_one_to_all", lambda x: np.int32(broadcast["value"])
    )
    with main_lock(config, tmp_path):
        assert not (tmp_path / run_lock.LOCK_NAME).exists()  # process 1 takes no lock
    broadcast["value"] = 1
    with pytest.raises(run_lock.RunLockError, match="process 0 could not lock"):
        main_lock(config, tmp_path)


# ------------------------------------------------- the loop's own hold (notebooks)


def test_a_reentering_hold_is_the_outer_one_on_its_thread_only(tmp_path):
    with run_lock.hold(tmp_path) as outer:
        token = lock_record(tmp_path)["token"]
        with run_lock.hold(tmp_path, reenter=True) as inner:
            assert inner is outer
        # The inner block left the outer's lock in place.
        assert lock_record(tmp_path)["token"] == token and outer.holds()
        with pytest.raises(run_lock.WorkdirLockedError):  # without reenter: refused as before
            with run_lock.hold(tmp_path):
                pass
        refused = []

        def other_thread():
            try:
                with run_lock.hold(tmp_path, reenter=True):
                    refused.append(False)
            except run_lock.WorkdirLockedError:
                refused.append(True)

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert refused == [True]  # another thread of this process is another run
        assert lock_record(tmp_path)["token"] == token
    assert not (tmp_path / run_lock.LOCK_NAME).exists()


def test_train_and_evaluate_from_python_is_refused_while_another_run_holds_the_workdir(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from _tiny import tiny_config

    from bcjax.train import loop

    holder = start_holder(tmp_path)
    try:
        with pytest.raises(run_lock.WorkdirLockedError) as refused:
            loop.train_and_evaluate(tiny_config(tmp_path / "no-data"), tmp_path)
        assert holder.poll() is None  # the holder lived through the refusal: they overlapped
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert f"PID {holder.pid} on host {socket.gethostname()}" in str(refused.value)
    # Refused before set-up touched the workdir.
    assert not [p.name for p in tmp_path.iterdir() if p.name != run_lock.LOCK_NAME]


def test_a_whole_study_from_python_holds_the_study_workdir(tmp_path):
    # cv.run_cross_validation locks the study's workdir itself, as bcjax.main does, so a
    # notebook's second whole study on it is refused; a one-fold job is not (it locks its fold).
    sys.path.insert(0, str(ROOT / "tests"))
    from _tiny import tiny_config

    from bcjax import cv
    from bcjax.data import BusiError

    config = tiny_config(tmp_path / "no-data")
    config.cv.folds, config.cv.fold = 3, -1
    holder = start_holder(tmp_path)
    try:
        with pytest.raises(run_lock.WorkdirLockedError) as refused:
            cv.run_cross_validation(config, tmp_path)
        assert holder.poll() is None  # the holder lived through the refusal: they overlapped
        # Refused before anything was read or written: no plan, no fold folder.
        assert [p.name for p in tmp_path.iterdir()] == [run_lock.LOCK_NAME]
        # A one-fold job gets past the study's lock, to the data (which is missing here).
        config.cv.fold = 1
        with pytest.raises(BusiError, match="no BUSI data was found"):
            cv.run_cross_validation(config, tmp_path)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert f"PID {holder.pid} on host {socket.gethostname()}" in str(refused.value)
