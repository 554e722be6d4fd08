"""MobileNetV2 and MobileNetV3 (Small, Large) as torchvision builds them, in
Flax linen (NHWC).

Submodule names follow torchvision's `features` list so a converter is a
renaming; torchvision's inner Sequential indices become words:

  features_0, features_{last}        ConvBNAct {conv, bn}   <- features.N.{0,1}
  features_N (inverted residual)     expand {conv, bn}      (absent when no expansion)
                                     depthwise {conv, bn}
                                     se {fc1, fc2}          (V3 blocks with SE)
                                     project {conv, bn}
  V2: classifier                                            <- classifier.1
  V3: pre_logits, classifier                                <- classifier.0, classifier.3
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bcjax.models import layers

ModuleDef = Any


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (kxk, strided) -> [squeeze-excite] -> project
    (1x1, linear), with a residual when shape is kept. Serves V2 and V3."""

    in_features: int
    expanded_features: int
    out_features: int
    conv: ModuleDef
    norm: ModuleDef
    kernel_size: int = 3
    strides: int = 1
    act: Callable = nn.relu
    squeeze_features: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        block = functools.partial(layers.ConvBNAct, conv=self.conv, norm=self.norm)
        y = x
        if self.expanded_features != self.in_features:
            y = block(self.expanded_features, kernel_size=1, act=self.act, name="expand")(y)
        y = block(
            self.expanded_features,
            kernel_size=self.kernel_size,
            strides=self.strides,
            groups=self.expanded_features,
            act=self.act,
            name="depthwise",
        )(y)
        if self.squeeze_features is not None:
            y = layers.SqueezeExcite(
                self.squeeze_features, dtype=self.dtype, param_dtype=self.param_dtype, name="se"
            )(y)
        y = block(self.out_features, kernel_size=1, act=None, name="project")(y)
        if self.strides == 1 and self.in_features == self.out_features:
            y = y + x
        return y


def _dense(features: int, dtype, param_dtype, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=layers.mobilenet_dense_init,
        bias_init=nn.initializers.zeros,
        name=name,
    )


# ----------------------------------------------------------------- MobileNetV2

