"""The config read at one boundary: typed, frozen specs of a run.

`from_config(config)` turns a checked ConfigDict (configs/default.py and its
overrides; bcjax.config_check) into typed specs, and code below that boundary
receives specs or plain arguments, never the config:

    ModelSpec      the network: name, width, compute dtype, BatchNorm sync, weights
    OptimizerSpec  optax: optimiser, schedule, regularisation, the loss's knobs
    DataSpec       where the images come from and how they are split and fed
    RunSpec        the loop: devices, batch, epochs, periodic work, checkpoints, reports
    ProcessSpec    how this process joins a multi-process run; the compilation cache

Defaults live in configs/default.py only: a field missing from an old config
(results.json of an earlier run) takes the value the default config gives it.

A run's identity, what a resumed run must share with its checkpoints (the model,
and what a step number means), is `identity(specs)`: the fields flagged
`identity=True` below (bcjax.train.checkpoint saves and compares it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from bcjax.models import family

# What config.strategy and config.optimizer may name (bcjax.parallel.strategies and
# bcjax.step.optim implement them).
STRATEGIES = ("shard_map", "pmap", "jit")
OPTIMIZERS = ("sgd", "adamw")


class ConfigError(ValueError):
    """A configuration value that bcjax cannot run with.

    Raised by the checks at the boundary (bcjax.config_check, which exports it
    too) and by code below it that finds a value unusable for the data it got
    (a positive class the data lacks, a batch larger than the training split):
    defined here, so that code does not import the checks."""


# No spec field has a default of its own: configs/default.py holds them all.
def _field():
    return dataclasses.field()


def _id():
    """A field that is part of the run's identity."""
    return dataclasses.field(metadata={"identity": True})


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str = _id()  # config.model
    width: int = _id()  # ResNet stem channels (identity for ResNets only)
    width_multiplier: float = _id()  # MobileNet (identity for MobileNets only)
    dropout_rate: float = _field()  # MobileNet head
    dtype: str = _field()  # compute dtype; parameters and BatchNorm statistics stay float32
    bn_sync: bool = _field()
    pretrained: str = _id()  # torchvision weights to start from; "" = from scratch

    @property
    def family(self) -> family.Family:
        return family.family_of(self.name)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    optimizer: str = _field()  # "sgd" | "adamw"
    learning_rate: float = _field()
    momentum: float = _field()
    nesterov: bool = _field()
    weight_decay: float = _field()
    warmup_epochs: float = _field()
    clip_norm: float = _field()  # 0 = no clipping
    label_smoothing: float = _field()
    class_weights: tuple[float, ...] = _field()  # empty = unweighted


@dataclasses.dataclass(frozen=True)
class DataSpec:
    dataset: str = _id()
    data_dir: str = _id()
    data_csv: str = _id()
    class_names: tuple[str, ...] = _id()
    positive_class: str = _field()
    synthetic_num: int = _id()
    synthetic_seed: int = _id()
    synthetic_mark: str = _id()
    synthetic_mark_prob: float = _id()
    image_size: int = _id()
    split_seed: int = _id()
    split_fractions: tuple[float, ...] = _id()
    split_manifest: str = _field()
    exclude_conflicts: bool = _id()
    balanced_sampling: bool = _field()
    input_on_device: str = _field()  # "auto" | "yes" | "no"
    cv_folds: int = _field()  # config.cv.folds (identity as "cv", with cv_fold)
    cv_fold: int = _field()  # config.cv.fold
    augment: dict | None = _field()  # config.augment; None when augment.enabled is False


@dataclasses.dataclass(frozen=True)
class RunSpec:
    strategy: str = _field()  # "shard_map" | "pmap" | "jit"
    num_devices: int = _field()  # 0 = all
    global_batch_size: int = _id()
    num_epochs: int = _field()
    seed: int = _field()
    nan_policy: str = _field()  # "stop" | "skip"
    eval_every_epochs: int = _field()
    log_every_steps: int = _field()
    checkpoint_every_epochs: int = _field()
    keep_latest: int = _field()
    keep_best: int = _field()
    best_metric: str = _field()
    early_stopping_patience: int = _field()
    fresh_start: bool = _field()
    timing_breakdown: bool = _field()
    clinical_report: bool = _field()


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    """How this process joins the run (bcjax.runtime, before JAX starts its backends)."""

    num_processes: int = _field()  # 0 = auto-detect (SLURM, TPU) or one
    process_id: int = _field()  # -1 = auto-detect
    coordinator_address: str = _field()  # "host:port"; "" = auto-detect
    compilation_cache: bool = _field()


