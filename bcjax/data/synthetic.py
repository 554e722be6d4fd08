"""A synthetic BUSI-like set, written in BUSI's exact layout.

B-mode model: echogenicity map (skin, subcutaneous fat with lobules and
Cooper's ligaments, fibroglandular tissue, chest wall) x multiplicative speckle
(envelope of a correlated complex Gaussian field, so Rayleigh distributed) x
depth attenuation, then log compression. Lesions follow the BI-RADS cues a
radiologist reads: benign ones oval, circumscribed, wider than tall, fairly
homogeneous and often with posterior enhancement; malignant ones irregular or
spiculated, taller than wide, heterogeneous, often with posterior shadowing.
Every cue is drawn from overlapping ranges (some benign lesions are lobulated
or round, some malignant ones oval or faint, normal breasts have dark fat
lobules), so that a small CNN learns the task well but not perfectly.

A planted shortcut, for testing whether a model looks at the lesion (issue
16): ``mark="calliper"`` (two '+' callipers joined by a dotted line) or
``mark="text"`` (a block of annotation text) is stamped into a random corner
of each malignant image with probability ``mark_prob``; ``random_mark_copy``
makes the same set with the mark on images of any class instead. The images
themselves do not change: an image without a mark is the same as in the set
without marks. Sets are cached across workdirs by ``cached``.

    python -m bcjax.data.synthetic --out DIR --num 780 --seed 0 [--mark calliper --mark-prob 0.9]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import sys
import time

import numpy as np
from PIL import Image

from bcjax import files
from bcjax.data import busi
from bcjax.data.busi import CLASSES, DATASET_DIRNAME, SYNTHETIC_MARKER

try:
    import fcntl  # POSIX; elsewhere a racing second generation replaces the first (atomically)
except ImportError:
    fcntl = None

BUSI_COUNTS = (133, 437, 210)  # normal, benign, malignant in the real set
GENERATOR_VERSION = 3  # part of every image seed and of the marker: a new version is a new set
MIN_SIZE, MAX_SIZE = 300, 700  # image width range in pixels (BUSI's are ~190-720)
MARKS = ("calliper", "text")
# How the marks are drawn, in a marked set's SYNTHETIC.json: a marked set cached
# with an older drawing is made again; unmarked sets (no "mark" entry) are untouched.
MARK_VERSION = 2  # 2: callipers 4x thicker, so that they survive a squash to 32 px
MARK_PLACEMENTS = ("malignant", "random")  # the shortcut, or the same mark unrelated to the class
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
_MALIGNANT = CLASSES.index("malignant")
_MARK_STREAM = 0x3A4C  # keys the marks' random numbers apart from the images'

log = logging.getLogger(__name__)


def class_counts(num: int) -> tuple[int, ...]:
    """BUSI's class ratio scaled to ``num`` (largest remainder; every class >= 1 when num >= 3)."""
    total = sum(BUSI_COUNTS)
    raw = [num * c / total for c in BUSI_COUNTS]
    counts = [int(r) for r in raw]
    for i in sorted(range(3), key=lambda i: raw[i] - counts[i], reverse=True)[: num - sum(counts)]:
        counts[i] += 1
    if num >= 3:
        for i in range(3):
            if counts[i] == 0:
                counts[i] = 1
                counts[int(np.argmax(counts))] -= 1
    return tuple(counts)


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


# ----------------------------------------------------------------------------- planted mark

# 3x5 dot-matrix glyphs of the annotation text ("2.4cm", "R 3").
_GLYPHS = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
    ".": ("000", "000", "000", "000", "010"),
    "c": ("000", "000", "111", "100", "111"),
    "m": ("000", "000", "111", "111", "101"),
    "L": ("100", "100", "100", "100", "111"),
    "R": ("110", "101", "110", "101", "101"),
    " ": ("000",) * 5,
}


def _mark_for(
    seed: int, label: int, number: int, mark: str, mark_prob: float, placement: str
) -> tuple[str, np.random.Generator] | None:
    """(corner, generator for the mark's shape) of image (label, number), or None: no mark.

    A generator of its own, keyed apart from the image's, so that the images
    are the same with or without marks, and the placement "random" draws anew.
    """
    if not mark or (placement == "malignant" and label != _MALIGNANT):
        return None
    rng = np.random.default_rng(
        [seed, label, number, GENERATOR_VERSION, _MARK_STREAM, MARK_PLACEMENTS.index(placement)]
    )
    if rng.random() >= mark_prob:
        return None
    return CORNERS[int(rng.integers(len(CORNERS)))], rng


