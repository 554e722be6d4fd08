"""The run's fixed costs (issue 23): the eval step compiled ahead (in the compile phase), the
asynchronous checkpoint writes finished before results.json, the compile clock per thread."""

import json
import pathlib
import sys
import threading
import time

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


def test_eval_step_compiled_ahead_scores_exactly_as_compiled_on_use(tiny_busi, tmp_path):
    from bcjax.eval import evaluators
    from bcjax.train import run_setup

    config = tiny_config(tiny_busi, num_devices=2)
    chrono = chrono_lib.Chrono()
    ctx, state, _ = run_setup.set_up(config, tmp_path, chrono)
    try:
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
        plain_steps = ctx.build_steps(max_traces=1)  # its eval step compiles on first use
        on_use = evaluators.Test(
            evaluators.Scorer(
                plain_steps,
                ctx.specs.run.global_batch_size,
                tuple(ctx.data.class_names),
                positive_class=ctx.data.positive_class,
            ),
            ctx.data.test,
            ctx.data.val,
        ).run(state)
    finally:
        ctx.close()
    for part in ("test", "val"):
        for key in ("names", "labels", "probs"):
            np.testing.assert_array_equal(
                with_ahead["predictions"][part][key], on_use["predictions"][part][key]
            )
    assert with_ahead["test"]["accuracy"] == on_use["test"]["accuracy"]


def test_checkpoint_writes_finish_before_results_json(tiny_busi, tmp_path, monkeypatch):
    # A slow asynchronous writer: each save's write completes on a thread, later. The
    # rule of issue 23: whatever is asynchronous has finished before results.json.
    # Also: the clinical report takes the Test evaluator's predictions, never scores
    # the test images again (only the probes' altered copies).
    from bcjax.eval import evaluators
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
    written = {step for kind, step in events if kind == "written"}
    assert written == {step for kind, step in events if kind == "saved"}
    assert kinds.index("results") > max(i for i, k in enumerate(kinds) if k == "written")
    timing = json.loads((tmp_path / "timing.json").read_text())
    # The checkpoint phase split into the saves' blocking part and the final wait.
    assert len(timing["checkpoint_s"]["save_calls"]) == 2
    assert timing["checkpoint_s"]["final_wait"] >= 0
    # Both steps compiled in the compile phase, each timed apart.
    assert {"train_step", "eval_step"} <= set(timing["compile"])
    assert timing["compile"]["eval_step"]["compile_s"] > 0
