"""Drawing of the synthetic BUSI-like images: the B-mode model behind bcjax.data.synthetic.

Echogenicity map (skin, subcutaneous fat with lobules and Cooper's ligaments,
fibroglandular tissue, chest wall) x multiplicative speckle (envelope of a
correlated complex Gaussian field, so Rayleigh distributed) x depth
attenuation, then log compression; lesions with the BI-RADS cues of their
class. Holds the generator's version (part of every image's seed), the range of
image sizes, each image's random generator and shape, and ``render``: one
image and its lesion mask. No files, no marks (bcjax.data.synthetic_marks).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

GENERATOR_VERSION = 3  # part of every image seed and of the marker: a new version is a new set
MIN_SIZE, MAX_SIZE = 300, 700  # image width range in pixels (BUSI's are ~190-720)


# ----------------------------------------------------------------------------- fields


def _resize(a: np.ndarray, h: int, w: int, method=Image.BICUBIC) -> np.ndarray:
    """Bicubic float resize through PIL (mode F), which is far faster than numpy here."""
    return np.array(Image.fromarray(a.astype(np.float32), "F").resize((w, h), method))


def _smooth_noise(rng, h, w, cells_y, cells_x) -> np.ndarray:
    """Zero-mean, unit-ish variance noise with features ~ (h/cells_y, w/cells_x)."""
    g = rng.standard_normal((max(2, cells_y), max(2, cells_x))).astype(np.float32)
    return _resize(g, h, w)


def _curve(rng, w, amp, n=3) -> np.ndarray:
    """A smooth random boundary offset y(x), for wavy tissue layers."""
    x = np.linspace(0, 2 * np.pi, w, dtype=np.float32)
    out = np.zeros(w, np.float32)
    for k in range(1, n + 1):
        out += (
            rng.uniform(-1, 1)
            / k
            * np.sin(k * x * rng.uniform(0.4, 1.2) + rng.uniform(0, 2 * np.pi))
        )
    return amp * out


def _speckle_db(rng, h, w) -> np.ndarray:
    """Speckle in dB: 10 log10 of the power of a correlated complex Gaussian field.

    Its envelope is Rayleigh distributed (fully developed speckle); the coarse
    grid, upsampled, sets the resolution cell, longer laterally than axially.
    """
    # Grid spacing in pixels; each cell is blurred with its neighbours ([1, 2, 1]
    # both ways) before upsampling, for a rounder point-spread function.
    cy = rng.uniform(1.3, 2.0) * max(h, 300) / 500
    cx = rng.uniform(2.4, 3.6) * max(w, 300) / 500
    gh, gw = max(3, int(h / cy)), max(3, int(w / cx))

    def field():
        g = rng.standard_normal((gh + 2, gw + 2), dtype=np.float32)
        g = g[:-2] + 2 * g[1:-1] + g[2:]
        g = g[:, :-2] + 2 * g[:, 1:-1] + g[:, 2:]
        return _resize(g, h, w)

    re, im = field(), field()
    re *= re
    im *= im
    re += im
    # The floor stands for the system's noise and limited dynamic range: without
    # it the field's zeros show up as black worm-like lines.
    re += 0.08 * float(re[::7, ::7].mean())
    np.log10(re, out=re)
    re *= 10
    return re


def _ellipse(yy, xx, cy, cx, ry, rx, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u = (dx * c + dy * s) / rx
    v = (-dx * s + dy * c) / ry
    return np.sqrt(u * u + v * v)


def _soft_inside(rho, edge):
    """1 inside rho < 1, 0 outside, with a logistic edge of width ``edge`` (in rho units)."""
    return 1.0 / (1.0 + np.exp(np.clip((rho - 1.0) / max(edge, 1e-3), -30, 30)))


# ----------------------------------------------------------------------------- tissue


def _tissue(rng, h, w):
    """Echogenicity of the breast without lesion, and the depth of the glandular layer."""
    yy = np.arange(h, dtype=np.float32)[:, None] / h
    xx = np.arange(w, dtype=np.float32)[None, :] / w
    skin = 0.035 + rng.uniform(0, 0.03) + _curve(rng, w, 0.01)[None, :]
    fat_end = rng.uniform(0.14, 0.32) + _curve(rng, w, 0.05)[None, :]
    gland_end = rng.uniform(0.6, 0.85) + _curve(rng, w, 0.06)[None, :]
    muscle_end = gland_end + rng.uniform(0.08, 0.16) + _curve(rng, w, 0.03)[None, :]

    def band(lo, hi, soft=0.008):
        # Linear ramps rather than logistic edges: a fraction of the cost, same look after speckle.
        return np.clip((yy - lo) / (2 * soft) + 0.5, 0, 1) * np.clip(
            (hi - yy) / (2 * soft) + 0.5, 0, 1
        )

    fat_level = rng.uniform(0.3, 0.45)
    gland_level = rng.uniform(0.6, 0.95)
    muscle_level = rng.uniform(0.35, 0.55)
    e = (
        0.08 * band(-1, skin - 0.012)
        + 1.0 * band(skin - 0.012, skin)
        + fat_level * band(skin, fat_end, 0.015)
        + gland_level * band(fat_end, gland_end, 0.02)
        + muscle_level * band(gland_end, muscle_end, 0.01)
        + 0.25 * band(muscle_end, 2.0, 0.01)
    )
    # Muscle fibres: fine bright horizontal striations.
    stri = 0.5 + 0.5 * np.sin(yy * h / rng.uniform(3, 7) + _curve(rng, w, 2.0)[None, :])
    e = e * (1 + 0.6 * stri * band(gland_end, muscle_end))
    if rng.random() < 0.4:  # pleura / rib surface: a bright line at the bottom of the muscle
        e = e + 0.9 * band(muscle_end, muscle_end + 0.012, 0.004)
    # Glandular heterogeneity and lobular structure.
    e = (
        e
        * np.exp(0.35 * _smooth_noise(rng, h, w, 6, 8))
        * np.exp(0.2 * _smooth_noise(rng, h, w, 16, 24))
    )
    # Cooper's ligaments: thin bright curves crossing the fat.
    for _ in range(rng.integers(2, 6)):
        x0 = rng.uniform(0, 1)
        path = x0 + 0.4 * rng.uniform(-1, 1) * yy + 0.03 * np.sin(yy * rng.uniform(5, 15))
        d = np.abs(xx - path) * w
        lig = np.exp(-((d / rng.uniform(1.0, 2.2)) ** 2)) * band(skin, fat_end + 0.05, 0.01)
        e = e + 0.6 * lig
    return e.astype(np.float32), float(np.mean(fat_end)), float(np.mean(gland_end))


def _dark_ovals(rng, e, h, w, n, y_range, size_range, level_range, aspect_range, edge=0.15):
    """Hypoechoic ovals (fat lobules), painted in their bounding boxes only."""
    for _ in range(n):
        ry = rng.uniform(*size_range) * min(h, w)
        rx = ry * rng.uniform(*aspect_range)
        cy, cx = rng.uniform(*y_range) * h, rng.uniform(0.05, 0.95) * w
        y0, y1 = int(max(0, cy - 1.5 * ry)), int(min(h, cy + 1.5 * ry + 1))
        x0, x1 = int(max(0, cx - 1.5 * rx)), int(min(w, cx + 1.5 * rx + 1))
        if y1 <= y0 or x1 <= x0:
            continue
        yy = np.arange(y0, y1, dtype=np.float32)[:, None]
        xx = np.arange(x0, x1, dtype=np.float32)[None, :]
        inside = _soft_inside(_ellipse(yy, xx, cy, cx, ry, rx, rng.uniform(-0.3, 0.3)), edge)
        level = rng.uniform(*level_range)
        e[y0:y1, x0:x1] *= 1 - inside * (1 - level)


# ----------------------------------------------------------------------------- lesions


def _lesion_params(rng, label: int, h: int, w: int, gland_depth: float) -> dict:
    benign = label == 1
    p = {}
    # Semi-axis scale as a fraction of the shorter image side; BUSI lesions are
    # mostly large in the frame, and the cues must survive a 64 px thumbnail.
    p["size"] = rng.uniform(0.1, 0.21) if benign else rng.uniform(0.1, 0.22)
    if benign:
        # Wider than tall, "parallel" orientation; some round-ish ones overlap malignant.
        p["wh"] = rng.uniform(1.4, 2.4) if rng.random() < 0.92 else rng.uniform(0.9, 1.4)
        p["angle"] = rng.uniform(-0.25, 0.25)
        p["lobes"] = rng.uniform(0, 0.05) if rng.random() < 0.9 else rng.uniform(0.06, 0.12)
        p["jitter"] = rng.uniform(0, 0.015) if rng.random() < 0.95 else rng.uniform(0.02, 0.05)
        p["spikes"] = 0
        p["edge"] = rng.uniform(0.02, 0.06)
        p["level"] = rng.uniform(0.08, 0.45) if rng.random() < 0.94 else rng.uniform(0.45, 0.65)
        p["hetero"] = rng.uniform(0.05, 0.25)
        p["posterior"] = (
            rng.uniform(1.15, 1.6)
            if rng.random() < 0.5
            else (rng.uniform(0.75, 0.95) if rng.random() < 0.15 else 1.0)
        )
        p["capsule"] = rng.uniform(0.3, 0.9) if rng.random() < 0.5 else 0.0
        p["halo"] = 0.0
        p["calc"] = 0
    else:
        # Taller than wide ("not parallel"); some are wider than tall anyway.
        p["wh"] = rng.uniform(0.5, 0.95) if rng.random() < 0.88 else rng.uniform(0.95, 1.4)
        p["angle"] = rng.uniform(-0.5, 0.5)
        p["lobes"] = rng.uniform(0.04, 0.14)
        spiculated = rng.random() < 0.6
        p["jitter"] = rng.uniform(0.03, 0.09) if rng.random() < 0.9 else rng.uniform(0.01, 0.03)
        p["spikes"] = int(rng.integers(8, 20)) if spiculated else 0
        p["edge"] = rng.uniform(0.05, 0.14)
        p["level"] = rng.uniform(0.1, 0.45) if rng.random() < 0.94 else rng.uniform(0.45, 0.65)
        p["hetero"] = rng.uniform(0.3, 0.7)
        p["posterior"] = (
            rng.uniform(0.25, 0.6)
            if rng.random() < 0.75
            else (rng.uniform(1.1, 1.3) if rng.random() < 0.3 else 1.0)
        )
        p["capsule"] = 0.0
        p["halo"] = rng.uniform(0.3, 0.8) if rng.random() < 0.4 else 0.0
        p["calc"] = int(rng.integers(2, 10)) if rng.random() < 0.4 else 0
    m = min(h, w)
    r = p["size"] * m
    # Semi-axes: x lateral, y axial (depth); equal area for a given size.
    p["rx"] = r * np.sqrt(p["wh"])
    p["ry"] = r / np.sqrt(p["wh"])
    p["cx"] = rng.uniform(0.3, 0.7) * w
    top = 0.12 * h + p["ry"]
    bottom = max(top + 1, min(gland_depth * h, 0.75 * h) - 0.3 * p["ry"])
    p["cy"] = rng.uniform(top, bottom)
    p["phases"] = rng.uniform(0, 2 * np.pi, size=24)
    p["amps"] = rng.uniform(0.3, 1.0, size=24)
    p["spike_angles"] = rng.uniform(-np.pi, np.pi, size=max(1, p["spikes"]))
    p["spike_len"] = rng.uniform(0.15, 0.55, size=max(1, p["spikes"]))
    p["spike_width"] = rng.uniform(0.015, 0.04, size=max(1, p["spikes"]))
    return p


def _boundary(theta: np.ndarray, p: dict, table_size: int = 2048) -> np.ndarray:
    """Radius of the lesion margin (1 = the underlying ellipse) at polar angle theta.

    Evaluated on a 1-D table of angles and looked up: the harmonics and spikes
    cost the same for a 700 px lesion as for a 40 px one.
    """
    table = _boundary_table(np.linspace(-np.pi, np.pi, table_size, endpoint=False), p)
    idx = np.rint((theta + np.pi) * (table_size / (2 * np.pi))).astype(np.int32) % table_size
    return table[idx]


def _boundary_table(theta: np.ndarray, p: dict) -> np.ndarray:
    r = np.ones_like(theta)
    for k in range(2, 5):  # macrolobulation
        r += p["lobes"] * p["amps"][k] / k * 2 * np.cos(k * theta + p["phases"][k])
    for k in range(7, 19):  # microlobulated / angular margin
        r += p["jitter"] * p["amps"][k] * np.cos(k * theta + p["phases"][k])
    for a, ln, wd in zip(p["spike_angles"][: p["spikes"]], p["spike_len"], p["spike_width"]):
        d = np.angle(np.exp(1j * (theta - a)))
        r += ln * np.exp(-0.5 * (d / wd) ** 2)
    return np.maximum(r, 0.3)


def _add_lesion(rng, e: np.ndarray, p: dict) -> np.ndarray:
    """Paints the lesion into ``e`` in place; returns its boolean mask."""
    h, w = e.shape
    reach = 1.9 * max(p["rx"], p["ry"])
    y0, y1 = int(max(0, p["cy"] - reach)), int(min(h, p["cy"] + reach + 1))
    x0, x1 = int(max(0, p["cx"] - reach)), int(min(w, p["cx"] + reach + 1))
    yy = np.arange(y0, y1, dtype=np.float32)[:, None]
    xx = np.arange(x0, x1, dtype=np.float32)[None, :]
    c, s = np.cos(p["angle"]), np.sin(p["angle"])
    dy, dx = yy - p["cy"], xx - p["cx"]
    u = (dx * c + dy * s) / p["rx"]
    v = (-dx * s + dy * c) / p["ry"]
    rho = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    rad = _boundary(theta, p)
    q = rho / rad  # < 1 inside
    inside = _soft_inside(q, p["edge"])
    bh, bw = inside.shape
    tex = np.exp(p["hetero"] * _smooth_noise(rng, bh, bw, max(2, bh // 10), max(2, bw // 10)))
    level = np.clip(p["level"] * tex, 0.02, 1.0)
    patch = e[y0:y1, x0:x1]
    patch *= 1 - inside * (1 - level)
    if p["capsule"]:
        patch += p["capsule"] * np.exp(-0.5 * ((q - 1.0) / 0.035) ** 2) * patch.mean()
    if p["halo"]:
        patch *= 1 + p["halo"] * np.exp(-0.5 * ((q - 1.12) / 0.07) ** 2)
    mask_patch = q < 1.0
    for _ in range(p["calc"]):  # microcalcifications: bright specks inside
        ys, xs = np.nonzero(mask_patch)
        if len(ys) == 0:
            break
        i = rng.integers(len(ys))
        rr = max(1, int(round(0.006 * min(h, w))))
        patch[max(0, ys[i] - rr) : ys[i] + rr + 1, max(0, xs[i] - rr) : xs[i] + rr + 1] *= (
            rng.uniform(3, 6)
        )
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = mask_patch
    if p["posterior"] != 1.0 and mask_patch.any():
        # Posterior shadowing / enhancement: a column below the lesion, as wide as
        # the lesion at each x, soft laterally, growing in over a short depth.
        cols = mask.any(axis=0)
        bottom = np.where(cols, h - 1 - np.argmax(mask[::-1], axis=0), h).astype(np.float32)
        k = max(3, int(0.15 * (x1 - x0)) | 1)
        weight = np.convolve(cols.astype(np.float32), np.ones(k, np.float32) / k, mode="same")
        bottom = np.minimum.reduce([bottom, np.roll(bottom, k // 2), np.roll(bottom, -(k // 2))])
        depth = np.arange(h, dtype=np.float32)[:, None] - (bottom[None, :] - 0.25 * p["ry"])
        ramp = np.clip(depth / (0.5 * p["ry"] + 1), 0, 1)
        e *= 1 + (p["posterior"] - 1) * ramp * weight[None, :]
    return mask


# ----------------------------------------------------------------------------- image


def render(rng: np.random.Generator, label: int, h: int, w: int):
    """(uint8 grayscale [h, w], bool mask [h, w]) of one synthetic B-mode image."""
    # Echogenicity is smooth next to the speckle: draw it at half resolution
    # (4x less work) and only the speckle and log compression at full size.
    f = 2 if min(h, w) >= 160 else 1
    h2, w2 = -(-h // f), -(-w // f)
    e, mask = _echogenicity(rng, label, h2, w2)
    # Depth attenuation only partly undone by time-gain compensation; slight lateral fall-off.
    yy = np.arange(h2, dtype=np.float32)[:, None] / h2
    xx = np.arange(w2, dtype=np.float32)[None, :] / w2
    e *= np.exp(-rng.uniform(0.4, 1.6) * yy) * (1 - rng.uniform(0, 0.25) * (2 * xx - 1) ** 2)
    # Scanners show tissue contrast steeper than the scatter strength ratio (the
    # exponent); speckle stays at its physical ~5.6 dB spread.
    db = 20 * rng.uniform(1.6, 2.0) * np.log10(np.maximum(e, 1e-4))
    if f > 1:
        db = _resize(db, h, w)
        mask = (
            np.asarray(
                Image.fromarray(mask.astype(np.uint8) * 255, "L").resize((w, h), Image.BILINEAR)
            )
            > 127
        )
    db += _speckle_db(rng, h, w)
    # Log compression into the display's dynamic range, then a gamma and gain
    # applied through a lookup table (a full-size pow() costs more than the rest).
    sub = db[:: max(1, h // 64), :: max(1, w // 64)].ravel()
    ref = np.partition(sub, int(rng.uniform(0.985, 0.998) * (sub.size - 1)))[
        int(0.99 * (sub.size - 1))
    ]
    dyn = rng.uniform(40, 55)
    lut = np.rint(
        255 * rng.uniform(0.85, 1.0) * np.linspace(0, 1, 1024) ** rng.uniform(1.8, 2.6)
    ).astype(np.uint8)
    db -= ref - dyn
    db *= 1023 / dyn
    np.clip(db, 0, 1023, out=db)
    return lut[db.astype(np.int32)], mask


def _echogenicity(rng, label, h, w):
    e, fat_depth, gland_depth = _tissue(rng, h, w)
    # Fat lobules in every breast; normal ones sometimes show a lobule deep in the
    # gland that looks like a small benign mass (normal vs benign overlap).
    _dark_ovals(
        rng,
        e,
        h,
        w,
        int(rng.integers(3, 9)),
        (0.06, fat_depth),
        (0.02, 0.06),
        (0.45, 0.75),
        (1.3, 3.0),
    )
    if label == 0 and rng.random() < 0.25:
        _dark_ovals(
            rng,
            e,
            h,
            w,
            1,
            (fat_depth, gland_depth * 0.9),
            (0.03, 0.07),
            (0.5, 0.75),
            (1.2, 2.2),
            edge=0.2,
        )
    mask = np.zeros((h, w), bool)
    n_lesions = 0 if label == 0 else (1 if rng.random() < 0.93 else 2)
    for _ in range(n_lesions):
        mask |= _add_lesion(rng, e, _lesion_params(rng, label, h, w, gland_depth))
    return e, mask


def _image_rng(seed: int, label: int, number: int) -> np.random.Generator:
    # Keyed by (seed, class, number) so that each image is the same however the
    # work is spread over threads, and whatever num is.
    return np.random.default_rng([seed, label, number, GENERATOR_VERSION])


def _image_shape(rng, min_size, max_size) -> tuple[int, int]:
    w = int(rng.integers(min_size, max_size + 1))
    h = int(np.clip(round(w * rng.uniform(0.7, 1.0)), min(min_size, w), max_size))
    return h, w
