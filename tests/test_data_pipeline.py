"""Grain pipeline: determinism, per-process slices, resumable state, exact evaluation."""

import numpy as np
import pytest

from bcjax.data import busi, pipeline, synthetic

S = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = synthetic.generate(
        tmp_path_factory.mktemp("busi"), num=30, seed=3, min_size=40, max_size=56
    )
    return pipeline.load_arrays(busi.scan(root), S)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_load_arrays_shapes_and_cache(data, tmp_path):
    assert data.images.shape == (30, S, S, 3) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int32 and len(data.names) == 30
    np.testing.assert_array_equal(np.bincount(data.labels), synthetic.class_counts(30))
    root = synthetic.generate(tmp_path, num=6, seed=3, min_size=40, max_size=56)
    examples = busi.scan(root)
    first = pipeline.load_arrays(examples, S, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1 and not list(
        (tmp_path / "cache").glob("*.tmp")
    )
    again = pipeline.load_arrays(examples, S, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(first.images, again.images)
    assert again.names == first.names
    sub = first.select([first.names[3], first.names[1]])
    np.testing.assert_array_equal(sub.images, first.images[[3, 1]])


def test_batches_shape_and_epochs(data):
    it = pipeline.train_iterator(data, 8, seed=0)
    spe = pipeline.steps_per_epoch(30, 8)
    assert spe == 3
    batches = _take(it, 2 * spe)
    b = batches[0]
    assert b["image"].shape == (8, S, S, 3) and b["image"].dtype == np.uint8
    assert b["label"].dtype == np.int32 and b["index"].dtype == np.int32
    np.testing.assert_array_equal(b["image"], data.images[b["index"]])
    np.testing.assert_array_equal(b["label"], data.labels[b["index"]])
    for epoch in range(2):
        idx = np.concatenate([x["index"] for x in batches[epoch * spe : (epoch + 1) * spe]])
        assert len(set(idx.tolist())) == 24  # no repeats within an epoch; remainder dropped
    assert not np.array_equal(batches[0]["index"], batches[spe]["index"])  # reshuffled per epoch


def test_same_seed_same_batches(data):
    a = _take(pipeline.train_iterator(data, 8, seed=7, num_threads=2), 4)
    b = _take(pipeline.train_iterator(data, 8, seed=7, num_threads=0), 4)
    for x, y in zip(a, b):
        _same(x, y)
    c = next(pipeline.train_iterator(data, 8, seed=8))
    assert not np.array_equal(a[0]["index"], c["index"])


@pytest.mark.parametrize("balanced", [False, True])
def test_process_count_does_not_change_global_batch(data, balanced):
    whole = _take(pipeline.train_iterator(data, 8, seed=1, balanced=balanced), 5)
    for count in (2, 4):
        parts = [
            _take(pipeline.train_iterator(data, 8, 1, p, count, balanced), 5) for p in range(count)
        ]
        for step in range(5):
            assert parts[0][step]["image"].shape[0] == 8 // count
            joined = {
                k: np.concatenate([parts[p][step][k] for p in range(count)]) for k in whole[step]
            }
            _same(joined, whole[step])
    with pytest.raises(ValueError):
        pipeline.train_iterator(data, 8, 1, 0, 3)


def test_restored_state_gives_same_next_batch(data):
    it = pipeline.train_iterator(data, 8, seed=2)
    _take(it, 4)  # into the second epoch
    state = it.get_state()
    expected = _take(it, 3)
    fresh = pipeline.train_iterator(data, 8, seed=2)
    fresh.set_state(state)
    for x, y in zip(_take(fresh, 3), expected):
        _same(x, y)
    part = pipeline.train_iterator(data, 8, 2, 1, 2)
    part.set_state(state)
    np.testing.assert_array_equal(next(part)["index"], expected[0]["index"][4:])


def test_balanced_sampling(data):
    it = pipeline.train_iterator(data, 24, seed=0, balanced=True)
    labels = np.concatenate([next(it)["label"] for _ in range(40)])
    freq = np.bincount(labels, minlength=3) / len(labels)
    assert np.all(np.abs(freq - 1 / 3) < 0.05), freq  # data itself is 5/15/10 of 30


@pytest.mark.parametrize("count", [1, 2])
def test_eval_covers_every_example_once(data, count):
    per_process = [list(pipeline.eval_batches(data, 8, p, count)) for p in range(count)]
    assert all(len(b) == pipeline.num_eval_batches(30, 8) == 4 for b in per_process)
    seen = []
    for p in range(count):
        for b in per_process[p]:
            assert b["image"].shape == (8 // count, S, S, 3) and b["valid"].dtype == bool
            v = b["valid"]
            np.testing.assert_array_equal(b["image"][v], data.images[b["index"][v]])
            np.testing.assert_array_equal(b["label"][v], data.labels[b["index"][v]])
            assert np.all(b["index"][~v] == -1) and not b["image"][~v].any()
            seen.extend(b["index"][v].tolist())
    assert sorted(seen) == list(range(30))


def test_batch_larger_than_data_is_an_error(data):
    with pytest.raises(ValueError, match="larger"):
        pipeline.train_iterator(data, 64, seed=0)
