"""Host input pipeline: decode and resize once, then Grain iterators over uint8 arrays.

Per-epoch host work is one gather of uint8 rows per batch; augmentation runs
on the accelerator (bcjax.data.augment), seeded per example by "index", so
results do not depend on how a global batch is cut over processes or devices.

Global batch order depends only on (seed, epoch); process p of P receives the
contiguous slice [p*B/P, (p+1)*B/P) of each global batch, so concatenating the
slices of all processes gives the same global batch for any P.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
from collections.abc import Sequence

import grain
import numpy as np
from PIL import Image

from bcjax import files
from bcjax.data import busi
from bcjax.data.busi import BusiError, Example, to_uint8_rgb

CACHE_VERSION = 1
# Read threads overlap the gather with the device step; on a 2-core host they
# only contend with the training process for the GIL and cores (measured slower).
DEFAULT_NUM_THREADS = 2 if (os.cpu_count() or 1) > 2 else 0
DEFAULT_PREFETCH = 4


@dataclasses.dataclass(frozen=True)
class ArraySet:
    images: np.ndarray  # uint8 [N, S, S, 3]
    labels: np.ndarray  # int32 [N]
    names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def subset(self, indices) -> ArraySet:
        indices = np.asarray(indices, np.int64)
        return ArraySet(
            self.images[indices], self.labels[indices], [self.names[i] for i in indices]
        )

    def select(self, names: Sequence[str]) -> ArraySet:
        """The rows named (e.g. one part of a split manifest), in that order."""
        pos = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in pos]
        if missing:
            raise BusiError(f"{len(missing)} name(s) not in this ArraySet, e.g. {missing[0]!r}")
        return self.subset([pos[n] for n in names])


# ----------------------------------------------------------------------------- decode once


def decode_resize(path, image_size: int) -> np.ndarray:
    """uint8 [S, S, 3]: the whole image squashed to S x S (BUSI is mostly near square).

    Resizing before the channel expansion keeps grayscale files at 1/3 of the
    work; reducing_gap lets PIL shrink by an integer factor first (same look, faster).
    """
    return _decode_resize(path, image_size, splits=None)[0]


def _decode_resize(path, image_size: int, *, splits) -> tuple[np.ndarray, int | None]:
    """decode_resize's array and, given the module bcjax.data.splits (a split is being made),
    splits.phash_file's hash from the same decode; None without it."""
    phash = None
    with_phash = splits is not None
    if busi._dicom(path) is not None:  # a DICOM frame, cropped (bcjax.data.dicom)
        rgb = busi.read_image(path)
        if with_phash:
            phash = splits.phash_image(Image.fromarray(rgb))
        small = Image.fromarray(rgb).resize(
            (image_size, image_size), Image.BILINEAR, reducing_gap=3.0
        )
        return np.asarray(small), phash
    try:
        with Image.open(path) as im:
            if with_phash:
                # Where draft() changes the decode (JPEG), the hash's draft and ours
                # differ: the hash decodes the file on its own (a cheap reduced decode).
                if type(im).draft is Image.Image.draft:
                    phash = splits.phash_image(im)
                else:
                    phash = splits.phash_file(path)
            im.draft("RGB", (image_size, image_size))  # JPEG only: decode at reduced scale
            if im.mode in ("L", "RGB"):
                small = im.resize((image_size, image_size), Image.BILINEAR, reducing_gap=3.0)
                return to_uint8_rgb(small), phash
            rgb = to_uint8_rgb(im)
    except BusiError:
        raise
    except Exception as e:
        raise BusiError(f"not a decodable image: {path} ({type(e).__name__}: {e})") from e
    small = Image.fromarray(rgb).resize((image_size, image_size), Image.BILINEAR, reducing_gap=3.0)
    return np.asarray(small), phash


def decode_resize_all(paths: Sequence, image_size: int, *, workers: int | None = None):
    """uint8 [N, S, S, 3]: ``decode_resize`` of every file in `paths` (in threads), read
    from and kept in the shared decoded cache (`shared_decoded_cache`)."""
    paths = list(paths)
    images = np.empty((len(paths), image_size, image_size, 3), np.uint8)
    shared = shared_decoded_cache(paths, image_size, workers)
    found = None if shared is None else shared.read(with_phashes=False)
    if found is not None:
        return found[0]

    def fill(i):
        images[i] = decode_resize(paths[i], image_size)

    with concurrent.futures.ThreadPoolExecutor(workers or min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(fill, range(len(paths))))
    if shared is not None:
        shared.write(images)
    return images


