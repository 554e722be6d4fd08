"""The training loop end to end on a tiny config: outputs, resume, restore elsewhere."""

import json
import os
import pathlib
import sys

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import _events  # noqa: E402
from _tiny import tiny_config  # noqa: E402

from bcjax.data import synthetic  # noqa: E402
from bcjax.train import loop, run_lock  # noqa: E402


@pytest.fixture(scope="session")
def tiny_busi(tmp_path_factory):
    out = tmp_path_factory.mktemp("busi")
    return synthetic.generate(out, num=48, seed=0, min_size=40, max_size=56)


def _final_params(workdir):
    from bcjax.train import checkpoint

    return checkpoint.read_params(pathlib.Path(workdir) / "checkpoints")


def test_run_writes_its_outputs(tiny_busi, tmp_path, monkeypatch):
    # Every model of the run comes from family.create_model: a patch there reaches the
    # clinical report too (it clones the run's model in float32, builds none of its own).
    from bcjax.data import datasets
    from bcjax.eval import evaluators
    from bcjax.models import family

    built, reported, reads = [], [], []
    real_create, real_report = family.create_model, evaluators.ClinicalReport.run
    real_read = datasets.read_source

    def read_source(*args):
        reads.append(args)
        return real_read(*args)

    def create_model(*args, **kwargs):
        built.append(real_create(*args, **kwargs))
        return built[-1]

    def report(self, state):
        reported.append(self.model)
        examples.extend(self.test_examples)
        return real_report(self, state)

    examples = []
    monkeypatch.setattr(datasets, "read_source", read_source)
    monkeypatch.setattr(family, "create_model", create_model)
    monkeypatch.setattr(evaluators.ClinicalReport, "run", report)
    results = loop.train_and_evaluate(
        tiny_config(
            tiny_busi,
            num_devices=2,
            timing_breakdown=True,
            clinical_report=True,
            input_on_device="yes",
        ),
        tmp_path,
    )
    for name in (
        "results.json",
        "timing.json",
        "manifest.json",
        "metrics.jsonl",
        "learning_curves.png",
        "confusion_matrix.png",
        "reliability.png",
        "roc_curves.png",
        "pr_curves.png",
        "least_grounded.png",
        "curves.json",
    ):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["dataset"] == "synthetic" and "SYNTHETIC" in saved["warning"]
    assert saved["num_devices"] == 2
    assert sum(map(sum, saved["test"]["confusion_matrix"])) == len(
        json.loads((tmp_path / "manifest.json").read_text())["test"]
    )
    # The summary's test report is the best checkpoint's predictions, scored.
    assert results["test"]["accuracy"] == saved["test"]["accuracy"]
    assert results["overflow_skipped_steps"] == 0  # float32: no loss scale, no overflow
    # The clinical sections of the best checkpoint's test part (bcjax.clinical).
    for key in ("calibration", "operating_points", "bootstrap", "grounding", "probes"):
        assert saved[key], key
    assert len(built) == 1 and reported == [built[0].clone(dtype=jax.numpy.float32)]
    # The clinical report used the test examples set-up read (the source was read once),
    # and they are what reading the source again gives for the test part, in its order.
    assert len(reads) == 1
    by_name = {e.name: e for e in real_read(*reads[0]).examples}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert examples == [by_name[name] for name in manifest["test"]]
    assert any(e.mask_paths for e in examples)
    shortcut = saved["probes"]["shortcut"]["criteria"]
    assert shortcut["drops_on_random_mark"]["flagged"] is None  # a run has no random-mark copy
    removal = shortcut["survives_lesion_removal"]
    # Not judged only when the tiny model never finds the positive class at all.
    assert removal["flagged"] in (True, False) or not removal["recall_original"]
    boot = saved["bootstrap"]["metrics"]["accuracy"]
    assert boot["value"] == pytest.approx(saved["test"]["accuracy"])
    assert boot["low"] <= boot["value"] <= boot["high"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for part in ("val", "test"):
        saved_probs = np.load(tmp_path / f"{part}_predictions.npz")
        assert sorted(saved_probs["names"]) == sorted(manifest[part])
        np.testing.assert_allclose(saved_probs["probs"].sum(1), 1, rtol=1e-5)
    held_out = np.load(tmp_path / "test_predictions.npz")
    assert np.mean(held_out["probs"].argmax(1) == held_out["labels"]) == pytest.approx(
        saved["test"]["accuracy"]
    )
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    assert list(tmp_path.glob("events.out.tfevents.*")) or list(
        tmp_path.glob("**/events.out.tfevents.*")
    )
    assert {"train/loss", "train/accuracy", "val/accuracy", "val/macro_f1", "lr"} <= set(lines[0])

    timing = json.loads((tmp_path / "timing.json").read_text())
    assert timing["input_on_device"] is True and saved["input_on_device"] is True
    # A checkpoint every epoch: three saves, and the time the loop spent on them.
    assert timing["checkpoints_saved"] == 3 and timing["phases_s"]["checkpoint"] > 0
    assert timing["compile"]["train_step"]["compile_s"] > 0
    assert timing["steps_total"] == 3 * saved["steps_per_epoch"]
    from bcjax.timing import breakdown

    assert not breakdown.check(timing["breakdown"]), breakdown.check(timing["breakdown"])
    # Every phase of the run, the process's start-up included, adds up to its wall time.
    phases = timing["phases_s"]
    assert set(phases) == {
        "startup",
        "setup",
        "data",
        "compile",
        "train",
        "eval",
        "checkpoint",
        "test",
        "clinical",
        "breakdown",
        "outputs",
        "unattributed",
    }
    assert sum(phases.values()) == pytest.approx(timing["wall_s"])
    assert timing["wall_s"] > timing["train_wall_s_this_process"]
    # Each phase is a time the run spent (how long each took is a benchmark's business).
    assert all(v >= 0 for v in phases.values()), phases


def test_auto_without_busi_falls_back_loudly(tmp_path):
    config = tiny_config(
        tmp_path / "nothing_here", dataset="auto", synthetic_num=24, num_epochs=1, image_size=32
    )
    from bcjax import specs
    from bcjax.data import datasets

    source = datasets.resolve_source(specs.from_config(config).data, tmp_path)
    assert source["dataset"] == "synthetic" and "SYNTHETIC" in source["warning"]
    # The workdir's generated set of other settings: a message, not a FileExistsError.
    config.synthetic_num = 30
    with pytest.raises(datasets.busi.BusiError, match="other settings.*fresh_start"):
        datasets.resolve_source(specs.from_config(config).data, tmp_path)


def test_restart_resumes_to_the_same_parameters(tiny_busi, tmp_path):
    straight = tmp_path / "straight"
    loop.train_and_evaluate(tiny_config(tiny_busi, num_devices=2), straight)
    interrupted = tmp_path / "interrupted"
    # The interrupted run keeps its images on the devices (straight: sent from
    # the host every step): same batches, so the same parameters too.
    on_device = tiny_config(tiny_busi, num_devices=2, input_on_device="yes")
    lock_holders = []

    def stop_after_epoch_2(record):
        lock_holders.append(json.loads((interrupted / run_lock.LOCK_NAME).read_text())["pid"])
        return record["epoch"] == 2

    with pytest.raises(loop.Interrupted):
        loop.train_and_evaluate(on_device, interrupted, on_epoch_end=stop_after_epoch_2)
    # Called from Python, the run held its workdir's lock and released it when interrupted.
    assert lock_holders == [os.getpid()] * 2
    assert not (interrupted / run_lock.LOCK_NAME).exists()
    resumed = loop.train_and_evaluate(on_device, interrupted)
    assert (
        resumed["input_on_device"]
        and not json.loads((straight / "results.json").read_text())["input_on_device"]
    )
    # The wall time counts the killed process up to its checkpoint too.
    timing = json.loads((interrupted / "timing.json").read_text())
    assert (
        resumed["wall_time_s"] == timing["train_wall_s"] > resumed["wall_time_s_this_process"] > 0
    )
    assert timing["train_wall_s_this_process"] == resumed["wall_time_s_this_process"]
    a, b = _final_params(straight), _final_params(interrupted)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)
    logged = [
        json.loads(line)["epoch"]
        for line in (interrupted / "metrics.jsonl").read_text().splitlines()
    ]
    assert logged == [1, 2, 3]  # the resumed epochs are not logged twice
    assert _events.logged_steps(interrupted) == _events.logged_steps(straight)  # nor in TensorBoard

    # Running a finished workdir again re-evaluates without training or re-timing.
    timing_before = (interrupted / "timing.json").read_text()
    again = loop.train_and_evaluate(tiny_config(tiny_busi, num_devices=2), interrupted)
    assert (interrupted / "timing.json").read_text() == timing_before
    assert (
        again["test"]["accuracy"]
        == json.loads((straight / "results.json").read_text())["test"]["accuracy"]
    )
    assert again["wall_time_s"] == resumed["wall_time_s"]


