"""Does the evidence sit on the lesion? Heat maps scored against lesion masks.

For every image with a non-empty lesion mask and its heat map (Grad-CAM of the
predicted class; any non-negative map), the map upsampled bilinearly to the
mask's size (half-pixel centres, as jax.image.resize):

* mass inside: the fraction of the map's positive mass that falls inside the
  mask. Chance: the mask's area fraction (what a uniform map scores).
* pointing game (Zhang et al. 2016): is the map's maximum inside the mask
  dilated by a tolerance disk of radius `tolerance_fraction` x the image's
  longer side (default 5%: 3 px at 64 px, 11 px at 224 px)? Where several
  pixels share the maximum (an upsampled map is flat beyond its outer cell
  centres) the hit is the fraction of them inside. Chance: the probability
  that the dilated mask holds the maximum of a map whose peak cell is drawn
  uniformly from the map's grid. A coarse map can only peak at a cell centre
  or in a border strip, never anywhere: with ResNet's 2x2 grid at 64 px the
  maximum always lies in a corner quadrant's outer half, so a central lesion
  can be hit by no map at all, and its chance is 0. Given maps already at the
  mask's size, the grid is the pixel grid and the chance is the dilated
  mask's area fraction (what a uniform map scores).

Pass maps at their own resolution (`gradcam.explain(..., upsample=False)`):
the grid is then known. A map with no positive value (Grad-CAM found no
evidence for the class) has no mass to place: it is counted as empty and left
out of the means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from bcjax.clinical import bootstrap

__all__ = [
    "TOLERANCE_FRACTION",
    "WORST",
    "dilate",
    "grounding_report",
    "mass_inside",
    "pointing_chance",
    "pointing_hits",
    "resize_maps",
    "tolerance_pixels",
]

TOLERANCE_FRACTION = 0.05
WORST = 8
# Pixels within this relative distance of the maximum share it: bilinear
# upsampling in float32 can leave a flat region a few ulps apart.
_TIE = 1e-6


def _interpolation_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] linear weights with half-pixel centres, clamped at the edges."""
    x = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
    lo = np.floor(x).astype(np.int64)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = x - lo
    m = np.zeros((size_out, size_in))
    np.add.at(m, (np.arange(size_out), lo), 1 - frac)
    np.add.at(m, (np.arange(size_out), hi), frac)
    return m


def resize_maps(maps, shape: tuple[int, int]) -> np.ndarray:
    """Maps [N, h, w] bilinearly resized to [N, *shape] (float64); for upsampling
    the same as jax.image.resize(..., "bilinear")."""
    maps = np.asarray(maps, np.float64)
    if maps.shape[1:] == tuple(shape):
        return maps
    rows = _interpolation_matrix(maps.shape[1], shape[0])
    cols = _interpolation_matrix(maps.shape[2], shape[1])
    return np.einsum("oh,nhw,pw->nop", rows, maps, cols)


def tolerance_pixels(shape: Sequence[int], fraction: float = TOLERANCE_FRACTION) -> int:
    """The pointing-game tolerance radius in pixels: fraction x the longer side, >= 1."""
    return max(1, int(round(fraction * max(shape))))


def dilate(masks, radius: int) -> np.ndarray:
    """Boolean masks [N, H, W] grown by a disk of `radius` pixels."""
    masks = np.asarray(masks) > 0
    if radius <= 0:
        return masks
    # The disk's row dy spans |dx| <= half-width(dy): each output row is the OR of the rows
    # dy away grown sideways by that width (a running count along the row). In numpy, not
    # scipy.ndimage.binary_dilation (the same result): scipy's import costs a run 0.3 s.
    n, h, w = masks.shape
    counts = np.zeros((n, h, w + 1), np.int32)
    np.cumsum(masks, axis=2, out=counts[:, :, 1:])
    x = np.arange(w)
    grown_by: dict[int, np.ndarray] = {}
    out = np.zeros_like(masks)
    for dy in range(-min(radius, h - 1), min(radius, h - 1) + 1):
        half = math.isqrt(radius**2 - dy**2)  # the largest |dx| with dx² + dy² <= radius²
        if half not in grown_by:
            hi, lo = np.minimum(x + half + 1, w), np.maximum(x - half, 0)
            grown_by[half] = counts[:, :, hi] > counts[:, :, lo]
        grown = grown_by[half]
        if dy >= 0:
            out[:, : h - dy] |= grown[:, dy:]
        else:
            out[:, -dy:] |= grown[:, : h + dy]
    return out


