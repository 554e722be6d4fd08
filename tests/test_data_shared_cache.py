"""The decoded-image cache shared by every run (pipeline.shared_decoded_cache): a new
workdir reads what another run decoded, keyed by the files' bytes, so a changed file is
decoded again even when its size and mtime are kept."""

import os
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from bcjax.data import busi, pipeline, splits, synthetic

S = 16


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return synthetic.generate(
        tmp_path_factory.mktemp("busi"), num=12, seed=5, min_size=40, max_size=72
    )


@pytest.fixture
def root(source, tmp_path, monkeypatch):
    """A private copy of the set (tests change files) and an empty bcjax cache root."""
    monkeypatch.setenv("BCJAX_CACHE_DIR", str(tmp_path / "bcjax-cache"))
    return shutil.copytree(source, tmp_path / "busi")


def _fresh_process():
    splits._HASH_CACHE.clear()  # nothing hashed yet, as in a new process


def _entries(tmp_path):
    return sorted((tmp_path / "bcjax-cache" / pipeline.SHARED_CACHE_FOLDER).glob("*.npz"))


def test_a_new_workdir_reads_what_another_run_decoded(root, opens, tmp_path):
    examples = busi.scan(root)
    _fresh_process()
    reference, reference_hashes = pipeline.load_arrays_and_phashes(examples, S)  # no cache
    _fresh_process()
    first, first_hashes = pipeline.load_arrays_and_phashes(examples, S, cache_dir=tmp_path / "w1")
    assert len(_entries(tmp_path)) == 1
    _fresh_process()
    opens.clear()
    again, again_hashes = pipeline.load_arrays_and_phashes(examples, S, cache_dir=tmp_path / "w2")
    assert opens == []  # nothing decoded: arrays and duplicate hashes from the shared entry
    for arrays, hashes in ((first, first_hashes), (again, again_hashes)):
        np.testing.assert_array_equal(arrays.images, reference.images)
        np.testing.assert_array_equal(hashes, reference_hashes)
        assert arrays.names == reference.names
        np.testing.assert_array_equal(arrays.labels, reference.labels)
    assert splits.make_split(examples, seed=0, hashes=again_hashes) == splits.make_split(
        examples, seed=0, hashes=reference_hashes
    )


def test_a_changed_file_is_decoded_again_even_with_its_size_and_mtime(root, opens, tmp_path):
    examples = busi.scan(root)
    target = pathlib.Path(examples[3].image_path)
    size = os.stat(target).st_size + 65536
    _pad(target, size)  # room for the changed file (bytes after IEND are ignored)
    before = pipeline.load_arrays(examples, S, cache_dir=tmp_path / "w1")
    st = os.stat(target)
    with Image.open(target) as im:
        flipped = np.ascontiguousarray(np.asarray(im)[:, ::-1])
    Image.fromarray(flipped).save(target)
    _pad(target, size)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(target).st_size, os.stat(target).st_mtime_ns) == (size, st.st_mtime_ns)
    opens.clear()
    after = pipeline.load_arrays(examples, S, cache_dir=tmp_path / "w2")
    assert len(opens) == len(examples)  # a new key: every file decoded again
    np.testing.assert_array_equal(after.images[3], pipeline.decode_resize(target, S))
    assert not np.array_equal(after.images[3], before.images[3])  # really changed
    np.testing.assert_array_equal(np.delete(after.images, 3, 0), np.delete(before.images, 3, 0))
    assert len(_entries(tmp_path)) == 2


def _pad(path, size):
    with open(path, "ab") as f:
        f.write(b"\0" * (size - os.stat(path).st_size))


