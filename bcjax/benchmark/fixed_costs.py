"""Timed figures that unit tests must not assert (a loaded machine would fail them):
the clinical report's time (``--clinical``) and cold vs warm compiles
(``--compile-cache``, from each case's ``compile_cache`` record).

Each figure is reported beside its target, as met or missed; nothing here fails.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

# BUSI's test part (about 20% of 780 images) and its class mix; the run's resamples.
CLINICAL_VAL = (25, 80, 40)
CLINICAL_TEST = (27, 87, 46)
# The bootstrap is vectorised: 2,000 resamples of 160 images should take well under this.
CLINICAL_TARGET_S = 2.0


def _simulated_predictions(rng, counts, separation=1.5, scale=2.0):
    """[N, C] probabilities of a moderately good classifier and [N] labels."""
    import numpy as np

    labels = np.repeat(np.arange(len(counts)), counts)
    logits = rng.normal(size=(len(labels), len(counts)))
    logits[np.arange(len(labels)), labels] += separation
    logits = scale * logits
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True), labels


def measure_clinical(repeats: int = 3, resamples: int | None = None, seed: int = 0) -> dict:
    """Seconds for ``bcjax.clinical.clinical_report`` on a BUSI-sized test part (median of
    ``repeats``), with its target."""
    import numpy as np

    from bcjax import clinical
    from bcjax.clinical import bootstrap
    from bcjax.data import busi

    resamples = bootstrap.RESAMPLES if resamples is None else resamples
    rng = np.random.default_rng(seed)
    val = _simulated_predictions(rng, CLINICAL_VAL)
    test = _simulated_predictions(rng, CLINICAL_TEST)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        report = clinical.clinical_report(
            *val, *test, list(busi.CLASSES), positive_class="malignant", resamples=resamples
        )
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return {
        "test_images": int(len(test[1])),
        "resamples": report["bootstrap"]["resamples"],
        "repeats": repeats,
        "seconds": times,
        "median_s": seconds,
        "target_s": CLINICAL_TARGET_S,
        "met": seconds < CLINICAL_TARGET_S,
    }


def clinical_line(result: Mapping) -> str:
    return (
        f"clinical report: {result['resamples']:,} bootstrap resamples of "
        f"{result['test_images']} test images in {result['median_s']:.2f} s "
        f"(median of {result['repeats']}; target < {result['target_s']:.1f} s: "
        f"{'met' if result['met'] else 'MISSED'})"
    )


def compile_cache_lines(model: str, breakdown: Mapping) -> list[str]:
    """Cold vs warm compile of each step of a case measured with ``compile_cache``.

    A warm compile reads the executable back from the persistent cache; it should
    take a fraction of the cold one (lowering, i.e. tracing, is paid either way)."""
    lines = []
    for name, t in (breakdown.get("compile_cache") or {}).items():
        cold, warm = t["cold_compile_s"], t["warm_compile_s"]
        lines.append(
            f"{model} {name}: compile cold {cold:.2f} s ({t['cold_cache']}), warm {warm:.2f} s "
            f"({t['warm_cache']}), warm/cold {warm / cold:.2f}"
            + ("" if warm < cold else "  MISSED: the warm compile was not faster")
            + f"; lowering {t['cold_lower_s']:.2f} / {t['warm_lower_s']:.2f} s"
        )
    return lines
