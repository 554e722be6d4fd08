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

The work is split by job: the drawing is in bcjax.data.synthetic_draw, the
marks in bcjax.data.synthetic_marks, the folders on disk (the cache's key and
lock, the temporary folders) in bcjax.data.synthetic_cache. This module holds
the public API (all of those names stay importable from here), ``generate``,
``cached`` and the CLI.

    python -m bcjax.data.synthetic --out DIR --num 780 --seed 0 [--mark calliper --mark-prob 0.9]
    python -m bcjax.data.synthetic --out DIR --num 60 --format dicom   # bcjax.data.synthetic_dicom
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import pathlib
import sys
import time

import numpy as np
from PIL import Image

from bcjax import files
from bcjax.data import busi
from bcjax.data.busi import CLASSES, DATASET_DIRNAME, SYNTHETIC_MARKER
from bcjax.data.synthetic_cache import _OWNED as _OWNED
from bcjax.data.synthetic_cache import STALE_AFTER_S as STALE_AFTER_S
from bcjax.data.synthetic_cache import (
    _exclusive,
    _holds,
    _owned_prefix,
    _remove_stale,
    cache_key,
    default_cache_dir,
)
from bcjax.data.synthetic_cache import _host as _host
from bcjax.data.synthetic_draw import (
    GENERATOR_VERSION,
    MAX_SIZE,
    MIN_SIZE,
    _image_rng,
    _image_shape,
    render,
)
from bcjax.data.synthetic_marks import CORNERS as CORNERS
from bcjax.data.synthetic_marks import (
    MARK_PLACEMENTS,
    MARK_VERSION,
    MARKS,
    _check_mark,
    _mark_for,
    stamp_mark,
)

BUSI_COUNTS = (133, 437, 210)  # normal, benign, malignant in the real set

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
    ap.add_argument(
        "--format",
        choices=("png", "dicom"),
        default="png",
        help="'dicom': US DICOM files with region tags and fake patient data "
        "(bcjax.data.synthetic_dicom)",
    )
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

    options = dict(
        min_size=args.min_size,
        max_size=args.max_size,
        mark=args.mark,
        mark_prob=args.mark_prob,
        mark_placement=args.mark_placement,
        workers=args.workers,
        progress=progress,
    )
    if args.format == "dicom":
        from bcjax.data import synthetic_dicom

        target = pathlib.Path(args.out).expanduser() / DATASET_DIRNAME
        if target.exists() and not args.overwrite:
            raise SystemExit(f"{target} exists; pass --overwrite to replace it")
        path = synthetic_dicom.generate_dicom(args.out, args.num, args.seed, **options)
    else:
        path = generate(args.out, args.num, args.seed, overwrite=args.overwrite, **options)
    print(file=sys.stderr)
    counts = dict(zip(CLASSES, class_counts(args.num)))
    print(
        f"wrote synthetic BUSI-like set (NOT real patient data) to {path}: {counts} "
        f"in {time.perf_counter() - start:.1f}s"
    )


if __name__ == "__main__":
    main()
