"""What differs between the zoo's two families, ResNet and MobileNet, in one place.

Everything outside bcjax.models asks here instead of testing the model's name:
which width knob a family has (ResNet `width`, MobileNet `width_multiplier`),
its torchvision (full) width, its classifier's name, and how a spec becomes a
model. (Grad-CAM needs nothing per family: both families sow the same
``features`` perturbation hook, bcjax.step.gradcam.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Family:
    """name: "resnet" | "mobilenet"; width_field: the config field that scales it;
    full_width: torchvision's value of that field (pretrained weights need it);
    head: the classifier's parameter name."""

    name: str
    width_field: str
    full_width: float
    head: str


RESNET = Family("resnet", "width", 64, "fc")
MOBILENET = Family("mobilenet", "width_multiplier", 1.0, "classifier")


def family_of(model_name: str) -> Family:
    """The family of a zoo name ("resnet18" -> RESNET, "mobilenet_v2" -> MOBILENET)."""
    return RESNET if model_name.startswith("resnet") else MOBILENET


def width_of(model_name: str, *, width: int, width_multiplier: float) -> dict[str, Any]:
    """{knob: value} of the one width knob this model has."""
    fam = family_of(model_name)
    return {fam.width_field: width if fam is RESNET else width_multiplier}


def is_full_width(model_name: str, *, width: int, width_multiplier: float) -> bool:
    """Whether the model has torchvision's layer shapes (what pretrained weights need)."""
    fam = family_of(model_name)
    knob = width_of(model_name, width=width, width_multiplier=width_multiplier)
    return knob[fam.width_field] == fam.full_width


def create_model(spec, *, num_classes: int, dtype=None):
    """The model of a `bcjax.specs.ModelSpec` (or anything with its fields) with a
    `num_classes` head; `dtype` overrides the spec's compute dtype (reports use float32)."""
    import bcjax.models  # the package imports this module: resolved at call time

    kwargs = width_of(spec.name, width=spec.width, width_multiplier=spec.width_multiplier)
    if family_of(spec.name) is MOBILENET:
        kwargs["dropout_rate"] = spec.dropout_rate
    return bcjax.models.create(
        spec.name,
        num_classes=num_classes,
        dtype=jnp.dtype(dtype if dtype is not None else spec.dtype),
        **kwargs,
    )