# (expand ratio t, channels c, repeats n, first stride s), torchvision's table.
_V2_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    num_classes: int = 3
    width_multiplier: float = 1.0
    dropout_rate: float = 0.2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    # torchvision: BatchNorm2d defaults (momentum 0.1, eps 1e-5).
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    # On XLA:CPU, compute the convolutions it would run in its slow generic loop
    # (depthwise; kernels larger than the feature map) in an equivalent form
    # (layers.cpu_friendly_conv). Same parameters; other platforms unaffected.
    cpu_conv: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = layers.make_conv(self.dtype, self.param_dtype, self.cpu_conv)
        norm = layers.model_norm(self, train)
        block = functools.partial(layers.ConvBNAct, conv=conv, norm=norm, act=nn.relu6)
        wm = self.width_multiplier
        in_features = layers.make_divisible(32 * wm)
        # torchvision never narrows the last conv below 1280.
        last_features = layers.make_divisible(1280 * max(1.0, wm))

        x = jnp.asarray(x, self.dtype)
        x = block(in_features, strides=2, name="features_0")(x)
        index = 1
        for t, c, n, s in _V2_SETTING:
            out_features = layers.make_divisible(c * wm)
            for i in range(n):
                x = InvertedResidual(
                    in_features=in_features,
                    expanded_features=int(round(in_features * t)),
                    out_features=out_features,
                    strides=s if i == 0 else 1,
                    conv=conv,
                    norm=norm,
                    act=nn.relu6,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"features_{index}",
                )(x)
                in_features = out_features
                index += 1
        x = block(last_features, kernel_size=1, name=f"features_{index}")(x)
        # Grad-CAM reads the gradient here (bcjax.predict); skipped at init so that
        # init still returns only params and batch_stats.
        x = x if self.is_initializing() else self.perturb("features", x)
        x = layers.global_avg_pool(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = _dense(self.num_classes, self.dtype, self.param_dtype, "classifier")(x)
        return jnp.asarray(x, jnp.float32)


# ----------------------------------------------------------------- MobileNetV3


@dataclasses.dataclass(frozen=True)
class V3Block:
    """One row of torchvision's MobileNetV3 table (channels before width scaling)."""

    in_features: int
    kernel_size: int
    expanded_features: int
    out_features: int
    use_se: bool
    use_hs: bool
    strides: int


def _v3(*rows) -> tuple[V3Block, ...]:
    return tuple(V3Block(i, k, e, o, se, act == "HS", s) for i, k, e, o, se, act, s in rows)


V3_LARGE = _v3(
    (16, 3, 16, 16, False, "RE", 1),
    (16, 3, 64, 24, False, "RE", 2),
    (24, 3, 72, 24, False, "RE", 1),
    (24, 5, 72, 40, True, "RE", 2),
    (40, 5, 120, 40, True, "RE", 1),
    (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2),
    (80, 3, 200, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 480, 112, True, "HS", 1),
    (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2),
    (160, 5, 960, 160, True, "HS", 1),
    (160, 5, 960, 160, True, "HS", 1),
)

V3_SMALL = _v3(
    (16, 3, 16, 16, True, "RE", 2),
    (16, 3, 72, 24, False, "RE", 2),
    (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1),
    (48, 5, 144, 48, True, "HS", 1),
    (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1),
    (96, 5, 576, 96, True, "HS", 1),
)


class MobileNetV3(nn.Module):
    setting: Sequence[V3Block]
    last_features: int  # 1280 (Large) or 1024 (Small), before width scaling
    num_classes: int = 3
    width_multiplier: float = 1.0
    dropout_rate: float = 0.2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    # torchvision: BatchNorm2d(eps=0.001, momentum=0.01); Flax momentum = 1 - 0.01.
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    # On XLA:CPU, compute the convolutions it would run in its slow generic loop
    # (depthwise; kernels larger than the feature map) in an equivalent form
    # (layers.cpu_friendly_conv). Same parameters; other platforms unaffected.
    cpu_conv: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = layers.make_conv(self.dtype, self.param_dtype, self.cpu_conv)
        norm = layers.model_norm(self, train)
        adjust = lambda c: layers.make_divisible(c * self.width_multiplier)
        block = functools.partial(layers.ConvBNAct, conv=conv, norm=norm, act=layers.hard_swish)

        x = jnp.asarray(x, self.dtype)
        x = block(adjust(self.setting[0].in_features), strides=2, name="features_0")(x)
        for index, cfg in enumerate(self.setting, start=1):
            expanded = adjust(cfg.expanded_features)
            x = InvertedResidual(
                in_features=adjust(cfg.in_features),
                expanded_features=expanded,
                out_features=adjust(cfg.out_features),
                kernel_size=cfg.kernel_size,
                strides=cfg.strides,
                act=layers.hard_swish if cfg.use_hs else nn.relu,
                squeeze_features=layers.make_divisible(expanded // 4) if cfg.use_se else None,
                conv=conv,
                norm=norm,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"features_{index}",
            )(x)
        # torchvision: 6x the last block's (already width-scaled) channels.
        last_conv = 6 * adjust(self.setting[-1].out_features)
        x = block(last_conv, kernel_size=1, name=f"features_{len(self.setting) + 1}")(x)
        # Grad-CAM reads the gradient here (bcjax.predict); skipped at init so that
        # init still returns only params and batch_stats.
        x = x if self.is_initializing() else self.perturb("features", x)
        x = layers.global_avg_pool(x)
        # Unlike V2, V3 scales its head width with the multiplier as well.
        x = _dense(adjust(self.last_features), self.dtype, self.param_dtype, "pre_logits")(x)
        x = layers.hard_swish(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = _dense(self.num_classes, self.dtype, self.param_dtype, "classifier")(x)
        return jnp.asarray(x, jnp.float32)


MobileNetV3Large = functools.partial(MobileNetV3, setting=V3_LARGE, last_features=1280)
MobileNetV3Small = functools.partial(MobileNetV3, setting=V3_SMALL, last_features=1024)