def test_workdir_of_another_run_is_refused_unless_forced(tiny_busi, tmp_path):
    # Another split (same shapes, so no new compile): refused, then replaced on request.
    from bcjax.train import checkpoint

    loop.train_and_evaluate(tiny_config(tiny_busi, num_epochs=2, warmup_epochs=1), tmp_path)
    manifest = (tmp_path / "manifest.json").read_text()
    with pytest.raises(checkpoint.CheckpointMismatchError, match="split_seed.*fresh_start"):
        loop.train_and_evaluate(tiny_config(tiny_busi, split_seed=1), tmp_path)
    assert (tmp_path / "manifest.json").read_text() == manifest

    # Forced: the old run is moved aside intact, the new one starts from step 0.
    forced = tiny_config(tiny_busi, split_seed=1, num_epochs=2, fresh_start=True)
    results = loop.train_and_evaluate(forced, tmp_path)
    assert results["config"]["split_seed"] == 1
    (aside,) = tmp_path.glob("replaced-*")
    assert (aside / "manifest.json").read_text() == manifest
    assert json.loads((aside / "results.json").read_text())["config"]["split_seed"] == 0
    assert checkpoint.read_params(aside / "checkpoints")  # the old checkpoints are kept
    assert (tmp_path / "manifest.json").read_text() != manifest
    logged = [
        json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert logged == [1, 2]  # a fresh log, not appended to the old run's
    # The same command again (a restart with the flag still set) keeps this run.
    loop.train_and_evaluate(forced, tmp_path)
    assert len(list(tmp_path.glob("replaced-*"))) == 1


def test_early_stopping_on_a_planted_plateau(tiny_busi, tmp_path, monkeypatch):
    # Validation macro-F1 planted per epoch: best at epoch 2, then two
    # evaluations without improvement (a tie is not one) -> stop after epoch 4.
    planted = iter([0.30, 0.50, 0.50, 0.45, 0.90, 0.95])
    from bcjax.eval import evaluators

    real_run = evaluators.Validation.run

    def run(self, state):  # the per-epoch validation only: the final scoring is not planted
        return {**real_run(self, state), "macro_f1": next(planted)}

    monkeypatch.setattr(evaluators.Validation, "run", run)
    config = tiny_config(
        tiny_busi, num_epochs=6, early_stopping_patience=2, checkpoint_every_epochs=5
    )
    results = loop.train_and_evaluate(config, tmp_path)
    assert results["stopped_epoch"] == 4 and results["best_epoch"] == 2
    assert "did not improve for 2" in results["stop_reason"]
    logged = [
        json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert logged == [1, 2, 3, 4]
    # A rerun knows the run is over: no further epochs.
    again = loop.train_and_evaluate(config, tmp_path)
    assert again["stopped_epoch"] == 4 and again["epochs_trained"] == 4
    assert next(planted) == 0.90  # no evaluation was consumed by the rerun's training


def test_non_finite_steps_stop_or_are_skipped(tiny_busi, tmp_path):
    # A learning rate of 1e30 overflows the parameters after the first real update.
    diverging = dict(learning_rate=1e30, num_epochs=2, warmup_epochs=1, checkpoint_every_epochs=1)
    with pytest.raises(loop.NonFiniteError, match=r"at step \d+ .*Last good checkpoint"):
        loop.train_and_evaluate(
            tiny_config(tiny_busi, nan_policy="stop", **diverging), tmp_path / "stop"
        )

    results = loop.train_and_evaluate(
        tiny_config(tiny_busi, nan_policy="skip", **diverging), tmp_path / "skip"
    )
    assert results["skipped_steps"] > 0
    params = _final_params(tmp_path / "skip")
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))


