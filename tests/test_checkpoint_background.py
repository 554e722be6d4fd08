"""Checkpoint saves of a CPU run of one process: a host copy, Orbax's save call on a
background thread (bcjax.train.checkpoint.saves_from_host_copy)."""

from __future__ import annotations

import threading

import jax
import numpy as np
import pytest
from _mp_worker import build, initial_state_host

from bcjax.parallel.mesh import make_mesh
from bcjax.train import checkpoint

MODEL = "tiny_cnn"


def _state():
    steps = build("shard_map", make_mesh(2), MODEL)
    return steps.place_state(initial_state_host(MODEL))


def _spy_on_orbax_save(ckpt, calls):
    orbax_save = ckpt._manager.save

    def save(step, **kw):
        calls.append(
            {
                "thread": threading.current_thread().name,
                "leaf_types": {type(x) for x in jax.tree.leaves(kw["args"]["state"].item)},
            }
        )
        return orbax_save(step, **kw)

    ckpt._manager.save = save


def test_the_save_call_runs_on_a_thread_from_a_host_copy_and_every_query_sees_it(tmp_path):
    state = _state()
    calls = []
    with checkpoint.CheckpointManager(tmp_path, keep_latest=2, keep_best=1) as ckpt:
        _spy_on_orbax_save(ckpt, calls)
        for step, accuracy in ((3, 0.5), (6, 0.9), (9, 0.4)):
            saved = state.replace(step=state.step + step)
            before = ckpt.all_steps()
            assert ckpt.save(step, saved, {"at": step}, metrics={"accuracy": accuracy})
            # As Orbax's own save call: every earlier checkpoint is committed on return
            # (at most one in flight), this one possibly not yet.
            assert set(before) <= set(checkpoint.committed_steps(tmp_path))
            # The queries wait for the save call, so they see it.
            assert ckpt.latest_step() == step
        assert ckpt.all_steps() == [6, 9] and ckpt.best_step() == 6
        ckpt.wait_until_finished()  # the loop's wait before results.json: all on disk
        assert sorted(checkpoint.committed_steps(tmp_path)) == [6, 9]
        restored, iter_state, _ = ckpt.restore(9, state)
    assert [c["thread"].startswith("bcjax-checkpoint") for c in calls] == [True] * 3
    assert all(c["leaf_types"] == {np.ndarray} for c in calls)
    assert iter_state == {"at": 9} and int(restored.step) == int(state.step) + 9
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
        assert got.sharding == want.sharding  # restored onto the mesh, as the target
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    variables = checkpoint.read_variables(tmp_path, 9)
    for got, want in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(saved.params)):
        np.testing.assert_array_equal(got, np.asarray(want))


def test_a_step_orbax_would_not_save_is_refused_at_the_call(tmp_path):
    state = _state()
    for async_save, directory in ((True, tmp_path / "thread"), (False, tmp_path / "orbax")):
        with checkpoint.CheckpointManager(directory, async_save=async_save) as ckpt:
            assert (ckpt._saver is not None) == async_save
            assert ckpt.save(5, state)
            assert not ckpt.save(4, state)  # older than the latest: Orbax's answer
            assert ckpt.all_steps() == [5]


def test_an_error_of_the_background_save_call_is_raised_by_the_next_call(tmp_path):
    state = _state()
    ckpt = checkpoint.CheckpointManager(tmp_path)

    def failing_save(step, **kw):
        raise OSError("disk full")

    ckpt._manager.save = failing_save
    assert ckpt.save(1, state)
    with pytest.raises(OSError, match="disk full"):
        ckpt.wait_until_finished()
    ckpt.close()  # the error was raised once; closing is clean


def test_only_cpu_runs_of_one_process_save_from_a_host_copy():
    assert checkpoint.saves_from_host_copy("cpu", 1, True)
    for platform in ("gpu", "cuda", "rocm", "tpu"):
        assert not checkpoint.saves_from_host_copy(platform, 1, True)
    assert not checkpoint.saves_from_host_copy("cpu", 2, True)
    assert not checkpoint.saves_from_host_copy("cpu", 1, False)


def test_the_best_checkpoint_comes_back_from_its_host_copy_equal_to_its_files(tmp_path):
    state = _state()
    saved = {}
    with checkpoint.CheckpointManager(tmp_path, keep_latest=2, keep_best=1) as ckpt:
        for step, accuracy in ((2, 0.6), (4, 0.8), (6, 0.7), (8, 0.8)):  # a tie: the later
            saved[step] = state.replace(step=state.step + step)
            ckpt.save(
                step, saved[step], {"at": step}, metrics={"accuracy": accuracy}, extra={"e": step}
            )
        assert ckpt.best_step() == 8 and ckpt.all_steps() == [6, 8]
        reads = []
        orbax_restore = ckpt._manager.restore
        ckpt._manager.restore = lambda step, **kw: reads.append(step) or orbax_restore(step, **kw)
        from_copy = ckpt.restore(8, state)
        from_files = ckpt.restore(6, state)
    assert reads == [6]  # the best step was not read back
    with checkpoint.CheckpointManager(tmp_path) as fresh:  # another process: its files
        on_disk = fresh.restore(8, state)
    assert from_copy[1:] == on_disk[1:] == ({"at": 8}, {"e": 8})
    for a, b, want in zip(
        jax.tree.leaves(from_copy[0]), jax.tree.leaves(on_disk[0]), jax.tree.leaves(saved[8])
    ):
        assert a.sharding == b.sharding == want.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(want))
        np.testing.assert_array_equal(np.asarray(b), np.asarray(want))
    assert int(from_files[0].step) == int(state.step) + 6
