"""Per-layer parameters and FLOPs: when each gradient becomes ready in the backward pass.

A profile is a tuple of layers from input to output, each (name, params, flops). The
backward pass runs from the output layer back, so a layer's gradient is ready once the
backward has worked through it and every layer after it; with backward FLOPs proportional to
forward FLOPs, layer i is ready at sum(flops[i:]) / sum(flops) of the backward.

Where the profiles come from:
- documented shapes built here: VGG16 and AlexNet (torchvision's layer shapes, 224 px;
  61,100,840 and 138,357,544 parameters, as the shared tables print), ResNet-18 ... 152,
  ResNeXt-101 32x4d and SE-ResNeXt-101 32x4d (bottleneck layout; the ResNet counts equal
  bcjax's zoo, which equals torchvision's, checked in a test);
- a ``layer_params`` column in a published CSV: per-layer parameter counts from input to
  output separated by ';', each optionally 'params:flops' (equal FLOPs per layer if absent);
- any other model with only ``params``: ``uniform`` layers (gradients ready evenly through
  the backward), a stated assumption.
"""

from __future__ import annotations

import re

Layer = tuple[str, int, float]
# Models outside the zoo and the builders below, with their documented parameter count.
KNOWN_PARAMS = {
    # Keras Applications' table lists InceptionV3 at 23.9M parameters (no auxiliary head).
    "inceptionv3": (23_900_000, "InceptionV3 23.9M parameters (Keras Applications table)"),
    # torchvision 0.29.1's efficientnet_v2_s, counted on CPU-dev (BUILD_NOTES, session 5)
    "efficientnetv2s": (21_458_488, "EfficientNet-v2-S 21,458,488 (torchvision efficientnet_v2_s)"),
    # Published counts of common models outside the zoo (so that a table that leaves params
    # blank still gets a prediction; the papers' rounded figures):
    # EfficientNet, Tan & Le 2019, Table 2.
    **{
        f"efficientnetb{i}": (n, f"EfficientNet-B{i} {n / 1e6:g}M parameters (Tan & Le 2019)")
        for i, n in enumerate(
            (5_300_000, 7_800_000, 9_200_000, 12_000_000, 19_000_000, 30_000_000)
            + (43_000_000, 66_000_000)
        )
    },
    # BERT, Devlin et al. 2019, section 3: BASE 110M, LARGE 340M.
    "bertbase": (110_000_000, "BERT-base 110M parameters (Devlin et al. 2019)"),
    "bertlarge": (340_000_000, "BERT-large 340M parameters (Devlin et al. 2019)"),
    # The Transformer, Vaswani et al. 2017, Table 3: base 65M, big 213M.
    "transformerbase": (65_000_000, "Transformer base 65M parameters (Vaswani et al. 2017)"),
    "transformerbig": (213_000_000, "Transformer big 213M parameters (Vaswani et al. 2017)"),
    # GPT-2, Radford et al. 2019, Table 2.
    "gpt2": (117_000_000, "GPT-2 117M parameters (Radford et al. 2019)"),
    "gpt2medium": (345_000_000, "GPT-2 medium 345M parameters (Radford et al. 2019)"),
    "gpt2large": (762_000_000, "GPT-2 large 762M parameters (Radford et al. 2019)"),
    "gpt2xl": (1_542_000_000, "GPT-2 XL 1542M parameters (Radford et al. 2019)"),
}
UNIFORM_LAYERS = 50