def mass_inside(maps, masks) -> np.ndarray:
    """[N] fraction of each map's positive mass inside its mask; NaN for a map
    with no positive mass."""
    masks = np.asarray(masks) > 0
    maps = np.clip(resize_maps(maps, masks.shape[1:]), 0.0, None)
    total = maps.sum(axis=(1, 2))
    inside = (maps * masks).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / total, np.nan)


def pointing_hits(maps, target_masks) -> np.ndarray:
    """[N] the fraction of each map's maximum pixels inside its (already dilated)
    target mask: 1 or 0 for a single maximum; NaN for a map with no positive value."""
    target_masks = np.asarray(target_masks) > 0
    maps = resize_maps(maps, target_masks.shape[1:])
    at_peak = pointing_regions(maps)
    hits = (at_peak & target_masks).sum(axis=(1, 2)) / at_peak.sum(axis=(1, 2))
    return np.where(maps.max(axis=(1, 2)) > 0, hits, np.nan)


def peak_regions(grid: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """bool [h * w, H, W]: where the upsampled map's maximum lies when cell k of
    the h x w grid holds the map's peak (found by upsampling a one-hot map)."""
    h, w = grid
    one_hot = np.eye(h * w).reshape(h * w, h, w)
    return pointing_regions(resize_maps(one_hot, tuple(shape)))


def pointing_regions(maps: np.ndarray) -> np.ndarray:
    """bool [N, H, W]: the pixels sharing each map's maximum."""
    peak = maps.max(axis=(1, 2), keepdims=True)
    return maps >= peak * (1 - _TIE)


def pointing_chance(target_masks, grid: Sequence[int] | None = None) -> np.ndarray:
    """[N] the pointing score of a map whose peak is in a uniformly random cell of
    `grid` (None: the masks' own pixel grid, i.e. the target's area fraction)."""
    target_masks = np.asarray(target_masks) > 0
    shape = target_masks.shape[1:]
    if grid is None or tuple(grid) == tuple(shape):
        return target_masks.mean(axis=(1, 2))
    regions = peak_regions(grid, shape).reshape(-1, shape[0] * shape[1]).astype(np.float64)
    targets = target_masks.reshape(len(target_masks), -1).astype(np.float64)
    # Each region's pixels weigh 1/size: the target pixels it holds over its size. The
    # counts are exact in float64 (and BLAS's: a bool operand made numpy loop in Python speed).
    inside = regions @ targets.T
    return (inside / regions.sum(axis=1, keepdims=True)).mean(axis=0)


def _mean_interval(
    values: np.ndarray, resamples: int, rng: np.random.Generator, confidence: float
) -> dict[str, Any]:
    values = values[np.isfinite(values)]
    if not values.size:
        return {"mean": None, "low": None, "high": None}
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = bootstrap.percentile_interval(means, confidence)
    return {"mean": float(values.mean()), "low": low, "high": high}


def _group(
    scores: dict[str, np.ndarray],
    where: np.ndarray,
    resamples: int,
    rng: np.random.Generator,
    confidence: float,
) -> dict[str, Any]:
    usable = where & np.isfinite(scores["mass_inside"])

    def mean(x):
        return {"mean": float(x[usable].mean()) if usable.any() else None}

    return {
        "images": int(where.sum()),
        "empty_maps": int((where & ~usable).sum()),
        "mass_inside": _mean_interval(scores["mass_inside"][usable], resamples, rng, confidence),
        "mass_chance": mean(scores["mask_fraction"]),
        "mass_above_chance": _mean_interval(
            (scores["mass_inside"] - scores["mask_fraction"])[usable], resamples, rng, confidence
        ),
        "pointing": _mean_interval(scores["pointing"][usable], resamples, rng, confidence),
        "pointing_chance": mean(scores["pointing_chance"]),
    }


def grounding_report(
    cams,
    masks,
    labels,
    predicted,
    class_names: Sequence[str],
    *,
    tolerance_fraction: float = TOLERANCE_FRACTION,
    worst: int = WORST,
    resamples: int = bootstrap.RESAMPLES,
    seed: int = 0,
    confidence: float = bootstrap.CONFIDENCE,
) -> dict[str, Any]:
    """The `grounding` section.

    Args:
      cams: [N, h, w] non-negative heat maps (Grad-CAM of the predicted class), best
        at their own resolution: the pointing chance then knows their grid.
      masks: [N, H, W] lesion masks (bool or {0, >0}); an empty mask (a normal
        image) leaves the image out.
      labels, predicted: [N] true and predicted class ids.
      class_names: the C class names.

    Returns:
      {"map", "map_grid", "tolerance_fraction", "tolerance_px", "resamples", "seed",
       "confidence",
       "per_class": {true class with lesion images: group},
       "all": group,
       "least_grounded": [{"index", "true", "predicted", "mass_inside",
                           "mask_fraction", "pointing"}, ...]  (up to `worst`,
                          lowest mass inside first; index into the inputs)}
      with group = {"images", "empty_maps", "mass_inside": {"mean", "low", "high"},
      "mass_chance": {"mean"}, "mass_above_chance": {"mean", "low", "high"},
      "pointing": {"mean", "low", "high"}, "pointing_chance": {"mean"}}.
      Intervals: percentile bootstrap of the mean over the group's images.
    """
    masks = np.asarray(masks) > 0
    cams = np.asarray(cams)
    labels = np.asarray(labels).astype(np.int64)
    predicted = np.asarray(predicted).astype(np.int64)
    if masks.ndim != 3 or cams.ndim != 3 or not len(cams) == len(masks) == len(labels):
        raise ValueError(
            f"want cams [N, h, w], masks [N, H, W], labels [N]; got "
            f"{cams.shape}, {masks.shape}, {labels.shape}"
        )
    names = list(class_names)
    radius = tolerance_pixels(masks.shape[1:], tolerance_fraction)
    has_lesion = masks.any(axis=(1, 2))
    lesion = np.flatnonzero(has_lesion)
    target = dilate(masks[lesion], radius)
    scores = {
        name: np.full(len(labels), np.nan)
        for name in ("mass_inside", "mask_fraction", "pointing", "pointing_chance")
    }
    scores["mass_inside"][lesion] = mass_inside(cams[lesion], masks[lesion])
    scores["mask_fraction"][lesion] = masks[lesion].mean(axis=(1, 2))
    scores["pointing"][lesion] = pointing_hits(cams[lesion], target)
    scores["pointing_chance"][lesion] = pointing_chance(target, cams.shape[1:])

    rng = np.random.default_rng(seed)
    per_class = {}
    for k, name in enumerate(names):
        where = has_lesion & (labels == k)
        if where.any():
            per_class[name] = _group(scores, where, resamples, rng, confidence)
    ranked = [
        i
        for i in np.argsort(scores["mass_inside"], kind="stable")
        if np.isfinite(scores["mass_inside"][i])
    ][:worst]
    return {
        "map": "Grad-CAM of the predicted class, upsampled bilinearly to the mask",
        "map_grid": list(cams.shape[1:]),
        "tolerance_fraction": tolerance_fraction,
        "tolerance_px": radius,
        "resamples": int(resamples),
        "seed": int(seed),
        "confidence": confidence,
        "per_class": per_class,
        "all": _group(scores, has_lesion, resamples, rng, confidence),
        "least_grounded": [
            {
                "index": int(i),
                "true": names[labels[i]],
                "predicted": names[predicted[i]],
                "mass_inside": float(scores["mass_inside"][i]),
                "mask_fraction": float(scores["mask_fraction"][i]),
                "pointing": float(scores["pointing"][i]),
            }
            for i in ranked
        ],
    }
