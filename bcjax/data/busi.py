"""Reading BUSI (Al-Dhabyani et al. 2020) as it is distributed.

Layout: ``Dataset_BUSI_with_GT/{normal,benign,malignant}/<class> (N).png`` with
masks ``<class> (N)_mask.png`` and, for some images, ``_mask_1``, ``_mask_2``.
Class folders may use any letter case; the set may also come as its zip.
Masks are attached to their image and are never returned as images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re
import warnings
import zipfile

import numpy as np
from PIL import Image

from bcjax import files

CLASSES = ("normal", "benign", "malignant")
DATASET_DIRNAME = "Dataset_BUSI_with_GT"
# Written by bcjax.data.synthetic into the dataset folder, so that a run can tell
# (and say loudly) that it trained on generated data.
SYNTHETIC_MARKER = "SYNTHETIC.json"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_MASK_RE = re.compile(r"^(?P<stem>.*)_mask(?:_(?P<k>\d+))?$", re.IGNORECASE)
_IGNORED_NAMES = {"__macosx", "thumbs.db", ".ds_store", "desktop.ini"}

log = logging.getLogger(__name__)


class BusiError(ValueError):
    """Bad BUSI input; the message names the offending file or folder."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One labelled image, whatever reader found it (BUSI, class folders, a CSV)."""

    # Unique key in manifests: "<class folder>/<file name>" (e.g. "benign/benign (12).png")
    # for folders, the path as listed (relative to the CSV's folder) for a CSV.
    name: str
    label: int  # index into the data set's class names (BUSI: CLASSES)
    image_path: str
    mask_paths: tuple[str, ...] = ()
    # Patient or case id ("" = none): images of one group never straddle splits.
    group: str = ""


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in _IGNORED_NAMES


