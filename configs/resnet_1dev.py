"""ResNet-18 on 1 device: the single-GPU baseline of the study."""

from configs import default


def get_config():
    c = default.get_config()
    c.model = "resnet18"
    c.num_devices = 1
    c.global_batch_size = 64
    c.dtype = "auto"  # the chip's fast dtype: bfloat16, float16 (loss-scaled) or float32
    return c