def test_unusable_workdir_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    from bcjax.train import workdir

    with pytest.raises(workdir.WorkdirError, match="not writable"):
        workdir.check_workdir(blocker / "run")
    with pytest.raises(workdir.WorkdirError, match="MiB free"):
        workdir.check_workdir(tmp_path / "run", min_free_bytes=2**62)
    assert loop.WorkdirError is workdir.WorkdirError  # what bcjax.main catches


def test_pretrained_weights_replace_the_initial_state(tmp_path):
    # A state_dict of torchvision's resnet18 names and shapes (random values);
    # the loop's start from config.pretrained must carry them into the state.
    from bcjax.step.state import TrainState

    keys = json.loads((ROOT / "tests" / "data" / "torchvision_keys.json").read_text())["resnet18"]
    rng = np.random.default_rng(0)
    weights = {k: rng.standard_normal(shape).astype(np.float32) for k, shape in keys if shape}
    np.savez(tmp_path / "resnet18.npz", **weights)
    import bcjax.models

    model = bcjax.models.create("resnet18", num_classes=3)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    )
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
    state = TrainState(
        step=0,
        params=zeros["params"],
        batch_stats=zeros["batch_stats"],
        opt_state=(),
        apply_fn=None,
        tx=None,
    )
    config = tiny_config(tmp_path, width=64, pretrained=str(tmp_path / "resnet18.npz"))
    from bcjax import specs
    from bcjax.train import run_setup

    loaded = run_setup.load_pretrained(specs.from_config(config).model, state, num_classes=3)
    np.testing.assert_array_equal(
        np.asarray(loaded.params["conv_init"]["kernel"]),
        weights["conv1.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        np.asarray(loaded.batch_stats["layer4_1"]["bn2"]["var"]),
        weights["layer4.1.bn2.running_var"],
    )
    assert loaded.params["fc"]["kernel"].shape == (512, 3)  # a new 3-class head


def test_progress_resumes_from_checkpoints_of_before_and_after_the_early_stopping_state():
    from bcjax import specs
    from bcjax.train.run_setup import Progress

    config = tiny_config("unused", best_metric="macro_f1", early_stopping_patience=2)
    run = specs.from_config(config).run
    history = [
        {"epoch": 1, "val": {"macro_f1": 0.5}, "skipped_steps": 0},
        {"epoch": 2, "val": {"macro_f1": 0.4}, "skipped_steps": 1},
    ]
    # Written before the early-stopping state was saved: rebuilt from the history.
    old = Progress.from_extra(
        {"history": history, "best_so_far": 0.5, "stopped": None, "wall_time_s": 12.5}, run
    )
    assert (old.early_stopping.best, old.early_stopping.evals_since_best) == (0.5, 1)
    assert old.wall_before_s == 12.5 and old.skipped_steps == 1 and old.stopped is None
    # Written now: the saved state itself, the patience of the config resuming.
    new = Progress.from_extra(old.to_extra(20.0), run)
    assert new.early_stopping == old.early_stopping and new.wall_before_s == 20.0
    assert not new.early_stopping.should_stop and new.early_stopping.update(0.3).should_stop
    # Another watched metric than the saved state's: replayed from the history.
    config.best_metric = "loss"
    other = specs.from_config(config).run
    assert Progress.from_extra(old.to_extra(20.0), other).early_stopping.best is None


def test_finite_checks_read_each_step_one_step_late():
    # The loop's pacing and its NaN/Inf rule in one: step N's flag is read once step
    # N+1 is dispatched (or at the epoch's end), and only then.
    class Flag:  # a device scalar whose reads are counted
        def __init__(self, value):
            self.value, self.reads = value, 0

        def __bool__(self):
            self.reads += 1
            return self.value

    class Ckpt:
        directory, waited = "ckpts", 0

        def wait_until_finished(self):
            self.waited += 1

        def latest_step(self):
            return 4

    flags = [Flag(True), Flag(False), Flag(True)]
    checks = loop._FiniteChecks("skip", Ckpt(), skipped=2)
    checks.after(5, {"grads_finite": flags[0]})
    assert flags[0].reads == 0  # not waited for while step 5 may still run
    checks.after(6, {"grads_finite": flags[1]})
    assert flags[0].reads == 1 and flags[1].reads == 0 and checks.skipped == 2
    checks.after(7, {"grads_finite": flags[2]})
    assert checks.skipped == 3  # step 6 skipped, added to the run's earlier two
    checks.flush()
    assert [f.reads for f in flags] == [1, 1, 1]

    ckpt = Ckpt()
    stopping = loop._FiniteChecks("stop", ckpt, skipped=0)
    stopping.after(9, {"grads_finite": Flag(False)})
    with pytest.raises(loop.NonFiniteError, match="at step 9 .*step 4 in ckpts"):
        stopping.flush()
    assert ckpt.waited == 1  # the last good checkpoint is on disk before it is named


def test_the_logged_learning_rate_is_the_one_the_optimiser_uses():
    # A skipped step (NaN/Inf under nan_policy "skip", a float16 overflow) keeps the whole
    # optimiser state, its schedule's count with it: optax itself says which rate is next.
    import types

    import optax

    from bcjax.train.run_setup import Progress

    schedule = optax.cosine_decay_schedule(1.0, decay_steps=20)
    tx = optax.sgd(schedule)
    params = {"w": jax.numpy.zeros(3)}
    opt_state = tx.init(params)
    for step in range(1, 11):
        if step in (3, 6, 9):  # two NaN/Inf skips and one float16 overflow: state kept
            continue
        _, opt_state = tx.update({"w": jax.numpy.ones(3)}, opt_state, params)
    count = int(optax.tree_utils.tree_get(opt_state, "count"))
    record = loop._epoch_record(
        types.SimpleNamespace(schedule=schedule),
        Progress([], early_stopping=None),
        epoch=1,
        step=10,
        train_metrics={"overflow": 0.1, "steps": 10},  # 1 of the epoch's 10 steps overflowed
        checks=types.SimpleNamespace(skipped=2),
    )
    assert count == 7 and record["overflow_skipped_steps"] == 1
    assert record["lr"] == float(schedule(count)) != float(schedule(10))
