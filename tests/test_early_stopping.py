"""bcjax.train.early_stopping on made-up metric sequences (no training)."""

import dataclasses
import math

import pytest

from bcjax.train import checkpoint
from bcjax.train.early_stopping import EarlyStopping, minimised


def run(metric, values, patience):
    """The states after each value, and the evaluation (1-based) that stopped, if any."""
    state, states, stopped_at = EarlyStopping(metric, patience), [], None
    for i, value in enumerate(values, start=1):
        state = state.update(value)
        states.append(state)
        if state.should_stop and stopped_at is None:
            stopped_at = i
    return states, stopped_at


def test_a_maximised_metric_stops_after_patience_evaluations_without_improvement():
    states, stopped_at = run("macro_f1", [0.3, 0.5, 0.5, 0.45, 0.9], patience=2)
    assert [s.improved for s in states] == [True, True, False, False, True]
    assert stopped_at == 4  # a tie (0.5 again) is not an improvement
    assert states[3].best == 0.5 and states[3].evals_since_best == 2
    assert "did not improve for 2 evaluation(s) after 0.5000" in states[3].reason()


def test_a_loss_is_minimised():
    assert minimised("loss") and minimised("val_loss") and not minimised("accuracy")
    states, stopped_at = run("loss", [1.0, 0.8, 0.9, 0.8, 0.7], patience=3)
    assert [s.improved for s in states] == [True, True, False, False, True]
    assert stopped_at is None and states[-1].best == 0.7
    _, stopped_at = run("loss", [1.0, 1.1, 1.2], patience=2)
    assert stopped_at == 3


def test_patience_zero_never_stops_and_undefined_values_never_improve():
    states, stopped_at = run("accuracy", [0.9] + [0.1] * 20, patience=0)
    assert stopped_at is None and states[-1].evals_since_best == 20
    states, stopped_at = run("accuracy", [None, math.nan, 0.4, None], patience=5)
    assert [s.improved for s in states] == [False, False, True, False]
    assert states[-1].best == 0.4 and states[-1].evals_since_best == 1


def test_the_state_is_immutable():
    state = EarlyStopping("accuracy", 2)
    assert state.update(0.5) is not state and state.best is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.best = 1.0


def test_saved_and_replayed_states_agree():
    history = [
        {"epoch": 1, "val": {"macro_f1": 0.4}},
        {"epoch": 2},  # epoch 2 not evaluated
        {"epoch": 3, "val": {"macro_f1": 0.6}},
        {"epoch": 4, "val": {"macro_f1": 0.5}},
    ]
    replayed = EarlyStopping.from_history("macro_f1", history, patience=3)
    assert (replayed.best, replayed.evals_since_best) == (0.6, 1)
    restored = EarlyStopping.from_dict(replayed.to_dict(), patience=3)
    assert restored == replayed
    # The patience is the resuming run's: a checkpoint does not fix it.
    assert EarlyStopping.from_dict(replayed.to_dict(), patience=1).should_stop


def test_the_best_checkpoint_follows_the_same_rule():
    # One rule for "better": checkpoint.py's best-by-metric policy imports it.
    assert checkpoint.minimised is minimised
