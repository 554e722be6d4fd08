"""ResNet-18 on 8 devices: the study's multi-GPU setting (8 simulated devices on a CPU)."""

from configs import default


def get_config():
    c = default.get_config()
    c.model = "resnet18"
    c.num_devices = 8
    c.global_batch_size = 64
    c.dtype = "auto"  # the chip's fast dtype: bfloat16, float16 (loss-scaled) or float32
    return c
