"""Checks a run configuration before anything compiles.

Every mistake a user can make with `--config.field=value` should fail here,
with a message that says what is allowed, and never later as a traceback from
deep inside JAX.
"""

from __future__ import annotations

import math

from bcjax.data.busi import CLASSES as BUSI_CLASSES
from bcjax.models import family, list_models
from bcjax.specs import OPTIMIZERS, STRATEGIES, ConfigError  # ConfigError: exported as before

MODELS = tuple(list_models())
DATASETS = ("auto", "busi", "synthetic", "folder", "csv")
BUSI_DATASETS = ("auto", "busi", "synthetic")  # BUSI's three classes, in its order
SYNTHETIC_MARKS = ("", "calliper", "text")
# "auto": the chip's fast dtype (bcjax.runtime resolves it before anything compiles).
DTYPES = ("float32", "bfloat16", "float16", "auto")
BEST_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auc_macro", "loss")
INPUT_ON_DEVICE = ("auto", "yes", "no")
FLAGS = (
    "bn_sync",
    "nesterov",
    "exclude_conflicts",
    "balanced_sampling",
    "compilation_cache",
    "timing_breakdown",
    "fresh_start",
    "clinical_report",
)
TEXTS = (
    "data_dir",
    "split_manifest",
    "coordinator_address",
    "pretrained",
    "data_csv",
    "positive_class",
)


def _choice(c, field, allowed):
    value = c[field]
    if value not in allowed:
        raise ConfigError(
            f"config.{field}={value!r} is not allowed; "
            f"choose one of {', '.join(map(repr, allowed))}."
        )


def _number(c, field, *, low=None, high=None, low_open=False, integer=False, where="config"):
    value = c[field]
    kind = "an integer" if integer else "a number"
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (integer and not isinstance(value, int))
    ):
        raise ConfigError(f"{where}.{field}={value!r} must be {kind}.")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}.{field}={value!r} must be finite.")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{where}.{field}={value!r} must be {'>' if low_open else '>='} {low}.")
    if high is not None and value > high:
        raise ConfigError(f"{where}.{field}={value!r} must be <= {high}.")


def _flag(c, field, where="config"):
    # ConfigDict lets None replace any field, so a bool field can hold None.
    if not isinstance(c[field], bool):
        raise ConfigError(f"{where}.{field}={c[field]!r} must be True or False.")


def _text(c, field):
    if not isinstance(c[field], str):
        raise ConfigError(f"config.{field}={c[field]!r} must be a string.")


def _numbers(c, field, where="config") -> tuple:
    """The field as a tuple of finite numbers; ConfigDict checks only that it is a tuple."""
    value = c[field]
    if not isinstance(value, (tuple, list)) or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
        for v in value
    ):
        raise ConfigError(f"{where}.{field}={value!r} must be a tuple of finite numbers.")
    return tuple(value)


