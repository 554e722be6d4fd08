"""bcjax: breast ultrasound classification with ResNet and MobileNet in JAX/Flax."""

__version__ = "0.1.0"
