"""Where synthetic sets live on disk, for bcjax.data.synthetic: the cache's folder,
key and lock, and the temporary folders of generations in progress.

A temporary folder's name says which host and process writes it, so that a
later generation can remove what a killed one left (``_remove_stale``);
``_exclusive`` makes two processes that want the same cached set take turns.
``cached`` itself, which generates, is in bcjax.data.synthetic.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import time

from bcjax import files
from bcjax.data import busi
from bcjax.data.busi import DATASET_DIRNAME, SYNTHETIC_MARKER
from bcjax.data.synthetic_draw import GENERATOR_VERSION, MAX_SIZE, MIN_SIZE

try:
    import fcntl  # POSIX; elsewhere a racing second generation replaces the first (atomically)
except ImportError:
    fcntl = None

# The public module's logger: its records keep the name they had before the split.
log = logging.getLogger("bcjax.data.synthetic")


# ----------------------------------------------------------------------------- temporary folders


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "localhost"


def _owned_prefix() -> str:
    """Start of this process's temporary folder names: the host and pid say
    who writes the folder, so a later run can tell a stale one from a live one."""
    return f".{DATASET_DIRNAME}.{_host()}.{os.getpid()}."


# Temporary set (mkdtemp's random part has no dots) or a replaced set awaiting removal.
_OWNED = re.compile(
    rf"\.{re.escape(DATASET_DIRNAME)}\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>[1-9][0-9]*)"
    r"\.(?:[a-z0-9_]+\.tmp|old)"
)


# A generation takes minutes at most; containers may share a host name but not
# pids, so a folder must also be this old before its dead-looking owner counts.
STALE_AFTER_S = 3600


def _remove_stale(out_dir: pathlib.Path, min_age_s: float = STALE_AFTER_S) -> None:
    """Removes the temporary folders that killed processes of this host left in out_dir.

    Other processes (those of a multi-process run) may be generating into the
    same out_dir right now: a folder is stale only when its pid runs no more
    and it was last changed over ``min_age_s`` ago (a process in another
    container with the same host name is invisible to os.kill). Folders named
    by another host (a shared file system) are its business and are left
    alone, as are names without an owner (made before owners were recorded).
    A pid reused since keeps its folder until that process ends: a leak,
    never a removal of live work.
    """
    host, now = _host(), time.time()
    for path in out_dir.glob(f".{DATASET_DIRNAME}.*"):
        m = _OWNED.fullmatch(path.name)
        if not m or m["host"] != host or not path.is_dir() or files.pid_alive(int(m["pid"])):
            continue
        try:
            if now - path.stat().st_mtime < min_age_s:
                continue
        except FileNotFoundError:  # removed meanwhile by another process
            continue
        shutil.rmtree(path, ignore_errors=True)  # another process may be removing it too
        if not path.exists():
            log.warning(
                "Removed %s, left by process %s (no longer running) of a killed generation.",
                path,
                m["pid"],
            )


# ------------------------------------------------------------------------- cache across workdirs


def default_cache_dir() -> pathlib.Path:
    """$BCJAX_CACHE_DIR/synthetic, else ~/.cache/bcjax/synthetic (see busi.default_cache_dir)."""
    return busi.default_cache_dir() / "synthetic"


def cache_key(
    num: int,
    seed: int,
    *,
    min_size: int = MIN_SIZE,
    max_size: int = MAX_SIZE,
    mark: str = "",
    mark_prob: float = 0.9,
    mark_placement: str = "malignant",
) -> str:
    """The set's folder name in the cache: "<num>-<seed>-v<generator version>[-<options>]"."""
    key = f"{num}-{seed}-v{GENERATOR_VERSION}"
    if (min_size, max_size) != (MIN_SIZE, MAX_SIZE):
        key += f"-{min_size}to{max_size}px"
    if mark:
        key += f"-{mark}{mark_prob:g}"
        if mark_placement != "malignant":
            key += f"-{mark_placement}"
    return key


@contextlib.contextmanager
def _exclusive(lock_path: pathlib.Path):
    """Holds an exclusive lock on ``lock_path`` (created if needed) while the block runs.

    The lock file stays: removing it would let a third process lock a new file
    while the second still holds the old one.
    """
    with open(lock_path, "a") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("Waiting for another process to finish generating %s ...", lock_path.stem)
                fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def _holds(folder: pathlib.Path, info: dict) -> bool:
    try:
        return json.loads((folder / SYNTHETIC_MARKER).read_text()) == info
    except (OSError, ValueError):
        return False
