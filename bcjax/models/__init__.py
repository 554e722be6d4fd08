"""Model zoo: ResNet v1.5 and MobileNetV2/V3 in Flax linen, NHWC.

    model = bcjax.models.create("resnet18", num_classes=3, dtype=jnp.bfloat16)
    variables = model.init(key, jnp.zeros((1, 224, 224, 3)), train=False)
    logits, updates = model.apply(variables, x, train=True,
                                  rngs={"dropout": key}, mutable=["batch_stats"])

Kept light on purpose (flax, jax only): research code imports it without the
data and checkpoint stack. A family's module (resnet.py, mobilenet.py, with
layers.py) is imported when one of its models is first asked for, so a ResNet
run never loads the MobileNets; every name below is still an attribute of this
package (PEP 562 ``__getattr__``).
"""

from __future__ import annotations

import importlib
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bcjax.models.family import Family, family_of

# name -> (module of bcjax.models, class); the module is imported on first use.
_REGISTRY: dict[str, tuple[str, str]] = {
    "resnet18": ("resnet", "ResNet18"),
    "resnet34": ("resnet", "ResNet34"),
    "resnet50": ("resnet", "ResNet50"),
    "resnet101": ("resnet", "ResNet101"),
    "resnet152": ("resnet", "ResNet152"),
    "mobilenet_v2": ("mobilenet", "MobileNetV2"),
    "mobilenet_v3_small": ("mobilenet", "MobileNetV3Small"),
    "mobilenet_v3_large": ("mobilenet", "MobileNetV3Large"),
}
# Every class this package exports, by the module it lives in.
_CLASSES = {cls: module for module, cls in _REGISTRY.values()} | {"ResNet": "resnet"}
_SUBMODULES = ("convert", "layers", "mobilenet", "resnet", "weights_file")


def __getattr__(name: str) -> Any:
    """The model classes (and submodules) of this package, imported on first access."""
    if name in _CLASSES:
        return getattr(importlib.import_module(f"{__name__}.{_CLASSES[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_CLASSES) | set(_SUBMODULES))


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
        _, cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown model {name!r}; valid names: {', '.join(list_models())}"
        ) from None
    constructor = __getattr__(cls)
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
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet101",
    "ResNet152",
    "MobileNetV2",
    "MobileNetV3Large",
    "MobileNetV3Small",
]