def _class_dirs(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    found = {}
    for child in folder.iterdir():
        if child.is_dir() and child.name.lower() in CLASSES:
            if child.name.lower() in found:
                raise BusiError(
                    f"two folders for class {child.name.lower()!r} in {folder}: "
                    f"{found[child.name.lower()].name!r} and {child.name!r}"
                )
            found[child.name.lower()] = child
    return found


def find_busi(path) -> pathlib.Path | None:
    """The BUSI folder (or zip) at or just below ``path``; None when there is none.

    Accepts the Dataset_BUSI_with_GT folder itself, a folder holding it (or
    holding its zip), or the zip. Does not validate the contents: scan() does.
    """
    path = pathlib.Path(path).expanduser()
    if path.is_file():
        return path if zipfile.is_zipfile(path) else None
    if not path.is_dir():
        return None
    if _class_dirs(path):
        return path
    children = sorted(
        (c for c in path.iterdir() if not _is_ignored(c.name)),
        key=lambda c: (c.name.lower() != DATASET_DIRNAME.lower(), c.name),
    )
    for child in children:
        if child.is_dir() and (_class_dirs(child) or child.name.lower() == DATASET_DIRNAME.lower()):
            return child
    for child in children:
        if child.is_file() and child.suffix.lower() == ".zip" and zipfile.is_zipfile(child):
            return child
    return None


def default_cache_dir() -> pathlib.Path:
    """Where bcjax keeps what it can make again: extracted zips, generated synthetic sets.

    $BCJAX_CACHE_DIR (the documented name, also read by runtime for the JAX
    compilation cache), else $BCJAX_CACHE (its older name, still honoured),
    else ~/.cache/bcjax.
    """
    path = os.environ.get("BCJAX_CACHE_DIR") or os.environ.get("BCJAX_CACHE") or "~/.cache/bcjax"
    return pathlib.Path(path).expanduser()


def _extract_zip(zip_path: pathlib.Path, cache_dir) -> pathlib.Path:
    """Extracts once into the cache, keyed by the zip's size and mtime; atomic."""
    st = zip_path.stat()
    key = hashlib.sha1(f"{zip_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[
        :16
    ]
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / f"busi_zip_{key}"
    if target.is_dir():
        return target
    with files.atomic_dir(target) as tmp:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                for info in zf.infolist():
                    parts = pathlib.PurePosixPath(info.filename).parts
                    if any(
                        p in ("..", "") or _is_ignored(p) for p in parts
                    ) or info.filename.startswith("/"):
                        continue  # junk (__MACOSX, ._files) or a path escaping the folder
                    zf.extract(info, tmp)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise BusiError(f"cannot read zip {zip_path}: {e}") from e
    return target


def resolve_root(root, cache_dir=None) -> pathlib.Path:
    """The Dataset_BUSI_with_GT folder for ``root`` (extracting a zip to the cache)."""
    path = pathlib.Path(root).expanduser()
    if not path.exists():
        raise BusiError(f"BUSI folder does not exist: {path}")
    found = find_busi(path)
    if found is None:
        raise BusiError(
            f"no BUSI data in {path}: expected class folders {', '.join(CLASSES)} "
            f"(any case), a {DATASET_DIRNAME} folder, or its zip"
        )
    if found.is_file():
        extracted = _extract_zip(found, cache_dir)
        inner = find_busi(extracted)
        if inner is None or inner.is_file():
            raise BusiError(f"zip {found} holds no BUSI class folders")
        return inner
    return found


def is_synthetic(root) -> bool:
    """True when the set was written by bcjax.data.synthetic."""
    path = pathlib.Path(root)
    return (path / SYNTHETIC_MARKER).is_file()


def synthetic_info(root) -> dict | None:
    path = pathlib.Path(root) / SYNTHETIC_MARKER
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _dicom(path):
    """bcjax.data.dicom when ``path`` is a DICOM file, else None (imported on use: pydicom).

    A PNG, JPEG, ... (IMAGE_SUFFIXES) is never one (dicom.is_dicom says the same), and is
    told apart here, so that runs on such files never load the DICOM reader."""
    if pathlib.Path(path).suffix.lower() in IMAGE_SUFFIXES:
        return None
    from bcjax.data import dicom

    return dicom if dicom.is_dicom(path) else None


def image_size(path) -> tuple[int, int]:
    """(width, height) after checking that the file decodes as an image.

    verify() walks every PNG chunk and its CRC without decompressing: it catches
    text files, truncated and corrupted files at a fraction of a decode's cost.
    A DICOM file's header is checked instead (bcjax.data.dicom.read_info): the
    size is that of its ultrasound region where it has one.
    """
    dicom = _dicom(path)
    if dicom is not None:
        return dicom.image_size(path)
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
    except Exception as e:  # PIL raises many types (SyntaxError, OSError, struct.error, ...)
        raise BusiError(f"not a decodable image: {path} ({type(e).__name__}: {e})") from e
    if size[0] < 1 or size[1] < 1:
        raise BusiError(f"empty image: {path}")
    return size


def scan_class_folder(
    folder: pathlib.Path, label: int, class_name: str, verify: bool
) -> list[Example]:
    """The images of one class folder with their masks beside them (``<stem>_mask[_k]``),
    in natural order; named "<class_name>/<file name>"."""
    images: dict[str, pathlib.Path] = {}
    masks: dict[str, list[tuple[int, pathlib.Path]]] = {}
    for f in folder.iterdir():
        if _is_ignored(f.name):
            continue
        if f.is_dir():
            warnings.warn(f"ignoring unexpected folder {f}", stacklevel=3)
            continue
        if f.suffix.lower() not in IMAGE_SUFFIXES and _dicom(f) is None:
            warnings.warn(f"ignoring non-image file {f}", stacklevel=3)
            continue
        stem = f.stem
        m = _MASK_RE.match(stem)
        if m:
            masks.setdefault(m.group("stem").lower(), []).append((int(m.group("k") or 0), f))
        else:
            images[stem.lower()] = f
    if not images:
        raise BusiError(f"class folder has no images: {folder}")
    for stem, ms in masks.items():
        if stem not in images:
            raise BusiError(f"mask without its image: {sorted(ms)[0][1]}")
    examples = []
    for stem in sorted(images, key=_natural_key):
        img = images[stem]
        mask_files = tuple(str(p) for _, p in sorted(masks.get(stem, [])))
        if verify:
            size = image_size(img)
            for mp in mask_files:
                msize = image_size(mp)
                if msize != size:
                    raise BusiError(
                        f"mask size {msize[0]}x{msize[1]} differs from image size "
                        f"{size[0]}x{size[1]}: {mp}"
                    )
        examples.append(
            Example(
                name=f"{class_name}/{img.name}",
                label=label,
                image_path=str(img),
                mask_paths=mask_files,
            )
        )
    return examples


def scan(root, *, verify: bool = True, cache_dir=None) -> list[Example]:
    """All examples of a BUSI folder, folder holding it, or zip; class order, then natural order.

    verify=True checks every image and mask decodes (PNG CRCs) and that mask and
    image sizes agree, so bad files fail here with their path rather than mid-training.
    """
    folder = resolve_root(root, cache_dir)
    dirs = _class_dirs(folder)
    missing = [c for c in CLASSES if c not in dirs]
    if missing:
        raise BusiError(f"missing class folder(s) {', '.join(missing)} in {folder}")
    for child in folder.iterdir():
        if child.is_dir() and child.name.lower() not in CLASSES and not _is_ignored(child.name):
            msg = f"ignoring unknown folder {child} (BUSI classes are {', '.join(CLASSES)})"
            log.warning(msg)
            warnings.warn(msg, stacklevel=2)
    examples = []
    for label, cls in enumerate(CLASSES):
        examples.extend(scan_class_folder(dirs[cls], label, cls, verify))
    return examples


def to_uint8_rgb(im: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] from any PIL mode BUSI-like files come in (L, LA, P, RGBA, 16-bit)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        # 16-bit PNGs use the full range; "I" (32-bit) from PIL may hold either.
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        g = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=-1)
    if im.mode == "F":
        g = np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=-1)
    if im.mode in ("L", "LA", "1"):
        g = np.asarray(im.convert("L"))
        return np.repeat(g[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"))


def read_image(path) -> np.ndarray:
    """uint8 [H, W, 3]; BusiError naming the file when it does not decode.

    DICOM: one frame, cropped to its ultrasound region (bcjax.data.dicom.read_rgb)."""
    dicom = _dicom(path)
    if dicom is not None:
        return dicom.read_rgb(path)
    try:
        with Image.open(path) as im:
            im.load()
            return to_uint8_rgb(im)
    except Exception as e:
        raise BusiError(f"not a decodable image: {path} ({type(e).__name__}: {e})") from e


def read_mask(example: Example, shape=None) -> np.ndarray:
    """Union of all masks of an example as uint8 {0, 1} [H, W]; zeros when it has none.

    Normal images in BUSI have an all-black mask; images with several lesions
    have one mask per lesion (_mask, _mask_1, ...), united here.
    """
    if shape is None:
        shape = read_image(example.image_path).shape[:2]
    out = np.zeros(shape, np.uint8)
    for mp in example.mask_paths:
        m = read_image(mp)
        if m.shape[:2] != tuple(shape):
            raise BusiError(
                f"mask size {m.shape[1]}x{m.shape[0]} differs from image size "
                f"{shape[1]}x{shape[0]}: {mp}"
            )
        out |= (m.max(axis=-1) > 127).astype(np.uint8)
    return out


def class_counts(examples, class_names=CLASSES) -> dict[str, int]:
    counts = dict.fromkeys(class_names, 0)
    for ex in examples:
        counts[class_names[ex.label]] += 1
    return counts
