"""Orbax checkpoints: other device counts, retention, resume == straight run."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from _mp_worker import IMAGE_SIZE, RNG_SEED, build, initial_state_host, make_batches, run, to_host

from bcjax.parallel.mesh import make_mesh
from bcjax.train import checkpoint

MODEL = "tiny_cnn"


def _assert_trees_equal(a, b):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(
            np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path)
        )


def _trained_state_8dev(num_steps=2):
    steps = build("shard_map", make_mesh(8), MODEL)
    _, state, _ = run(steps, steps.place_state(initial_state_host(MODEL)), make_batches(num_steps))
    return steps, state


def test_written_on_8_devices_restores_on_1_and_4(tmp_path):
    steps8, state = _trained_state_8dev()
    snapshot = to_host(state)
    with checkpoint.CheckpointManager(tmp_path, keep_latest=1, keep_best=0) as ckpt:
        ckpt.save(int(state.step), state, {"next_index": 2}, extra={"note": "8 devices"})
        # The save is asynchronous; donating the state right away must not
        # change what is written.
        state, _ = steps8.train_step(
            state, steps8.shard_batch(make_batches(3)[2]), jax.random.key(RNG_SEED)
        )
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [2]
        for n in (1, 4):
            mesh = make_mesh(n)
            target = build("shard_map", mesh, MODEL).place_state(initial_state_host(MODEL))
            restored, iter_state, extra = ckpt.restore_latest(target)
            assert iter_state == {"next_index": 2} and extra == {"note": "8 devices"}
            _assert_trees_equal(to_host(restored), snapshot)
            for leaf in jax.tree.leaves(restored):
                assert leaf.sharding.mesh == mesh and leaf.sharding.is_fully_replicated
    _assert_trees_equal(checkpoint.read_params(tmp_path), snapshot.params)


def test_keeps_latest_and_best_never_deletes_the_newest(tmp_path):
    state = build("shard_map", make_mesh(), MODEL).place_state(initial_state_host(MODEL))
    accuracy = {1: 0.9, 2: 0.2, 3: 0.95, 4: 0.1, 5: 0.05, 6: 0.01}  # newest are worst
    with checkpoint.CheckpointManager(
        tmp_path, keep_latest=2, keep_best=2, best_metric="accuracy"
    ) as ckpt:
        for step, acc in accuracy.items():
            ckpt.save(
                step,
                state.replace(step=state.step + step),
                None,
                metrics={"accuracy": acc, "loss": 1 - acc, "per_class": [1, 2]},
            )
        ckpt.save(7, state.replace(step=state.step + 7))  # no metrics: kept while latest
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [1, 3, 6, 7]
        assert ckpt.best_step() == 3 and ckpt.latest_step() == 7
        best, iter_state, _ = ckpt.restore_best(state)
        assert int(best.step) == 3 and iter_state is None
        ckpt.save(8, state.replace(step=state.step + 8), metrics={"accuracy": 0.5})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [1, 3, 7, 8]
    with checkpoint.CheckpointManager(
        tmp_path / "by_loss", keep_latest=1, keep_best=1, best_metric="loss"
    ) as ckpt:  # "loss": lower is better
        for step, loss in ((1, 0.3), (2, 0.1), (3, 0.5)):
            ckpt.save(step, state, metrics={"loss": loss})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [2, 3] and ckpt.best_step() == 2


def test_stop_and_restart_equals_straight_run(tmp_path):
    """4 steps straight vs 2 steps, checkpoint (state + Grain iterator state),
    a new manager, restore onto a fresh state, 2 more steps: same parameters."""
    from bcjax.data import pipeline

    rs = np.random.RandomState(3)
    data = pipeline.ArraySet(
        rs.randint(0, 256, (40, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8),
        rs.randint(0, 3, 40).astype(np.int32),
        [f"x{i}" for i in range(40)],
    )
    steps = build("shard_map", make_mesh(), MODEL)
    rng = jax.random.key(RNG_SEED)

    def train(state, it, n):
        for _ in range(n):
            state, _ = steps.train_step(state, steps.shard_batch(next(it)), rng)
        return state

    straight = to_host(
        train(
            steps.place_state(initial_state_host(MODEL)),
            pipeline.train_iterator(data, 16, seed=0, num_threads=0),
            4,
        )
    )

    it = pipeline.train_iterator(data, 16, seed=0, num_threads=0)
    state = train(steps.place_state(initial_state_host(MODEL)), it, 2)
    meta = checkpoint.run_metadata({"model": MODEL, "seed": 0})
    with checkpoint.CheckpointManager(tmp_path, metadata=meta) as ckpt:
        ckpt.save(int(state.step), state, it.get_state(), extra={"history": [{"epoch": 1}]})
    del state, it  # the "killed" run

    with checkpoint.CheckpointManager(tmp_path, metadata=meta) as ckpt:
        fresh = steps.place_state(initial_state_host(MODEL))
        state, iter_state, extra = ckpt.restore_latest(fresh)
    assert int(state.step) == 2 and extra == {"history": [{"epoch": 1}]}
    it = pipeline.train_iterator(data, 16, seed=0, num_threads=0)
    it.set_state(iter_state)
    resumed = to_host(train(state, it, 2))
    assert int(resumed.step) == 4
    _assert_trees_equal(resumed.params, straight.params)
    _assert_trees_equal(resumed.batch_stats, straight.batch_stats)
    _assert_trees_equal(resumed.opt_state, straight.opt_state)


def test_refuses_a_directory_of_another_model(tmp_path):
    import ml_collections

    config = ml_collections.ConfigDict(
        {
            "model": "resnet18",
            "width": 64,
            "width_multiplier": 1.0,
            "learning_rate": 0.1,
            "class_weights": (1.0, 2.0, 3.0),
        }
    )
    meta = checkpoint.run_metadata(config)
    identity = meta["identity"]
    assert identity["model"] == "resnet18" and identity["width"] == 64
    # A ResNet has no width_multiplier; the learning rate does not define the run.
    assert "width_multiplier" not in identity and "learning_rate" not in identity
    assert identity["global_batch_size"] == 32  # configs/default.py's, the field absent here
    assert meta["config"]["class_weights"] == [1.0, 2.0, 3.0]
    checkpoint.CheckpointManager(tmp_path, metadata=meta).close()
    other_lr = config.copy_and_resolve_references()
    other_lr.learning_rate = 0.01  # not part of the identity: resuming is fine
    with checkpoint.CheckpointManager(tmp_path, metadata=checkpoint.run_metadata(other_lr)) as ckpt:
        assert ckpt.metadata()["identity"]["model"] == "resnet18"
    other = config.copy_and_resolve_references()
    other.model = "mobilenet_v2"
    with pytest.raises(
        checkpoint.CheckpointMismatchError, match="model: checkpoint 'resnet18' vs config"
    ):
        checkpoint.CheckpointManager(tmp_path, metadata=checkpoint.run_metadata(other))


def test_identity_records_the_classes_and_runs_from_before_still_resume(tmp_path):
    config = {
        "model": "tiny_cnn",
        "dataset": "folder",
        "data_dir": "/data",
        "data_csv": "",
        "class_names": (),
        "synthetic_mark": "",
        "synthetic_mark_prob": 0.9,
        "split_seed": 0,
    }
    current = checkpoint.run_metadata(config, class_names=("benign", "malignant"))
    assert current["identity"]["class_names"] == ["benign", "malignant"]  # resolved from the data
    assert {"data_csv", "synthetic_mark", "synthetic_mark_prob"} <= set(current["identity"])
    # Before the data was read (fresh_start's check, bcjax.cv): an empty
    # config.class_names means "from the data" and is not compared.
    assert "class_names" not in checkpoint.run_metadata(config)["identity"]

    # The identity as a run wrote it before these fields existed: it resumes.
    old = {
        "identity": {
            "model": "tiny_cnn",
            "dataset": "folder",
            "data_dir": "/data",
            "split_seed": 0,
        },
        "config": {},
    }
    state = {"w": jax.numpy.arange(3.0)}
    with checkpoint.CheckpointManager(tmp_path, metadata=old, async_save=False) as ckpt:
        ckpt.save(1, state)
    with checkpoint.CheckpointManager(tmp_path, metadata=current, async_save=False) as ckpt:
        assert ckpt.metadata()["identity"] == old["identity"]
        assert ckpt.latest_step() == 1
    # Other classes, or the same in another order, are another run.
    reordered = checkpoint.run_metadata(config, class_names=("malignant", "benign"))
    with pytest.raises(checkpoint.CheckpointMismatchError, match="class_names"):
        checkpoint.check_identity(current, reordered)


def test_bad_retention_values():
    with pytest.raises(ValueError, match="keep_latest must be >= 1"):
        checkpoint.CheckpointManager("/tmp/unused", keep_latest=0)