def validate(config, num_devices_available: int | None = None) -> None:
    """Raises ConfigError for any value bcjax cannot run with."""
    c = config
    _choice(c, "model", MODELS)
    _choice(c, "strategy", STRATEGIES)
    _choice(c, "dataset", DATASETS)
    _choice(c, "optimizer", OPTIMIZERS)
    _choice(c, "dtype", DTYPES)
    _choice(c, "best_metric", BEST_METRICS)
    _choice(c, "nan_policy", ("stop", "skip"))
    _choice(c, "input_on_device", INPUT_ON_DEVICE)
    _choice(c, "synthetic_mark", SYNTHETIC_MARKS)
    _number(c, "width", low=1, high=1024, integer=True)
    _number(c, "width_multiplier", low=0, low_open=True)
    _number(c, "dropout_rate", low=0, high=0.99)
    _number(c, "image_size", low=32, high=2048, integer=True)
    _number(c, "synthetic_num", low=12, integer=True)
    _number(c, "synthetic_seed", low=0, integer=True)
    _number(c, "synthetic_mark_prob", low=0, high=1)
    _number(c, "num_processes", low=0, integer=True)
    _number(c, "global_batch_size", low=1, integer=True)
    _number(c, "num_epochs", low=1, integer=True)
    _number(c, "learning_rate", low=0, low_open=True)
    _number(c, "momentum", low=0, high=0.999)
    _number(c, "weight_decay", low=0)
    _number(c, "warmup_epochs", low=0)
    _number(c, "label_smoothing", low=0, high=0.99)
    _number(c, "clip_norm", low=0)
    _number(c, "seed", low=0, high=2**63 - 1, integer=True)  # jax.random.key takes an int64
    _number(c, "split_seed", low=0, integer=True)
    _number(c, "num_devices", low=0, integer=True)
    _number(c, "eval_every_epochs", low=1, integer=True)
    _number(c, "checkpoint_every_epochs", low=1, integer=True)
    _number(c, "keep_latest", low=1, integer=True)
    _number(c, "keep_best", low=0, integer=True)
    _number(c, "log_every_steps", low=1, integer=True)
    _number(c, "early_stopping_patience", low=0, integer=True)
    _number(c, "process_id", low=-1, integer=True)
    for field in FLAGS:
        _flag(c, field)
    for field in TEXTS:
        _text(c, field)
    _check_augment(c.augment)
    _check_cv(c)

    fractions = _numbers(c, "split_fractions")
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(
            f"config.split_fractions={fractions!r} must be three positive fractions "
            "(train, val, test) summing to 1: validation picks the best checkpoint, "
            "test scores it."
        )
    _check_data(c)
    if c.warmup_epochs >= c.num_epochs:
        raise ConfigError(
            f"config.warmup_epochs={c.warmup_epochs} must be below "
            f"config.num_epochs={c.num_epochs}."
        )
    _check_pretrained(c)
    if c.num_processes > 1 and not c.coordinator_address:
        raise ConfigError(
            f"config.num_processes={c.num_processes} needs config.coordinator_address (host:port)."
        )
    if c.num_processes and c.process_id >= c.num_processes:
        raise ConfigError(
            f"config.process_id={c.process_id} must be below "
            f"config.num_processes={c.num_processes} "
            "(or -1: auto-detect)."
        )
    if c.checkpoint_every_epochs % c.eval_every_epochs:
        raise ConfigError(
            f"config.checkpoint_every_epochs={c.checkpoint_every_epochs} must be a multiple of "
            f"config.eval_every_epochs={c.eval_every_epochs}: checkpoints carry the validation "
            "metric that ranks them."
        )
    if c.strategy == "jit" and not c.bn_sync:
        raise ConfigError(
            "config.strategy='jit' always computes BatchNorm statistics over the global batch; "
            "per-device statistics (config.bn_sync=False) need strategy 'shard_map' or 'pmap'."
        )

    devices = c.num_devices or num_devices_available
    if devices and c.global_batch_size % devices:
        given = f"config.num_devices={devices}" if c.num_devices else f"the {devices} devices"
        raise ConfigError(
            f"config.global_batch_size={c.global_batch_size} is not divisible by "
            f"{given}; use a multiple of {devices}."
        )
    if num_devices_available is not None and c.num_devices > num_devices_available:
        raise ConfigError(
            f"config.num_devices={c.num_devices} but only {num_devices_available} device(s) "
            "are available."
        )


def _check_data(c) -> None:
    """The data source's fields together: classes, CSV, planted mark, class weights.

    The classes of folder and CSV data are known only once read: what needs
    them is checked again by bcjax.data.datasets, still before anything compiles.
    """
    names = c.class_names
    if (
        not isinstance(names, (tuple, list))
        or len(set(names)) != len(names)
        or any(not isinstance(n, str) or not n or n != n.strip() for n in names)
    ):
        raise ConfigError(
            f"config.class_names={names!r} must be empty (classes from the data) "
            "or distinct, non-empty class names."
        )
    if len(names) == 1:
        raise ConfigError(
            f"config.class_names={names!r} names one class; classification needs two or more."
        )
    busi_like = c.dataset in BUSI_DATASETS
    if busi_like and names and sorted(names) != sorted(BUSI_CLASSES):
        raise ConfigError(
            f"config.class_names={names!r}: config.dataset={c.dataset!r} has "
            f"BUSI's classes {', '.join(BUSI_CLASSES)}; give these in any order, or "
            "leave it empty. Other classes: config.dataset='folder' or 'csv'."
        )
    known = tuple(names) or (BUSI_CLASSES if busi_like else ())
    if c.positive_class and known and c.positive_class not in known:
        raise ConfigError(
            f"config.positive_class={c.positive_class!r} is not one of the classes "
            f"{', '.join(known)} (config.class_names, or the data's)."
        )
    if c.dataset == "csv" and not c.data_csv:
        raise ConfigError(
            "config.dataset='csv' needs config.data_csv: a CSV file with the "
            "columns image, label and optionally mask and group."
        )
    if c.data_csv and c.dataset != "csv":
        raise ConfigError(
            f"config.data_csv={c.data_csv!r} is read only with config.dataset='csv' "
            f"(config.dataset={c.dataset!r}); set one, or clear the other."
        )
    if c.synthetic_mark and c.dataset not in ("auto", "synthetic"):
        raise ConfigError(
            f"config.synthetic_mark={c.synthetic_mark!r} plants a mark in the "
            f"synthetic set; config.dataset={c.dataset!r} does not use it."
        )
    weights = _numbers(c, "class_weights")
    count = len(known) or None  # folder/CSV data without class_names: checked once read
    if weights and (any(w <= 0 for w in weights) or (count and len(weights) != count)):
        order = f" ({', '.join(known)})" if known else ""
        raise ConfigError(
            f"config.class_weights={weights!r} must be empty or "
            f"{count or 'one per class:'} positive numbers{order}."
        )