def _cache_key(examples: Sequence[Example], image_size: int) -> str:
    h = hashlib.sha1(f"v{CACHE_VERSION}|{image_size}".encode())
    for ex in examples:
        st = os.stat(ex.image_path)
        h.update(f"|{ex.name}|{ex.label}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def load_arrays(
    examples: Sequence[Example], image_size: int, cache_dir=None, *, workers: int | None = None
) -> ArraySet:
    """Decodes and resizes every image once to uint8 [N, S, S, 3].

    cache_dir: keep the result as an .npz keyed by the file list (names, labels,
    sizes, mtimes) and image size; a later run loads it instead of decoding.
    """
    return _load_arrays(examples, image_size, cache_dir, workers, splits=None)


def load_arrays_and_phashes(
    examples: Sequence[Example], image_size: int, cache_dir=None, *, workers: int | None = None
) -> tuple[ArraySet, np.ndarray]:
    """``load_arrays`` and ``splits.phashes`` of the same examples, each image decoded once.

    A first run decodes every image for the duplicate hashes of its split and
    again for its arrays; decoding (PNG inflate) is nearly all of that time.
    Give the hashes to ``splits.make_split(..., hashes=...)`` and cut the parts
    with ``ArraySet.select``. Both results equal the separate calls', and both
    caches in ``cache_dir`` are read and written as by those calls.
    """
    from bcjax.data import splits  # only a run that makes a split needs the hashes

    examples = list(examples)
    arrays = _load_arrays(examples, image_size, cache_dir, workers, splits=splits)
    # Finds every hash decoded above (or in its own cache), and writes its cache.
    return arrays, splits.phashes(examples, workers=workers, cache_dir=cache_dir)


def _load_arrays(examples, image_size, cache_dir, workers, *, splits) -> ArraySet:
    """load_arrays; given bcjax.data.splits, each decode also hands its image's hash to it.

    With a cache_dir (a run's), two caches are tried before decoding: the folder's own
    (keyed by the files' names, sizes and mtimes: no file is read) and the decoded cache
    shared by every run (`shared_decoded_cache`, keyed by the files' bytes), which spares a
    new workdir the decode of a set another run decoded already.
    """
    examples = list(examples)
    names = [ex.name for ex in examples]
    labels = np.array([ex.label for ex in examples], np.int32)
    cache_file = None
    if cache_dir is not None:
        cache_file = (
            pathlib.Path(cache_dir) / f"busi-{image_size}px-{_cache_key(examples, image_size)}.npz"
        )
        if cache_file.is_file():
            try:
                with np.load(cache_file) as z:
                    images = z["images"]
                    cached_names = json.loads(bytes(z["names"]).decode())
                if cached_names == names and images.shape == (
                    len(names),
                    image_size,
                    image_size,
                    3,
                ):
                    return ArraySet(images, labels, names)
            except (OSError, ValueError, KeyError):
                pass  # unreadable cache: decode again and overwrite it
    paths = [ex.image_path for ex in examples]
    shared = None if cache_dir is None else shared_decoded_cache(paths, image_size, workers)
    if shared is not None:
        found = shared.read(with_phashes=splits is not None)
        if found is not None:
            images, phashes = found
            if splits is not None:
                for path, phash in zip(paths, phashes):
                    splits.remember_phash(path, int(phash))
            return ArraySet(images, labels, names)
    images = np.empty((len(examples), image_size, image_size, 3), np.uint8)
    phashes = np.zeros(len(examples), np.uint64)

    def fill(i):
        path = paths[i]
        images[i], phash = _decode_resize(path, image_size, splits=splits)
        if splits is not None:
            splits.remember_phash(path, phash)
            phashes[i] = phash

    workers = workers or min(16, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(fill, range(len(examples))))
    if cache_file is not None:
        files.save_npz(
            cache_file, images=images, names=np.frombuffer(json.dumps(names).encode(), np.uint8)
        )
    if shared is not None:
        shared.write(images, phashes if splits is not None else None)
    return ArraySet(images, labels, names)


# ----------------------------------------------------------------------------- shared cache

SHARED_CACHE_FOLDER = "decoded"  # under busi.default_cache_dir(), beside synthetic/ and jax/
# Entries kept, the least recently used dropped first: at most this many, and beyond the
# newest one no more than this many bytes in all (BUSI at 224 px: 117 MB an entry).
SHARED_CACHE_KEEP = 8
SHARED_CACHE_MAX_BYTES = 4 << 30
_CHUNK = 1 << 20


def _file_digest(path) -> bytes:
    # SHA-256: CPUs with SHA extensions hash it ≈ 1.6x faster than blake2b (176 MB of PNGs:
    # 0.15 vs 0.24 s on one core); hashlib releases the GIL for large buffers, so threads help.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.digest()


