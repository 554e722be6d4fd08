"""ResNet v1.5 as torchvision builds it, in Flax linen (NHWC).

v1.5: the stride of a bottleneck block sits in its 3x3 conv, not its first 1x1.
Submodule names follow torchvision's state_dict so a converter is a renaming:

  conv_init, bn_init                      <- conv1, bn1
  layer{i}_{j}: conv1 bn1 conv2 bn2 [conv3 bn3] [downsample_conv downsample_bn]
                                          <- layer{i}.{j}.{conv1,...,downsample.0,downsample.1}
  fc                                      <- fc
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bcjax.models import layers

ModuleDef = Any


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    features: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    zero_init_residual: bool = False
    act: Callable = nn.relu

    expansion = 1

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(
            self.features,
            (3, 3),
            (self.strides, self.strides),
            padding=layers.torch_padding(3),
            name="conv1",
        )(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.features, (3, 3), padding=layers.torch_padding(3), name="conv2")(y)
        y = self.norm(name="bn2", **_last_bn_init(self.zero_init_residual))(y)
        residual = _downsample(residual, y.shape[-1], self.strides, self.conv, self.norm)
        return self.act(y + residual)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 with 4x expansion (ResNet-50/101/152)."""

    features: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    zero_init_residual: bool = False
    act: Callable = nn.relu

    expansion = 4

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.features, (1, 1), name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(
            self.features,
            (3, 3),
            (self.strides, self.strides),
            padding=layers.torch_padding(3),
            name="conv2",
        )(y)
        y = self.act(self.norm(name="bn2")(y))
        y = self.conv(self.features * self.expansion, (1, 1), name="conv3")(y)
        y = self.norm(name="bn3", **_last_bn_init(self.zero_init_residual))(y)
        residual = _downsample(residual, y.shape[-1], self.strides, self.conv, self.norm)
        return self.act(y + residual)


def _last_bn_init(zero_init_residual: bool) -> dict:
    # torchvision's zero_init_residual: each block starts as the identity,
    # which helps large-batch training (Goyal et al. 2017).
    return {"scale_init": nn.initializers.zeros} if zero_init_residual else {}


def _downsample(x, features: int, strides: int, conv: ModuleDef, norm: ModuleDef):
    """Projection shortcut (1x1 strided conv + BN) exactly where torchvision adds
    one: when the stride or the channel count changes. Must be called inside the
    block's compact method so the names land in the block's scope."""
    if strides == 1 and x.shape[-1] == features:
        return x
    x = conv(features, (1, 1), (strides, strides), name="downsample_conv")(x)
    return norm(name="downsample_bn")(x)


class ResNet(nn.Module):
    stage_sizes: Sequence[int]
    block_cls: type[nn.Module]
    num_classes: int = 3
    width: int = 64
    zero_init_residual: bool = False
    # torchvision's ResNet has no dropout; kept at 0 by default so the
    # architecture is theirs, available because configs share one knob.
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    # torchvision: BatchNorm2d(momentum=0.1, eps=1e-5); Flax momentum = 1 - 0.1.
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    # On XLA:CPU, compute the convolutions it would run in its slow generic loop
    # (depthwise; kernels larger than the feature map) and the stem's max pool
    # (whose gradient XLA:CPU expands into index maps and a scatter) in
    # equivalent forms (layers.cpu_friendly_conv, layers.max_pool). Same
    # parameters; other platforms unaffected.
    cpu_conv: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = layers.make_conv(self.dtype, self.param_dtype, self.cpu_conv)
        norm = layers.model_norm(self, train)
        x = jnp.asarray(x, self.dtype)
        x = conv(self.width, (7, 7), (2, 2), padding=layers.torch_padding(7), name="conv_init")(x)
        x = nn.relu(norm(name="bn_init")(x))
        x = layers.max_pool(x, (3, 3), (2, 2), layers.torch_padding(3), cpu=self.cpu_conv)
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                x = self.block_cls(
                    features=self.width * 2**i,
                    strides=2 if i > 0 and j == 0 else 1,
                    conv=conv,
                    norm=norm,
                    zero_init_residual=self.zero_init_residual,
                    name=f"layer{i + 1}_{j}",
                )(x)
        # Grad-CAM reads the gradient here (bcjax.predict); skipped at init so that
        # init still returns only params and batch_stats.
        x = x if self.is_initializing() else self.perturb("features", x)
        x = layers.global_avg_pool(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=layers.torch_linear_kernel_init,
            bias_init=layers.torch_linear_bias_init(x.shape[-1]),
            name="fc",
        )(x)
        return jnp.asarray(x, jnp.float32)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck)
