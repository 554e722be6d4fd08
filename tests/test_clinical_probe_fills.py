"""The probes' fills (bcjax.clinical.probes), now numpy over all runs and rows at once,
against a plain row-by-row reference written here: the same pixels from the same draws."""

import numpy as np
import pytest

from bcjax.clinical import probes


def _mirror(d, n):
    t = d % (2 * n)
    return t if t < n else 2 * n - 1 - t


def _fill_rows_reference(image, fill, source):
    """Run by run, pixel by pixel: each pixel of a run copies the mirrored source stretch
    on the side needing fewer reflections (left on ties)."""
    height, width = fill.shape
    filled = np.zeros_like(fill)
    for y in range(height):
        x = 0
        while x < width:
            if not fill[y, x]:
                x += 1
                continue
            start = x
            while x < width and fill[y, x]:
                x += 1
            stop = x
            left = 0
            while start - 1 - left >= 0 and source[y, start - 1 - left]:
                left += 1
            right = 0
            while stop + right < width and source[y, stop + right]:
                right += 1
            if not left and not right:
                continue
            for p in range(start, stop):
                a, b = p - start, stop - 1 - p
                cost_left = a / left if left else np.inf
                cost_right = b / right if right else np.inf
                if cost_left <= cost_right:
                    src = start - 1 - _mirror(a, max(left, 1))
                else:
                    src = stop + _mirror(b, max(right, 1))
                image[y, p] = image[y, src]
                filled[y, p] = True
    return filled


def _draw_by_depth_reference(image, fill, source, band, rng):
    out = np.array(image, copy=True)
    ys, xs = np.nonzero(source)
    for y in range(fill.shape[0]):
        columns = np.flatnonzero(fill[y])
        if not len(columns):
            continue
        depth = min(max(y, ys[0]), ys[-1])
        lo = np.searchsorted(ys, depth - band, side="left")
        hi = np.searchsorted(ys, depth + band, side="right")
        pick = rng.integers(lo, hi, size=len(columns))
        out[y, columns] = image[ys[pick], xs[pick]]
    return out


def _case(rng):
    h, w = rng.integers(3, 40, 2)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    fill = rng.random((h, w)) < rng.uniform(0.1, 0.7)
    source = ~fill & (rng.random((h, w)) < rng.uniform(0.3, 1.0))
    return image, fill, source


def test_fill_rows_matches_the_row_by_row_reference():
    rng = np.random.default_rng(0)
    for _ in range(300):
        image, fill, source = _case(rng)
        expected, got = image.copy(), image.copy()
        np.testing.assert_array_equal(
            probes._fill_rows(got, fill, source), _fill_rows_reference(expected, fill, source)
        )
        np.testing.assert_array_equal(got, expected)
        # The transposed view, as the column pass writes it.
        expected, got = image.copy(), image.copy()
        probes._fill_rows(got.swapaxes(0, 1), fill.T, source.T)
        _fill_rows_reference(expected.swapaxes(0, 1), fill.T, source.T)
        np.testing.assert_array_equal(got, expected)


def test_draw_by_depth_makes_the_same_draws_as_row_by_row():
    rng = np.random.default_rng(1)
    checked = 0
    for seed in range(300):
        image, fill, source = _case(rng)
        if not source.any():
            continue
        band = int(rng.integers(1, 6))
        try:
            expected = _draw_by_depth_reference(
                image, fill, source, band, np.random.default_rng(seed)
            )
        except ValueError:  # a row with no source within the band: nothing to draw from
            with pytest.raises(ValueError):
                probes._draw_by_depth(image, fill, source, band, np.random.default_rng(seed))
            continue
        got = probes._draw_by_depth(image, fill, source, band, np.random.default_rng(seed))
        np.testing.assert_array_equal(got, expected)
        checked += 1
    assert checked > 100
