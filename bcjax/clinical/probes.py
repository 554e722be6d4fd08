"""Shortcut probes: does the prediction survive without the lesion, or with nothing else?

Two altered copies of each test image that has a lesion mask, both filled with
tissue from around the lesion at the same depth (ultrasound brightness and
speckle change with depth; a row is one depth), never a flat colour, which
would be a shortcut of its own:

* lesion removed: the mask grown by `removal_margin` (default 4% of the longer
  side, >= 1 px) is filled row by row with the mirror image of the tissue
  beside it, from the side with more of it, so the texture runs on across the
  region's edge. A region spanning a whole row is then filled along columns.
* lesion only: everything farther than `context_margin` (default 8%, >= 2 px)
  from the mask is filled with pixels drawn at random from that margin ring,
  each from ring rows within a margin of its own depth (the ring's top or
  bottom rows above or below it). Mirroring a ring a few pixels thick across
  the whole image would paint stripes, a structure of its own; random draws
  keep the ring's brightness by depth and lose only its spatial grain.

Images without a mask (normal) are left unchanged. Seeded: the same inputs
give the same copies.

`shortcut_flags` reads a probe report and says whether the model relies on
something other than the lesion, by two named criteria (see its docstring),
each with the numbers behind it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bcjax.clinical import bootstrap, grounding

__all__ = [
    "ACCURACY_DROP",
    "CONTEXT_MARGIN",
    "PROBE_LIMITS",
    "RANDOM_MARK",
    "RECALL_KEPT",
    "REMOVAL_MARGIN",
    "keep_lesion_only",
    "probe_images",
    "probe_report",
    "remove_lesion",
    "shortcut_flags",
]

REMOVAL_MARGIN = 0.04
CONTEXT_MARGIN = 0.08

# The probe version holding predictions on a copy of the test set with the planted
# mark placed at random (bcjax.data.synthetic.random_mark_copy); only synthetic sets have one.
RANDOM_MARK = "random_mark"
# shortcut_flags' thresholds; why these values: see its docstring.
RECALL_KEPT = 0.75
ACCURACY_DROP = 0.15

PROBE_LIMITS = (
    "Probe limits: the fills copy tissue from the same depth, so they keep brightness by "
    "depth but not the exact texture (mirror seams where the lesion was; grainless random "
    "tissue around a kept lesion). Lesion removal changes nothing outside the grown mask: "
    "posterior shadowing or enhancement below a lesion (a real sign of malignancy) survives "
    "it, so accuracy that survives lesion removal may rest on that sign rather than on an "
    "artefact. Both copies are outside the training distribution, so some accuracy loss is "
    "the alteration itself. Hand-drawn masks miss parts of lesions; the margins cover small "
    "misses only. Images without a mask (normal) are unchanged, so the probes speak about "
    "lesion images only."
)


def _mirror(distance: np.ndarray, length: int) -> np.ndarray:
    """Offsets 0, 1, .., length-1, length-1, .., 0, 0, 1, .. (reflect padding)."""
    t = distance % (2 * length)
    return np.where(t < length, t, 2 * length - 1 - t)


def _fill_rows(image: np.ndarray, fill: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Fills each run of `fill` in each row of `image` (in place) with the mirrored
    `source` pixels beside it; returns the pixels filled (runs without source
    beside them stay). Only source pixels are read and only fill pixels written, so
    every run is filled at once (numpy over all runs, no loop per row)."""
    width = fill.shape[1]
    filled = np.zeros_like(fill)
    edges = np.diff(np.pad(fill.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    row, start = np.nonzero(edges == 1)  # row-major: each row's runs in order
    stop = np.nonzero(edges == -1)[1]
    if not len(row):
        return filled
    # The source pixels just left of each run and just right of it, contiguous: up to
    # the last pixel that is not source before the run, the first one after it.
    x = np.arange(width)
    blocked = ~source
    last_blocked = np.maximum.accumulate(np.where(blocked, x, -1), axis=1)
    next_blocked = np.minimum.accumulate(np.where(blocked, x, width)[:, ::-1], axis=1)[:, ::-1]
    before = np.where(start > 0, last_blocked[row, np.maximum(start - 1, 0)], -1)
    after = np.where(stop < width, next_blocked[row, np.minimum(stop, width - 1)], width)
    left, right = start - 1 - before, after - stop
    keep = (left > 0) | (right > 0)
    row, start, stop, left, right = row[keep], start[keep], stop[keep], left[keep], right[keep]
    # One entry per pixel of the kept runs.
    run = np.repeat(np.arange(len(row)), stop - start)
    first = np.cumsum(stop - start) - (stop - start)
    px = start[run] + np.arange(len(run)) - first[run]
    from_left = px - start[run]
    from_right = stop[run] - 1 - px
    # Each pixel from the side that needs fewer reflections to reach it.
    lr, rr = left[run], right[run]
    cost_left = np.where(lr > 0, from_left / np.maximum(lr, 1), np.inf)
    cost_right = np.where(rr > 0, from_right / np.maximum(rr, 1), np.inf)
    src = np.where(
        cost_left <= cost_right,
        start[run] - 1 - _mirror(from_left, np.maximum(lr, 1)),
        stop[run] + _mirror(from_right, np.maximum(rr, 1)),
    )
    y = row[run]
    image[y, px] = image[y, src]
    filled[y, px] = True
    return filled


def _mirror_fill(image: np.ndarray, fill: np.ndarray, source: np.ndarray) -> np.ndarray:
    """A copy of `image` with `fill` replaced by texture from `source`: rows first,
    then columns for what rows could not reach, then (a region with no source
    in its rows or columns) the mean of the source."""
    out = np.array(image, copy=True)
    if not fill.any():
        return out
    fill = fill & ~source
    done = _fill_rows(out, fill, source)
    rest = fill & ~done
    if rest.any():
        # Transposed views: the column pass writes into `out` itself.
        done_t = _fill_rows(out.swapaxes(0, 1), rest.T, (source | done).T)
        rest &= ~done_t.T
    if rest.any():
        pool = out[source | (fill & ~rest)]
        out[rest] = pool.mean(axis=0) if len(pool) else out[rest]
    return out


def _margin(shape: Sequence[int], fraction: float, least: int) -> int:
    return max(least, int(round(fraction * max(shape[:2]))))


def remove_lesion(image, mask, *, margin: float = REMOVAL_MARGIN) -> np.ndarray:
    """`image` [H, W] or [H, W, C] with the mask grown by `margin` x the longer side
    replaced by same-depth tissue from beside it (see the module docstring)."""
    image = np.asarray(image)
    mask = np.asarray(mask) > 0
    region = grounding.dilate(mask[None], _margin(mask.shape, margin, 1))[0]
    return _mirror_fill(image, region, ~region)


def _draw_by_depth(
    image: np.ndarray, fill: np.ndarray, source: np.ndarray, band: int, rng: np.random.Generator
) -> np.ndarray:
    """A copy of `image` whose `fill` pixels are drawn at random from the `source`
    pixels in rows within `band` of their own row (clamped to the source's rows)."""
    out = np.array(image, copy=True)
    ys, xs = np.nonzero(source)  # row-major: ys ascending
    rows = np.flatnonzero(fill.any(axis=1))
    depth = np.clip(rows, ys[0], ys[-1])
    lo = np.searchsorted(ys, depth - band, side="left")
    hi = np.searchsorted(ys, depth + band, side="right")
    counts = fill.sum(axis=1)[rows]
    # One draw per row, in row order: the same random stream as drawing row by row.
    pick = np.concatenate(
        [rng.integers(a, b, size=k) for a, b, k in zip(lo, hi, counts)] or [np.zeros(0, int)]
    )
    fill_y, fill_x = np.nonzero(fill)  # row-major, as the draws
    out[fill_y, fill_x] = image[ys[pick], xs[pick]]
    return out


def keep_lesion_only(image, mask, *, margin: float = CONTEXT_MARGIN, seed: int = 0) -> np.ndarray:
    """`image` with everything farther than `margin` x the longer side from the mask
    replaced by pixels of that margin ring (see the module docstring)."""
    image = np.asarray(image)
    mask = np.asarray(mask) > 0
    if not mask.any():
        return np.array(image, copy=True)
    band = _margin(mask.shape, margin, 2)
    kept = grounding.dilate(mask[None], band)[0]
    return _draw_by_depth(image, ~kept, kept & ~mask, band, np.random.default_rng(seed))


def probe_images(
    images, masks, *, removal_margin: float = REMOVAL_MARGIN, context_margin: float = CONTEXT_MARGIN
) -> dict[str, np.ndarray]:
    """{"lesion_removed", "lesion_only": uint8 like `images` [N, H, W, C],
    "has_lesion": bool [N]}; images with an empty mask are copied unchanged.
    Image i's random draws are seeded with i."""
    images = np.asarray(images)
    masks = np.asarray(masks) > 0
    has_lesion = masks.any(axis=(1, 2))
    removed = images.copy()
    only = images.copy()
    for i in np.flatnonzero(has_lesion):
        removed[i] = remove_lesion(images[i], masks[i], margin=removal_margin)
        only[i] = keep_lesion_only(images[i], masks[i], margin=context_margin, seed=int(i))
    return {"lesion_removed": removed, "lesion_only": only, "has_lesion": has_lesion}


def _version(
    probs: np.ndarray, labels: np.ndarray, has_lesion: np.ndarray, names: Sequence[str]
) -> dict[str, Any]:
    plain = bootstrap.weighted_metrics(np.ones((1, len(labels))), probs, labels)
    correct = probs.argmax(axis=1) == labels

    def finite(x):
        return float(x) if np.isfinite(x) else None

    return {
        "accuracy": finite(plain["accuracy"][0]),
        "auc_macro": finite(plain["auc_macro"][0]),
        "lesion_images_accuracy": (float(correct[has_lesion].mean()) if has_lesion.any() else None),
        "recall": {
            name: (float(correct[labels == k].mean()) if (labels == k).any() else None)
            for k, name in enumerate(names)
        },
    }


def probe_report(
    labels,
    has_lesion,
    probs: Mapping[str, Any],
    class_names: Sequence[str],
    *,
    removal_margin: float = REMOVAL_MARGIN,
    context_margin: float = CONTEXT_MARGIN,
) -> dict[str, Any]:
    """The probe numbers: per version ("original", "lesion_removed", "lesion_only",
    and RANDOM_MARK where there is such a copy: class probabilities [N, C] of
    the test images in that version) its accuracy, macro AUC, accuracy over
    lesion images and recall per class.

    {"lesion_images", "removal_margin", "context_margin", "limits",
     "versions": {version: {"accuracy", "auc_macro", "lesion_images_accuracy",
                            "recall": {class: value}}}}
    A model that keeps its malignant recall with the lesion removed relies on
    something outside the lesion; read it with `limits`.
    """
    labels = np.asarray(labels).astype(np.int64)
    has_lesion = np.asarray(has_lesion, bool)
    return {
        "lesion_images": int(has_lesion.sum()),
        "removal_margin": removal_margin,
        "context_margin": context_margin,
        "limits": PROBE_LIMITS,
        "versions": {
            version: _version(np.asarray(p, np.float64), labels, has_lesion, list(class_names))
            for version, p in probs.items()
        },
    }


def _kept(original, altered):
    """altered / original, or None where it says nothing (no original recall)."""
    if original is None or altered is None or original <= 0:
        return None
    return altered / original


def shortcut_flags(
    report: Mapping[str, Any],
    positive_class: str,
    *,
    recall_kept: float = RECALL_KEPT,
    accuracy_drop: float = ACCURACY_DROP,
) -> dict[str, Any]:
    """Does the probe report (`probe_report`'s dict) show a model that decides on
    something other than the lesion? Two criteria; `flagged` if either holds.

    * survives_lesion_removal: the positive class's recall with the lesion removed
      is at least `recall_kept` (0.75) of its recall on the original images. A
      model left with nothing to go on calls a lesion-removed image positive at
      about its rate on lesion-free images (near 0 for a model that calls those
      normal), so its kept share falls toward 0. In the planted-shortcut study
      (tests/test_shortcut_probe.py, seeds 0-3 at 10 and 15 epochs) the
      unmarked models kept 0.29-0.56
      (posterior shadowing survives the removal: see PROBE_LIMITS), the models
      trained with the mark 0.92-0.99.
    * drops_on_random_mark: accuracy on the "random_mark" version (the same test
      images with the planted mark placed at random) is at least `accuracy_drop`
      (0.15) below the original accuracy. A model that ignores the mark loses
      nothing in expectation; the unmarked models lost at most 0.08, the mark
      being a foreign object to them. One that calls every marked image positive loses
      about p x (accuracy - prevalence of the positive class) with the mark on a
      share p of the images: 0.6 for p = 1 at accuracy 0.88 and prevalence 0.27
      (measured 0.52-0.60). 0.15 is a quarter of that. None (not judged) without
      a "random_mark" version, as on BUSI, where only the first criterion speaks.

    Grounding is not a criterion: at the image sizes a quick check trains on, the
    Grad-CAM grid is too coarse to say where the evidence lies (see grounding).
    {"flagged": bool, "positive_class",
     "criteria": {name: {"flagged": bool | None, "threshold", and its numbers}}}
    """
    versions = report["versions"]
    original = versions["original"]
    removed = versions.get("lesion_removed")
    recall = original["recall"][positive_class]
    removed_recall = removed["recall"][positive_class] if removed else None
    kept = _kept(recall, removed_recall)
    criteria = {
        "survives_lesion_removal": {
            "flagged": None if kept is None else bool(kept >= recall_kept),
            "threshold": recall_kept,
            "recall_original": recall,
            "recall_lesion_removed": removed_recall,
            "recall_kept": kept,
        }
    }
    random_mark = versions.get(RANDOM_MARK)
    drop = None
    if random_mark is not None and None not in (original["accuracy"], random_mark["accuracy"]):
        drop = original["accuracy"] - random_mark["accuracy"]
    criteria["drops_on_random_mark"] = {
        "flagged": None if drop is None else bool(drop >= accuracy_drop),
        "threshold": accuracy_drop,
        "accuracy_original": original["accuracy"],
        "accuracy_random_mark": random_mark["accuracy"] if random_mark else None,
        "accuracy_drop": drop,
    }
    return {
        "flagged": any(c["flagged"] for c in criteria.values()),
        "positive_class": positive_class,
        "criteria": criteria,
    }
