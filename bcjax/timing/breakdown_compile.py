"""Cold and warm compile times of a train step with a persistent compilation
cache (``compile_cold_warm``), for ``bcjax.timing.breakdown.measure``'s
``compile_cache`` option; importable from ``bcjax.timing.breakdown`` too.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Mapping

import jax

from bcjax.timing.chrono import timed_compile


@contextlib.contextmanager
def _fresh_persistent_cache(path: str):
    """A persistent compilation cache in ``path`` for the duration, then the
    previous settings back. In-memory caches are cleared on the way in, so the
    first compile inside is cold."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {k: jax.config.values.get(k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()
    jax.clear_caches()
    try:
        yield
    finally:
        for k, v in old.items():
            jax.config.update(k, v)
        cc.reset_cache()


def compile_cold_warm(named_calls: Mapping[str, tuple], cache_dir: str | None = None) -> dict:
    """Cold and warm lower/compile times with a persistent compilation cache.

    ``named_calls``: name -> (jitted, *args). Cold: first compile into an empty
    cache folder (a temporary one unless ``cache_dir`` is given, which should
    then be empty). Warm: ``jax.clear_caches()`` (as a restarted process would
    be), then the same compile again, which reads the executable back from
    disk; lowering (tracing) is paid again either way.
    """
    out: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        if cache_dir is None:
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bcjax-cc-"))
        stack.enter_context(_fresh_persistent_cache(cache_dir))
        for name, (fn, *args) in named_calls.items():
            _, _, t = timed_compile(fn, *args)
            out[name] = {
                "cold_lower_s": t["lower_s"],
                "cold_compile_s": t["compile_s"],
                "cold_cache": t["persistent_cache"],
            }
        jax.clear_caches()
        for name, (fn, *args) in named_calls.items():
            _, _, t = timed_compile(fn, *args)
            out[name].update(
                {
                    "warm_lower_s": t["lower_s"],
                    "warm_compile_s": t["compile_s"],
                    "warm_cache": t["persistent_cache"],
                }
            )
    return out
