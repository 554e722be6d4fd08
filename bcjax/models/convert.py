"""torchvision ImageNet weights -> bcjax variables, for every model of the zoo.

    variables = convert_state_dict("resnet18", "resnet18.npz", num_classes=3)
    variables = load_pretrained("resnet18", "resnet18.pth", 3, state.variables)

    python -m bcjax.models.convert --model resnet18 --weights resnet18.pth --out resnet18_bcjax.npz

The zoo's submodules are named after torchvision's state_dict (see resnet.py,
mobilenet.py), so conversion is a renaming plus two layout changes: conv
kernels OIHW -> HWIO (depthwise C,1,kh,kw -> kh,kw,1,C falls out of the same
transpose) and Linear (out, in) -> Dense (in, out). BatchNorm weight/bias are
scale/bias, running_mean/var go to batch_stats; num_batches_tracked has no
counterpart (Flax BatchNorm has no step count) and is dropped.

Inputs: a mapping name -> array, a `.npz` written by np.savez(**state_dict) (no
torch needed), a `.npz` written by this module's CLI (bcjax layout), or a
`.pth`/`.pt` file when torch is installed.

This module holds the mapping (bcjax leaf path <-> torchvision key, layouts),
the conversion, the public API and the CLI; reading the files, with their
one-line WeightsFileErrors, is bcjax.models.weights_file (its names stay
importable from here).

Not imported by bcjax.models: the zoo stays jax + flax only. This module adds
numpy, and torch only inside read_state_dict for a .pth.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from bcjax import files
from bcjax.models.family import family_of
from bcjax.models.weights_file import StateDict, read_state_dict
from bcjax.models.weights_file import WeightsFileError as WeightsFileError

IMAGENET_CLASSES = 1000

# Which top-level module is the classifier head of each family. MobileNetV3's
# pre_logits (torchvision classifier.0) is part of the trunk and is kept.
_HEAD = {"resnet": "fc", "mobilenet_v2": "classifier", "mobilenet_v3": "classifier"}

_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _family(model_name: str) -> str:
    for family in ("resnet", "mobilenet_v2", "mobilenet_v3"):
        if model_name.startswith(family):
            return family
    raise ValueError(f"No torchvision converter for model {model_name!r}.")


# ------------------------------------------------------------------ structure


@functools.cache
def _abstract_shapes(model_name: str, num_classes: int) -> tuple:
    """((collection, *module path, leaf), shape) of the model's params and
    batch_stats, from jax.eval_shape: tracing only, no initialisation (a real
    init of ResNet-152 costs XLA:CPU seconds of RNG kernels for nothing).

    Cached and immutable: tracing a big model costs seconds on its own, and a
    process converts the same model rarely more than once or twice.
    """
    import jax
    import jax.numpy as jnp

    import bcjax.models

    model = bcjax.models.create(model_name, num_classes=num_classes)
    shapes = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),  # shapes do not depend on the size
    )
    out = []
    for collection in ("params", "batch_stats"):
        out.extend(((collection,) + path, shape) for path, shape in _flatten(shapes[collection]))
    return tuple(out)


def abstract_shapes(model_name: str, num_classes: int = 3) -> dict:
    """{(collection, *module path, leaf): shape} of `bcjax.models.create(model_name,
    num_classes=num_classes)` (params and batch_stats), by jax.eval_shape."""
    return {path: tuple(s.shape) for path, s in _abstract_shapes(model_name, num_classes)}


def _flatten(tree, prefix=()):
    if isinstance(tree, Mapping):
        for key in tree:
            yield from _flatten(tree[key], prefix + (str(key),))
    else:
        yield prefix, tree


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _torch_module(family: str, modules: tuple, block_parts: list) -> str:
    """torchvision module prefix of a bcjax module path.

    block_parts: the submodule names of the enclosing features_N (MobileNet),
    in call order; torchvision numbers them where bcjax names them.
    """
    top = modules[0]
    if family == "resnet":
        if top in ("conv_init", "bn_init"):
            return {"conv_init": "conv1", "bn_init": "bn1"}[top]
        if top == "fc":
            return "fc"
        stage, block = re.fullmatch(r"layer(\d+)_(\d+)", top).groups()
        sub = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(
            modules[1], modules[1]
        )
        return f"layer{stage}.{block}.{sub}"
    if top == "classifier":
        return "classifier.1" if family == "mobilenet_v2" else "classifier.3"
    if top == "pre_logits":
        return "classifier.0"
    index = int(re.fullmatch(r"features_(\d+)", top).group(1))
    if modules[1] in ("conv", "bn"):  # a plain Conv2dNormActivation (first / last layer)
        return f"features.{index}.{'0' if modules[1] == 'conv' else '1'}"
    part, sub = modules[1], modules[2]
    position = [p for p in ("expand", "depthwise", "se", "project") if p in block_parts].index(part)
    if family == "mobilenet_v2":
        # V2's InvertedResidual.conv is flat at the end: ..., Conv2d, BatchNorm2d.
        if part == "project":
            return f"features.{index}.conv.{position + (sub == 'bn')}"
        return f"features.{index}.conv.{position}.{'0' if sub == 'conv' else '1'}"
    if part == "se":
        return f"features.{index}.block.{position}.{sub}"
    return f"features.{index}.block.{position}.{'0' if sub == 'conv' else '1'}"


def torch_key_map(model_name: str, num_classes: int = IMAGENET_CLASSES) -> dict:
    """{bcjax leaf path ('params', 'layer1_0', 'conv1', 'kernel'): torchvision key
    ('layer1.0.conv1.weight')} for every parameter and BatchNorm statistic."""
    family = _family(model_name)
    shapes = abstract_shapes(model_name, num_classes)
    parts: dict = {}
    for path in shapes:
        if len(path) > 3:
            parts.setdefault(path[1], []).append(path[2])
    mapping = {}
    for path in shapes:
        collection, modules, leaf = path[0], path[1:-1], path[-1]
        prefix = _torch_module(family, modules, parts.get(modules[0], []))
        mapping[path] = f"{prefix}.{_LEAF_NAMES[collection, leaf]}"
    return mapping


def _to_flax(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if leaf == "kernel" and array.ndim == 2:
        return array.T  # Linear (out, in) -> Dense (in, out)
    return array


def _to_torch(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def _torch_shape(shape: tuple, leaf: str) -> tuple:
    return _to_torch(np.empty(shape, np.uint8), leaf).shape


# ------------------------------------------------------------------ layouts


def _is_bcjax_layout(state: Mapping) -> bool:
    return bool(state) and all(k.startswith(("params/", "batch_stats/")) for k in state)


def _bcjax_to_torch(model_name: str, state: Mapping, num_classes: int) -> dict:
    """A file written by this module's CLI back to torchvision names, so that it
    goes through the same checks (and head replacement) as a state_dict."""
    by_path = {tuple(k.split("/")): v for k, v in state.items()}
    out = {}
    for path, key in torch_key_map(model_name, num_classes).items():
        if path in by_path:
            out[key] = _to_torch(by_path.pop(path), path[-1])
    out.update({"/".join(p): v for p, v in by_path.items()})  # reported as unexpected
    return out


def guess_model(state: Mapping) -> str | None:
    """Which torchvision model a state_dict's key names belong to (None if unsure)."""
    keys = set(state)
    if "layer3.0.conv1.weight" in keys:
        blocks = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"layer3\.(\d+)\.", k)))
        bottleneck = "layer1.0.conv3.weight" in keys
        return {
            (False, 2): "resnet18",
            (False, 6): "resnet34",
            (True, 6): "resnet50",
            (True, 23): "resnet101",
            (True, 36): "resnet152",
        }.get((bottleneck, blocks))
    indices = [int(m.group(1)) for k in keys if (m := re.match(r"features\.(\d+)\.", k))]
    if any(".conv." in k for k in keys) and indices:
        return "mobilenet_v2"
    if any(".block." in k for k in keys) and indices:
        return {16: "mobilenet_v3_large", 12: "mobilenet_v3_small"}.get(max(indices))
    return None


