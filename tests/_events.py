"""Reads back the TensorBoard event files bcjax writes, with TensorBoard's own EventAccumulator.

tensorboard is a test-only dependency, so this reader lives with the tests. The accumulator
applies TensorBoard's purge rule, as the TensorBoard UI does: a restart marker at step P drops
the events with step >= P read before it, so a resumed run's redone steps show once.
"""

from __future__ import annotations

import pathlib

from tensorboard.backend.event_processing import event_accumulator


def accumulator(logdir) -> event_accumulator.EventAccumulator:
    """The loaded accumulator of the one event directory in or under `logdir` (e.g. a workdir,
    whose events are in <workdir>/tensorboard), keeping every event (no sampling)."""
    logdir = pathlib.Path(logdir)
    run_dirs = sorted({p.parent for p in logdir.glob("**/*tfevents*")})
    assert len(run_dirs) == 1, f"expected one folder of event files under {logdir}: {run_dirs}"
    keep_all = {event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0}
    acc = event_accumulator.EventAccumulator(str(run_dirs[0]), size_guidance=keep_all)
    acc.Reload()
    return acc


def scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard shows them."""
    acc = accumulator(logdir)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def logged_steps(logdir) -> dict[str, list[int]]:
    """{tag: steps} as TensorBoard shows them: a step logged twice appears twice."""
    return {tag: [step for step, _ in points] for tag, points in scalars(logdir).items()}