@dataclasses.dataclass(frozen=True)
class SharedDecoded:
    """One entry of the shared decoded cache: the uint8 [N, S, S, 3] arrays that
    `decode_resize` gives for N files, and (when a split was made from them) their
    duplicate hashes (bcjax.data.splits.phash_file's), as `path`, an .npz."""

    path: pathlib.Path
    shape: tuple[int, int, int, int]

    def read(self, *, with_phashes: bool) -> tuple[np.ndarray, np.ndarray | None] | None:
        """(images, phashes or None), or None when absent, damaged or without the hashes
        asked for."""
        try:
            with np.load(self.path) as z:
                images = z["images"]
                phashes = z["phashes"] if "phashes" in z.files else None
        except (OSError, ValueError, KeyError, EOFError):
            return None  # absent, or a damaged cache: only a cache
        if images.shape != self.shape or images.dtype != np.uint8:
            return None
        if with_phashes and (phashes is None or phashes.shape != self.shape[:1]):
            return None
        try:
            os.utime(self.path)  # recently used: pruned last
        except OSError:
            pass
        return images, phashes

    def write(self, images: np.ndarray, phashes: np.ndarray | None = None) -> None:
        arrays = {"images": images}
        if phashes is not None:
            arrays["phashes"] = np.asarray(phashes, np.uint64)
        try:
            files.save_npz(self.path, **arrays)
            _prune(self.path.parent, SHARED_CACHE_KEEP, SHARED_CACHE_MAX_BYTES)
        except OSError:
            pass  # a read-only or full cache folder: the run goes on without it


def _prune(folder: pathlib.Path, keep: int, max_bytes: int) -> None:
    stats = [(p, p.stat()) for p in folder.glob("*.npz")]
    stats.sort(key=lambda e: e[1].st_mtime, reverse=True)  # newest first, always kept
    total = 0
    for i, (path, st) in enumerate(stats):
        total += st.st_size
        if i and (i >= keep or total > max_bytes):
            path.unlink(missing_ok=True)


def shared_decoded_cache(paths: Sequence, image_size: int, workers: int | None = None):
    """The shared cache entry (`SharedDecoded`) for `decode_resize` of every file in
    `paths` at `image_size`, or None unless every file belongs to a set that
    bcjax.data.synthetic generated (its root holds busi.SYNTHETIC_MARKER). Real images,
    a clinic's above all, are never copied outside the run's workdir: this cache lives in
    the user's cache folder and outlives every study (the workdir's own cache still spares
    a resumed run the decode). DICOM files are left out too: their decode depends on
    bcjax.data.dicom's code, which the key cannot see.

    The key hashes every file's bytes (so it holds when a file changes in place, keeps
    its mtime or moves), their order, the image size, CACHE_VERSION (raise it when
    `decode_resize` changes what it returns) and Pillow's version (the decoder and the
    resize). Reading and hashing 780 BUSI-sized PNGs (176 MB) takes ≈ 0.15 s; decoding
    them ≈ 3 s.
    """
    from PIL import __version__ as pillow_version

    paths = list(paths)
    # Images and masks of a generated set are root/<class>/<file>.
    roots = {pathlib.Path(p).parent.parent for p in paths}
    if not paths or not all(busi.is_synthetic(root) for root in roots):
        return None
    if any(busi._dicom(p) is not None for p in paths):
        return None  # their decode depends on bcjax.data.dicom's code, which the key cannot see
    with concurrent.futures.ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(_file_digest, paths))
    h = hashlib.sha256(f"v{CACHE_VERSION}|{image_size}|pillow {pillow_version}".encode())
    for d in digests:
        h.update(d)
    name = f"{image_size}px-{h.hexdigest()[:32]}.npz"
    return SharedDecoded(
        busi.default_cache_dir() / SHARED_CACHE_FOLDER / name,
        (len(paths), image_size, image_size, 3),
    )


# ----------------------------------------------------------------------------- training order


def steps_per_epoch(n: int, global_batch_size: int) -> int:
    return n // global_batch_size


def num_eval_batches(n: int, global_batch_size: int) -> int:
    return -(-n // global_batch_size)


def _local_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index={process_index} / process_count={process_count}")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not a positive multiple of "
            f"process_count {process_count}"
        )
    per = global_batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


def epoch_order(labels: np.ndarray, seed: int, epoch: int, balanced: bool = False) -> np.ndarray:
    """Example indices of one epoch (int64 [N]); a function of (seed, epoch) only.

    balanced: draw N indices with replacement, each class equally likely (an
    alternative to class weights for BUSI's 133/437/210 imbalance).
    """
    rng = np.random.default_rng([int(seed) % 2**63, int(epoch), 0xDA7A])
    n = len(labels)
    if not balanced:
        return rng.permutation(n)
    counts = np.bincount(labels)
    present = np.count_nonzero(counts)
    p = 1.0 / (present * counts[labels])
    return rng.choice(n, size=n, replace=True, p=p / p.sum())


