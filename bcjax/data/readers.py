"""Labelled images in layouts other than BUSI's: class folders and a CSV.

Both give the same ``Example`` records as the BUSI reader, so they go through
the same splits, manifests, pipeline and errors (``BusiError``, naming the
file, or the CSV line, at fault). The class names and their order come from
the data or from the caller:

- BUSI: its three classes, in its order (normal, benign, malignant);
- folders (torchvision's ImageFolder layout): one sub-folder per class,
  ``root/<class>/<image>``, masks beside their image as for BUSI
  (``<stem>_mask.png``, ``<stem>_mask_1.png``, ...); classes in sorted order;
- a CSV with the columns ``image``, ``label`` and optionally ``mask`` (several
  masks joined by ``;``) and ``group`` (a patient or case id); relative paths
  are read against the CSV's folder; classes are the labels in sorted order.

Given ``class_names``, that order is used instead, and data of a class not
named there is an error (an unknown label), as is a named class without images.

Labels (CSV values, folder names) that differ only in letter case or surrounding
whitespace are one class: ``Benign``, ``benign`` and ``benign `` are folded into the
spelling ``class_names`` uses, else the one with most images (the first in sorted
order on a tie), with a warning; ``LabelledSet.label_variants`` records the
spellings and their counts (the manifest keeps them).

DICOM files (bcjax.data.dicom) are images like any other. Where an example has no
group (a CSV without a ``group`` value, or a folder), a DICOM file's PatientID,
else its StudyInstanceUID, becomes its group as a salted hash, so one patient's
images never straddle splits; ``LabelledSet.dicom_files`` holds their header facts.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import pathlib
import warnings
from collections.abc import Sequence

from bcjax.data import busi
from bcjax.data.busi import BusiError, Example

KINDS = ("busi", "folder", "csv")
CSV_COLUMNS = ("image", "label", "mask", "group")
MASK_SEPARATOR = ";"

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LabelledSet:
    """What a reader found: the examples, and the class names their labels index."""

    examples: tuple[Example, ...]
    class_names: tuple[str, ...]
    kind: str  # "busi" | "folder" | "csv"
    path: str  # the BUSI or class folder, or the CSV file
    # {class: {spelling: images}} for classes found under several spellings (folded).
    label_variants: dict = dataclasses.field(default_factory=dict)
    # {example name: dicom.FileInfo} for the DICOM files among the examples.
    dicom_files: dict = dataclasses.field(default_factory=dict)

    def class_counts(self) -> dict[str, int]:
        return busi.class_counts(self.examples, self.class_names)


def _ordered(found: Sequence[str], class_names: Sequence[str], where: str) -> tuple[str, ...]:
    """The class order: ``class_names`` when given (and it must match the data), else sorted."""
    if not class_names:
        return tuple(sorted(found))
    unknown = [c for c in found if c not in class_names]
    if unknown:
        raise BusiError(
            f"unknown label(s) {', '.join(map(repr, sorted(unknown)))} in {where}: "
            f"config.class_names lists {', '.join(map(repr, class_names))}"
        )
    empty = [c for c in class_names if c not in found]
    if empty:
        raise BusiError(
            f"class(es) {', '.join(map(repr, empty))} of config.class_names have no images "
            f"in {where}"
        )
    return tuple(class_names)


def fold_key(label: str) -> str:
    """What makes two labels one class: equal after stripping and case folding."""
    return label.strip().casefold()


def fold_labels(
    counts: dict[str, int], class_names: Sequence[str], where: str
) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """({spelling: class}, {class: {spelling: count}} of the folded ones) for the
    spellings found (with their image counts); warns once per folded class."""
    by_key: dict[str, dict[str, int]] = {}
    for spelling, n in counts.items():
        by_key.setdefault(fold_key(spelling), {})[spelling] = n
    named = {fold_key(c): c for c in class_names}
    to_class, variants = {}, {}
    for key, spellings in by_key.items():
        if key in named:
            chosen = named[key]
        else:  # most images, then the first in sorted order
            chosen = min(spellings, key=lambda s: (-spellings[s], s))
        for spelling in spellings:
            to_class[spelling] = chosen
        if len(spellings) > 1 or chosen not in spellings:
            variants[chosen] = dict(sorted(spellings.items()))
            listed = ", ".join(f"{s!r} ({n})" for s, n in sorted(spellings.items()))
            msg = (
                f"{where}: labels {listed} differ only in letter case or spaces: "
                f"one class {chosen!r} ({sum(spellings.values())} images)"
            )
            log.warning(msg)
            warnings.warn(msg, stacklevel=3)
    return to_class, variants


def with_dicom_groups(examples: Sequence[Example]) -> tuple[list[Example], dict]:
    """``examples`` with the DICOM ones' empty groups set from their headers, and
    {name: dicom.FileInfo} of those; BusiError naming a DICOM file that cannot be used."""
    out, infos = [], {}
    for ex in examples:
        if busi._dicom(ex.image_path) is not None:
            from bcjax.data import dicom

            info = dicom.read_info(ex.image_path)
            infos[ex.name] = info
            if not ex.group and info.group:
                ex = dataclasses.replace(ex, group=info.group)
        out.append(ex)
    return out, infos


def _check_class_names(class_names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(class_names)
    if len(set(names)) != len(names) or not all(isinstance(c, str) and c.strip() for c in names):
        raise BusiError(f"class names must be distinct, non-empty strings, got {list(names)}")
    return names


# ----------------------------------------------------------------------------- BUSI


def read_busi(root, *, class_names: Sequence[str] = (), verify: bool = True) -> LabelledSet:
    """BUSI (folder, folder holding it, or zip) in its order, or in the order of
    ``class_names`` (a permutation of its three classes)."""
    class_names = _check_class_names(class_names)
    folder = busi.resolve_root(root)
    examples, infos = with_dicom_groups(busi.scan(folder, verify=verify))
    if not class_names or class_names == busi.CLASSES:
        return LabelledSet(tuple(examples), busi.CLASSES, "busi", str(folder), dicom_files=infos)
    order = _ordered(busi.CLASSES, class_names, str(folder))
    new_label = [order.index(c) for c in busi.CLASSES]
    relabelled = sorted(
        (dataclasses.replace(ex, label=new_label[ex.label]) for ex in examples),
        key=lambda ex: ex.label,
    )  # stable: natural order within a class
    return LabelledSet(tuple(relabelled), order, "busi", str(folder), dicom_files=infos)


# ----------------------------------------------------------------------------- class folders


def read_folder(
    root, *, class_names: Sequence[str] = (), verify: bool = True, min_classes: int = 2
) -> LabelledSet:
    """One sub-folder per class (ImageFolder); sub-folder names are the class names.

    Files directly in ``root`` are ignored with a warning; folders inside a
    class folder are too (as for BUSI). Folders whose names differ only in case or
    spaces (``Benign/``, ``benign/``) are one class (see the module doc); an
    example's name keeps its own folder's name. ``min_classes``: 1 for a set
    that is only scored (bcjax.evaluate), 2 for training.
    """
    class_names = _check_class_names(class_names)
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        raise BusiError(
            f"config.dataset='folder' needs a folder of class folders; {root} "
            + ("is a file" if root.exists() else "does not exist")
        )
    dirs = {}
    for child in sorted(root.iterdir()):
        if busi._is_ignored(child.name) or child.name == busi.SYNTHETIC_MARKER:
            continue
        if child.is_dir():
            dirs[child.name] = child
        else:
            warnings.warn(
                f"ignoring file {child}: images belong in one sub-folder per class", stacklevel=2
            )
    if not dirs:
        raise BusiError(f"no class folders in {root}: expected one sub-folder of images per class")
    scanned = {name: busi.scan_class_folder(d, 0, name, verify) for name, d in dirs.items()}
    to_class, variants = fold_labels(
        {name: len(found) for name, found in scanned.items()}, class_names, str(root)
    )
    order = _ordered(sorted(set(to_class.values())), class_names, str(root))
    if len(order) < min_classes:
        raise BusiError(
            f"only one class folder ({order[0]!r}) in {root}: classification needs two or more"
        )
    examples = []
    for label, name in enumerate(order):
        for folder_name in sorted(f for f in scanned if to_class[f] == name):
            examples.extend(dataclasses.replace(ex, label=label) for ex in scanned[folder_name])
    examples, infos = with_dicom_groups(examples)
    return LabelledSet(tuple(examples), order, "folder", str(root), variants, infos)


# ----------------------------------------------------------------------------- CSV


def _resolve(value: str, base: pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _name(path: pathlib.Path, base: pathlib.Path) -> str:
    """The example's name: its path relative to the CSV's folder where it lies below it.

    Normalised, not resolved: an image in a linked folder keeps the name it is listed by.
    """
    absolute = pathlib.Path(os.path.normpath(os.path.abspath(path)))
    try:
        return absolute.relative_to(os.path.normpath(os.path.abspath(base))).as_posix()
    except ValueError:
        return absolute.as_posix()


def read_csv(
    csv_path, *, class_names: Sequence[str] = (), verify: bool = True, min_classes: int = 2
) -> LabelledSet:
    """The rows of a CSV (columns image, label[, mask, group]) as examples.

    Errors name the CSV and the line (the header is line 1): a missing or
    undecodable image or mask, an empty or unknown label, an image listed
    twice, a mask of another size than its image, a mask that is also listed
    as an image. Examples are ordered by class, then by name, so the split
    does not depend on the order of the rows.
    """
    class_names = _check_class_names(class_names)
    path = pathlib.Path(csv_path).expanduser()
    if not path.is_file():
        raise BusiError(f"CSV file does not exist: {path}")
    base = path.parent
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet programs write a BOM
    except (OSError, UnicodeDecodeError) as e:
        raise BusiError(f"cannot read CSV {path}: {e}") from e
    reader = csv.DictReader(io.StringIO(text))
    header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
    missing = [c for c in ("image", "label") if c not in header]
    if missing:
        raise BusiError(
            f"CSV {path} lacks the column(s) {', '.join(missing)}; its header is "
            f"{header or '(empty)'}; expected {', '.join(CSV_COLUMNS[:2])} and optionally "
            f"{', '.join(CSV_COLUMNS[2:])}"
        )
    if len(set(header)) != len(header):
        raise BusiError(f"CSV {path} names a column twice: {header}")
    reader.fieldnames = header

    rows = []  # (line, image path, label, mask paths, group)
    line_of_image: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        where = f"{path} line {line}"
        if None in row:
            raise BusiError(f"{where}: more fields than the header has columns")
        value = {k: (v or "").strip() for k, v in row.items()}
        if not any(value.values()):
            continue  # a blank line of commas
        if not value["image"]:
            raise BusiError(f"{where}: empty image path")
        if not value["label"]:
            raise BusiError(f"{where}: empty label (image {value['image']!r})")
        if class_names and fold_key(value["label"]) not in {fold_key(c) for c in class_names}:
            raise BusiError(
                f"{where}: unknown label {value['label']!r}; config.class_names lists "
                f"{', '.join(map(repr, class_names))}"
            )
        image = _resolve(value["image"], base)
        if not image.is_file():
            raise BusiError(f"{where}: image file not found: {image}")
        key = os.path.normcase(str(image.resolve()))
        if key in line_of_image:
            raise BusiError(
                f"{where}: duplicate row: image {value['image']!r} is already listed on line "
                f"{line_of_image[key]}"
            )
        line_of_image[key] = line
        masks = [
            _resolve(m.strip(), base)
            for m in value.get("mask", "").split(MASK_SEPARATOR)
            if m.strip()
        ]
        for mask in masks:
            if not mask.is_file():
                raise BusiError(f"{where}: mask file not found: {mask}")
        if verify:
            try:
                size = busi.image_size(image)
                for mask in masks:
                    mask_size = busi.image_size(mask)
                    if mask_size != size:
                        raise BusiError(
                            f"mask size {mask_size[0]}x{mask_size[1]} differs from image size "
                            f"{size[0]}x{size[1]}: {mask}"
                        )
            except BusiError as e:
                raise BusiError(f"{where}: {e}") from e
        rows.append((line, image, value["label"], masks, value.get("group", "")))
    if not rows:
        raise BusiError(f"CSV {path} lists no images")
    for line, _, _, masks, _ in rows:
        for mask in masks:
            other = line_of_image.get(os.path.normcase(str(mask.resolve())))
            if other is not None:
                raise BusiError(
                    f"{path} line {line}: mask {mask} is listed as an image on line {other}; "
                    "masks never enter as images"
                )

    spellings: dict[str, int] = {}
    for _, _, label, _, _ in rows:
        spellings[label] = spellings.get(label, 0) + 1
    to_class, variants = fold_labels(spellings, class_names, str(path))
    order = _ordered(sorted(set(to_class.values())), class_names, str(path))
    if len(order) < min_classes:
        raise BusiError(
            f"CSV {path} has one label only ({order[0]!r}): classification needs two or more"
        )
    examples = [
        Example(
            name=_name(image, base),
            label=order.index(to_class[label]),
            image_path=str(image),
            mask_paths=tuple(str(m) for m in masks),
            group=group,
        )
        for _, image, label, masks, group in rows
    ]
    examples.sort(key=lambda ex: (ex.label, busi._natural_key(ex.name)))
    examples, infos = with_dicom_groups(examples)
    return LabelledSet(tuple(examples), order, "csv", str(path), variants, infos)


# ----------------------------------------------------------------------------- any


def detect(path) -> str:
    """The reader for ``path``: "csv" for a .csv file, "busi" for a BUSI folder or
    zip, else "folder" (class folders)."""
    path = pathlib.Path(path).expanduser()
    if path.is_file() and path.suffix.lower() == ".csv":
        return "csv"
    found = busi.find_busi(path)
    if found is not None and (found.is_file() or _holds_busi_classes(found)):
        return "busi"
    # Class folders named like some of BUSI's (benign/malignant only, say) are
    # another labelled set, not an incomplete BUSI.
    return "folder"


def _holds_busi_classes(folder: pathlib.Path) -> bool:
    names = {c.name.lower() for c in folder.iterdir() if c.is_dir()}
    return set(busi.CLASSES) <= names


def read(
    kind: str,
    path,
    *,
    class_names: Sequence[str] = (),
    verify: bool = True,
    min_classes: int = 2,
) -> LabelledSet:
    """The examples at ``path`` by reader ``kind`` ("busi", "folder", "csv").

    min_classes: the fewest classes a folder or CSV may have (1: a set that is only
    scored, such as an external set of cancers; training needs 2)."""
    if kind == "busi":
        return read_busi(path, class_names=class_names, verify=verify)
    readers = {"folder": read_folder, "csv": read_csv}
    if kind not in readers:
        raise ValueError(f"unknown reader {kind!r}; choose one of {', '.join(KINDS)}")
    return readers[kind](path, class_names=class_names, verify=verify, min_classes=min_classes)


def check_class_sizes(labelled: LabelledSet, parts: int, what: str) -> None:
    """BusiError when a class has fewer images than ``parts`` (one for each part
    of the split), naming the class and its count."""
    small = {c: n for c, n in labelled.class_counts().items() if n < parts}
    if small:
        listed = ", ".join(f"{c!r} has {n}" for c, n in small.items())
        raise BusiError(
            f"{labelled.path}: too few images for {what}, which needs at least {parts} per "
            f"class (one in each part): {listed}"
        )
