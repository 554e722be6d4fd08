"""Early stopping as a small immutable state (after flax.training.early_stopping).

    stopper = EarlyStopping("macro_f1", patience=3)
    for each evaluation:
        stopper = stopper.update(val["macro_f1"])
        if stopper.improved: ...            # a new best: save it
        if stopper.should_stop: break

The state is saved in each checkpoint (``to_dict``) so a resumed run goes on
counting where the killed one was; ``from_history`` rebuilds it from the epoch
records of a checkpoint written before it was saved there.

This module also owns the rule for which way a metric improves
(``minimised``); the checkpoints' best-by-metric policy uses the same one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

__all__ = ["EarlyStopping", "minimised"]


def minimised(metric: str) -> bool:
    """A metric is better lower when its name contains "loss"; any other, higher."""
    return "loss" in metric


def _finite(value) -> float | None:
    # A metric is None when undefined (e.g. every step of an epoch skipped for NaN).
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """Evaluations since the best value of ``metric``; stops after ``patience`` of them.

    metric: the validation metric watched (its name decides the direction, see ``minimised``).
    patience: evaluations without improvement that end the run; 0 never stops.
    best: the best value so far (None before the first defined one).
    evals_since_best: evaluations after the best one.
    improved: whether the latest ``update`` set a new best.
    """

    metric: str
    patience: int = 0
    best: float | None = None
    evals_since_best: int = 0
    improved: bool = False

    def update(self, value) -> EarlyStopping:
        """The state after one more evaluation; a tie is not an improvement, nor None/NaN."""
        value = _finite(value)
        if value is not None and (self.best is None or self._better(value, self.best)):
            return dataclasses.replace(self, best=value, evals_since_best=0, improved=True)
        return dataclasses.replace(self, evals_since_best=self.evals_since_best + 1, improved=False)

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.evals_since_best >= self.patience

    def reason(self) -> str:
        best = "none" if self.best is None else f"{self.best:.4f}"
        return f"val {self.metric} did not improve for {self.patience} evaluation(s) after {best}"

    def _better(self, value: float, than: float) -> bool:
        return value < than if minimised(self.metric) else value > than

    def to_dict(self) -> dict:
        """What a checkpoint keeps; the patience comes from the config of the run resuming."""
        return {"metric": self.metric, "best": self.best, "evals_since_best": self.evals_since_best}

    @classmethod
    def from_dict(cls, saved: Mapping, *, patience: int) -> EarlyStopping:
        return cls(
            metric=saved["metric"],
            patience=patience,
            best=saved.get("best"),
            evals_since_best=int(saved.get("evals_since_best", 0)),
        )

    @classmethod
    def from_history(
        cls, metric: str, history: Iterable[Mapping], *, patience: int
    ) -> EarlyStopping:
        """Replays the evaluations of epoch records ({"val": {...}} where evaluated)."""
        state = cls(metric=metric, patience=patience)
        for record in history:
            if "val" in record:
                state = state.update(record["val"].get(metric))
        return dataclasses.replace(state, improved=False)
