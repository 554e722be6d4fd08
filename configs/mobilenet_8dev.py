"""MobileNetV2 on 8 devices (8 simulated devices on a CPU)."""

from configs import default


def get_config():
    c = default.get_config()
    c.model = "mobilenet_v2"
    c.num_devices = 8
    c.global_batch_size = 64
    c.dtype = "auto"  # the chip's fast dtype: bfloat16, float16 (loss-scaled) or float32
    c.optimizer = "adamw"
    c.learning_rate = 2e-3
    c.weight_decay = 0.05
    return c
