"""When periodic work is due: one rule for logging, evaluating and checkpointing.

In the spirit of big_vision's ``u.itstime``: the loop asks
``itstime(count, every, total)`` with a step count (logging) or an epoch count
(evaluation, checkpoints), so every "is it time?" reads the same way.
"""

from __future__ import annotations

__all__ = ["itstime"]


def itstime(count: int, every: int, total: int, *, last: bool = True) -> bool:
    """Whether work done every ``every`` counts is due once ``count`` of ``total`` are done.

    count: steps or epochs completed so far (1-based: the first is 1).
    every: the period; 0 or less never fires on its own.
    last: also fire at ``count == total``, so the end of training is always
      logged, evaluated and saved, whatever the period.
    """
    if last and count == total:
        return True
    return every > 0 and count > 0 and count % every == 0
