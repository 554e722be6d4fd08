"""Numerical check of bcjax.models.convert against torchvision itself.

Two halves, run in two environments (torch and jax never share one here):

    # 1. with torch + torchvision (not bcjax dependencies: a virtual environment of
    #    their own, here $TORCH_VENV): random torchvision models with non-trivial
    #    BatchNorm, their state_dicts, an input batch, fp32 logits, and the key/shape
    #    manifest used by tests/test_convert.py
    $TORCH_VENV/bin/python tools/torchvision_check.py export --dir /tmp/tv_check \
        [--manifest tests/data/torchvision_keys.json]

    # 2. with bcjax (jax + flax, no torch): convert, run, compare
    python tools/torchvision_check.py compare --dir /tmp/tv_check

ImageNet weights are not needed (nor downloadable everywhere): a random model
exercises every mapping as long as nothing is an identity. So BatchNorm running
statistics are first calibrated on random images (real activation scales, no
blow-up through 50 residual blocks), then perturbed, and BN affine parameters
and all biases (zeros in torchvision's init, e.g. the SE convs) are randomised;
a swapped mean/var, a missing bias or a wrong epsilon then shows in the logits.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

MODELS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
)
IMAGE_SIZE = 224
BATCH = 2


# ---------------------------------------------------------------- export (torch)


def _randomise(model, torch, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        # Calibrate: cumulative average (momentum None) of real batch statistics.
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for _ in range(2):
            model(torch.randn(8, 3, 128, 128, generator=gen))
        model.eval()
        for m in norms:
            m.running_mean += (
                0.1 * torch.randn(m.num_features, generator=gen) * m.running_var.sqrt()
            )
            m.running_var *= torch.empty(m.num_features).uniform_(0.5, 2.0, generator=gen)
            m.weight.copy_(torch.empty(m.num_features).uniform_(0.5, 1.5, generator=gen))
            m.bias.copy_(0.2 * torch.randn(m.num_features, generator=gen))
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))


def _manifest_json(keys: dict, origin: str) -> str:
    # One tensor a line: small, diffable, still plain JSON.
    lines = ["{", f'"_generated_by": {json.dumps(origin)},']
    for i, (name, entries) in enumerate(keys.items()):
        body = ",\n".join("  " + json.dumps(e) for e in entries)
        lines.append(f'"{name}": [\n{body}\n]' + ("," if i < len(keys) - 1 else ""))
    return "\n".join(lines) + "\n}\n"


def export(directory: str, manifest: str | None) -> None:
    import torch
    import torchvision

    torch.set_num_threads(2)
    os.makedirs(directory, exist_ok=True)
    gen = torch.Generator().manual_seed(1234)
    images = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    np.save(os.path.join(directory, "images_nchw.npy"), images.numpy())
    keys = {}
    for index, name in enumerate(MODELS):
        start = time.time()
        torch.manual_seed(index)
        model = getattr(torchvision.models, name)(weights=None)
        _randomise(model, torch, seed=100 + index)
        with torch.no_grad():
            logits = model(images)
        state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        np.savez(os.path.join(directory, f"{name}_state.npz"), **state)
        np.save(os.path.join(directory, f"{name}_logits.npy"), logits.numpy())
        keys[name] = [[k, list(v.shape)] for k, v in state.items()]
        print(
            f"{name}: {len(state)} tensors, logits {tuple(logits.shape)}, "
            f"{time.time() - start:.1f} s",
            flush=True,
        )
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__}
    for path in filter(None, (os.path.join(directory, "torchvision_keys.json"), manifest)):
        with open(path, "w") as f:
            f.write(_manifest_json(keys, f"tools/torchvision_check.py export, {versions}"))
        print("manifest ->", path)


# ---------------------------------------------------------------- compare (jax)


def _errors(ours: np.ndarray, theirs: np.ndarray) -> tuple:
    diff = np.abs(ours - theirs)
    scale = np.abs(theirs).max()
    # Elementwise |a-b|/|b| blows up on the few logits that happen to be near
    # zero, so its max is taken with |b| floored at 1% of the largest logit.
    elementwise = diff / np.maximum(np.abs(theirs), 1e-2 * scale)
    median = np.median(diff / np.maximum(np.abs(theirs), np.finfo(np.float32).tiny))
    top1 = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
    return diff.max() / scale, median, elementwise.max(), diff.max(), scale, top1


def compare(directory: str) -> None:
    import functools
    import platform

    import jax
    import jax.numpy as jnp

    import bcjax.models
    from bcjax.models import convert

    images = np.load(os.path.join(directory, "images_nchw.npy")).transpose(0, 2, 3, 1)
    rows = []
    for name in MODELS:
        start = time.time()
        variables = convert.convert_state_dict(
            name, os.path.join(directory, f"{name}_state.npz"), num_classes=1000
        )
        model = bcjax.models.create(name, num_classes=1000)
        apply = jax.jit(functools.partial(model.apply, train=False))
        ours = np.asarray(apply(variables, jnp.asarray(images)))
        np.save(os.path.join(directory, f"{name}_bcjax_logits.npy"), ours)
        theirs = np.load(os.path.join(directory, f"{name}_logits.npy"))
        rows.append((name, *_errors(ours, theirs), time.time() - start))
        print(f"{name}: done in {time.time() - start:.0f} s", flush=True)
    print(
        f"\njax {jax.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, fp32, eval mode, batch {BATCH} at {IMAGE_SIZE} px, 1000 classes\n"
    )
    print(
        "| model | max abs err / max abs logit | elementwise rel err: median | max (floor 1e-2) "
        "| max abs err | max abs logit | top-1 agree | s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, rel, median, elem, abs_err, scale, top1, secs in rows:
        print(
            f"| {name} | {rel:.2e} | {median:.2e} | {elem:.2e} | {abs_err:.2e} | {scale:.3g} "
            f"| {top1:.0%} | {secs:.0f} |"
        )
    worst = max(r[1] for r in rows)
    print(
        f"\nworst max-relative error {worst:.2e}: {'PASS' if worst <= 1e-4 else 'FAIL'} "
        "(target 1e-4)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("export", "compare"))
    parser.add_argument("--dir", required=True, help="folder for the (large) intermediate files")
    parser.add_argument("--manifest", help="export: also write the key/shape manifest here")
    args = parser.parse_args()
    export(args.dir, args.manifest) if args.mode == "export" else compare(args.dir)


if __name__ == "__main__":
    main()