def _conv(name, cin, cout, k, out_hw, *, groups=1, bias=False, bn=True) -> list[Layer]:
    weights = k * k * (cin // groups) * cout
    layers = [(name, weights + (cout if bias else 0), float(weights * out_hw * out_hw))]
    if bn:  # BatchNorm scale and bias: tiny, but a tensor of their own
        layers.append((f"{name}/bn", 2 * cout, float(2 * cout * out_hw * out_hw)))
    return layers


def _fc(name, cin, cout) -> list[Layer]:
    return [(name, cin * cout + cout, float(cin * cout))]


def vgg16(num_classes: int = 1000) -> tuple[Layer, ...]:
    layers: list[Layer] = []
    cin, hw = 3, 224
    for stage, (width, convs) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
        for i in range(convs):
            layers += _conv(f"conv{stage + 1}_{i + 1}", cin, width, 3, hw, bias=True, bn=False)
            cin = width
        hw //= 2
    layers += _fc("fc6", 512 * 7 * 7, 4096) + _fc("fc7", 4096, 4096)
    return tuple(layers + _fc("fc8", 4096, num_classes))


def alexnet(num_classes: int = 1000) -> tuple[Layer, ...]:
    spec = ((3, 64, 11, 55), (64, 192, 5, 27), (192, 384, 3, 13), (384, 256, 3, 13))
    layers: list[Layer] = []
    for i, (cin, cout, k, hw) in enumerate(spec + ((256, 256, 3, 13),)):
        layers += _conv(f"conv{i + 1}", cin, cout, k, hw, bias=True, bn=False)
    layers += _fc("fc6", 256 * 6 * 6, 4096) + _fc("fc7", 4096, 4096)
    return tuple(layers + _fc("fc8", 4096, num_classes))


def resnet(
    layers_per_stage=(3, 4, 6, 3),
    *,
    bottleneck=True,
    groups=1,
    width_per_group=64,
    se=False,
    num_classes=1000,
) -> tuple[Layer, ...]:
    """ResNet v1.5 / ResNeXt / SE-ResNeXt at 224 px (torchvision's layout; SE: two 1x1
    convs with bias, reduction 16)."""
    out: list[Layer] = _conv("stem", 3, 64, 7, 112)
    inplanes, hw = 64, 56
    for s, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers_per_stage)):
        if s:
            hw //= 2
        expansion = 4 if bottleneck else 1
        width = int(planes * width_per_group / 64) * groups if bottleneck else planes
        cout = planes * expansion
        for b in range(blocks):
            name = f"layer{s + 1}.{b}"
            if bottleneck:
                out += _conv(f"{name}.conv1", inplanes, width, 1, hw)
                out += _conv(f"{name}.conv2", width, width, 3, hw, groups=groups)
                out += _conv(f"{name}.conv3", width, cout, 1, hw)
            else:
                out += _conv(f"{name}.conv1", inplanes, cout, 3, hw)
                out += _conv(f"{name}.conv2", cout, cout, 3, hw)
            if se:
                squeezed = cout // 16
                out += _fc(f"{name}.se1", cout, squeezed) + _fc(f"{name}.se2", squeezed, cout)
            if b == 0 and (s or inplanes != cout):
                out += _conv(f"{name}.downsample", inplanes, cout, 1, hw)
            inplanes = cout
    return tuple(out + _fc("fc", inplanes, num_classes))


def uniform(params: int, layers: int = UNIFORM_LAYERS) -> tuple[Layer, ...]:
    """``layers`` equal layers of equal FLOPs: gradients ready evenly through the backward."""
    each = params // layers
    sizes = [each] * (layers - 1) + [params - each * (layers - 1)]
    return tuple((f"layer{i}", size, 1.0) for i, size in enumerate(sizes))


def from_text(text: str) -> tuple[Layer, ...] | None:
    """A ``layer_params`` cell: 'p1;p2;...' or 'p1:f1;p2:f2;...' from input to output."""
    layers = []
    for i, item in enumerate(x for x in re.split(r"[;|]", text or "") if x.strip()):
        params, _, flops = item.partition(":")
        try:
            layers.append((f"layer{i}", int(float(params)), float(flops) if flops else 1.0))
        except ValueError:
            return None
    return tuple(layers) or None


def _key(name: str) -> str:
    key = re.sub(r"[^a-z0-9]", "", (name or "").lower())
    return re.sub(r"v15$", "", key)


_RESNETS = {
    "resnet18": dict(layers_per_stage=(2, 2, 2, 2), bottleneck=False),
    "resnet34": dict(layers_per_stage=(3, 4, 6, 3), bottleneck=False),
    "resnet50": dict(layers_per_stage=(3, 4, 6, 3)),
    "resnet101": dict(layers_per_stage=(3, 4, 23, 3)),
    "resnet152": dict(layers_per_stage=(3, 8, 36, 3)),
    "resnext10132x4d": dict(layers_per_stage=(3, 4, 23, 3), groups=32, width_per_group=4),
    "seresnext10132x4d": dict(
        layers_per_stage=(3, 4, 23, 3), groups=32, width_per_group=4, se=True
    ),
}


def documented(model_name: str, num_classes: int = 1000) -> tuple[Layer, ...] | None:
    """The built profile of a model this module knows by name; None otherwise. Matches the
    name's leading words ('ResNet-50 v1.5', 'ResNet-50 (tf_cnn_benchmarks resnet50)')."""
    key = _key(re.split(r"[(\[]", model_name or "")[0])
    if key in ("vgg16", "vgg"):
        return vgg16(num_classes)
    if key == "alexnet":
        return alexnet(num_classes)
    if key in _RESNETS:
        return resnet(num_classes=num_classes, **_RESNETS[key])
    return None


def known_params(model_name: str) -> tuple[int, str] | None:
    """The documented count of the longest ``KNOWN_PARAMS`` name the model's name starts
    with ('BERT-Large Uncased' -> BERT-large, 'GPT-2 medium' -> GPT-2 medium); None if none."""
    key = _key(re.split(r"[(\[]", model_name or "")[0])
    names = [name for name in KNOWN_PARAMS if key.startswith(name)]
    return KNOWN_PARAMS[max(names, key=len)] if names else None


def total_params(profile) -> int:
    return sum(p for _, p, _ in profile)
