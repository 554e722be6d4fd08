"""The tiny training run that the loop-level tests share.

ResNet-18 at width 4 on 32 px images, global batch 8, a checkpoint every epoch:
a few seconds per epoch on a CPU. Test files add what they need as overrides.
"""

import importlib
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `configs` is a folder of the repository, not a package of bcjax


def tiny_config(data_dir, **overrides):
    config = importlib.import_module("configs.quickstart").get_config()
    config.dataset = "busi"
    config.data_dir = str(data_dir)
    config.width = 4
    config.image_size = 32
    config.global_batch_size = 8
    config.num_epochs = 3
    config.warmup_epochs = 1
    config.checkpoint_every_epochs = 1
    config.log_every_steps = 2
    config.timing_breakdown = False
    config.clinical_report = False  # tested on its own (test_clinical_outputs, test_loop)
    for k, v in overrides.items():
        config[k] = v
    return config
