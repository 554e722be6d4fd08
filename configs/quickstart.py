"""Small and quick on a CPU: a narrow ResNet-18 at 64 px on the synthetic set.

A first look in a few minutes on a laptop; not the study's setting.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model = "resnet18"
    c.width = 16
    c.image_size = 64
    c.dtype = "float32"  # bf16 is slow on most CPUs
    c.num_devices = 1
    c.global_batch_size = 32
    c.num_epochs = 20
    c.warmup_epochs = 2
    c.learning_rate = 0.05
    c.checkpoint_every_epochs = 5
    return c
