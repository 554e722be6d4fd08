"""MobileNetV2 on 1 device."""

from configs import mobilenet_8dev


def get_config():
    c = mobilenet_8dev.get_config()
    c.num_devices = 1
    return c
