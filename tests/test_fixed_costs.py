"""The run's fixed costs (issue 23): the eval step compiled ahead (in the compile phase), its
batch, the asynchronous checkpoint writes and the end of the run's preparation (beside the
train loop) finished before timing.json and results.json, the compile clock per thread."""

import gc
import json
import pathlib
import sys
import threading
import time
import types

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _tiny import tiny_config  # noqa: E402

from bcjax.data import synthetic  # noqa: E402
from bcjax.timing import chrono as chrono_lib  # noqa: E402
from bcjax.train import loop  # noqa: E402


@pytest.fixture(scope="module")
def tiny_busi(tmp_path_factory):
    out = tmp_path_factory.mktemp("busi")
    return synthetic.generate(out, num=48, seed=0, min_size=40, max_size=56)


def test_cache_events_count_only_their_own_thread():
    # A compile counts its own thread's persistent-cache events, not another thread's.
    import jax.monitoring as monitoring

    def elsewhere():
        monitoring.record_event("/jax/compilation_cache/cache_hits")

    with chrono_lib.cache_events() as counts:
        other = threading.Thread(target=elsewhere)
        other.start()
        other.join()
        assert chrono_lib.cache_outcome(counts) == "off"
        monitoring.record_event("/jax/compilation_cache/cache_misses")
    assert dict(counts) == {"cache_misses": 1}


