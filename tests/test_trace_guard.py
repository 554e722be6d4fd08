"""build_steps(max_traces=1): a second trace of the train or eval step fails loudly.

A retrace is a silent recompile (10-80 s on a GPU), e.g. of a batch whose
shape or dtype changed; the loop builds its steps with max_traces=1.
"""

import chex
import jax
import numpy as np
import pytest
from _mp_worker import RNG_SEED, build, initial_state_host, make_batches

from bcjax.parallel.mesh import make_mesh

MODEL = "tiny_cnn"


@pytest.mark.parametrize("strategy", ["shard_map", "pmap"])
def test_a_second_trace_fails_loudly(strategy):
    steps = build(strategy, make_mesh(2), MODEL, max_traces=1)
    state = steps.place_state(initial_state_host(MODEL))
    batch = make_batches(1)[0]
    rng = jax.random.key(RNG_SEED)

    steps.eval_step(state, steps.shard_batch(batch))
    steps.eval_step(state, steps.shard_batch(batch))  # the same shapes: no new trace
    half = {k: v[: len(v) // 2] for k, v in batch.items()}
    with pytest.raises(AssertionError, match="eval_step.*traced > 1"):
        steps.eval_step(state, steps.shard_batch(half))

    steps.train_step.lower(state, steps.shard_batch(batch), rng)
    as_float = {**batch, "image": batch["image"].astype(np.float32)}
    with pytest.raises(AssertionError, match="train_step.*traced > 1"):
        steps.train_step.lower(state, steps.shard_batch(as_float), rng)


def test_each_build_counts_its_own_traces():
    # A run builds its steps once; the next run (or fold) in the process builds anew
    # and gets a count of its own, still guarded.
    mesh = make_mesh(2)
    batch = make_batches(1)[0]
    outputs = []
    for _ in range(2):
        steps = build("shard_map", mesh, MODEL, max_traces=1)
        state = steps.place_state(initial_state_host(MODEL))
        outputs.append(steps.eval_step(state, steps.shard_batch(batch)))
    np.testing.assert_array_equal(outputs[0]["logits"], outputs[1]["logits"])
    np.testing.assert_array_equal(outputs[1]["label"], batch["label"])
    half = {k: v[: len(v) // 2] for k, v in batch.items()}
    with pytest.raises(AssertionError, match="eval_step.*traced > 1"):
        steps.eval_step(state, steps.shard_batch(half))  # the new build's guard is on

    # Without the guard, retracing is allowed (tests, ablations, the breakdown).
    chex.clear_trace_counter()
    steps = build("shard_map", mesh, MODEL)
    state = steps.place_state(initial_state_host(MODEL))
    for rows in (16, 8):
        out = steps.eval_step(state, steps.shard_batch({k: v[:rows] for k, v in batch.items()}))
        assert out["logits"].shape == (rows, 3)
        # The same examples score the same whichever batch shape carried them.
        np.testing.assert_allclose(out["logits"], outputs[0]["logits"][:rows], rtol=1e-5)
