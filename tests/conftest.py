"""Test set-up: 8 fake CPU devices, set before JAX is imported anywhere.

A persistent compilation cache shared by the whole session (fresh each run)
lets tests that build the same tiny step reuse one compile: on CI's 2 cores
compiling, not running, is what costs time. It is removed when the run ends.
"""

import atexit
import os
import shutil
import tempfile

import pytest
from PIL import Image

# Optimisation level 0 only lowers LLVM's effort on the generated CPU code:
# the tiny test programs compile ~20% faster and run the same operations.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "BCJAX_CACHE_DIR" not in os.environ:
    # Made by the first process (pytest-xdist's workers inherit it) and removed
    # by that process at exit, so a test run leaves no ~40 MB folder behind.
    _session_cache = tempfile.mkdtemp(prefix="bcjax-test-jit-cache-")
    os.environ["BCJAX_CACHE_DIR"] = _session_cache
    atexit.register(shutil.rmtree, _session_cache, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["BCJAX_CACHE_DIR"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture
def opens(monkeypatch):
    """Counts the image files PIL opens (every decode opens its file)."""
    counted = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        counted.append(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    return counted