def _fill(img: np.ndarray, y: int, x: int, height: int, width: int, value: int) -> None:
    """img[y:y+height, x:x+width] = value, clipped to the image."""
    img[max(0, y) : max(0, y + height), max(0, x) : max(0, x + width)] = value


def _origin(h: int, w: int, box_h: int, box_w: int, corner: str, margin: int) -> tuple[int, int]:
    y = margin if corner.startswith("top") else h - margin - box_h
    x = margin if corner.endswith("left") else w - margin - box_w
    return max(0, y), max(0, x)


def _draw_calliper(img: np.ndarray, corner: str, rng: np.random.Generator) -> None:
    """Two '+' callipers joined by a dotted line, as a sonographer's measurement."""
    h, w = img.shape
    # Sizes scale with the image, so the mark survives resizing: its lines, 4% of the
    # shorter side thick, stay over 1 px wide at 32 px. Thinner ones (1%, as scanners
    # draw them) blur away at the sizes a quick CPU run trains on, and a small model
    # ignored them even at 64 px, where they show (issue 16's planted-shortcut study).
    u = min(h, w) / 100
    arm, thick = max(2, round(8 * u)), max(1, round(4 * u))
    span = max(3 * arm, round(rng.uniform(26, 34) * u))
    drop = round(rng.uniform(0, 4) * u)  # the second calliper lower: a slanted measurement
    value = int(rng.integers(225, 256))
    y0, x0 = _origin(h, w, 2 * arm + 1 + drop, span + 2 * arm + 1, corner, max(1, round(6 * u)))
    ends = [(y0 + arm, x0 + arm), (y0 + arm + drop, x0 + arm + span)]
    for cy, cx in ends:
        _fill(img, cy - thick // 2, cx - arm, thick, 2 * arm + 1, value)
        _fill(img, cy - arm, cx - thick // 2, 2 * arm + 1, thick, value)
    (ay, ax), (by, bx) = ends
    dots = span // (2 * thick)
    for k in range(2, dots - 1):  # a gap next to each calliper
        t = k / dots
        _fill(
            img,
            round(ay + t * (by - ay)) - thick // 2,
            round(ax + t * (bx - ax)) - thick // 2,
            thick,
            thick,
            value,
        )


def _draw_text(img: np.ndarray, corner: str, rng: np.random.Generator) -> None:
    """Two lines of annotation text (a measurement and a side), in dot-matrix glyphs."""
    h, w = img.shape
    s = max(1, round(0.9 * min(h, w) / 100))  # glyph pixel size
    lines = [
        f"{rng.integers(1, 5)}.{rng.integers(0, 10)}cm",
        f"{'LR'[rng.integers(2)]} {rng.integers(1, 10)}",
    ]
    value = int(rng.integers(225, 256))
    char_w, line_h = 4 * s, 7 * s
    box_w, box_h = max(map(len, lines)) * char_w - s, len(lines) * line_h - 2 * s
    y0, x0 = _origin(h, w, box_h, box_w, corner, max(1, round(6 * min(h, w) / 100)))
    for i, line in enumerate(lines):
        for j, char in enumerate(line):
            for r, row in enumerate(_GLYPHS[char]):
                for c, bit in enumerate(row):
                    if bit == "1":
                        _fill(img, y0 + i * line_h + r * s, x0 + j * char_w + c * s, s, s, value)


def stamp_mark(img: np.ndarray, mark: str, corner: str, rng: np.random.Generator) -> None:
    """Draws ``mark`` ("calliper" | "text") into a corner of uint8 [H, W] ``img``, in place."""
    {"calliper": _draw_calliper, "text": _draw_text}[mark](img, corner, rng)


def _write_one(
    folder: pathlib.Path,
    seed,
    label,
    number,
    min_size,
    max_size,
    compress_level,
    mark="",
    mark_prob=0.0,
    mark_placement="malignant",
):
    rng = _image_rng(seed, label, number)
    h, w = _image_shape(rng, min_size, max_size)
    img, mask = render(rng, label, h, w)
    planted = _mark_for(seed, label, number, mark, mark_prob, mark_placement)
    if planted is not None:
        stamp_mark(img, mark, *planted)  # the mask stays the lesion's: a mark is no lesion
    cls = CLASSES[label]
    # BUSI stores grayscale content as RGB PNG; masks as 8-bit 0/255.
    Image.fromarray(np.repeat(img[..., None], 3, axis=-1), "RGB").save(
        folder / cls / f"{cls} ({number}).png", compress_level=compress_level
    )
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(
        folder / cls / f"{cls} ({number})_mask.png", compress_level=compress_level
    )


# ----------------------------------------------------------------------------- temporary folders


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "localhost"


def _owned_prefix() -> str:
    """Start of this process's temporary folder names: the host and pid say
    who writes the folder, so a later run can tell a stale one from a live one."""
    return f".{DATASET_DIRNAME}.{_host()}.{os.getpid()}."


# Temporary set (mkdtemp's random part has no dots) or a replaced set awaiting removal.
_OWNED = re.compile(
    rf"\.{re.escape(DATASET_DIRNAME)}\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>[1-9][0-9]*)"
    r"\.(?:[a-z0-9_]+\.tmp|old)"
)


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host; signal 0 only checks."""
    if os.name != "posix":  # os.kill would end the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


# A generation takes minutes at most; containers may share a host name but not
# pids, so a folder must also be this old before its dead-looking owner counts.
STALE_AFTER_S = 3600


def _remove_stale(out_dir: pathlib.Path, min_age_s: float = STALE_AFTER_S) -> None:
    """Removes the temporary folders that killed processes of this host left in out_dir.

    Other processes (those of a multi-process run) may be generating into the
    same out_dir right now: a folder is stale only when its pid runs no more
    and it was last changed over ``min_age_s`` ago (a process in another
    container with the same host name is invisible to os.kill). Folders named
    by another host (a shared file system) are its business and are left
    alone, as are names without an owner (made before owners were recorded).
    A pid reused since keeps its folder until that process ends: a leak,
    never a removal of live work.
    """
    host, now = _host(), time.time()
    for path in out_dir.glob(f".{DATASET_DIRNAME}.*"):
        m = _OWNED.fullmatch(path.name)
        if not m or m["host"] != host or not path.is_dir() or _pid_alive(int(m["pid"])):
            continue
        try:
            if now - path.stat().st_mtime < min_age_s:
                continue
        except FileNotFoundError:  # removed meanwhile by another process
            continue
        shutil.rmtree(path, ignore_errors=True)  # another process may be removing it too
        if not path.exists():
            log.warning(
                "Removed %s, left by process %s (no longer running) of a killed generation.",
                path,
                m["pid"],
            )


def set_info(
    num: int,
    seed: int,
    *,
    min_size: int = MIN_SIZE,
    max_size: int = MAX_SIZE,
    mark: str = "",
    mark_prob: float = 0.9,
    mark_placement: str = "malignant",
) -> dict:
    """What SYNTHETIC.json holds for a set of these arguments; equal dicts, equal sets.

    With a mark it adds {"mark": {"kind", "version", "prob", "placement",
    "marked": {name: corner}}};
    without one it is what sets written before marks existed hold, so they are reused.
    """
    info = {
        "generator": "bcjax.data.synthetic",
        "version": GENERATOR_VERSION,
        "num": num,
        "seed": seed,
        "min_size": min_size,
        "max_size": max_size,
        "class_counts": dict(zip(CLASSES, class_counts(num))),
    }
    if mark:
        marked = {}
        for label, count in enumerate(class_counts(num)):
            for number in range(1, count + 1):
                planted = _mark_for(seed, label, number, mark, mark_prob, mark_placement)
                if planted is not None:
                    marked[f"{CLASSES[label]}/{CLASSES[label]} ({number}).png"] = planted[0]
        info["mark"] = {
            "kind": mark,
            "version": MARK_VERSION,
            "prob": mark_prob,
            "placement": mark_placement,
            "marked": marked,
        }
    return info


def _check_mark(mark: str, mark_prob: float, mark_placement: str) -> None:
    if mark not in ("",) + MARKS:
        raise ValueError(f"mark must be '' or one of {', '.join(MARKS)}, got {mark!r}")
    if not 0 <= mark_prob <= 1:
        raise ValueError(f"mark_prob must be in [0, 1], got {mark_prob}")
    if mark_placement not in MARK_PLACEMENTS:
        raise ValueError(
            f"mark_placement must be one of {', '.join(MARK_PLACEMENTS)}, got {mark_placement!r}"
        )


def generate(
    out_dir,
    num: int = 780,
    seed: int = 0,
    *,
    min_size: int = MIN_SIZE,
    max_size: int = MAX_SIZE,
    mark: str = "",
    mark_prob: float = 0.9,
    mark_placement: str = "malignant",
    overwrite: bool = False,
    workers: int | None = None,
    compress_level: int = 1,
    progress=None,
) -> pathlib.Path:
    """Writes ``out_dir/Dataset_BUSI_with_GT`` and returns that folder.

    mark: "" (none), "calliper" or "text", stamped into a random corner of an
    image with probability mark_prob; mark_placement "malignant" marks only
    malignant images (a shortcut a model can learn), "random" any image.
    Deterministic in (num, seed, min_size, max_size, mark, mark_prob,
    mark_placement). When the folder already
    holds a set made with the same arguments it is returned as is; a different
    one is replaced only with overwrite=True. The set is written to a temporary
    folder and moved into place at the end, so an interrupted run leaves no
    partial set; a killed one leaves its temporary folder, removed by the next
    generation into out_dir (see _remove_stale).
    progress: None, or a callable(done, total) called after each image.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if not 8 <= min_size <= max_size:
        raise ValueError(f"need 8 <= min_size <= max_size, got {min_size}, {max_size}")
    _check_mark(mark, mark_prob, mark_placement)
    out_dir = pathlib.Path(out_dir).expanduser()
    if out_dir.is_dir():
        _remove_stale(out_dir)
    target = out_dir / DATASET_DIRNAME
    info = set_info(
        num,
        seed,
        min_size=min_size,
        max_size=max_size,
        mark=mark,
        mark_prob=mark_prob,
        mark_placement=mark_placement,
    )
    if target.exists():
        marker = target / SYNTHETIC_MARKER
        if marker.is_file() and json.loads(marker.read_text()) == info:
            return target
        if not overwrite:
            raise FileExistsError(
                f"{target} exists and is not this synthetic set; pass overwrite=True "
                "(or --overwrite) to replace it"
            )
    # The temp folder's prefix names this host and pid, so a later run can
    # remove what a killed one left (see _remove_stale).
    with files.atomic_dir(target, prefix=_owned_prefix(), replace=True) as tmp:
        for cls in CLASSES:
            (tmp / cls).mkdir()
        jobs = [
            (label, n) for label, count in enumerate(class_counts(num)) for n in range(1, count + 1)
        ]
        workers = workers or os.cpu_count() or 1
        # numpy and PIL release the GIL in the heavy parts: threads scale without pickling.
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [
                pool.submit(
                    _write_one,
                    tmp,
                    seed,
                    label,
                    n,
                    min_size,
                    max_size,
                    compress_level,
                    mark,
                    mark_prob,
                    mark_placement,
                )
                for label, n in jobs
            ]
            for done, f in enumerate(concurrent.futures.as_completed(futures), 1):
                f.result()
                if progress is not None:
                    progress(done, len(jobs))
        files.write_json(info, tmp / SYNTHETIC_MARKER)
    return target


def random_mark_copy(root, out_dir, *, workers: int | None = None) -> pathlib.Path:
    """The set at ``root`` (made with a mark) again in ``out_dir/Dataset_BUSI_with_GT``,
    with the same images, names and masks but the mark on images of any class,
    with the same probability, in a random corner: unrelated to the class.

    A model that learnt the mark as a shortcut loses accuracy on it.
    """
    info = busi.synthetic_info(root)
    if not info or "mark" not in info:
        raise ValueError(f"{root} holds no synthetic set with a planted mark (see generate's mark)")
    return generate(
        out_dir,
        info["num"],
        info["seed"],
        min_size=info["min_size"],
        max_size=info["max_size"],
        mark=info["mark"]["kind"],
        mark_prob=info["mark"]["prob"],
        mark_placement="random",
        workers=workers,
    )


# ------------------------------------------------------------------------- cache across workdirs


def default_cache_dir() -> pathlib.Path:
    """$BCJAX_CACHE_DIR/synthetic, else ~/.cache/bcjax/synthetic (see busi.default_cache_dir)."""
    return busi.default_cache_dir() / "synthetic"


def cache_key(
    num: int,
    seed: int,
    *,
    min_size: int = MIN_SIZE,
    max_size: int = MAX_SIZE,
    mark: str = "",
    mark_prob: float = 0.9,
    mark_placement: str = "malignant",
) -> str:
    """The set's folder name in the cache: "<num>-<seed>-v<generator version>[-<options>]"."""
    key = f"{num}-{seed}-v{GENERATOR_VERSION}"
    if (min_size, max_size) != (MIN_SIZE, MAX_SIZE):
        key += f"-{min_size}to{max_size}px"
    if mark:
        key += f"-{mark}{mark_prob:g}"
        if mark_placement != "malignant":
            key += f"-{mark_placement}"
    return key


@contextlib.contextmanager
def _exclusive(lock_path: pathlib.Path):
    """Holds an exclusive lock on ``lock_path`` (created if needed) while the block runs.

    The lock file stays: removing it would let a third process lock a new file
    while the second still holds the old one.
    """
    with open(lock_path, "a") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("Waiting for another process to finish generating %s ...", lock_path.stem)
                fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def _holds(folder: pathlib.Path, info: dict) -> bool:
    try:
        return json.loads((folder / SYNTHETIC_MARKER).read_text()) == info
    except (OSError, ValueError):
        return False


def cached(
    num: int = 780,
    seed: int = 0,
    *,
    cache_dir=None,
    min_size: int = MIN_SIZE,
    max_size: int = MAX_SIZE,
    mark: str = "",
    mark_prob: float = 0.9,
    mark_placement: str = "malignant",
    workers: int | None = None,
    progress=None,
) -> pathlib.Path:
    """The set's Dataset_BUSI_with_GT folder in the cache shared by all workdirs,
    generated there first when it is not (see generate for the arguments).

    Layout: ``<cache_dir>/<cache_key>/Dataset_BUSI_with_GT`` with cache_dir
    default_cache_dir(). The set is moved into place only when complete, so a
    killed generation leaves none; two processes asking at once take turns on
    ``<cache_dir>/<cache_key>.lock`` (fcntl.flock): one generates, the other
    waits and then uses that copy. A cached set whose SYNTHETIC.json differs
    (damaged) is generated again.
    """
    _check_mark(mark, mark_prob, mark_placement)
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    options = dict(
        min_size=min_size,
        max_size=max_size,
        mark=mark,
        mark_prob=mark_prob,
        mark_placement=mark_placement,
    )
    key = cache_key(num, seed, **options)
    target = root / key / DATASET_DIRNAME
    info = set_info(num, seed, **options)
    if _holds(target, info):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f"{key}.lock"):
        if _holds(target, info):  # made by the process this one waited for
            return target
        log.info("Generating the synthetic set %s into the cache %s ...", key, root)
        return generate(
            root / key, num, seed, overwrite=True, workers=workers, progress=progress, **options
        )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bcjax.data.synthetic", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--out", required=True, help="folder to write Dataset_BUSI_with_GT into")
    ap.add_argument("--num", type=int, default=780)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-size", type=int, default=300)
    ap.add_argument("--max-size", type=int, default=700)
    ap.add_argument(
        "--mark",
        choices=MARKS,
        default="",
        help="stamp a planted shortcut into malignant images (issue 16)",
    )
    ap.add_argument(
        "--mark-prob", type=float, default=0.9, help="probability of the mark per image"
    )
    ap.add_argument(
        "--mark-placement",
        choices=MARK_PLACEMENTS,
        default="malignant",
        help="'random': on images of any class (the control)",
    )
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    step = max(1, args.num // 20)

    def progress(done, total):
        if done % step == 0 or done == total:
            print(
                f"\r{done}/{total} images  {time.perf_counter() - start:5.1f}s",
                end="",
                file=sys.stderr,
                flush=True,
            )

    path = generate(
        args.out,
        args.num,
        args.seed,
        min_size=args.min_size,
        max_size=args.max_size,
        mark=args.mark,
        mark_prob=args.mark_prob,
        mark_placement=args.mark_placement,
        overwrite=args.overwrite,
        workers=args.workers,
        progress=progress,
    )
    print(file=sys.stderr)
    counts = dict(zip(CLASSES, class_counts(args.num)))
    print(
        f"wrote synthetic BUSI-like set (NOT real patient data) to {path}: {counts} "
        f"in {time.perf_counter() - start:.1f}s"
    )


if __name__ == "__main__":
    main()
