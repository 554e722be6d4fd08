"""The CPU form of the augmentation (augment._augment_in_chunks: gathered and blended
in chunks with lax.map) against a float64 numpy reference and the vectorised form
that accelerators run."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from bcjax.data import augment

SIZE = 32
# 36 examples: two chunks of CPU_CHUNK (16), a loop, and a remainder: both paths of lax.map.
BATCH = 36


@pytest.fixture(scope="module")
def batch():
    images = np.random.default_rng(5).integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8)
    keys = augment.example_keys(jax.random.key(7), np.arange(BATCH))
    return images, keys


def reference(images, keys, s):
    """augment_batch in float64 numpy from the same uniform draws (float32, from jax)."""
    out = np.zeros(images.shape, np.float64)
    h, w = images.shape[1:3]
    for n, (image, key) in enumerate(zip(images, keys)):
        r = np.asarray(jax.random.uniform(key, (8,)), np.float64)

        def between(i, lo, hi, r=r):
            return lo + (hi - lo) * r[i]

        area = between(0, *s["crop_scale"])
        ratio = math.exp(between(1, *np.log(s["crop_ratio"])))
        cw, ch = min(math.sqrt(area * ratio), 1.0), min(math.sqrt(area / ratio), 1.0)
        cx, cy = between(2, -(1 - cw), 1 - cw), between(3, -(1 - ch), 1 - ch)
        theta = between(4, -1.0, 1.0) * math.radians(s["rotate_deg"])
        sx = -1.0 if r[5] < 0.5 else 1.0
        v = (np.arange(h) + 0.5) * (2.0 / h) - 1.0
        u = (np.arange(w) + 0.5) * (2.0 / w) - 1.0
        uu, vv = u[None, :] * (sx * cw), v[:, None] * ch
        xs = (cx + math.cos(theta) * uu - math.sin(theta) * vv + 1.0) * (w / 2.0) - 0.5
        ys = (cy + math.sin(theta) * uu + math.cos(theta) * vv + 1.0) * (h / 2.0) - 0.5
        resampled = np.zeros((h, w, 3))
        y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
        for dy in (0, 1):
            for dx in (0, 1):
                yi, xi = y0 + dy, x0 + dx
                weight = (1 - np.abs(ys - yi)) * (1 - np.abs(xs - xi))
                ok = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
                taps = image[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)].astype(np.float64)
                resampled += np.where(ok, weight, 0.0)[..., None] * taps
        factor = between(6, 1 - s["contrast"], 1 + s["contrast"])
        pivot = image.astype(np.float64).mean() / 255.0
        x = (
            resampled * (factor / 255.0)
            + (1.0 - factor) * pivot
            + between(7, -1, 1) * s["brightness"]
        )
        out[n] = (np.clip(x, 0.0, 1.0) - np.array(augment.MEAN)) / np.array(augment.STD)
    return out


def test_cpu_chunks_are_as_close_to_float64_as_the_vectorised_form(batch):
    images, keys = batch
    s = augment.settings()
    assert s["contrast"] and s["brightness"] and s["flip"] and s["rotate_deg"]
    chunks = np.asarray(jax.jit(lambda i, k: augment.augment_batch(i, k, s))(images, keys))
    vectorised = np.asarray(jax.jit(lambda i, k: augment._augment_vectorised(i, k, s))(*batch))
    want = reference(images, keys, s)
    err_chunks, err_vectorised = np.abs(chunks - want).max(), np.abs(vectorised - want).max()
    # float32 rounding of the sampling coordinates (ulp(32) ~ 4e-6 px) times an image
    # gradient of up to 255 per pixel, in normalised units (/ 255 / 0.224): ~2e-5.
    assert err_vectorised < 5e-5 and err_chunks < 5e-5, (err_vectorised, err_chunks)


def test_cpu_program_augments_in_chunks_and_accelerators_keep_the_vmap(batch):
    images, keys = batch
    s = augment.settings()
    cpu = jax.jit(lambda i, k: augment.augment_batch(i, k, s)).lower(images, keys).compile()
    vmap = jax.jit(lambda i, k: augment._augment_vectorised(i, k, s))
    # Two loops more than the vmap (the random draws may loop too): the taps, the blend.
    loops = cpu.as_text().count(" while(")
    assert loops == vmap.lower(images, keys).compile().as_text().count(" while(") + 2
    want = np.asarray(vmap(images, keys))
    # What build_steps asks for by its mesh's platform is what lowering for it picks.
    for in_chunks, expected in ((True, cpu(images, keys)), (False, want)):
        chosen = jax.jit(lambda i, k, c=in_chunks: augment.augment_batch(i, k, s, in_chunks=c))
        np.testing.assert_array_equal(chosen(images, keys), expected)
    for platform in ("cuda", "rocm", "tpu"):
        exported = export.export(
            jax.jit(lambda i, k: augment.augment_batch(i, k, s)),
            platforms=(platform,),
            disabled_checks=[export.DisabledSafetyCheck.platform()],
        )(jnp.asarray(images), keys)
        np.testing.assert_array_equal(exported.call(jnp.asarray(images), keys), want, platform)


def test_cpu_chunks_sample_every_pixel_at_one_coordinate():
    """Each sampling coordinate is computed once and then read by the gather and the
    blend. In one vmap XLA:CPU computes it twice (in the index and in the weights'
    fusions, rounded differently): with these keys example 84's pixel (53, 36) lies at
    y = 51 - 4e-6, whose floor then differs between the two, and the vectorised form
    blends the wrong pair of rows there (off by ~2 in normalised units)."""
    images = np.random.default_rng(1).integers(0, 256, (128, 64, 64, 3), dtype=np.uint8)
    keys = augment.example_keys(jax.random.key(0), np.arange(128))
    s = augment.settings()
    chunks = np.asarray(jax.jit(lambda i, k: augment.augment_batch(i, k, s))(images, keys))
    np.testing.assert_allclose(chunks, reference(images, keys, s), rtol=0, atol=5e-5)