def test_an_entry_without_hashes_serves_arrays_not_a_split(root, opens, tmp_path):
    examples = busi.scan(root)
    pipeline.load_arrays(examples, S, cache_dir=tmp_path / "w1")  # resumes keep no hashes
    _fresh_process()
    opens.clear()
    arrays, hashes = pipeline.load_arrays_and_phashes(examples, S, cache_dir=tmp_path / "w2")
    assert len(opens) == len(examples)  # decoded for the hashes
    _fresh_process()
    np.testing.assert_array_equal(hashes, splits.phashes(examples))
    opens.clear()
    _fresh_process()
    again, again_hashes = pipeline.load_arrays_and_phashes(examples, S, cache_dir=tmp_path / "w3")
    assert opens == []  # the entry now holds them
    np.testing.assert_array_equal(again_hashes, hashes)
    np.testing.assert_array_equal(again.images, arrays.images)


def test_damaged_entries_are_decoded_again_and_old_ones_pruned(root, tmp_path, monkeypatch):
    examples = busi.scan(root)
    paths = [ex.image_path for ex in examples]
    entry = pipeline.shared_decoded_cache(paths, S)
    assert entry.read(with_phashes=False) is None  # absent
    entry.path.parent.mkdir(parents=True)
    entry.path.write_bytes(b"not an npz")
    np.testing.assert_array_equal(
        pipeline.decode_resize_all(paths, S), [pipeline.decode_resize(p, S) for p in paths]
    )
    assert entry.read(with_phashes=False) is not None  # rewritten whole
    monkeypatch.setattr(pipeline, "SHARED_CACHE_KEEP", 2)
    for k in range(1, 4):  # other sets: the first k files
        pipeline.decode_resize_all(paths[:k], S)
    assert [p.name for p in _entries(tmp_path)] == sorted(
        pipeline.shared_decoded_cache(paths[:k], S).path.name for k in (2, 3)
    )
    # A byte budget smaller than any entry: only the newest stays.
    monkeypatch.setattr(pipeline, "SHARED_CACHE_MAX_BYTES", 1)
    pipeline.decode_resize_all(paths, S)
    assert _entries(tmp_path) == [entry.path]


def test_dicom_files_are_not_cached(source, tmp_path, monkeypatch):
    """A DICOM frame's decode (crop, windowing) is bcjax.data.dicom's code, which the
    key cannot see: such sets are decoded every run (and kept in the workdir's cache)."""
    from bcjax.data import synthetic_dicom

    monkeypatch.setenv("BCJAX_CACHE_DIR", str(tmp_path / "bcjax-cache"))
    pngs = [ex.image_path for ex in busi.scan(source)]
    assert pipeline.shared_decoded_cache(pngs, S) is not None
    dicoms = [ex.image_path for ex in busi.scan(synthetic_dicom.to_dicom(source, tmp_path, 0))]
    assert all(p.endswith(".dcm") for p in dicoms)
    assert pipeline.shared_decoded_cache(pngs + dicoms[:1], S) is None
    pipeline.load_arrays(busi.scan(tmp_path / "Dataset_BUSI_with_GT"), S, cache_dir=tmp_path / "w")
    assert not _entries(tmp_path)


def test_real_images_never_leave_the_workdir(root, tmp_path):
    """Only sets bcjax generated go to the shared cache, which lives in the user's cache
    folder and outlives every study: real images (here the same files without the
    generator's marker) are cached in the run's workdir alone."""
    (pathlib.Path(root) / busi.SYNTHETIC_MARKER).unlink()
    examples = busi.scan(root)
    paths = [ex.image_path for ex in examples]
    assert pipeline.shared_decoded_cache(paths, S) is None
    arrays = pipeline.load_arrays(examples, S, cache_dir=tmp_path / "w1")
    pipeline.load_arrays_and_phashes(examples, S, cache_dir=tmp_path / "w2")
    masks = [m for ex in examples for m in ex.mask_paths]
    pipeline.decode_resize_all(masks, S)
    assert not _entries(tmp_path)
    assert list((tmp_path / "w1").glob("*.npz"))  # the workdir's own cache
    np.testing.assert_array_equal(arrays.images, [pipeline.decode_resize(p, S) for p in paths])
