"""Training augmentation in JAX, run on the accelerator inside the jitted step.

The host ships uint8 batches; here each example gets its own PRNG key (derived
from its dataset index by the caller), so an example is augmented the same way
whatever the device count. One affine map per example does random resized
crop, horizontal flip and small rotation in a single bilinear resampling;
then brightness and contrast; then normalisation with fixed constants.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from bcjax import specs

# ImageNet statistics: keep torchvision-pretrained weights valid. On BUSI-like
# images (mean ~0.3, std ~0.2) they still give roughly zero mean, unit scale.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def settings(cfg=None) -> dict:
    """config.augment's fields as plain Python values: enabled, crop_scale (fraction of
    the image area the crop keeps), crop_ratio (its aspect ratio range, log-uniform),
    flip, rotate_deg, brightness (additive, in units of the full range), contrast
    (a factor in [1 - c, 1 + c] about the image mean).

    cfg: a dict or ConfigDict of them, as bcjax.specs.DataSpec.augment gives every
    one; fields it lacks (all, for None) take configs/default.py's values, the one
    place they are written.
    """
    given = {} if cfg is None else dict(cfg)  # dict() takes a ConfigDict too
    out = {**specs.defaults().data.augment, **given}
    out["crop_scale"] = tuple(float(v) for v in out["crop_scale"])
    out["crop_ratio"] = tuple(float(v) for v in out["crop_ratio"])
    return out


def normalize(images_uint8) -> jax.Array:
    """float32 images, (x / 255 - MEAN) / STD per channel; what evaluation feeds the model."""
    x = jnp.asarray(images_uint8).astype(jnp.float32) * (1.0 / 255.0)
    return (x - jnp.asarray(MEAN, jnp.float32)) / jnp.asarray(STD, jnp.float32)


# On CPU the batch is augmented in chunks of this many examples (see augment_batch).
CPU_CHUNK = 16


def _taps(image, ys, xs):
    """The four taps of every sample of image [H, W, C] at float pixel coordinates
    ys, xs: (rows uint8 [..., 4C], inside bool [..., 1], wy, wx float32 [..., 1]).

    One gather: the image, padded by one zero pixel on every side, becomes a
    table whose row (i, j) holds padded pixels (i, j), (i, j+1), (i+1, j) and
    (i+1, j+1), i.e. the four taps of a sample with floor (i-1, j-1). Built
    from slices, it is gathered once with 1-D row indices. On XLA:CPU four row
    gathers of the image (one per tap) made the augmentation cost about three
    times as much inside the quickstart's train step, and gathering with
    (y, x) index pairs is slower still.
    """
    h, w, c = image.shape
    padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)))
    taps = (padded[:-1, :-1], padded[:-1, 1:], padded[1:, :-1], padded[1:, 1:])
    table = jnp.concatenate(taps, axis=-1).reshape((h + 1) * (w + 1), 4 * c)
    y0f, x0f = jnp.floor(ys), jnp.floor(xs)
    wy, wx = (ys - y0f)[..., None], (xs - x0f)[..., None]
    y0, x0 = y0f.astype(jnp.int32), x0f.astype(jnp.int32)
    # A floor in [-1, H-1] x [-1, W-1] has a table row (taps outside the image
    # read the zero border); any other sample has all four taps outside.
    inside = ((y0 >= -1) & (y0 < h) & (x0 >= -1) & (x0 < w))[..., None]
    idx = (jnp.clip(y0, -1, h - 1) + 1) * (w + 1) + jnp.clip(x0, -1, w - 1) + 1
    rows = jnp.take(table, idx.reshape(-1), axis=0).reshape(idx.shape + (4 * c,))
    return rows, inside, wy, wx


def _blend(rows, inside, wy, wx):
    """The bilinear blend of the taps from `_taps` (zero for samples outside the image)."""
    c = rows.shape[-1] // 4
    rows = jnp.where(inside, rows.astype(jnp.float32), 0.0)
    v00, v01, v10, v11 = (rows[..., k * c : (k + 1) * c] for k in range(4))
    top = v00 * (1 - wx) + v01 * wx
    bottom = v10 * (1 - wx) + v11 * wx
    return top * (1 - wy) + bottom * wy


def _bilinear(image, ys, xs):
    """image [H, W, C] sampled at float pixel coordinates; zero outside the image."""
    return _blend(*_taps(image, ys, xs))


def _draw(image_uint8, key, s: dict):
    """One example's random crop, flip and rotation as input coordinates of every output
    pixel (ys, xs [H, W]), and its brightness and contrast as a map ``x * scale + offset``
    of the resampled values (scale, offset: float32 scalars)."""
    h, w = image_uint8.shape[:2]
    # All random numbers from one draw: one threefry call instead of eight keeps
    # the compiled step small and quick to compile.
    r = jax.random.uniform(key, (8,))

    def between(i, lo, hi):
        return lo + (hi - lo) * r[i]

    area = between(0, *s["crop_scale"])
    ratio = jnp.exp(between(1, math.log(s["crop_ratio"][0]), math.log(s["crop_ratio"][1])))
    # Crop width/height as fractions of the image; centre in normalised [-1, 1] coordinates.
    cw = jnp.minimum(jnp.sqrt(area * ratio), 1.0)
    ch = jnp.minimum(jnp.sqrt(area / ratio), 1.0)
    cx = between(2, -(1 - cw), 1 - cw)
    cy = between(3, -(1 - ch), 1 - ch)
    theta = between(4, -1.0, 1.0) * math.radians(s["rotate_deg"])
    sx = jnp.where(r[5] < 0.5, -1.0, 1.0) if s["flip"] else 1.0

    # Output pixel centres in [-1, 1], mapped to input coordinates through crop,
    # flip and rotation; identity when the crop is the whole image.
    v = (jnp.arange(h, dtype=jnp.float32) + 0.5) * (2.0 / h) - 1.0
    u = (jnp.arange(w, dtype=jnp.float32) + 0.5) * (2.0 / w) - 1.0
    uu, vv = u[None, :] * (sx * cw), v[:, None] * ch
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    x_in = cx + cos * uu - sin * vv
    y_in = cy + sin * uu + cos * vv
    xs = (x_in + 1.0) * (w / 2.0) - 0.5
    ys = (y_in + 1.0) * (h / 2.0) - 0.5
    # Brightness and contrast fold into one affine map of the resampled values.
    # The contrast pivot is the mean of the source image rather than of the crop:
    # nearly the same, and it avoids a reduction over the resampled pixels, which
    # made XLA compute the resampling twice.
    scale, offset = 1.0 / 255.0, 0.0
    if s["contrast"]:
        factor = between(6, 1 - s["contrast"], 1 + s["contrast"])
        pivot = jnp.mean(image_uint8.astype(jnp.float32)) * (1.0 / 255.0)
        scale, offset = factor / 255.0, (1.0 - factor) * pivot
    if s["brightness"]:
        offset = offset + between(7, -s["brightness"], s["brightness"])
    return ys, xs, jnp.asarray(scale, jnp.float32), jnp.asarray(offset, jnp.float32)


def _intensity(resampled, scale, offset):
    return jnp.clip(resampled * scale + offset, 0.0, 1.0)


def augment_one(image_uint8, key, cfg=None) -> jax.Array:
    """One example: uint8 [H, W, C] -> float32 [H, W, C] in [0, 1] (before normalisation)."""
    ys, xs, scale, offset = _draw(image_uint8, key, settings(cfg))
    return _intensity(_bilinear(image_uint8, ys, xs), scale, offset)


def _normalized(x):
    return (x - jnp.asarray(MEAN, jnp.float32)) / jnp.asarray(STD, jnp.float32)


def _augment_vectorised(images_uint8, keys, s: dict) -> jax.Array:
    """augment_batch as one vmap of augment_one: what accelerators run."""
    return _normalized(jax.vmap(lambda im, k: augment_one(im, k, s))(images_uint8, keys))


def _augment_in_chunks(images_uint8, keys, s: dict) -> jax.Array:
    """augment_batch on CPU: the same draws and formulas, gathered and blended in chunks
    of CPU_CHUNK examples (lax.map), so that XLA:CPU writes the gathered taps and the
    augmented batch once each. In one vmap it fused the blend into both consumers of
    the batch in the train step (the stem convolution and its kernel gradient's
    transposed input), so the blend ran twice; a jax.lax.optimization_barrier does not
    stop that (XLA removes it before fusion). Equal to the vectorised form up to the
    rounding of the sampling coordinates (fused differently); the quickstart's step
    ran about 4% faster (BUILD_NOTES, #23 session 9). Each coordinate is also
    computed once here: in one vmap XLA:CPU computed it in two fusions, rounded
    differently, and a sample within rounding of a whole pixel could blend the wrong
    pair of rows (one pixel in 128 images in a test).
    """
    ys, xs, scale, offset = jax.vmap(lambda im, k: _draw(im, k, s))(images_uint8, keys)
    taps = jax.lax.map(lambda a: _taps(*a), (images_uint8, ys, xs), batch_size=CPU_CHUNK)

    def finish(a):
        *example_taps, example_scale, example_offset = a
        return _normalized(_intensity(_blend(*example_taps), example_scale, example_offset))

    return jax.lax.map(finish, (*taps, scale, offset), batch_size=CPU_CHUNK)


def augment_batch(images_uint8, keys, cfg=None, *, in_chunks: bool | None = None) -> jax.Array:
    """uint8 [B, H, W, C] + keys [B] -> normalised float32 [B, H, W, C].

    cfg fields: see `settings`. With enabled=False this is normalize(images).
    in_chunks: True for the CPU form (`_augment_in_chunks`), False for one vmap
    (what accelerators run); None picks by the platform the program is lowered
    for, tracing both (bcjax.parallel.strategies passes its mesh's choice). The
    draws per example key are the same either way.
    """
    s = settings(cfg)
    if not s["enabled"]:
        return normalize(images_uint8)
    images_uint8 = jnp.asarray(images_uint8)
    if in_chunks is None:
        return jax.lax.platform_dependent(
            images_uint8,
            keys,
            cpu=lambda im, k: _augment_in_chunks(im, k, s),
            default=lambda im, k: _augment_vectorised(im, k, s),
        )
    form = _augment_in_chunks if in_chunks else _augment_vectorised
    return form(images_uint8, keys, s)


def example_keys(rng, indices) -> jax.Array:
    """One key per example from its dataset index: the same example gets the same
    augmentation for a given rng, however the batch is split over devices."""
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.asarray(indices, jnp.int32))