@dataclasses.dataclass(frozen=True)
class Specs:
    """A run's specs, and its config as a plain dict (results.json and the checkpoint
    metadata record it whole)."""

    model: ModelSpec
    optimizer: OptimizerSpec
    data: DataSpec
    run: RunSpec
    process: ProcessSpec
    config: dict


@functools.cache
def _defaults() -> dict:
    """configs/default.py's values: the one place a default is written."""
    try:
        from configs import default
    except ImportError:  # bcjax run from elsewhere than the repository: its file beside it
        import importlib.util
        import pathlib

        path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"
        if not path.is_file():
            return {}
        spec = importlib.util.spec_from_file_location("_bcjax_default_config", path)
        default = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(default)
    return default.get_config().to_dict()


def _plain(value: Any) -> Any:
    """ConfigDict / list values as hashable plain Python (tuples for sequences)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    return value


def _take(cls, values: dict, **renamed):
    """cls's fields from values (a field `f` read as renamed.get(f, f))."""
    keys = {f.name: renamed.get(f.name, f.name) for f in dataclasses.fields(cls)}
    missing = sorted(key for key in keys.values() if key not in values)
    if missing:  # an older config, and no configs/default.py to complete it from
        raise ValueError(
            f"the config lacks {', '.join(missing)} and configs/default.py, which holds "
            "every field's default, was not found beside bcjax."
        )
    return cls(**{name: _plain(values[key]) for name, key in keys.items()})


def from_config(config) -> Specs:
    """The specs of a (checked) config: a ConfigDict or a plain dict, completed by the
    defaults where an older config lacks a field."""
    given = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    defaults = _defaults()
    values = {**defaults, **given}
    for group in ("cv", "augment"):  # nested: an older config may lack some of their fields
        values[group] = {**defaults.get(group, {}), **_plain(given.get(group, {}))}
    values.update({f"cv_{k}": v for k, v in values["cv"].items()})
    augment = values["augment"]
    values["augment"] = augment if augment.get("enabled", True) else None
    return Specs(
        model=_take(ModelSpec, values, name="model"),
        optimizer=_take(OptimizerSpec, values),
        data=_take(DataSpec, values),
        run=_take(RunSpec, values),
        process=_take(ProcessSpec, values),
        config=given,
    )


def defaults() -> Specs:
    """The specs of configs/default.py itself (tools and tests that run without a config)."""
    return from_config({})


def with_dtype(run_specs: Specs, dtype: str) -> Specs:
    """The specs with the model's compute dtype set (config.dtype "auto" made the chip's
    one), in the config they record too (results.json, the checkpoint metadata)."""
    return dataclasses.replace(
        run_specs,
        model=dataclasses.replace(run_specs.model, dtype=dtype),
        config={**run_specs.config, "dtype": dtype},
    )


def identity(specs: Specs, *, class_names=None) -> dict:
    """The fields a resumed run must share with its checkpoints, under their config names.

    Only the width knob the model's family has counts. class_names: the classes as
    read from the data (label order); without them config.class_names stands in
    when it names classes, and an empty one ("from the data") is left out.
    """
    out: dict[str, Any] = {}
    for spec in (specs.model, specs.data, specs.run):
        for f in dataclasses.fields(spec):
            if f.metadata.get("identity"):
                out["model" if f.name == "name" and spec is specs.model else f.name] = getattr(
                    spec, f.name
                )
    other = "width_multiplier" if specs.model.family is family.RESNET else "width"
    out.pop(other)
    out["cv"] = {"folds": specs.data.cv_folds, "fold": specs.data.cv_fold}
    if class_names is not None:
        out["class_names"] = tuple(str(c) for c in class_names)
    elif not out["class_names"]:
        del out["class_names"]
    return out
