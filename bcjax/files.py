"""One home for writing files so that a crash never leaves half of one.

Every output file of bcjax goes through here: the content is written to a
temporary file in the target's own folder (same filesystem, so the rename is
atomic) and renamed over the target only when complete. A reader, or the next
run after a kill, sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

__all__ = ["atomic_dir", "atomic_file", "pid_alive", "save_npz", "write_json", "write_text"]


def _new_file_mode() -> int:
    # mkstemp creates files readable by the owner only; an output file should
    # get the mode any new file gets (0666 less the umask). Reading the umask
    # means setting it, so set it straight back.
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_file(path, mode: str = "w", **open_kwargs) -> Iterator[Any]:
    """Opens a temp file beside ``path``; on a clean exit it replaces ``path``."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:  # a replaced file keeps its mode; a new one gets the usual one
            os.fchmod(fd, path.stat().st_mode & 0o7777)
        except FileNotFoundError:
            os.fchmod(fd, _new_file_mode())
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(obj, path, *, default=None) -> pathlib.Path:
    """``obj`` as indented JSON; ``default`` as json.dump's, for types JSON lacks."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=1, default=default)
        f.write("\n")
    return pathlib.Path(path)


def write_text(text: str, path) -> pathlib.Path:
    with atomic_file(path) as f:
        f.write(text)
    return pathlib.Path(path)


def save_npz(path, **arrays) -> pathlib.Path:
    import numpy as np  # a light module otherwise: only array writers pay for numpy

    with atomic_file(path, "wb") as f:
        np.savez(f, **arrays)
    return pathlib.Path(path)


@contextlib.contextmanager
def atomic_dir(
    target, *, prefix: str | None = None, replace: bool = False
) -> Iterator[pathlib.Path]:
    """Yields an empty temp folder beside ``target``; on a clean exit it becomes ``target``.

    When ``target`` appeared meanwhile (another process won a race), the
    existing one is kept unless ``replace``, in which case it is swapped out
    and removed. ``prefix`` names the temp folder (so stale ones can be found).
    """
    target = pathlib.Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = prefix or f".{target.name}."
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.exists() and replace:
            old = target.parent / f"{prefix}old"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, target)
            except OSError:
                if not target.is_dir():  # lost a race to another process: theirs is as good
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (signal 0 only checks): whether
    the writer of a leftover file (a lock, a half-written folder) may still be at work."""
    if os.name != "posix":  # os.kill would end the process on Windows: assume it lives
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
