"""The config read at one boundary (bcjax.specs): typed specs, defaults written once,
the run's identity."""

import dataclasses
import sys

import pytest

from bcjax import specs
from bcjax.models import family

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from configs import default, quickstart  # noqa: E402

# The identity as bcjax wrote it before the specs (checkpoint.IDENTITY_FIELDS of
# session 5): runs written then must still resume, so no field may leave it.
IDENTITY_BEFORE = {
    "model",
    "width",
    "width_multiplier",
    "global_batch_size",
    "image_size",
    "dataset",
    "data_dir",
    "data_csv",
    "class_names",
    "split_seed",
    "split_fractions",
    "exclude_conflicts",
    "synthetic_num",
    "synthetic_seed",
    "synthetic_mark",
    "synthetic_mark_prob",
    "cv",
    "pretrained",
}


def test_every_spec_field_is_a_config_field_with_its_value():
    config = quickstart.get_config()
    run_specs = specs.from_config(config)
    assert run_specs.model.name == "resnet18" and run_specs.model.width == 16
    assert run_specs.data.image_size == 64 and run_specs.run.num_epochs == 20
    assert run_specs.optimizer.learning_rate == config.learning_rate
    assert run_specs.data.cv_folds == config.cv.folds and run_specs.data.cv_fold == config.cv.fold
    assert run_specs.data.augment["crop_ratio"] == tuple(config.augment.crop_ratio)
    flat = config.to_dict()
    renamed = {"name": "model", "cv_folds": None, "cv_fold": None, "augment": None}
    every = (run_specs.model, run_specs.optimizer, run_specs.data, run_specs.run)
    for spec in (*every, run_specs.process):
        for field in dataclasses.fields(spec):
            key = renamed.get(field.name, field.name)
            if key is None:
                continue
            value = flat[key]
            expected = tuple(value) if isinstance(value, list | tuple) else value
            assert getattr(spec, field.name) == expected, field.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        run_specs.run.num_epochs = 3


def test_disabled_augmentation_is_none_and_an_old_config_takes_the_defaults():
    config = default.get_config()
    config.augment.enabled = False
    assert specs.from_config(config).data.augment is None
    # A results.json config written before synthetic_mark_prob and crop_ratio existed.
    old = default.get_config().to_dict()
    del old["synthetic_mark_prob"]
    del old["augment"]["crop_ratio"]
    old["cv"] = {"folds": 5}  # a nested group with a field missing
    old["synthetic_num"] = 100
    completed = specs.from_config(old)
    assert completed.data.synthetic_num == 100  # what the old config says wins
    assert completed.data.synthetic_mark_prob == default.get_config().synthetic_mark_prob
    assert completed.data.augment["crop_ratio"] == pytest.approx((3 / 4, 4 / 3))
    assert (completed.data.cv_folds, completed.data.cv_fold) == (5, default.get_config().cv.fold)
    assert completed.config == old  # recorded as given


def test_identity_keeps_every_field_of_before_and_only_the_model_s_width_knob():
    resnet = specs.identity(specs.from_config(default.get_config()), class_names=("x", "y"))
    assert set(resnet) == IDENTITY_BEFORE - {"width_multiplier"}
    config = default.get_config()
    config.model = "mobilenet_v2"
    mobilenet = specs.identity(specs.from_config(config))
    # An empty config.class_names means "from the data": left out until they are read.
    assert set(mobilenet) == IDENTITY_BEFORE - {"width", "class_names"}
    # The classes read from the data override an empty config.class_names.
    with_classes = specs.identity(specs.from_config(config), class_names=["a", "b"])
    assert with_classes["class_names"] == ("a", "b")
    # Not identity: changing them resumes the run.
    config.learning_rate, config.num_epochs, config.dtype = 0.3, 7, "float32"
    assert specs.identity(specs.from_config(config)) == mobilenet


def test_model_family_rules_in_one_place():
    assert family.family_of("resnet50") is family.RESNET
    assert family.family_of("mobilenet_v3_small") is family.MOBILENET
    assert family.width_of("resnet18", width=16, width_multiplier=0.5) == {"width": 16}
    assert family.width_of("mobilenet_v2", width=16, width_multiplier=0.5) == {
        "width_multiplier": 0.5
    }
    assert family.is_full_width("resnet18", width=64, width_multiplier=0.5)
    assert not family.is_full_width("mobilenet_v2", width=64, width_multiplier=0.5)
    config = default.get_config()
    config.model, config.width_multiplier, config.dropout_rate = "mobilenet_v2", 0.5, 0.3
    config.dtype = "bfloat16"  # not the default "auto": the run resolves that (next test)
    model = family.create_model(specs.from_config(config).model, num_classes=2)
    assert (model.width_multiplier, model.dropout_rate, model.num_classes) == (0.5, 0.3, 2)
    assert str(model.dtype) == config.dtype


def test_dtype_auto_is_resolved_for_library_callers(tmp_path):
    """A config with dtype "auto" handed straight to the loop (no bcjax.main) gets the
    chip's dtype in its model spec, its model and the config it records."""
    import jax.numpy as jnp
    from _tiny import tiny_config

    from bcjax.data import synthetic
    from bcjax.timing import chrono
    from bcjax.train import run_setup

    data = synthetic.generate(tmp_path / "busi", num=24, seed=0, min_size=40, max_size=48)
    config = tiny_config(data, num_devices=1)
    config.dtype = "auto"
    ctx, _, _ = run_setup.set_up(config, tmp_path / "run", chrono.Chrono())
    try:
        # XLA:CPU's fast dtype is float32 (bcjax.parallel.chips.dtype_for).
        assert ctx.specs.model.dtype == ctx.specs.config["dtype"] == "float32"
        assert ctx.model.dtype == jnp.float32
    finally:
        ctx.close()
