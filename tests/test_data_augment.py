"""On-device augmentation: shapes, determinism per key, identity when off.

Each distinct setting is one XLA compile (seconds on a busy CPU): keep them few.
"""

import functools

import jax
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
    fn = jitted(augment.DEFAULTS)
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


def test_config_dict_fields():
    import ml_collections

    cfg = ml_collections.ConfigDict(
        dict(
            enabled=True,
            crop_scale=(0.6, 1.0),
            flip=True,
            rotate_deg=10.0,
            brightness=0.2,
            contrast=0.2,
        )
    )
    assert augment.settings(cfg) == augment.settings(augment.DEFAULTS) == augment.settings(None)
    assert augment.settings({"flip": False})["flip"] is False
