"""Configs load, variants differ from the default only where they say, and bad values fail early."""

import importlib
import pathlib
import subprocess
import sys

import pytest

from bcjax import config_check

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VARIANTS = [
    "default",
    "resnet_8dev",
    "resnet_1dev",
    "mobilenet_8dev",
    "mobilenet_1dev",
    "quickstart",
]


@pytest.mark.parametrize("name", VARIANTS)
def test_every_config_is_valid(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    config_check.validate(config)


def test_variants_keep_the_default_fields():
    default = importlib.import_module("configs.default").get_config()
    for name in VARIANTS:
        config = importlib.import_module(f"configs.{name}").get_config()
        assert set(config.keys()) == set(default.keys())
    assert importlib.import_module("configs.resnet_8dev").get_config().num_devices == 8
    assert importlib.import_module("configs.mobilenet_1dev").get_config().model == "mobilenet_v2"


def test_unknown_field_cannot_be_added():
    config = importlib.import_module("configs.default").get_config()
    with pytest.raises(AttributeError, match="learning_rte"):
        config.learning_rte = 0.1


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("model", "resnet19", "resnet18"),
        ("strategy", "horovod", "shard_map"),
        ("learning_rate", -0.1, "learning_rate"),
        ("global_batch_size", 30, "divisible"),
        ("dataset", "imagenet", "synthetic"),
        ("split_fractions", (0.5, 0.1, 0.1), "sum"),
        ("class_weights", (1.0, -1.0, 1.0), "positive"),
        ("image_size", 16, ">= 32"),
        ("num_epochs", 0, ">= 1"),
        ("split_fractions", (0.8, 0.0, 0.2), "positive"),
        ("pretrained", "resnet18.pth", "no such file"),
        ("early_stopping_patience", -1, ">= 0"),
        ("warmup_epochs", 200, "below"),
        ("checkpoint_every_epochs", 3, "multiple"),
    ],
)
def test_bad_values_fail_with_what_is_allowed(field, value, message):
    config = importlib.import_module("configs.resnet_8dev").get_config()
    config.eval_every_epochs = 2 if field == "checkpoint_every_epochs" else 1
    config.unlock()
    config[field] = value
    with pytest.raises(config_check.ConfigError, match=message):
        config_check.validate(config)


@pytest.mark.parametrize(
    "folds,fold,message",
    [
        (1, -1, "2..50 folds"),
        (51, -1, "2..50 folds"),
        (5, 5, "0..4"),
        (0, 2, "needs config.cv.folds"),
    ],
)
def test_bad_cross_validation_values(folds, fold, message):
    config = importlib.import_module("configs.default").get_config()
    config.cv.folds, config.cv.fold = folds, fold
    with pytest.raises(config_check.ConfigError, match=message):
        config_check.validate(config)


def test_pretrained_needs_the_full_width_model(tmp_path):
    weights = tmp_path / "resnet18.npz"
    weights.write_bytes(b"")
    config = importlib.import_module("configs.quickstart").get_config()
    config.pretrained = str(weights)
    with pytest.raises(config_check.ConfigError, match="full-width"):
        config_check.validate(config)
    config.width = 64
    config_check.validate(config)


def test_jit_with_per_device_batchnorm_is_refused():
    config = importlib.import_module("configs.default").get_config()
    config.strategy, config.bn_sync = "jit", False
    with pytest.raises(config_check.ConfigError, match="bn_sync"):
        config_check.validate(config)


def _main(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "bcjax.main", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


def test_main_rejects_an_unknown_override_without_a_traceback(tmp_path):
    run = _main(
        "--config=configs/quickstart.py", f"--workdir={tmp_path}", "--config.learning_rte=0.1"
    )
    assert run.returncode != 0
    assert "learning_rte" in run.stderr and "Traceback" not in run.stderr


def test_main_rejects_a_bad_value_before_compiling(tmp_path):
    run = _main(
        "--config=configs/resnet_8dev.py", f"--workdir={tmp_path}", "--config.global_batch_size=60"
    )
    assert run.returncode != 0
    assert "divisible" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_main_reports_missing_busi_without_a_traceback(tmp_path):
    run = _main(
        "--config=configs/quickstart.py",
        f"--workdir={tmp_path / 'run'}",
        "--config.dataset=busi",
        f"--config.data_dir={tmp_path / 'nowhere'}",
    )
    assert run.returncode != 0
    assert (
        "error:" in run.stderr
        and "no BUSI data was found" in run.stderr
        and "Traceback" not in run.stderr
    )