class _Gather:
    """Picklable, thread-safe map from a global step to this process's batch."""

    def __init__(
        self, data: ArraySet, global_batch_size, seed, local: slice, balanced, with_images=True
    ):
        self.data = data
        self.with_images = with_images
        self.gbs = global_batch_size
        self.seed = seed
        self.local = local
        self.balanced = balanced
        self.spe = steps_per_epoch(len(data), global_batch_size)
        self._order = functools.lru_cache(maxsize=4)(self._compute_order)

    def _compute_order(self, epoch: int) -> np.ndarray:
        return epoch_order(self.data.labels, self.seed, epoch, self.balanced)

    def __call__(self, step: int, _unused=None) -> dict:
        epoch, k = divmod(int(step), self.spe)
        start = k * self.gbs
        idx = self._order(epoch)[start + self.local.start : start + self.local.stop]
        batch = {"label": np.take(self.data.labels, idx), "index": idx.astype(np.int32)}
        if self.with_images:
            batch["image"] = np.take(self.data.images, idx, axis=0)
        return batch

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_order"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._order = functools.lru_cache(maxsize=4)(self._compute_order)


def _read_options(num_threads, prefetch):
    if num_threads is None:
        num_threads = DEFAULT_NUM_THREADS
    if prefetch is None:  # Grain uses at most prefetch threads at a time
        prefetch = max(DEFAULT_PREFETCH, num_threads) if num_threads > 0 else 0
    return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)


def train_batch_spec(data: ArraySet, batch_size: int, with_images: bool = True) -> dict:
    """{key: (shape, dtype)} of a train batch of `batch_size` rows, as `train_iterator`'s
    elements have them (its `_Gather`), known before any batch is read: a run lowers its
    train step from these shapes while it sets up (bcjax.train.run_setup)."""
    spec = {"label": ((batch_size,), data.labels.dtype), "index": ((batch_size,), np.int32)}
    if with_images:
        spec["image"] = ((batch_size, *data.images.shape[1:]), data.images.dtype)
    return spec


def train_iterator(
    data: ArraySet,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    balanced: bool = False,
    *,
    num_threads: int | None = None,
    prefetch: int | None = None,
    with_images: bool = True,
) -> grain.DatasetIterator:
    """Endless iterator of this process's slice of each global batch, epoch after epoch.

    Drops each epoch's remainder. Elements: {"image": uint8 [B/P, S, S, 3],
    "label": int32 [B/P], "index": int32 [B/P]} (index = row in ``data``).
    get_state()/set_state() restore the position exactly (state = next global step).
    num_threads/prefetch: Grain read threads and buffered batches (default: 2 threads,
    none on hosts with <= 2 CPUs; prefetch >= threads).
    with_images=False leaves "image" out: the loop then gathers the rows from a
    copy of the images kept on the devices (``strategies.on_device_images``).
    """
    local = _local_slice(global_batch_size, process_index, process_count)
    if steps_per_epoch(len(data), global_batch_size) < 1:
        raise ValueError(
            f"global batch {global_batch_size} is larger than the {len(data)} training examples"
        )
    gather = _Gather(data, global_batch_size, seed, local, balanced, with_images)
    ds = grain.MapDataset.range(gather.spe).repeat().map_with_index(gather)
    return iter(ds.to_iter_dataset(_read_options(num_threads, prefetch)))


# ----------------------------------------------------------------------------- evaluation


class _EvalGather:
    def __init__(self, data: ArraySet, global_batch_size, local: slice):
        self.data = data
        self.gbs = global_batch_size
        self.local = local

    def __call__(self, b: int) -> dict:
        n = len(self.data)
        g = b * self.gbs + np.arange(self.local.start, self.local.stop)
        valid = g < n
        idx = np.where(valid, g, 0)
        image = np.take(self.data.images, idx, axis=0)
        image[~valid] = 0
        return {
            "image": image,
            "label": np.where(valid, np.take(self.data.labels, idx), 0).astype(np.int32),
            "index": np.where(valid, g, -1).astype(np.int32),
            "valid": valid,
        }


def eval_batches(
    data: ArraySet,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    *,
    num_threads: int | None = None,
    prefetch: int | None = None,
) -> grain.DatasetIterator:
    """Every example exactly once over all processes; ceil(N / B) batches, the last one padded.

    Padding rows have valid=False, image 0, label 0 and index -1. Every process
    gets the same number of batches (collectives stay in step).
    """
    local = _local_slice(global_batch_size, process_index, process_count)
    ds = grain.MapDataset.range(num_eval_batches(len(data), global_batch_size)).map(
        _EvalGather(data, global_batch_size, local)
    )
    return iter(ds.to_iter_dataset(_read_options(num_threads, prefetch)))
