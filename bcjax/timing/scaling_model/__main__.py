"""python -m bcjax.timing.scaling_model {validate,fit,busi,predict} ...

validate --published CSV [CSV ...] --out DIR [--busbw 180e9]   the model against published rows
fit --published CSV [CSV ...] --out DIR [--write]   re-fit (--write: replace fitted.json)
busi --out DIR [--links pcie3-2gpu-nop2p,pcie4]     the study's question, redone
predict --grad-mb 44.7 --fixed-ms 1.66 --per-image-ms 0.057   (ring_model's command line)
"""

from __future__ import annotations

import argparse
import sys

from bcjax.timing.scaling_model import presets, terms


def _predict(a) -> None:
    """Weak scaling for each ``--batches`` (per device); with ``--global-batch`` also the
    study's setting, a fixed global batch split over the devices."""
    model = terms.ComputeModel(a.fixed_ms * 1e-3, a.per_image_ms * 1e-3)
    devices = [int(x) for x in a.devices.split(",")]
    overlap = None if a.overlap == "schedule" else float(a.overlap)
    for link in a.link.split(","):
        note = presets.interconnect(link).note
        if a.busbw:
            link = presets.with_bus_bandwidth(presets.interconnect(link), a.busbw)
        rows = terms.table(
            model,
            a.grad_mb * 1e6,
            devices=devices,
            link=link,
            overlap=overlap,
            per_device_batches=[int(x) for x in a.batches.split(",")],
        )
        print(f"\nSame per-device batch; {note}; overlap {a.overlap}")
        print(terms.format_markdown(rows))
        for g in [int(x) for x in a.global_batch.split(",") if x]:
            print(f"\nGlobal batch {g} split over the devices; {note}; overlap {a.overlap}")
            print(
                terms.format_markdown(
                    terms.strong_scaling_table(
                        model, a.grad_mb * 1e6, g, devices=devices, link=link, overlap=overlap
                    )
                )
            )
        need = terms.batch_for_efficiency(
            model, a.grad_mb * 1e6, max(devices), 0.9, link=link, overlap=overlap
        )
        print(
            f"\n90% efficiency at {max(devices)} devices needs a per-device batch of "
            f"{need if need else 'more than 4096'} (powers of two)."
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bcjax.timing.scaling_model", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="predict every row of a published table")
    v.add_argument(
        "--published", required=True, nargs="+", help="CSV(s) with published_scaling.csv's columns"
    )
    v.add_argument("--out", required=True, help="directory for validation.csv, summary.md, PNG")
    v.add_argument(
        "--busbw",
        type=float,
        default=None,
        help="measured all-reduce bus bandwidth in bytes/s, replacing every preset's",
    )
    f = sub.add_parser("fit", help="fit on the declared subset; leave-one-out errors")
    f.add_argument("--published", required=True, nargs="+")
    f.add_argument("--out", required=True)
    f.add_argument("--write", action="store_true", help="replace the shipped fitted.json")
    b = sub.add_parser("busi", help="ResNet-18 / MobileNetV2 at BUSI's batches on 2, 4, 8 GPUs")
    b.add_argument("--out", required=True)
    b.add_argument(
        "--validation",
        default=None,
        help="accepted for old command lines and ignored: the intervals now come from the "
        "shipped fit's out-of-sample errors (fitted.json)",
    )
    b.add_argument(
        "--links",
        default=None,
        help="interconnect presets, comma separated (default: pcie3-2gpu-nop2p, pcie4, "
        "nvlink4-nvswitch); e.g. pcie3-2gpu-nop2p = 2 GPUs over PCIe 3 without P2P",
    )
    r = sub.add_parser("predict", help="ring_model's tables for one model")
    r.add_argument("--grad-mb", type=float, required=True, help="gradient size in MB (1e6 bytes)")
    r.add_argument("--fixed-ms", type=float, default=0.0, help="per-step compute at any batch")
    r.add_argument("--per-image-ms", type=float, required=True)
    r.add_argument(
        "--link", default="pcie4,nvlink4-nvswitch", help=f"presets: {', '.join(presets.PRESETS)}"
    )
    r.add_argument("--busbw", type=float, default=None, help="measured bus bandwidth, bytes/s")
    r.add_argument(
        "--overlap",
        default="schedule",
        help="'schedule' (buckets against the backward) or a hidden fraction 0..1",
    )
    r.add_argument("--devices", default="1,2,4,8")
    r.add_argument("--batches", default="8,32,128")
    r.add_argument("--global-batch", default="", help="fixed global batches, comma separated")
    a = p.parse_args(argv)
    try:
        if a.command == "validate":
            from bcjax.timing.scaling_model.validate import validate

            validate(a.published, a.out, bus_bandwidth=a.busbw)
        elif a.command == "fit":
            from bcjax.timing.scaling_model.validate import fit_report

            print(fit_report(a.published, a.out, write=a.write))
        elif a.command == "busi":
            from bcjax.timing.scaling_model.busi import write_busi_question

            links = tuple(a.links.split(",")) if a.links else None
            print(write_busi_question(a.out, links))
        else:
            _predict(a)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
