"""The scaling model on models it was never fitted on: the shared tables' 54 rows whose
``params`` are blank (ResNeXt101-32x4d, SE-ResNeXt101-32x4d, EfficientNet-v2-S and the
EfficientNet-WideSE variants), with parameter counts filled here, validated with the shipped
(fitted) parameters. None of these rows enters the fit: `validate` calls them not predictable.

    python tools/scaling_heldout_models.py --out results/scaling_validation/heldout_models

Parameter counts: ResNeXt and SE-ResNeXt counted below layer by layer (the same count gives
torchvision's ResNet-50/101, checked in tests); EfficientNet-v2-S is torchvision 0.29.1's
efficientnet_v2_s (21,458,488, counted on CPU-dev, 2026-11-30); the WideSE variants are given
their base model's count (B0 5,288,548, B4 19,341,616, as the shared file prints), a stated
approximation. The count only sizes the all-reduce (under 1% of these steps): the script
re-runs the check with every filled count halved and doubled to show it does not matter.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import sys
import tempfile

from bcjax.timing.scaling_model import validate

ROOT = pathlib.Path(__file__).resolve().parents[1]


def resnext_params(
    layers=(3, 4, 23, 3), groups=32, width_per_group=4, se=False, num_classes=1000
) -> int:
    """Trainable parameters of a (SE-)ResNeXt with bottleneck blocks (BN: scale and bias;
    SE: two 1x1 convs with bias, reduction 16). groups=1, width_per_group=64 is ResNet."""
    total = 3 * 64 * 7 * 7 + 2 * 64  # stem conv + BN
    inplanes = 64
    for planes, blocks in zip((64, 128, 256, 512), layers):
        width = int(planes * width_per_group / 64) * groups
        out = 4 * planes
        for b in range(blocks):
            total += inplanes * width + 2 * width  # 1x1 + BN
            total += width * (width // groups) * 9 + 2 * width  # grouped 3x3 + BN
            total += width * out + 2 * out  # 1x1 + BN
            if b == 0:
                total += inplanes * out + 2 * out  # projection shortcut + BN
            if se:
                squeezed = out // 16
                total += out * squeezed + squeezed + squeezed * out + out
            inplanes = out
    return total + inplanes * num_classes + num_classes


FILLED = {
    "ResNeXt101-32x4d": resnext_params(),
    "SE-ResNeXt101-32x4d": resnext_params(se=True),
    "EfficientNet-v2-S": 21_458_488,
    "efficientnet-widese-b0": 5_288_548,
    "efficientnet-widese-b4": 19_341_616,
}


def heldout_rows(published: pathlib.Path, scale: float = 1.0) -> tuple[list[str], list[dict]]:
    """The rows of the models not in bcjax's zoo, params filled (times ``scale``)."""
    with open(published, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = list(reader.fieldnames), list(reader)
    out = []
    for r in rows:
        if not r["params"].strip() and r["model"] in FILLED:
            out.append({**r, "params": str(round(FILLED[r["model"]] * scale))})
    return fields, out


def _validate(published: pathlib.Path, scale: float, target: pathlib.Path) -> tuple:
    """(rows, model MAE, naive MAE) in points for the held-out rows, counts times scale."""
    fields, rows = heldout_rows(published, scale)
    target.mkdir(parents=True, exist_ok=True)
    csv_path = target / "published_heldout_models.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    records = [r for r in validate.validate(str(csv_path), str(target)) if r["error"] != ""]
    n = len(records)
    return (
        n,
        100 * sum(abs(r["error"]) for r in records) / n,
        100 * sum(abs(r["naive_error"]) for r in records) / n,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--published", default=ROOT / "tests" / "data" / "published_scaling.csv")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    maes = {}
    with tempfile.TemporaryDirectory() as scratch:
        for scale in (1.0, 0.5, 2.0):
            # only the unscaled run's files are kept; the others just give their MAE
            target = out if scale == 1.0 else pathlib.Path(scratch) / f"x{scale:g}"
            maes[scale] = _validate(pathlib.Path(args.published), scale, target)
    lines = [
        f"params x{scale:g}: {n} rows, MAE {mae:.2f} points (naive {naive:.2f})"
        for scale, (n, mae, naive) in maes.items()
    ]
    (out / "heldout.md").write_text(
        "# Scaling model on models it was never fitted on\n\n"
        + "\n".join(f"- {line}" for line in lines)
        + "\n\nPer model and per GPU count: summary.md.\n"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