@pytest.mark.parametrize("strategy", ["shard_map", "jit"])
def test_train_step_compiled_during_set_up_steps_as_the_loops_compile(
    tiny_busi, tmp_path, strategy
):
    # A fresh CPU run's set-up compiles the train step on a thread from the shapes alone,
    # beside the state's initialisation. That executable takes the loop's real first batch
    # and steps exactly as the step compiled from the real arguments (2 devices here).
    import jax

    from bcjax.data import pipeline
    from bcjax.train import run_setup

    config = tiny_config(tiny_busi, num_devices=2, strategy=strategy)
    ctx, state, _ = run_setup.set_up(config, tmp_path, chrono_lib.Chrono())
    try:
        assert ctx.train_step_ahead is not None
        ahead, times = ctx.train_step_ahead.result()
        assert times["lower_s"] > 0 and times["persistent_cache"] in ("hit", "miss", "off")
        host = next(ctx.train_iter)
        spec = pipeline.train_batch_spec(ctx.data.train, ctx.specs.run.global_batch_size)
        assert {k: (v.shape, v.dtype) for k, v in host.items()} == spec
        batch, rng = ctx.steps.shard_batch(host), jax.random.key(ctx.specs.run.seed)
        plain = ctx.build_steps().train_step.lower(state, batch, rng).compile()
        copy = jax.tree.map(lambda x: x.copy(), state)  # both executables donate the state
        by_ahead, by_plain = ahead(state, batch, rng), plain(copy, batch, rng)
        for a, b in zip(jax.tree.leaves(by_ahead), jax.tree.leaves(by_plain)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    finally:
        ctx.close()


def test_a_failed_set_up_waits_for_its_train_step_compile(tiny_busi, tmp_path, monkeypatch):
    from bcjax.train import run_setup

    class Refused(RuntimeError):
        pass

    def refuse(*args, **kwargs):
        raise Refused("not this workdir")

    started = []
    real_ahead = run_setup._compile_train_step_ahead

    def ahead(*args):
        started.append(real_ahead(*args))
        return started[-1]

    monkeypatch.setattr(run_setup.checkpoint, "CheckpointManager", refuse)
    monkeypatch.setattr(run_setup, "_compile_train_step_ahead", ahead)
    with pytest.raises(Refused):
        run_setup.set_up(tiny_config(tiny_busi), tmp_path, chrono_lib.Chrono())
    assert len(started) == 1 and started[0].done()  # finished before the error came out


def test_eval_step_compiled_ahead_scores_exactly_as_compiled_on_use(tiny_busi, tmp_path):
    from bcjax.eval import evaluators
    from bcjax.train import run_setup

    config = tiny_config(tiny_busi, num_devices=2)
    chrono = chrono_lib.Chrono()
    ctx, state, _ = run_setup.set_up(config, tmp_path, chrono)
    try:
        # The eval step's batch: 6 (the 5 validation images in one batch, even over the 2
        # devices), not the global batch of 8.
        eval_batch = loop.eval_batch_size(ctx)
        assert (eval_batch, ctx.specs.run.global_batch_size) == (6, 8)
        batch = loop._eval_batch_to_compile_for(ctx)
        compiled = chrono.compile("eval_step", ctx.steps.eval_step, state, batch)
        with_ahead = evaluators.Test(loop.scorer(ctx, compiled), ctx.data.test, ctx.data.val).run(
            state
        )
        # The module the loop compiles is the one a first call of an equal build would
        # compile; without debug info (source lines) it is what the persistent cache's key
        # hashes, so both paths share their cache entries.
        ahead, _ = chrono_lib.timed_lower(ctx.build_steps(max_traces=1).eval_step, state, batch)
        plain = ctx.build_steps(max_traces=1).eval_step.lower(state, batch)
        assert ahead.as_text() == plain.as_text()

        def scored_on_use(batch_size):
            plain_steps = ctx.build_steps(max_traces=1)  # its eval step compiles on first use
            score = evaluators.Scorer(
                plain_steps,
                batch_size,
                tuple(ctx.data.class_names),
                positive_class=ctx.data.positive_class,
            )
            return evaluators.Test(score, ctx.data.test, ctx.data.val).run(state)

        on_use = scored_on_use(eval_batch)
        by_global_batch = scored_on_use(ctx.specs.run.global_batch_size)
    finally:
        ctx.close()
    for part in ("test", "val"):
        for key in ("names", "labels", "probs"):
            np.testing.assert_array_equal(
                with_ahead["predictions"][part][key], on_use["predictions"][part][key]
            )
        # Another eval batch is another program: each example is scored alone (eval mode),
        # so only float rounding may differ (bit-identical with jax 0.10.2; jax 0.6.1's
        # XLA:CPU rounds some probabilities differently, by ~5e-8).
        by_batch = by_global_batch["predictions"][part]
        np.testing.assert_array_equal(with_ahead["predictions"][part]["names"], by_batch["names"])
        np.testing.assert_allclose(
            with_ahead["predictions"][part]["probs"], by_batch["probs"], rtol=1e-6, atol=1e-7
        )
    assert with_ahead["test"]["accuracy"] == on_use["test"]["accuracy"]


def _fake_ctx(n_val, n_test, batch, devices=1, platform="cpu"):
    mesh = types.SimpleNamespace(
        devices=np.array([types.SimpleNamespace(platform=platform)] * devices)
    )
    return types.SimpleNamespace(
        specs=types.SimpleNamespace(run=types.SimpleNamespace(global_batch_size=batch)),
        data=types.SimpleNamespace(val=range(n_val), test=range(n_test)),
        mesh=mesh,
    )


@pytest.mark.parametrize(
    "n_val, n_test, batch, devices, platform, expected",
    [
        (78, 156, 32, 1, "cpu", 26),  # the quickstart: 3 x 26, not 3 x 32 with 18 padded
        (64, 128, 32, 1, "cpu", 32),  # full batches stay
        (65, 130, 32, 1, "cpu", 22),  # 3 batches: 22 + 22 + 21
        (5, 10, 8, 2, "cpu", 6),  # even over the devices
        (100, 200, 32, 8, "cpu", 32),  # 4 x 25 rounded up to the 8 devices: 32
        (0, 10, 8, 1, "cpu", 5),  # no validation part: the test part's
        (0, 0, 8, 1, "cpu", 8),
        (78, 156, 32, 1, "gpu", 32),  # accelerators: the global batch, as before
    ],
)
def test_eval_batch_splits_the_validation_part_evenly_on_cpu(
    n_val, n_test, batch, devices, platform, expected
):
    assert loop.eval_batch_size(_fake_ctx(n_val, n_test, batch, devices, platform)) == expected


def test_checkpoint_writes_finish_before_results_json(tiny_busi, tmp_path, monkeypatch):
    # A slow asynchronous writer: each save's write completes on a thread, later. The
    # rule of issue 23: whatever is asynchronous has finished before results.json (and
    # timing.json). The same for the end of the run's preparation beside the train loop:
    # a slow one here, which must finish before either file is written, and whose Grad-CAM
    # program the report then uses as it is (traced once, on that thread, never again).
    # Also: the clinical report takes the Test evaluator's predictions, never scores
    # the test images again (only the probes' altered copies).
    from bcjax.eval import clinical_outputs, evaluators
    from bcjax.step import gradcam
    from bcjax.train import checkpoint, outputs

    scored = []  # the images of every part the eval step ran over
    real_score = evaluators.Scorer.__call__

    def score(self, state, data, **kwargs):
        scored.append(data.images)
        return real_score(self, state, data, **kwargs)

    monkeypatch.setattr(evaluators.Scorer, "__call__", score)

    events, writers = [], []
    real_save = checkpoint.CheckpointManager.save
    real_wait = checkpoint.CheckpointManager.wait_until_finished
    real_write_results = outputs.write_results

    def save(self, step, *args, **kwargs):
        saved = real_save(self, step, *args, **kwargs)

        def write():
            time.sleep(0.3)
            events.append(("written", int(step)))

        writers.append(threading.Thread(target=write))
        writers[-1].start()
        events.append(("saved", int(step)))
        return saved

    def wait_until_finished(self):
        for writer in writers:
            writer.join()
        real_wait(self)

    def write_results(ctx, results):
        events.append(("results", None))
        real_write_results(ctx, results)

    real_write_timing = outputs.write_timing

    def write_timing(ctx, timing):
        events.append(("timing", None))
        real_write_timing(ctx, timing)

    real_lowered = clinical_outputs.gradcam_lowered

    def slow_gradcam_lowered(*args):
        time.sleep(0.5)
        lowered = real_lowered(*args)
        events.append(("prepared", threading.current_thread().name))
        return lowered

    traced_on = []
    real_trace = gradcam._logits_and_features

    def traced(*args):
        traced_on.append(threading.current_thread().name)
        return real_trace(*args)

    monkeypatch.setattr(outputs, "write_timing", write_timing)
    monkeypatch.setattr(clinical_outputs, "gradcam_lowered", slow_gradcam_lowered)
    monkeypatch.setattr(gradcam, "_logits_and_features", traced)
    gradcam.explain_jit.clear_cache()  # whatever earlier tests compiled

    monkeypatch.setattr(checkpoint.CheckpointManager, "save", save)
    monkeypatch.setattr(checkpoint.CheckpointManager, "wait_until_finished", wait_until_finished)
    monkeypatch.setattr(outputs, "write_results", write_results)
    run_data = []
    real_set_up = loop.set_up

    def set_up(*args):
        ctx, state, progress = real_set_up(*args)
        run_data.append(ctx.data)
        return ctx, state, progress

    monkeypatch.setattr(loop, "set_up", set_up)
    config = tiny_config(tiny_busi, num_epochs=2, warmup_epochs=1, clinical_report=True)
    results = loop.train_and_evaluate(config, tmp_path)
    assert results["probes"] is not None  # the report ran its probes (two altered copies)
    (data,) = run_data
    assert sum(images is data.test.images for images in scored) == 1
    assert len(scored) == 2 + 2 + 2  # two validations, Test (test, val), the probes' two
    kinds = [kind for kind, _ in events]
    assert kinds.count("saved") == 2 and kinds[-1] == "results", events
    # Prepared beside training, on its own thread, before the first timing.json.
    assert [who for kind, who in events if kind == "prepared"] == ["bcjax-end-of-run_0"]
    assert kinds.index("prepared") < kinds.index("timing")
    assert len(traced_on) == 1 and traced_on[0].startswith("bcjax-end-of-run")
    written = {step for kind, step in events if kind == "written"}
    assert written == {step for kind, step in events if kind == "saved"}
    assert kinds.index("results") > max(i for i, k in enumerate(kinds) if k == "written")
    timing = json.loads((tmp_path / "timing.json").read_text())
    # The checkpoint phase split into the saves' blocking part and the final wait.
    assert len(timing["checkpoint_s"]["save_calls"]) == 2
    assert timing["checkpoint_s"]["final_wait"] >= 0
    # Both steps compiled and timed apart (a fresh CPU run: the train step beside set-up).
    assert {"train_step", "eval_step"} <= set(timing["compile"])
    assert timing["compile"]["eval_step"]["compile_s"] > 0
    assert timing["compile"]["train_step"]["beside"] == "setup"
    # Grad-CAM's compile beside training: in the thread's record, not among the steps'.
    assert set(timing["compile"]) == {"train_step", "eval_step"}
    ahead = timing["end_of_run_ahead_s"]
    assert ahead["gradcam"]["lower_s"] >= 0.5  # the slow lowering above
    assert ahead["gradcam"]["compile_s"] > 0
    assert ahead["thread"] >= ahead["imports"] + ahead["gradcam"]["lower_s"]
    assert ahead["wait"] >= 0


def test_end_of_run_preparation_errors_are_raised_and_no_results_written(
    tiny_busi, tmp_path, monkeypatch
):
    from bcjax.eval import clinical_outputs

    def broken(*args):
        raise RuntimeError("no Grad-CAM today")

    monkeypatch.setattr(clinical_outputs, "gradcam_lowered", broken)
    config = tiny_config(tiny_busi, num_epochs=1, warmup_epochs=1, clinical_report=True)
    with pytest.raises(RuntimeError, match="no Grad-CAM today"):
        loop.train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "results.json").exists()
    assert not (tmp_path / "timing.json").exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("bcjax-end-of-run")]


def test_an_interrupted_run_waits_for_its_preparation_and_unfreezes_the_heap(
    tiny_busi, tmp_path, monkeypatch
):
    # The loop's own exception (here Interrupted) is the one raised, once the thread is done.
    from bcjax.eval import clinical_outputs

    finished = []
    real_lowered = clinical_outputs.gradcam_lowered

    def slow(*args):
        time.sleep(1.0)
        finished.append(True)
        return real_lowered(*args)

    monkeypatch.setattr(clinical_outputs, "gradcam_lowered", slow)
    config = tiny_config(tiny_busi, num_epochs=2, warmup_epochs=1, clinical_report=True)
    frozen = []  # objects the collector skips while the run trains (gc.freeze)

    def stop(record):
        frozen.append(gc.get_freeze_count())
        return True

    gc.unfreeze()
    with pytest.raises(loop.Interrupted):
        loop.train_and_evaluate(config, tmp_path, on_epoch_end=stop)
    assert finished == [True]
    assert not [t for t in threading.enumerate() if t.name.startswith("bcjax-end-of-run")]
    # Frozen while it ran (the imports, set-up and compiled programs), unfrozen when it ended.
    assert frozen[0] > 10_000 and gc.get_freeze_count() == 0