def _check_augment(a) -> None:
    where = "config.augment"
    _flag(a, "enabled", where)
    _flag(a, "flip", where)
    _number(a, "rotate_deg", low=0, high=180, where=where)
    _number(a, "brightness", low=0, high=1, where=where)  # in units of the intensity range
    _number(a, "contrast", low=0, high=1, where=where)  # factor in [1 - contrast, 1 + contrast]
    scale = _numbers(a, "crop_scale", where)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(
            f"{where}.crop_scale={scale!r} must be (low, high) with 0 < low <= high <= 1: "
            "the fraction of the image area a random crop keeps."
        )
    ratio = _numbers(a, "crop_ratio", where)
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise ConfigError(
            f"{where}.crop_ratio={ratio!r} must be (low, high) with 0 < low <= high: "
            "the range of the crop's aspect ratio (width / height)."
        )


def _check_cv(c) -> None:
    folds, fold = c.cv.folds, c.cv.fold
    for name, value in (("folds", folds), ("fold", fold)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config.cv.{name}={value!r} must be an integer.")
    if folds == 1 or folds < 0 or folds > 50:
        raise ConfigError(
            f"config.cv.folds={folds} must be 0 (one train/val/test split) or 2..50 folds."
        )
    if folds and not -1 <= fold < folds:
        raise ConfigError(f"config.cv.fold={fold} must be -1 (all folds) or 0..{folds - 1}.")
    if not folds and fold != -1:
        raise ConfigError(f"config.cv.fold={fold} needs config.cv.folds >= 2.")
    if folds and c.split_manifest:
        raise ConfigError(
            "config.split_manifest and config.cv.folds >= 2 exclude each other: the folds are "
            "cut from config.split_seed; clear one of them."
        )


def _check_pretrained(c) -> None:
    if not c.pretrained:
        return
    import os

    path = str(c.pretrained)
    if not os.path.isfile(path):
        raise ConfigError(
            f"config.pretrained={path!r}: no such file. Give a torchvision state_dict "
            "saved as .npz (or .pth with torch installed); see bcjax.models.convert."
        )
    if not path.endswith((".npz", ".pth", ".pt")):
        raise ConfigError(f"config.pretrained={path!r} must be a .npz, .pth or .pt file.")
    widths = {"width": c.width, "width_multiplier": c.width_multiplier}
    if not family.is_full_width(c.model, **widths):
        field = family.family_of(c.model).width_field
        knob = f"{field}={widths[field]}"
        raise ConfigError(
            f"config.pretrained needs torchvision's full-width {c.model}; config.{knob} "
            "changes the layer shapes."
        )


def unknown_field_message(error: AttributeError) -> str:
    """The message for an override of a field the locked config does not have."""
    # config_flags wraps a KeyError in the AttributeError, and str() of a KeyError
    # is its repr (quotes and "\n" escapes): take the message itself.
    text = error
    while isinstance(text, BaseException) and text.args:
        text = text.args[0]
    name, *hint = str(text).splitlines() or [repr(text)]
    return f"unknown config field {name}." + (f" {' '.join(hint)}" if hint else "")
