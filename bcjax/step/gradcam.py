"""Grad-CAM of a batch: a pure function, compiled once per model and batch shape.

Grad-CAM (Selvaraju et al. 2017): the gradient of one class's logit with
respect to the last convolutional feature map A (the models expose it through
``self.perturb("features", ...)``), channel weights w_k = spatial mean of that
gradient, cam = relu(sum_k w_k A_k), upsampled bilinearly to the input size and
scaled to [0, 1] per image (a cam that is zero everywhere stays zero).

In eval mode examples do not interact (BatchNorm uses its running statistics),
so one pullback of the batch gives every example's gradient, and the backward
pass runs only through the head (pool + dense): a Grad-CAM batch costs about
one forward pass.

    probs, maps, explained = explain_jit(model, variables, images_uint8, class_index)
    probs, maps, explained = explain_in_batches(model, variables, images, batch_size=32)

The jitted functions take the model as a static argument: equal models (the
training loop's and bcjax.predict's for one run) share one compile per shape.
Run them on a float32 copy of the model: bf16 rounding shows in the maps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.data import augment

__all__ = [
    "explain",
    "explain_in_batches",
    "explain_jit",
    "grad_cam",
    "in_batches",
    "lower_in_batches",
    "normalise_maps",
]


def _logits_and_features(model, variables, x, perturbations):
    """Logits, and the feature map the ``features`` hook sees.

    The hook sits right after a direct child of the model (the last ResNet
    block, MobileNet's last 1x1 conv), so that child's output is captured.
    Children are recorded in the order they finish, at trace time: the
    returned collection is a dict whose key order is not promised.
    """
    finished = []

    def direct_children(module, method_name):
        if method_name == "__call__" and len(module.path) == 1:
            finished.append(module.path[0])
            return True
        return False

    logits, state = model.apply(
        {**variables, "perturbations": perturbations},
        x,
        train=False,
        capture_intermediates=direct_children,
        mutable=["intermediates"],
    )
    shape = perturbations["features"].shape
    for name in reversed(finished):
        out = state["intermediates"][name]["__call__"][-1]
        if getattr(out, "shape", None) == shape:
            return logits, out
    raise ValueError(
        f"{type(model).__name__}: no submodule output of shape {shape} feeds its 'features' hook."
    )


def normalise_maps(maps):
    """Each map [.., H, W] divided by its maximum; a map with no positive value
    becomes zeros (no NaN)."""
    peak = jnp.max(maps, axis=(-2, -1), keepdims=True)
    scaled = jnp.where(peak > 0, maps / jnp.where(peak > 0, peak, 1.0), 0.0)
    return jnp.clip(scaled, 0.0, 1.0)


def explain(model, variables, images_uint8, class_index, upsample: bool = True):
    """(probabilities [N, C], maps [N, S, S] in [0, 1], explained class [N]).

    ``images_uint8``: [N, S, S, 3], normalised here as evaluation does.
    ``class_index``: int32 [N], the class whose logit is explained; -1 = the
    predicted one. ``upsample=False`` returns the maps on the feature map's own
    grid [N, h, w] (what bcjax.clinical.grounding wants: it knows the grid then).
    """
    x = augment.normalize(images_uint8)
    hook = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, mutable=["perturbations"])[1], variables, x
    )["perturbations"]
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), hook)
    logits, pullback, features = jax.vjp(
        lambda p: _logits_and_features(model, variables, x, p), zeros, has_aux=True
    )
    target = jnp.where(class_index < 0, jnp.argmax(logits, axis=-1), class_index)
    (grads,) = pullback(jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype))
    weights = jnp.mean(grads["features"], axis=(1, 2))
    cam = jax.nn.relu(jnp.einsum("nhwc,nc->nhw", features.astype(jnp.float32), weights))
    if upsample:
        n, size = images_uint8.shape[0], images_uint8.shape[1:3]
        cam = jax.image.resize(cam, (n, *size), method="bilinear")
    return jax.nn.softmax(logits), normalise_maps(cam), target


def grad_cam(model, variables, images_uint8, class_index, upsample: bool = True):
    """Only the maps of ``explain``: float32 [N, S, S] (or [N, h, w]) in [0, 1]."""
    return explain(model, variables, images_uint8, class_index, upsample)[1]


# Module level, the model static: every caller with an equal model shares the compile.
explain_jit = jax.jit(explain, static_argnums=0, static_argnames="upsample")


def in_batches(fn: Callable, model, variables, batch_size: int, *arrays: np.ndarray) -> Any:
    """``fn(model, variables, *chunk)`` over fixed-size chunks of ``arrays`` (equal
    length; the last chunk zero-padded and its padding dropped from the outputs),
    so the function compiles once; outputs concatenated as numpy."""
    n = len(arrays[0])
    if n == 0:
        raise ValueError("no examples to run")
    size = min(batch_size, n)
    outputs = []
    for start in range(0, n, size):
        stop = min(start + size, n)
        pad = size - (stop - start)
        chunk = [
            np.concatenate([a[start:stop], np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in arrays
        ]
        out = fn(model, variables, *chunk)
        outputs.append(jax.tree.map(lambda o, k=stop - start: np.asarray(o)[:k], out))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def lower_in_batches(model, variables, images_shape, *, batch_size: int = 32, upsample=True):
    """``explain_jit`` lowered for the chunks ``explain_in_batches(model, variables, images,
    batch_size=batch_size, upsample=upsample)`` runs, from shapes alone: ``variables`` may be
    arrays or ``jax.ShapeDtypeStruct``s, ``images_shape`` is [N, S, S, 3] (uint8 images).

    The same jitted function and argument types as that call: compiling the result (on
    another thread, say) leaves the executable in JAX's caches, and the call then neither
    traces nor compiles."""
    size = min(batch_size, images_shape[0])
    return explain_jit.lower(
        model,
        jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), variables),
        jax.ShapeDtypeStruct((size, *images_shape[1:]), np.uint8),
        jax.ShapeDtypeStruct((size,), np.int32),
        upsample=upsample,
    )


def explain_in_batches(
    model,
    variables,
    images_uint8: np.ndarray,
    class_index=None,
    *,
    batch_size: int = 32,
    upsample: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``explain_jit`` over all of ``images_uint8`` [N, S, S, 3] in batches of
    ``batch_size``; ``class_index`` None (each image's predicted class) or int [N];
    ``upsample`` as for ``explain``."""
    images_uint8 = np.asarray(images_uint8)
    if class_index is None:
        class_index = np.full(len(images_uint8), -1, np.int32)
    return in_batches(
        functools.partial(explain_jit, upsample=upsample),
        model,
        variables,
        batch_size,
        images_uint8,
        np.asarray(class_index, np.int32),
    )
