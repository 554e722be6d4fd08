"""One run per workdir at a time: a lock file in the workdir, held while a run lives.

    with run_lock.hold(workdir):
        ...

``bcjax.train.loop.train_and_evaluate`` holds it (on process 0) for every run,
whoever calls it; ``bcjax.main`` takes it earlier, before the training stack
is imported, so a second run is refused in seconds; the loop's hold
(``reenter=True``) is then main's, not a second lock.

A second run on the same workdir is refused at once (``WorkdirLockedError``,
naming the holder's host, PID and start time), instead of both writing into
it: interleaved metrics.jsonl, mixed checkpoints, whichever results.json came
last.

No ``flock``: on network filesystems (NFS, Lustre, GPFS) it may be a no-op or
local to one host. The lock is ``WORKDIR/.bcjax-run.lock``, created with
``O_CREAT | O_EXCL`` (atomic wherever a workdir is shared) and holding the
holder's host, boot id, PID, process start time and a random token. It is
removed when the holder exits (also on SIGTERM and SIGHUP, which are then
re-raised). A holder that could not remove it (SIGKILL, a power cut) leaves a
stale lock, which the next run takes over:

- same host (same host name and boot id): stale when the PID is gone or now
  belongs to a process that started at another time (PID reuse);
- another host: stale when the file's mtime, which a daemon thread of the
  holder refreshes every ``HEARTBEAT_S`` seconds, is older than
  ``STALE_AFTER_S`` (measured on the filesystem's own clock, so clock skew
  between hosts does not count). A run killed on one host therefore holds the
  workdir from another host for up to ``STALE_AFTER_S``.

Taking over is guarded by a second file created with ``O_EXCL``, so of two
processes finding the same stale lock only one removes it; the lock itself is
then created with ``O_EXCL`` as usual.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import pathlib
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

from bcjax import files

log = logging.getLogger(__name__)

LOCK_NAME = ".bcjax-run.lock"
# The holder touches its lock this often; another host's lock is stale after
# STALE_AFTER_S without a touch. Ten beats of margin: NFS caches attributes
# for up to a minute, and a loaded host may miss a beat.
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
# A takeover guard older than this was left by a process killed while taking
# over (which takes milliseconds); it is removed.
GUARD_STALE_S = 60.0


# This process's locks, by lock file: (the lock, the thread that holds it).
_HELD: dict[pathlib.Path, tuple[RunLock, int]] = {}
_HELD_GUARD = threading.Lock()


class RunLockError(RuntimeError):
    """The workdir cannot be locked for this run."""


class WorkdirLockedError(RunLockError):
    """Another live run holds the workdir."""


# ----------------------------------------------------------- who holds it


def _boot_id() -> str | None:
    try:
        return pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # not Linux
        return None


def process_start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks after boot (Linux), else None.

    With the PID it names one process: a PID reused by a later process has
    another start time."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
        # Field 22; the command name (field 2, in parentheses) may hold spaces.
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def this_process() -> dict:
    """The record this process writes into the lock."""
    now = time.time()
    return {
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid": os.getpid(),
        "process_start_ticks": process_start_ticks(os.getpid()),
        "started": datetime.datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds"),
        "started_unix": now,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv])[:500],
        "token": secrets.token_hex(8),
    }


def describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "a process whose lock cannot be read (torn, or being written)"
    return (
        f"PID {holder.get('pid')} on host {holder.get('host')}, "
        f"started {holder.get('started')}"
        + (f" ({holder['command']})" if holder.get("command") else "")
    )


def _read(path: pathlib.Path) -> dict | None:
    """The holder record, None if there is no lock; {} if it cannot be parsed
    (being written right now, or torn)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _filesystem_now(folder: pathlib.Path) -> float:
    """The current time on the clock that stamps files in ``folder``: on a
    network filesystem the server's, which stamped the holder's heartbeat too."""
    fd, probe = tempfile.mkstemp(prefix=".bcjax-clock-", dir=folder)
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        os.unlink(probe)


def stale_reason(path: pathlib.Path, holder: dict) -> str | None:
    """Why the lock at ``path`` (holding ``holder``) is stale; None while it is held."""
    same_host = holder.get("host") == socket.gethostname()
    boot_id = holder.get("boot_id")
    if same_host and (boot_id is None or boot_id == _boot_id()) and holder.get("pid"):
        pid = int(holder["pid"])
        if not files.pid_alive(pid):
            return f"its process {pid} is gone"
        recorded, now = holder.get("process_start_ticks"), process_start_ticks(pid)
        if recorded is not None and now is not None:
            return None if recorded == now else f"PID {pid} now belongs to another process"
        # No /proc to tell a reused PID apart: the heartbeat decides, as for another host.
    try:
        age = _filesystem_now(path.parent) - path.stat().st_mtime
    except FileNotFoundError:
        return "it was removed"
    if age > STALE_AFTER_S:
        return f"no heartbeat for {age:.0f} s (stale after {STALE_AFTER_S:.0f} s)"
    return None


# ----------------------------------------------------------- the lock