# ------------------------------------------------------------------ conversion


def _fresh_head(family: str, fan_in: int, num_classes: int, rng_seed: int) -> dict:
    """A new classifier head with the zoo's own initial distribution
    (layers.py): ResNet fc is torch.nn.Linear's default U(+-1/sqrt(fan_in)) for
    kernel and bias, the MobileNets' classifier N(0, 0.01) with a zero bias.

    Drawn with numpy rather than the jax initialisers: same distributions, but
    no XLA compile of an RNG kernel per head shape (~1-2 s each on a CPU box),
    and seeded by rng_seed alone.
    """
    rng = np.random.default_rng(rng_seed)
    if family == "resnet":
        bound = 1.0 / np.sqrt(fan_in)
        kernel = rng.uniform(-bound, bound, (fan_in, num_classes))
        bias = rng.uniform(-bound, bound, (num_classes,))
    else:
        kernel = rng.normal(0.0, 0.01, (fan_in, num_classes))
        bias = np.zeros((num_classes,))
    return {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}


def _mismatch_error(
    model_name: str, state: Mapping, missing, unexpected, wrong_shapes
) -> ValueError:
    lines = [f"The weights do not fit bcjax's {model_name!r}:"]

    def listing(items, limit=8):
        items = list(items)
        more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    if wrong_shapes:
        lines.append(
            f"  {len(wrong_shapes)} shape mismatch(es): "
            + listing(
                f"{key}: weights {tuple(got)} vs {model_name} {tuple(want)}"
                for key, got, want in wrong_shapes
            )
        )
    if missing:
        lines.append(f"  {len(missing)} missing key(s): {listing(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected key(s): {listing(unexpected)}")
    guess = guess_model(state)
    if guess and guess != model_name:  # the likely cause first
        lines.insert(
            1,
            f"  The key names look like torchvision's {guess!r}; was --model/config.model "
            f"meant to be {guess!r}?",
        )
    return ValueError("\n".join(lines))


