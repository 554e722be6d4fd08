"""bcjax.clinical's numpy forms of what it took from scipy (a run's report no longer imports
scipy: ≈ 0.5 s), checked against scipy itself: the disk dilation, the temperature fit, the
temperature-scaled softmax."""

import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage, optimize, special

from bcjax.clinical import calibration, grounding


def _scipy_dilate(masks, radius):
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return ndimage.binary_dilation(masks, structure=(yy**2 + xx**2 <= radius**2)[None])


@pytest.mark.parametrize("radius", [1, 2, 3, 5, 11, 40])
@pytest.mark.parametrize("shape", [(3, 17, 23), (2, 64, 64), (1, 5, 40), (2, 1, 9), (1, 30, 3)])
def test_dilate_equals_scipy_binary_dilation(radius, shape):
    rng = np.random.default_rng(radius)
    for fraction in (0.02, 0.3):
        masks = rng.random(shape) < fraction
        masks[0, 0, 0] = masks[-1, -1, -1] = True  # at the borders too
        got = grounding.dilate(masks, radius)
        assert got.dtype == bool
        np.testing.assert_array_equal(got, _scipy_dilate(masks, radius))


def _nll(logp, labels):
    rows = np.arange(len(labels))

    def nll(log_t):
        scaled = logp / np.exp(log_t)
        return float(np.mean(special.logsumexp(scaled, axis=1) - scaled[rows, labels]))

    return nll


@pytest.mark.parametrize("seed", range(6))
def test_fit_temperature_matches_scipy_bounded_search(seed):
    """Inside the bounds (a planted temperature) and at them (labels far from or equal
    to the argmax): within scipy's own search error (1e-6 in log T), same NLL."""
    rng = np.random.default_rng(seed)
    n, classes = 150, 3
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes)) + 2.0 * np.eye(classes)[labels]
    scale = [0.3, 2.5, 6.0, 0.01, 300.0, 1.0][seed]
    probs = special.softmax(logits * scale, axis=1)
    if seed == 5:
        labels = probs.argmax(axis=1)  # always right: T at its lower bound
    nll = _nll(calibration.log_probabilities(probs), labels)
    bounds = calibration._LOG_T_BOUNDS
    reference = optimize.minimize_scalar(
        nll, bounds=bounds, method="bounded", options={"xatol": 1e-10}
    )
    best = min([reference.x, *bounds], key=nll)
    fitted = np.log(calibration.fit_temperature(probs, labels))
    assert abs(fitted - best) < 1e-6
    assert nll(fitted) <= nll(best) + 1e-12
    if seed in (0, 1, 2):
        assert bounds[0] + 0.1 < fitted < bounds[1] - 0.1  # a real interior minimum


def test_minimize_unimodal_finds_interior_and_boundary_minima():
    for target in (-2.7, 0.0, 1.234567, 5.0, -5.0):
        got = calibration.minimize_unimodal(lambda x, t=target: (x - t) ** 2, -3.0, 3.0, 1e-9)
        assert abs(got - np.clip(target, -3.0, 3.0)) < 1e-8


def test_apply_temperature_equals_scipy_softmax():
    rng = np.random.default_rng(0)
    probs = special.softmax(rng.normal(size=(40, 4)) * 5, axis=1)
    probs[0] = [1.0, 0.0, 0.0, 0.0]  # an underflowed probability
    for t in (0.05, 0.7, 1.0, 3.0, 20.0):
        expected = special.softmax(calibration.log_probabilities(probs) / t, axis=1)
        np.testing.assert_allclose(
            calibration.apply_temperature(probs, t), expected, rtol=1e-14, atol=1e-300
        )


def test_the_report_modules_do_not_import_scipy():
    code = (
        "import sys; import bcjax.eval.clinical_outputs; "
        "print(sorted(m for m in sys.modules if m == 'scipy' or m.startswith('scipy.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
