"""Building blocks shared by the ResNet and MobileNet families.

Everything here mirrors torchvision's choices (padding, initialisers, BatchNorm
constants) so that parameter counts match and torchvision weights can be
converted without changing any numerics.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

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


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
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


# ------------------------------------------------- convolutions XLA:CPU runs slowly
#
# XLA:CPU hands a convolution to its Eigen kernel only in NHWC/HWIO form and
# without window reversal; any other convolution runs in a generic loop emitted
# per output element, 10-100x slower. Two cases of these models end up there
# (jax 0.10.2; evidence and timings in BUILD_NOTES, issue 18):
#
# - Dense convolutions whose kernel has more taps than the feature map has
#   pixels (3x3 on 2x2 or 1x1: ResNet's last stage at 32-64 px). XLA's algebraic
#   simplifier (SwapConvOperands, on by default on CPU) swaps input and kernel
#   of such a convolution, forward or input-gradient, into a form with window
#   reversal. Here they become patches (pad + strided slices) times the kernel
#   as one matrix product, whose gradients are matrix products as well.
# - Depthwise convolutions (MobileNet): the grouped forward and input gradient
#   run as library convolutions working channel group by channel group, and
#   the weight gradient (a batch-grouped convolution) is expanded to a dense
#   C x C one. Here they are kh*kw shifted multiply-adds, which XLA fuses into
#   one loop, with a gradient of the same kind (_depthwise_bwd).
#
# Both change only the order of the floating-point sums. They apply on CPU
# only (lax.platform_dependent: other platforms lower the plain convolution,
# where cuDNN and TPU kernels run these well), to float32 NHWC/HWIO
# convolutions without dilation; anything else is lax.conv_general_dilated.


def _conv_plan(
    lhs_shape,
    rhs_shape,
    strides,
    padding,
    lhs_dilation,
    rhs_dilation,
    dimension_numbers,
    feature_group_count,
    dtype,
):
    """("dense" | "depthwise", explicit padding) when the CPU form applies, else None."""
    if len(lhs_shape) != 4 or dtype != jnp.float32:
        return None
    nhwc = jax.lax.conv_dimension_numbers(lhs_shape, rhs_shape, ("NHWC", "HWIO", "NHWC"))
    if jax.lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers) != nhwc:
        return None
    if any(d != 1 for d in tuple(lhs_dilation or (1, 1)) + tuple(rhs_dilation or (1, 1))):
        return None
    kh, kw, kernel_in, features = rhs_shape
    in_features = lhs_shape[3]
    if isinstance(padding, str):  # "SAME" / "VALID", resolved as lax does
        padding = jax.lax.padtype_to_pads(lhs_shape[1:3], (kh, kw), strides, padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if kh * kw == 1 or any(lo < 0 or hi < 0 for lo, hi in padding):
        return None  # 1x1: never swapped, and XLA runs it as a matrix product
    if feature_group_count == in_features and kernel_in == 1 and features == in_features:
        return "depthwise", padding
    if feature_group_count != 1:
        return None
    out_hw = [
        (size + lo + hi - k) // s + 1
        for size, (lo, hi), k, s in zip(lhs_shape[1:3], padding, (kh, kw), strides)
    ]
    # The simplifier swaps when the kernel's taps outnumber the (unpadded)
    # spatial size of the operand it slides over: the input in the forward
    # convolution, the output gradient in the input-gradient one.
    smallest_map = min(lhs_shape[1] * lhs_shape[2], out_hw[0] * out_hw[1])
    return ("dense", padding) if kh * kw > smallest_map else None


def _taps(x, kernel_hw, strides, padding):
    """The kh*kw strided windows of the zero-padded x, each [N, Ho, Wo, C]."""
    xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    n, hp, wp, c = xp.shape
    (kh, kw), (sh, sw) = kernel_hw, strides
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    return [
        jax.lax.slice(
            xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1)
        )
        for i in range(kh)
        for j in range(kw)
    ]


def _dense_as_matmul(x, kernel, strides, padding, precision):
    kh, kw, in_features, features = kernel.shape
    # Taps in (i, j) order, channels inside: the row order of kernel.reshape.
    patches = jnp.concatenate(_taps(x, (kh, kw), strides, padding), axis=-1)
    return jax.lax.dot_general(
        patches,
        kernel.reshape(kh * kw * in_features, features),
        (((3,), (0,)), ((), ())),
        precision=precision,
    )


def _shift_sum(x, kernel, strides, padding):
    """sum over taps t of window_t(x) * kernel[t]: a depthwise convolution as one
    elementwise loop (XLA fuses the slices, products and sums)."""
    kh, kw = kernel.shape[:2]
    taps = _taps(x, (kh, kw), strides, padding)
    y = taps[0] * kernel[0, 0, 0]
    for t, tap in enumerate(taps[1:], start=1):
        y = y + tap * kernel[t // kw, t % kw, 0]
    return y


def _depthwise_as_shifts(x, kernel, strides, padding):
    # Under shard_map the kernel is replicated while x varies per device; the
    # custom gradient below must return a kernel gradient typed like its input,
    # so the kernel is first made to vary like x (adding zeros typed like x;
    # XLA drops the addition). Its gradient is then summed over devices by JAX.
    kernel = kernel + jnp.zeros_like(x, shape=kernel.shape)
    return _depthwise(x, kernel, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, kernel, strides, padding):
    return _shift_sum(x, kernel, strides, padding)


def _depthwise_fwd(x, kernel, strides, padding):
    # Only the inputs are kept: JAX's own rule would keep all kh*kw shifted
    # copies of x for the kernel gradient, each a full activation in memory.
    return _shift_sum(x, kernel, strides, padding), (x, kernel)


def _depthwise_bwd(strides, padding, residuals, dy):
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    (h, w), (ho, wo) = x.shape[1:3], dy.shape[1:3]
    # Input gradient: dy dilated by the stride and padded so that the flipped
    # kernel, slid with stride 1, lands on every input pixel.
    pads = [(0, 0, 0)]
    for size, out, k, s, (lo, _) in zip((h, w), (ho, wo), (kh, kw), strides, padding):
        pads.append((k - 1 - lo, size - 1 + lo - (out - 1) * s, s - 1))
    dy_padded = jax.lax.pad(dy, jnp.zeros((), dy.dtype), pads + [(0, 0, 0)])
    dx = _shift_sum(dy_padded, kernel[::-1, ::-1], (1, 1), ((0, 0), (0, 0)))
    # Kernel gradient: per tap, window(x) * dy summed over batch and pixels.
    # All taps in one reduction over the batch first (XLA fuses the windows
    # into it and reads x and dy once), then over the much smaller pixel maps:
    # 2x faster on XLA:CPU than one reduction per tap over everything, and
    # shorter float32 sums.
    products = [tap * dy for tap in _taps(x, (kh, kw), strides, padding)]
    zeros = [jnp.zeros((), dy.dtype)] * len(products)
    per_pixel = jax.lax.reduce(products, zeros, lambda a, b: [u + v for u, v in zip(a, b)], (0,))
    dk = jnp.stack([jnp.sum(p, axis=(0, 1)) for p in per_pixel])
    return dx, dk.reshape(kernel.shape)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def cpu_friendly_conv(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
):
    """``lax.conv_general_dilated`` that avoids XLA:CPU's slow convolutions.

    Same signature and result (up to float rounding) as
    ``lax.conv_general_dilated``; see the comment above for which convolutions
    take another form on CPU. Lowered for any other platform it is exactly
    ``lax.conv_general_dilated``. Pass it as ``nn.Conv(conv_general_dilated=...)``.
    """
    conv = functools.partial(
        jax.lax.conv_general_dilated,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    plan = None
    if batch_group_count == 1 and preferred_element_type is None:
        plan = _conv_plan(
            lhs.shape,
            rhs.shape,
            tuple(window_strides),
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
            jnp.result_type(lhs, rhs),
        )
    if plan is None:
        return conv(lhs, rhs)
    form, padding = plan
    strides = tuple(window_strides)
    if form == "dense":
        cpu = functools.partial(
            _dense_as_matmul, strides=strides, padding=padding, precision=precision
        )
    else:
        cpu = functools.partial(_depthwise_as_shifts, strides=strides, padding=padding)
    return jax.lax.platform_dependent(lhs, rhs, cpu=cpu, default=conv)


# ------------------------------------------------- max pooling on XLA:CPU
#
# nn.max_pool's gradient is select_and_scatter, which XLA:CPU expands into a
# variadic reduce-window carrying four s32 index maps of the padded input, a
# concatenate of those indices and a scatter: ~20% of ResNet-18's CPU step at
# 64 px (issue 23, BUILD_NOTES). On CPU the pool here is the elementwise max
# of its kh*kw strided windows (one fused loop); its gradient routes each
# output gradient to the first maximal window element, as select_and_scatter
# with `>=` does, by interior-padded (strided) placement, again fused loops.
# Same values; gradients equal up to the order of the sums where windows
# overlap. float32 only; other platforms lower nn.max_pool itself.


def _window_max(x, window, strides, padding):
    """(max over the windows, index of the first maximal element per output)."""
    xp = jnp.pad(
        x,
        ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)),
        constant_values=-jnp.inf,
    )
    taps = _taps(xp, window, strides, ((0, 0), (0, 0)))
    y = functools.reduce(jnp.maximum, taps)
    # Last to first, so that the first maximal tap wins.
    first = jnp.full(y.shape, len(taps) - 1, jnp.int8)
    for t in range(len(taps) - 2, -1, -1):
        first = jnp.where(taps[t] == y, jnp.int8(t), first)
    return y, first


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_cpu(x, window, strides, padding):
    return _window_max(x, window, strides, padding)[0]


def _max_pool_cpu_fwd(x, window, strides, padding):
    y, first = _window_max(x, window, strides, padding)
    return y, (first, x.shape)


def _max_pool_cpu_bwd(window, strides, padding, residuals, dy):
    first, (n, h, w, c) = residuals
    (kh, kw), (sh, sw) = window, strides
    hp, wp = h + sum(padding[0]), w + sum(padding[1])
    ho, wo = dy.shape[1:3]
    zero = jnp.zeros((), dy.dtype)
    dx = None
    for t in range(kh * kw):
        i, j = divmod(t, kw)
        # Output (a, b) read padded input (i + sh*a, j + sw*b): place it there.
        placed = jax.lax.pad(
            jnp.where(first == t, dy, zero),
            zero,
            (
                (0, 0, 0),
                (i, hp - i - (ho - 1) * sh - 1, sh - 1),
                (j, wp - j - (wo - 1) * sw - 1, sw - 1),
                (0, 0, 0),
            ),
        )
        dx = placed if dx is None else dx + placed
    (top, _), (left, _) = padding
    return (dx[:, top : top + h, left : left + w, :],)


_max_pool_cpu.defvjp(_max_pool_cpu_fwd, _max_pool_cpu_bwd)


def max_pool(x, window: tuple[int, int], strides: tuple[int, int], padding, cpu: bool = True):
    """``nn.max_pool`` on NHWC input with explicit ((lo, hi), (lo, hi)) padding;
    with ``cpu``, float32 input takes the form above when lowered for CPU (see the
    comment there; other dtypes stay nn.max_pool, as cpu_friendly_conv does)."""
    plain = functools.partial(nn.max_pool, window_shape=window, strides=strides, padding=padding)
    # int8 holds the index of the first maximum: up to 127 taps per window.
    if not cpu or x.ndim != 4 or x.dtype != jnp.float32 or math.prod(window) > 127:
        return plain(x)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    cpu_form = functools.partial(
        _max_pool_cpu, window=tuple(window), strides=tuple(strides), padding=padding
    )
    return jax.lax.platform_dependent(x, cpu=cpu_form, default=plain)


def make_conv(dtype: Dtype, param_dtype: Dtype, cpu_conv: bool = True) -> ModuleDef:
    """nn.Conv partial for the zoo; ``cpu_conv`` selects ``cpu_friendly_conv``
    (same parameters, same results up to float rounding, faster on XLA:CPU)."""
    return functools.partial(
        nn.Conv,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=conv_kernel_init,
        conv_general_dilated=cpu_friendly_conv if cpu_conv else None,
    )


def make_norm(
    *,
    train: bool,
    momentum: float,
    epsilon: float,
    dtype: Dtype,
    param_dtype: Dtype,
    axis_name: str | None,
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
    act: Callable | None = nn.relu

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