def convert_state_dict(
    model_name: str,
    state_dict: StateDict | str | os.PathLike,
    *,
    num_classes: int = 3,
    rng_seed: int = 0,
) -> dict:
    """{"params": ..., "batch_stats": ...} of float32 numpy arrays, the tree of
    `bcjax.models.create(model_name, num_classes=num_classes).init(...)`.

    The classifier head (ResNet fc, MobileNet classifier) is torchvision's when
    its shape fits num_classes (always for ImageNet weights at 1000 classes,
    where it must be present), otherwise a fresh one drawn with `rng_seed`.
    Raises ValueError naming every missing/unexpected key and shape mismatch.
    """
    family = _family(model_name)
    state = read_state_dict(state_dict)
    if _is_bcjax_layout(state):
        state = _bcjax_to_torch(model_name, state, num_classes)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}

    shapes = abstract_shapes(model_name, num_classes)
    key_map = torch_key_map(model_name, num_classes)
    head = _HEAD[family]
    head_paths = [p for p in shapes if p[:2] == ("params", head)]
    # The head is torchvision's when it fits; a head of another size is simply
    # not used (and need not be there) unless the model has 1000 classes.
    keep_head = num_classes == IMAGENET_CLASSES or all(
        key_map[p] in state and np.shape(state[key_map[p]]) == _torch_shape(shapes[p], p[-1])
        for p in head_paths
    )

    missing, wrong_shapes, flat = [], [], {}
    for path, shape in shapes.items():
        key = key_map[path]
        if path in head_paths and not keep_head:
            continue
        if key not in state:
            missing.append(key)
            continue
        want = _torch_shape(shape, path[-1])
        if np.shape(state[key]) != want:
            wrong_shapes.append((key, np.shape(state[key]), want))
            continue
        flat[path] = np.ascontiguousarray(_to_flax(np.asarray(state[key]), path[-1]), np.float32)
    used = set(key_map.values())
    unexpected = sorted(k for k in state if k not in used)
    if missing or unexpected or wrong_shapes:
        raise _mismatch_error(model_name, state, missing, unexpected, wrong_shapes)
    if not keep_head:
        fan_in = shapes[("params", head, "kernel")][0]
        for leaf, value in _fresh_head(family, fan_in, num_classes, rng_seed).items():
            flat[("params", head, leaf)] = value
    return _unflatten(flat)


