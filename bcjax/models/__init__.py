"""Model zoo: ResNet v1.5 and MobileNetV2/V3 in Flax linen, NHWC.

    model = bcjax.models.create("resnet18", num_classes=3, dtype=jnp.bfloat16)
    variables = model.init(key, jnp.zeros((1, 224, 224, 3)), train=False)
    logits, updates = model.apply(variables, x, train=True,
                                  rngs={"dropout": key}, mutable=["batch_stats"])

Kept light on purpose (flax, jax only): research code imports it without the
data and checkpoint stack.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bcjax.models.family import Family, family_of
from bcjax.models.mobilenet import MobileNetV2, MobileNetV3Large, MobileNetV3Small
from bcjax.models.resnet import ResNet, ResNet18, ResNet34, ResNet50, ResNet101, ResNet152

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "resnet152": ResNet152,
    "mobilenet_v2": MobileNetV2,
    "mobilenet_v3_small": MobileNetV3Small,
    "mobilenet_v3_large": MobileNetV3Large,
}


def list_models() -> list[str]:
    return list(_REGISTRY)


def create(
    name: str,
    *,
    num_classes: int = 3,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    bn_axis_name: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Builds a model by name.

    Extra kwargs go to the model: ResNet `width` (64), `zero_init_residual`,
    `dropout_rate` (0.0); MobileNet `width_multiplier` (1.0), `dropout_rate`
    (0.2); all `bn_momentum` / `bn_epsilon` (Flax convention, torchvision's
    values by default).
    """
    try:
        constructor = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown model {name!r}; valid names: {', '.join(list_models())}"
        ) from None
    return constructor(
        num_classes=num_classes,
        dtype=dtype,
        param_dtype=param_dtype,
        bn_axis_name=bn_axis_name,
        **kwargs,
    )


__all__ = [
    "create",
    "family_of",  # what differs between ResNets and MobileNets (bcjax.models.family)
    "list_models",
    "Family",
    "ResNet",
    "MobileNetV2",
    "MobileNetV3Large",
    "MobileNetV3Small",
]
