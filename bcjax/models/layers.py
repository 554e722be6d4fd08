"""Building blocks shared by the ResNet and MobileNet families.

Everything here mirrors torchvision's choices (padding, initialisers, BatchNorm
constants) so that parameter counts match and torchvision weights can be
converted without changing any numerics.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any
Dtype = Any

def _flat(sample: Callable) -> Callable:
    """Draws a flat vector and reshapes it.

    Same distribution as drawing in the kernel's shape, but XLA:CPU compiles
    threefry for small multi-dimensional shapes very slowly (LLVM works on the
    N-d counter iota: measured ~7 s for one 3x3x1x8 draw vs ~1 s flat, jax
    0.10 on a loaded 2-core box), and model.init draws once per kernel.
    """

    def init(key, shape, dtype=jnp.float32):
        size = math.prod(shape)
        return sample(key, (size,), dtype).reshape(shape)

    return init


def _fans(shape: Sequence[int]) -> tuple[int, int]:
    # Flax/torch convention for HWIO conv and (in, out) dense kernels.
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def conv_kernel_init(key, shape, dtype=jnp.float32):
    """torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu"):
    untruncated N(0, 2 / fan_out) for every conv of ResNet and MobileNet.

    fan_out of an HWIO kernel is O*H*W as torch's for OIHW, also for depthwise
    kernels (H W 1 C vs C 1 H W), so the std matches layer by layer.
    """
    std = (2.0 / _fans(shape)[1]) ** 0.5
    return _flat(lambda k, s, d: std * jax.random.normal(k, s, d))(key, shape, dtype)


def mobilenet_dense_init(key, shape, dtype=jnp.float32):
    """MobileNetV2/V3 in torchvision re-initialise their Linear layers with
    N(0, 0.01) and zero bias."""
    return _flat(lambda k, s, d: 0.01 * jax.random.normal(k, s, d))(key, shape, dtype)


def torch_linear_kernel_init(key, shape, dtype=jnp.float32):
    """torchvision's ResNet leaves its fc at torch.nn.Linear's default,
    kaiming_uniform_(a=sqrt(5)), which is U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / _fans(shape)[0] ** 0.5
    return _flat(lambda k, s, d: jax.random.uniform(k, s, d, -bound, bound))(key, shape, dtype)


def torch_linear_bias_init(fan_in: int) -> Callable:
    """Bias initialiser of torch.nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    Flax bias initialisers only see the bias shape, so fan_in is bound here.
    """
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return _flat(lambda k, s, d: jax.random.uniform(k, s, d, -bound, bound))(key, shape, dtype)

    return init


def torch_padding(kernel_size: int, dilation: int = 1) -> Sequence[tuple[int, int]]:
    """Symmetric padding as torch uses it.

    Flax's "SAME" pads (0, 1) for stride 2 on even inputs where torch pads
    (1, 1); the outputs would be shifted by a pixel and converted weights would
    no longer reproduce torchvision's activations.
    """
    pad = (kernel_size - 1) // 2 * dilation
    return ((pad, pad), (pad, pad))


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """torchvision's _make_divisible: round channels to a multiple of divisor
    without going more than 10% below the requested value."""
    if min_value is None:
        min_value = divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def hard_sigmoid(x):
    # torch.nn.Hardsigmoid is relu6(x + 3) / 6 (not the 0.2x + 0.5 of Keras).
    return jax.nn.relu6(x + 3.0) / 6.0


def hard_swish(x):
    return x * hard_sigmoid(x)


def make_conv(dtype: Dtype, param_dtype: Dtype) -> ModuleDef:
    return functools.partial(
        nn.Conv,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=conv_kernel_init,
    )


def make_norm(
    *,
    train: bool,
    momentum: float,
    epsilon: float,
    dtype: Dtype,
    param_dtype: Dtype,
    axis_name: Optional[str],
) -> ModuleDef:
    """BatchNorm partial.

    momentum is Flax's (decay of the running average), i.e. 1 - torch momentum.
    With axis_name set, batch statistics are averaged over that named mesh axis
    (shard_map/pmap); mean and mean-of-squares travel in one pmean.
    """
    return functools.partial(
        nn.BatchNorm,
        use_running_average=not train,
        momentum=momentum,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        axis_name=axis_name,
    )


def model_norm(model: nn.Module, train: bool) -> ModuleDef:
    """The BatchNorm partial configured by a zoo model's own fields
    (bn_momentum, bn_epsilon, dtype, param_dtype, bn_axis_name)."""
    return make_norm(
        train=train,
        momentum=model.bn_momentum,
        epsilon=model.bn_epsilon,
        dtype=model.dtype,
        param_dtype=model.param_dtype,
        axis_name=model.bn_axis_name,
    )


class ConvBNAct(nn.Module):
    """torchvision's Conv2dNormActivation: conv (no bias) -> BatchNorm -> act.

    Submodules are named `conv` and `bn` (torch indices 0 and 1).
    """

    features: int
    conv: ModuleDef
    norm: ModuleDef
    kernel_size: int = 3
    strides: int = 1
    groups: int = 1
    act: Optional[Callable] = nn.relu

    @nn.compact
    def __call__(self, x):
        x = self.conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=(self.strides, self.strides),
            padding=torch_padding(self.kernel_size),
            feature_group_count=self.groups,
            name="conv",
        )(x)
        x = self.norm(name="bn")(x)
        if self.act is not None:
            x = self.act(x)
        return x


class SqueezeExcite(nn.Module):
    """torchvision's SqueezeExcitation as MobileNetV3 uses it: global average
    pool -> 1x1 conv (bias) -> ReLU -> 1x1 conv (bias) -> hard-sigmoid -> scale.

    fc1/fc2 are Conv2d in torchvision, so they get the conv initialiser and a
    zero bias.
    """

    squeeze_features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = functools.partial(
            nn.Conv,
            kernel_size=(1, 1),
            use_bias=True,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=conv_kernel_init,
            bias_init=nn.initializers.zeros,
        )
        scale = jnp.mean(x, axis=(1, 2), keepdims=True)
        scale = nn.relu(dense(self.squeeze_features, name="fc1")(scale))
        scale = hard_sigmoid(dense(x.shape[-1], name="fc2")(scale))
        return x * scale.astype(x.dtype)


def global_avg_pool(x):
    return jnp.mean(x, axis=(1, 2))