def _path_names(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def load_pretrained(
    model_name: str,
    path: StateDict | str | os.PathLike,
    num_classes: int,
    variables: Mapping,
    *,
    rng_seed: int = 0,
) -> Mapping:
    """`variables` (a training run's initial tree) with params and batch_stats
    replaced by the converted torchvision weights.

    Same tree structure, dtypes and, for jax arrays, shardings as `variables`;
    other collections are kept as they are. torchvision's weights exist only
    for the full-width models (ResNet width 64, MobileNet width_multiplier 1.0),
    anything else is refused.
    """
    import jax

    converted = convert_state_dict(model_name, path, num_classes=num_classes, rng_seed=rng_seed)
    new = {}
    for collection in ("params", "batch_stats"):
        flat = dict(_flatten(converted[collection]))
        leaves = jax.tree_util.tree_flatten_with_path(variables[collection])[0]
        mine = {_path_names(p): leaf for p, leaf in leaves}
        for leaf_path in sorted(set(flat) | set(mine)):
            got, want = mine.get(leaf_path), flat.get(leaf_path)
            if got is None or want is None or tuple(np.shape(got)) != want.shape:
                name = "/".join((collection,) + leaf_path)
                fam = family_of(model_name)
                knob = f"{fam.width_field}={fam.full_width}"
                raise ValueError(
                    f"variables do not fit the pretrained {model_name} at {name}: variables "
                    f"{None if got is None else tuple(np.shape(got))} vs weights "
                    f"{None if want is None else want.shape}. torchvision weights need the "
                    f"full-width model ({knob}) with num_classes={num_classes}."
                )

        def replace(p, leaf, flat=flat):
            value = flat[_path_names(p)].astype(leaf.dtype)
            if isinstance(leaf, jax.Array):
                # From a callback rather than device_put: also right for a
                # sharding over several processes' devices (each process holds
                # the same converted weights and fills its own devices).
                return jax.make_array_from_callback(value.shape, leaf.sharding, value.__getitem__)
            return value

        new[collection] = jax.tree_util.tree_map_with_path(replace, variables[collection])
    from flax.core import FrozenDict

    if isinstance(variables, FrozenDict):
        return variables.copy(new)
    return {**variables, **new}


# ------------------------------------------------------------------ CLI


def main(argv=None) -> None:
    import bcjax.models

    parser = argparse.ArgumentParser(
        prog="python -m bcjax.models.convert",
        description="Convert torchvision weights (.pth/.pt with torch, or .npz) into a bcjax "
        ".npz that loads without torch (keys 'params/...', 'batch_stats/...').",
    )
    parser.add_argument("--model", required=True, choices=bcjax.models.list_models())
    parser.add_argument("--weights", required=True, help="torchvision state_dict (.pth, .pt, .npz)")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument(
        "--num-classes",
        type=int,
        default=IMAGENET_CLASSES,
        help="1000 keeps torchvision's head (default); else a fresh head",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of a fresh head")
    args = parser.parse_args(argv)
    try:
        variables = convert_state_dict(
            args.model, args.weights, num_classes=args.num_classes, rng_seed=args.seed
        )
    except (ValueError, ImportError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None  # a message, not a traceback
    flat = {"/".join(path): value for path, value in _flatten(variables)}
    out = args.out if args.out.endswith(".npz") else args.out + ".npz"  # as np.savez names it
    files.save_npz(out, **flat)
    count = sum(v.size for k, v in flat.items() if k.startswith("params/"))
    print(f"{args.model}: {len(flat)} arrays, {count:,} parameters -> {out}")


if __name__ == "__main__":
    main()
