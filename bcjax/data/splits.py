"""Duplicate- and patient-aware, stratified splits (saved as manifests: bcjax.data.manifest).

BUSI has no official split and holds many exact and near-duplicate images,
some filed under two classes (Pawłowska et al. 2023). Images are grouped by a
perceptual hash (DCT of a 32x32 thumbnail, 64 bits) and Hamming distance; a
group is always placed whole into one split, so no image is tested against
its own copy. Groups spanning two classes are reported as conflicts and can be
excluded. Images that share a patient/case id (``Example.group``, from a CSV's
``group`` column) are joined to one group as well, so no patient straddles splits.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import threading
from collections.abc import Sequence

import numpy as np
from PIL import Image

from bcjax import files
from bcjax.data import busi
from bcjax.data.busi import BusiError, Example

# What a split is written as: bcjax.data.manifest (also how a run reads it back).
from bcjax.data.manifest import BUSI_CLASSES, MANIFEST_VERSION, SPLITS

# Bits of 64. On 780 synthetic images the closest unrelated pair is 10 bits apart
# (0.01% of pairs <= 14), while re-encoding, resizing and brightness changes stay
# within 2 and a 3-5% crop within 8: err on the side of grouping, since a missed
# duplicate leaks test images into training and a false group costs little.
DEFAULT_HASH_THRESHOLD = 8

_HASH_CACHE: dict[
    tuple, int
] = {}  # (path, size, mtime) -> hash; files rarely change within a process
_HASH_LOCK = threading.Lock()


# ----------------------------------------------------------------------------- hashing


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)


def phash_array(gray: np.ndarray) -> int:
    """64-bit perceptual hash of a 2-D image: signs of its lowest 8x8 DCT terms about their
    median."""
    if gray.shape != (32, 32):
        gray = np.asarray(
            Image.fromarray(np.asarray(gray, np.float32), "F").resize((32, 32), Image.BOX)
        )
    c = _DCT32 @ np.asarray(gray, np.float64) @ _DCT32.T
    low = c[:8, :8].ravel()
    bits = low > np.median(
        low[1:]
    )  # DC left out of the median: it is the brightness, not the pattern
    return int(np.packbits(bits).view(">u8")[0])


def phash_image(im: Image.Image) -> int:
    """``phash_array`` of an opened image (decodes it unless loaded)."""
    g = im.convert("L") if im.mode not in ("I;16", "I;16B", "I") else im.convert("F")
    return phash_array(np.asarray(g.convert("F").resize((32, 32), Image.BOX)))


def _file_key(path) -> tuple:
    st = os.stat(path)
    return (str(path), st.st_size, st.st_mtime_ns)


def remember_phash(path, value: int) -> None:
    """Records the hash of ``path`` computed elsewhere from the same decode
    (``pipeline.load_arrays_and_phashes``), so ``phash_file`` does not decode it again."""
    with _HASH_LOCK:
        _HASH_CACHE[_file_key(path)] = int(value)


def phash_file(path) -> int:
    key = _file_key(path)
    with _HASH_LOCK:
        if key in _HASH_CACHE:
            return _HASH_CACHE[key]
    try:
        if busi._dicom(path) is not None:  # its frame and crop, as the pipeline decodes it
            h = phash_image(Image.fromarray(busi.read_image(path)))
        else:
            with Image.open(path) as im:
                im.draft("L", (64, 64))  # JPEG decodes at reduced size; PNG ignores it
                h = phash_image(im)
    except BusiError:
        raise
    except Exception as e:
        raise BusiError(f"not a decodable image: {path} ({type(e).__name__}: {e})") from e
    with _HASH_LOCK:
        _HASH_CACHE[key] = h
    return h


def phashes(examples: Sequence[Example], workers: int | None = None, cache_dir=None) -> np.ndarray:
    """uint64 [N] hashes (PIL decodes without the GIL, so threads help).

    cache_dir: keep the hashes in ``cache_dir/phash-v1.json`` keyed by file
    path, size and mtime, so later runs skip decoding every image.
    """
    disk = {}
    cache_file = pathlib.Path(cache_dir) / "phash-v1.json" if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        try:
            disk = json.loads(cache_file.read_text())
        except (OSError, json.JSONDecodeError):
            disk = {}  # a damaged cache is only a cache

    def key(ex):
        st = os.stat(ex.image_path)
        return f"{ex.image_path}|{st.st_size}|{st.st_mtime_ns}"

    def one(ex):
        k = key(ex)
        return int(disk[k], 16) if k in disk else phash_file(ex.image_path)

    workers = workers or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        out = np.array(list(pool.map(one, examples)), dtype=np.uint64)
    if cache_file is not None:
        new = {key(ex): f"{int(h):016x}" for ex, h in zip(examples, out)}
        if any(disk.get(k) != v for k, v in new.items()):
            files.write_json({**disk, **new}, cache_file)
    return out


def hamming_matrix(hashes: np.ndarray) -> np.ndarray:
    x = hashes[:, None] ^ hashes[None, :]
    return np.bitwise_count(x).astype(np.int32)


def duplicate_groups(
    hashes: np.ndarray, threshold: int = DEFAULT_HASH_THRESHOLD
) -> list[list[int]]:
    """Connected components (union-find) of "Hamming distance <= threshold"; all N indices
    covered."""
    n = len(hashes)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if n > 1:
        dist = hamming_matrix(np.asarray(hashes, np.uint64))
        for i, j in zip(*np.nonzero(np.triu(dist <= threshold, k=1))):
            ri, rj = find(int(i)), find(int(j))
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values())


# ----------------------------------------------------------------------------- assignment


def _targets(count: int, fractions: Sequence[float]) -> np.ndarray:
    """Integer counts per part summing to ``count`` (largest remainder)."""
    raw = np.asarray(fractions, np.float64) * count / float(sum(fractions))
    out = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - out), kind="stable")[: count - out.sum()]:
        out[i] += 1
    return out


def _assign(
    groups: list[list[int]], labels: np.ndarray, fractions, rng, num_classes: int
) -> list[int]:
    """Part index per group, stratified by class.

    Groups are visited in a seeded random order, larger groups first; each goes
    to the part furthest below its target for the group's (majority) class,
    measured relative to the target, so singletons reproduce exact stratification.
    """
    parts = len(fractions)
    group_label = [int(np.bincount(labels[g], minlength=num_classes).argmax()) for g in groups]
    targets = {c: _targets(int(np.sum(labels == c)), fractions) for c in range(num_classes)}
    filled = {c: np.zeros(parts, int) for c in range(num_classes)}
    order = rng.permutation(len(groups))
    order = sorted(
        order, key=lambda gi: -len(groups[gi])
    )  # stable: keeps the random order within a size
    out = [0] * len(groups)
    for gi in order:
        c = group_label[gi]
        t, f = targets[c], filled[c]
        deficit = (t - f) / np.maximum(t, 1)
        deficit[
            t == 0
        ] = -np.inf  # a part meant to get none of this class gets none while others can
        if np.all(np.isinf(deficit)):
            deficit = -f.astype(float)
        part = int(np.argmax(deficit))
        out[gi] = part
        filled[c][part] += len(groups[gi])
    return out


def join_patient_groups(groups: list[list[int]], examples: Sequence[Example]) -> list[list[int]]:
    """``groups`` with every two groups that hold images of one patient (Example.group) united.

    Sorted like duplicate_groups; returned unchanged when no example has a group.
    """
    first_group_of: dict[str, int] = {}
    parent = list(range(len(groups)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for gi, members in enumerate(groups):
        for i in members:
            patient = examples[i].group
            if not patient:
                continue
            if patient in first_group_of:
                a, b = find(first_group_of[patient]), find(gi)
                parent[max(a, b)] = min(a, b)
            else:
                first_group_of[patient] = gi
    if not first_group_of:
        return groups
    joined: dict[int, list[int]] = {}
    for gi, members in enumerate(groups):
        joined.setdefault(find(gi), []).extend(members)
    return sorted(sorted(g) for g in joined.values())


def _class_names(examples, class_names) -> tuple[str, ...]:
    names = tuple(BUSI_CLASSES if class_names is None else class_names)
    bad = sorted({ex.label for ex in examples if not 0 <= ex.label < len(names)})
    if bad:
        raise BusiError(f"labels {bad} do not index the {len(names)} class names {list(names)}")
    return names


def _prepare(
    examples, seed, threshold, exclude_conflicts, hashes=None, cache_dir=None, class_names=None
):
    names = [ex.name for ex in examples]
    if len(set(names)) != len(names):
        raise BusiError("example names are not unique")
    class_names = _class_names(examples, class_names)
    if hashes is None:
        hashes = phashes(examples, cache_dir=cache_dir)
    all_groups = duplicate_groups(np.asarray(hashes, np.uint64), threshold)
    labels = np.array([ex.label for ex in examples], int)
    conflicts = [g for g in all_groups if len(set(labels[g].tolist())) > 1]
    excluded = sorted(i for g in conflicts for i in g) if exclude_conflicts else []
    groups = [g for g in all_groups if not (exclude_conflicts and g in conflicts)]
    # Patients join after the conflict check: one patient's benign and malignant
    # lesions are two true labels, not a duplicate filed under two classes.
    groups = join_patient_groups(groups, examples)
    meta = {
        "version": MANIFEST_VERSION,
        "seed": seed,
        "num_examples": len(examples),
        "hash": "dct-phash-64",
        "hash_threshold": threshold,
        "duplicate_groups": [[names[i] for i in g] for g in all_groups if len(g) > 1],
        "conflicts": [[names[i] for i in g] for g in conflicts],
        "exclude_conflicts": exclude_conflicts,
        "excluded": [names[i] for i in excluded],
        "class_names": list(class_names),
    }
    patients: dict[str, list[str]] = {}
    for ex in examples:
        if ex.group:
            patients.setdefault(ex.group, []).append(ex.name)
    if patients:  # absent for BUSI: its manifests stay as they were
        meta["patient_groups"] = {
            g: sorted(members) for g, members in sorted(patients.items()) if len(members) > 1
        }
    return names, labels, groups, meta


def _collect(names, labels, groups, assignment, part_names):
    out = {p: [] for p in part_names}
    for g, part in zip(groups, assignment):
        out[part_names[part]].extend(g)
    return {p: [names[i] for i in sorted(idx)] for p, idx in out.items()}


def _counts(split, examples, class_names):
    label_of = {ex.name: ex.label for ex in examples}
    return {
        p: {c: sum(label_of[n] == k for n in split[p]) for k, c in enumerate(class_names)}
        for p in SPLITS
    }


def make_split(
    examples: Sequence[Example],
    seed: int = 0,
    fractions=(0.7, 0.1, 0.2),
    exclude_conflicts: bool = False,
    *,
    hash_threshold: int = DEFAULT_HASH_THRESHOLD,
    hashes=None,
    cache_dir=None,
    class_names: Sequence[str] | None = None,
) -> dict:
    """{"train", "val", "test": [names], "meta": {...}}; duplicate groups never straddle parts.

    meta: seed, fractions, hash_threshold, duplicate_groups (lists of names, size >= 2),
    conflicts (groups spanning classes), excluded (names left out when
    exclude_conflicts), counts per part and class.
    hashes: precomputed phashes (uint64 [N]); cache_dir: see phashes().
    class_names: what the labels index (recorded in meta); None = BUSI's three.
    Images sharing an Example.group (a patient) are kept in one part too.
    """
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(f"fractions must be 3 non-negative numbers, got {fractions}")
    names, labels, groups, meta = _prepare(
        examples, seed, hash_threshold, exclude_conflicts, hashes, cache_dir, class_names
    )
    num_classes = len(meta["class_names"])
    rng = np.random.default_rng([seed, 0x5B117])
    assignment = _assign(groups, labels, fractions, rng, num_classes)
    split = _collect(names, labels, groups, assignment, SPLITS)
    meta.update(
        kind="holdout",
        fractions=list(fractions),
        counts=_counts(split, examples, meta["class_names"]),
    )
    return {**split, "meta": meta}


def kfold_split(
    examples: Sequence[Example],
    folds: int,
    fold: int,
    seed: int = 0,
    test_fraction: float = 0.2,
    *,
    exclude_conflicts: bool = False,
    hash_threshold: int = DEFAULT_HASH_THRESHOLD,
    hashes=None,
    cache_dir=None,
    class_names: Sequence[str] | None = None,
) -> dict:
    """Fold ``fold`` of ``folds`` as {"train", "val", "test", "meta"}.

    The test part is held out first and is the same for every fold (it depends on
    seed and test_fraction only); the rest is cut into ``folds`` stratified,
    group-respecting folds, of which ``fold`` is the validation part. Duplicate
    and patient groups are kept whole, class_names recorded, as in make_split.
    """
    if folds < 2 or not 0 <= fold < folds:
        raise ValueError(f"need folds >= 2 and 0 <= fold < folds, got folds={folds}, fold={fold}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    names, labels, groups, meta = _prepare(
        examples, seed, hash_threshold, exclude_conflicts, hashes, cache_dir, class_names
    )
    num_classes = len(meta["class_names"])
    rng = np.random.default_rng([seed, 0x5B117])
    outer = _assign(groups, labels, (1 - test_fraction, test_fraction), rng, num_classes)
    rest = [g for g, part in zip(groups, outer) if part == 0]
    test = [g for g, part in zip(groups, outer) if part == 1]
    inner = _assign(rest, labels, [1.0] * folds, np.random.default_rng([seed, 0xF01D]), num_classes)
    split = {
        "train": [i for g, k in zip(rest, inner) if k != fold for i in g],
        "val": [i for g, k in zip(rest, inner) if k == fold for i in g],
        "test": [i for g in test for i in g],
    }
    split = {p: [names[i] for i in sorted(idx)] for p, idx in split.items()}
    meta.update(
        kind="kfold",
        folds=folds,
        fold=fold,
        test_fraction=test_fraction,
        counts=_counts(split, examples, meta["class_names"]),
    )
    return {**split, "meta": meta}
