"""On-device augmentation: shapes, determinism per key, identity when off, and
the bilinear resampling against a float64 numpy reference.

Each distinct setting is one XLA compile (seconds on a busy CPU): keep them few.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax.data import augment

IDENTITY = dict(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    flip=False,
    rotate_deg=0.0,
    brightness=0.0,
    contrast=0.0,
)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)


def keys(seed, n=4):
    return jax.random.split(jax.random.key(seed), n)


def jitted(cfg):
    return jax.jit(functools.partial(augment.augment_batch, cfg=cfg))


def test_shapes_finite_range_and_deterministic(images):
    fn = jitted(augment.settings())
    a = np.asarray(fn(images, keys(0)))
    assert a.shape == images.shape and a.dtype == np.float32
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, fn(images, keys(0)))
    assert not np.allclose(a, fn(images, keys(1)))
    # Each example depends on its own image and key only, not on its batch neighbours.
    np.testing.assert_allclose(fn(images[::-1], keys(0)[::-1]), a[::-1], atol=1e-6)
    lo = (0 - np.array(augment.MEAN)) / np.array(augment.STD)
    hi = (1 - np.array(augment.MEAN)) / np.array(augment.STD)
    assert np.all(a >= lo - 1e-5) and np.all(a <= hi + 1e-5)
    idx_keys = augment.example_keys(jax.random.key(0), np.arange(4))
    assert idx_keys.shape == (4,)


def test_disabled_and_identity_settings_give_normalize(images):
    ref = np.asarray(augment.normalize(images))
    np.testing.assert_array_equal(augment.augment_batch(images, keys(0), {"enabled": False}), ref)
    # With the crop, rotation and intensity changes off, only the flip is left: each
    # example comes out either untouched or mirrored (one compile checks both).
    out = np.asarray(jitted(dict(IDENTITY, flip=True))(images, keys(3)))
    flipped = [not np.allclose(out[i], ref[i], atol=1e-4) for i in range(4)]
    assert 0 < sum(flipped) < 4
    for i in range(4):
        np.testing.assert_allclose(out[i], ref[i, :, ::-1] if flipped[i] else ref[i], atol=1e-4)


def test_settings_are_the_configs():
    import ml_collections

    from bcjax import specs

    full = specs.defaults().data.augment  # configs/default.py's config.augment
    assert augment.settings(full) == full
    assert augment.settings(None) == augment.settings(ml_collections.ConfigDict(full)) == full
    # A field the settings lack (a config written before it existed) takes
    # configs/default.py's value: no second default in bcjax.data.augment.
    older = ml_collections.ConfigDict({k: v for k, v in full.items() if k != "crop_ratio"})
    assert augment.settings(older)["crop_ratio"] == full["crop_ratio"]
    assert augment.settings({"flip": False}) == dict(full, flip=False)


def bilinear_reference(image, ys, xs):
    """float64 bilinear sampling, pixel by pixel: the weighted sum of the four
    neighbours that lie inside the image (those outside count as zero)."""
    h, w, c = image.shape
    out = np.zeros(ys.shape + (c,))
    for at in np.ndindex(ys.shape):
        y, x = float(ys[at]), float(xs[at])
        y0, x0 = int(np.floor(y)), int(np.floor(x))
        for yi, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
            for xi, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                if 0 <= yi < h and 0 <= xi < w:
                    out[at] += wy * wx * image[yi, xi].astype(np.float64)
    return out


def test_bilinear_matches_float64_reference():
    # Not square (5 x 7), so that a swapped row/column index shows; two images
    # under vmap, as augment_batch calls it.
    rng = np.random.default_rng(1)
    h, w = 5, 7
    images = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    # Random affine maps of a 9 x 11 output grid (rotation, scale, shift), over
    # and past the borders: from fully outside, through partly outside, to inside.
    v, u = np.meshgrid(np.linspace(-1, 1, 9), np.linspace(-1, 1, 11), indexing="ij")
    ys, xs = [], []
    for _ in range(2):
        theta, scale = rng.uniform(-0.5, 0.5), rng.uniform(0.8, 1.6, 2)
        cy, cx = rng.uniform(-1, 1, 2)
        ys.append(h / 2 + cy + scale[0] * h / 2 * (np.sin(theta) * u + np.cos(theta) * v))
        xs.append(w / 2 + cx + scale[1] * w / 2 * (np.cos(theta) * u - np.sin(theta) * v))
    # And every pairing of coordinates at and around the borders, whole pixels included.
    edges_y = np.array([-2.0, -1.25, -1.0, -0.5, 0.0, 0.25, h - 1.0, h - 0.5, h - 0.25, h, h + 0.5])
    edges_x = np.array([-1.5, -1.0, -0.75, 0.0, 0.5, 3.0, w - 1.0, w - 0.5, w, w + 0.25, w + 2.0])
    ey, ex = np.meshgrid(edges_y, edges_x, indexing="ij")
    ys = np.concatenate([np.stack(ys), np.stack([ey, ey])], axis=1).astype(np.float32)
    xs = np.concatenate([np.stack(xs), np.stack([ex, ex])], axis=1).astype(np.float32)

    compiled = jax.jit(jax.vmap(augment._bilinear)).lower(images, ys, xs).compile()
    # The four taps come from one gather (four on XLA:CPU cost several times more).
    assert compiled.as_text().count(" gather(") == 1
    got = np.asarray(compiled(jnp.asarray(images), jnp.asarray(ys), jnp.asarray(xs)))
    want = np.stack([bilinear_reference(images[i], ys[i], xs[i]) for i in range(2)])
    # The cases the grid must cover: samples wholly outside (zero), partly outside,
    # and inside the image.
    taps_inside = (ys > -1) & (ys < h) & (xs > -1) & (xs < w)
    assert (~taps_inside).any() and (want[taps_inside] > 0).any()
    assert ((ys < 0) & taps_inside).any() and ((xs > w - 1) & taps_inside).any()
    np.testing.assert_array_equal(got[~taps_inside], 0.0)
    # A few float32 roundings of values up to 255 (a wrong tap is off by units).
    np.testing.assert_allclose(got, want, rtol=0, atol=16 * 255 * 2.0**-24)
