"""The fitted part of the model, as ``python -m bcjax.timing.scaling_model fit`` wrote it.

``fitted.json`` beside this file holds every fitted number; a test re-fits the shared
published tables (tests/data) and checks the file reproduces, so a model change means
re-running ``fit``, never hand-editing constants. Each number is attached to a property a
new row can have:

- ``sync_cv``: spread of one GPU's step time (the slowest of N GPUs ends the step); range
  searched 0 ... 0.05;
- ``node_sync_cv``: the same for a whole host, past one host; range 0 ... 0.1;
- ``contention``: fraction of a step's compute a full host loses while all its GPUs train,
  by (framework family, input kind, precision class) where the family's rows span at
  least two model families (``fitting.MIN_MODEL_FAMILIES``), else by (framework family,
  input kind, precision class, model family), used for that model family only;
  ``pooled_contention`` by (input kind, precision class) over all frameworks, used for a
  family (or a model) the fit has not seen; range
  0 ... 1 (``fitting.MAX_CONTENTION``); none on synthetic input; for CPU-decoded input
  whose loader spreads over the host's cores, the loss of a host with
  ``presets.REFERENCE_CORES_PER_GPU`` physical cores a GPU (a DGX-1), scaled for other
  documented hosts by their cores a GPU (``presets.contention_factor``);
- ``board_loss``: share of compute each GPU of a dual-GPU board (Tesla K80) loses once
  both of the board's GPUs work, against one alone; range 0 ... 0.36
  (``presets.MAX_BOARD_LOSS``);
- ``residual_quantiles``: the 10th and 90th percentiles of the out-of-sample errors
  (predicted - published), leaving each source document out and leaving each GPU
  generation out, pooled: of all fittable rows ('all'), and of each framework / scheme
  group with at least ``fitting.MIN_GROUP_ERRORS`` such errors. A row's interval is the
  wider of its group's and all rows' (never narrower than all rows' say: a group's errors
  come from few documents). All rows' alone held for a new document or generation overall
  but not per group (TF2 Horovod 37%, BUILD_NOTES session 7); by scheme kind alone it did
  not hold for a new generation (session 6).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

FITTED_PATH = pathlib.Path(__file__).with_name("fitted.json")
INTERVAL_LEVEL = 0.8  # the intervals' nominal coverage (10th to 90th percentile)


@dataclasses.dataclass(frozen=True)
class ModelParams:
    sync_cv: float = 0.0
    node_sync_cv: float = 0.0
    contention: tuple = ()  # ((family, input, precision[, model family]), fraction)
    board_loss: float = 0.0  # share of compute lost on a dual-GPU board with both GPUs busy
    pooled_contention: tuple = ()  # ((input, precision), fraction)
    residual_quantiles: tuple = ()  # ('all' or 'family / scheme', (q10, q90, rows))
    rows: int = 0
    sources: tuple = ()  # the source documents the fit saw

    def host_contention(
        self, family: str, input_kind: str, precision: str, model_family: str = ""
    ) -> tuple[float, str]:
        """(fraction, which fit it came from): the value of the family's rows of this model
        family (fitted where the family's rows are all of one model family), else the
        family's own, else the pooled one."""
        own = dict(self.contention)
        for key in ((family, input_kind, precision, model_family), (family, input_kind, precision)):
            if key in own:
                return own[key], "/".join(key)
        pooled = dict(self.pooled_contention).get((input_kind, precision), 0.0)
        return pooled, f"pooled {input_kind}/{precision}"

    def interval(self, group: str = "all") -> tuple[float, float, str]:
        """(q10, q90, which errors) for a row of ``group`` ('family / scheme'): the wider of
        the group's quantiles and all rows', or all rows' alone where the fit has no
        quantiles for that group."""
        table = dict(self.residual_quantiles)
        if "all" not in table:
            return 0.0, 0.0, "none"
        q10, q90 = table["all"][:2]
        if group == "all" or group not in table:
            return q10, q90, "all"
        return min(q10, table[group][0]), max(q90, table[group][1]), f"{group} and all"

    def count(self) -> int:
        """How many numbers are fitted (the intervals' quantiles included)."""
        return (
            3
            + len(self.contention)
            + len(self.pooled_contention)
            + 2 * len(self.residual_quantiles)
        )

    def to_json(self) -> str:
        def listed(pairs):
            return [[list(k) if isinstance(k, tuple) else k, v] for k, v in pairs]

        data = {
            "sync_cv": self.sync_cv,
            "node_sync_cv": self.node_sync_cv,
            "contention": listed(self.contention),
            "board_loss": self.board_loss,
            "pooled_contention": listed(self.pooled_contention),
            "residual_quantiles": listed((k, list(v)) for k, v in self.residual_quantiles),
            "rows": self.rows,
            "sources": list(self.sources),
        }
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ModelParams:
        d = json.loads(text)
        return cls(
            sync_cv=d["sync_cv"],
            node_sync_cv=d["node_sync_cv"],
            contention=tuple((tuple(k), v) for k, v in d["contention"]),
            board_loss=d.get("board_loss", 0.0),
            pooled_contention=tuple((tuple(k), v) for k, v in d["pooled_contention"]),
            residual_quantiles=tuple((k, tuple(v)) for k, v in d["residual_quantiles"]),
            rows=d.get("rows", 0),
            sources=tuple(d.get("sources", ())),
        )


def load() -> ModelParams:
    """The shipped fit; all zeros (no fitted terms) if the file is missing."""
    if not FITTED_PATH.exists():
        return ModelParams()
    return ModelParams.from_json(FITTED_PATH.read_text())


SHIPPED = load()