def _create(path: pathlib.Path, record: dict) -> bool:
    """Creates the lock holding ``record``; False if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    except OSError:  # a full disk, say: leave no torn lock behind
        path.unlink(missing_ok=True)
        raise
    return True


def _take_over(path: pathlib.Path, stale: dict, reason: str) -> None:
    """Removes the stale lock, unless another process has replaced it since it was read."""
    guard = path.with_name(path.name + ".takeover")
    try:
        os.close(os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        try:
            if _filesystem_now(path.parent) - guard.stat().st_mtime > GUARD_STALE_S:
                guard.unlink(missing_ok=True)  # left by a taker killed mid-way; next try
        except FileNotFoundError:
            pass
        return  # another process is taking over; the caller tries again
    try:
        current = _read(path)
        if current is not None and current.get("token") == stale.get("token"):
            log.warning("Taking over the lock %s of %s: %s.", path, describe(stale), reason)
            path.unlink(missing_ok=True)
    finally:
        guard.unlink(missing_ok=True)


class RunLock:
    """The lock of one workdir, held by this process from ``acquire`` to ``release``."""

    def __init__(self, workdir, *, heartbeat_s: float = HEARTBEAT_S):
        self.path = pathlib.Path(workdir).expanduser().resolve() / LOCK_NAME
        self.heartbeat_s = heartbeat_s
        self.record: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, attempts: int = 5) -> RunLock:
        """Takes the lock (a stale one is taken over); WorkdirLockedError if a live run has it."""
        record = this_process()
        for attempt in range(attempts):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                created = _create(self.path, record)
            except OSError as e:
                raise RunLockError(
                    f"cannot create the run's lock {self.path}: {e.strerror or e}."
                ) from e
            if created:
                self.record = record
                self._start_heartbeat()
                return self
            holder = _read(self.path)
            if holder is None:  # released between our create and read: try again
                continue
            if not holder:  # being written by its creator this instant, or torn by a kill
                time.sleep(0.05 * (attempt + 1))
                holder = _read(self.path)
                if holder is None:
                    continue
            # An unreadable lock names no process: its age alone decides.
            reason = stale_reason(self.path, holder)
            if reason is None:
                raise WorkdirLockedError(self._refusal(holder))
            _take_over(self.path, holder, reason)
            time.sleep(0.01 * attempt)  # another taker may be mid-way: let it finish
        raise WorkdirLockedError(
            f"could not lock {self.path.parent} in {attempts} attempts: other processes are "
            f"taking it at the same time (lock file {self.path})."
        )

    def _refusal(self, holder: dict) -> str:
        return (
            f"the workdir {self.path.parent} is in use by another bcjax run: "
            f"{describe(holder)}. Wait for it to end or stop it; two runs in one workdir would "
            f"write over each other. If it is no longer running, its lock ({self.path}) is "
            f"taken over at once on the same host, or {STALE_AFTER_S:.0f} s after its last "
            "heartbeat from another host."
        )

    def holds(self) -> bool:
        current = _read(self.path)
        return bool(self.record and current and current.get("token") == self.record["token"])

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._beat, name=f"bcjax-lock-heartbeat {self.path}", daemon=True
        )
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.holds():
                    log.warning("%s is no longer this run's lock; not refreshing it.", self.path)
                    return
                os.utime(self.path)
            except OSError as e:  # a filesystem hiccup: the next beat tries again
                log.debug("heartbeat of %s failed: %s", self.path, e)

    def release(self) -> None:
        """Removes the lock if it is still this process's (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        if self.record is not None and self.holds():
            self.path.unlink(missing_ok=True)
        self.record = None


@contextlib.contextmanager
def _released_on_termination(lock: RunLock) -> Iterator[None]:
    """SIGTERM/SIGHUP remove the lock, then end the process as they would have.

    Only where the signal ends the process: its default action, or the handler
    of an enclosing ``hold`` (which releases its own lock next). Another handler
    (a graceful stop, say) is left alone: the process may well go on running.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        lock.release()
        before = previous[signum]
        if getattr(before, "releases_run_lock", False):
            before(signum, frame)
        else:
            signal.signal(signum, before)
            os.kill(os.getpid(), signum)

    handler.releases_run_lock = True
    previous = {}
    for name in ("SIGTERM", "SIGHUP"):  # no SIGHUP on Windows
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        current = signal.getsignal(signum)
        if current == signal.SIG_DFL or getattr(current, "releases_run_lock", False):
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextlib.contextmanager
def hold(workdir, *, heartbeat_s: float = HEARTBEAT_S, reenter: bool = False) -> Iterator[RunLock]:
    """Holds the workdir's lock for the block; refuses (WorkdirLockedError) if a live run has it.

    reenter: inside a hold of the same workdir on the same thread (bcjax.main's,
    around the loop's), use that lock and leave it to the outer block. Without it,
    and from any other thread, this process's own lock refuses as another's would."""
    lock = RunLock(workdir, heartbeat_s=heartbeat_s)
    thread = threading.get_ident()
    with _HELD_GUARD:
        outer = _HELD.get(lock.path)
    if reenter and outer is not None and outer[1] == thread:
        yield outer[0]
        return
    lock.acquire()
    with _HELD_GUARD:
        _HELD[lock.path] = (lock, thread)
    try:
        with _released_on_termination(lock):
            yield lock
    finally:
        with _HELD_GUARD:
            _HELD.pop(lock.path, None)
        lock.release()


@contextlib.contextmanager
def hold_on_process_0(folders, *, reenter: bool = False) -> Iterator[None]:
    """Process 0 holds every folder's lock for the block (``hold``, in order, with ``reenter``).

    The other processes of a multi-process run learn whether it got them, so a
    refused run ends on every process at once (RunLockError everywhere)."""
    import jax  # started by the caller already (bcjax.runtime or the loop)

    with contextlib.ExitStack() as stack:
        refusal = None
        if jax.process_index() == 0:
            try:
                for folder in folders:
                    stack.enter_context(hold(folder, reenter=reenter))
            except RunLockError as e:
                refusal = e
        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils

            refused = multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))
            if int(refused) and refusal is None:
                refusal = RunLockError(
                    f"process 0 could not lock {', '.join(map(str, folders))} (its log says why)."
                )
        if refusal is not None:
            raise refusal
        yield
