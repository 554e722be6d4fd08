"""Step throughput and its breakdown, models x per-device batch x device counts.

The command line of ``python -m bcjax.benchmark`` (see bcjax.benchmark): flags
(``parse_args``), the loop over cases with its printed lines and tables
(``main``), ``--ablate``'s step ladder (``run_ablation``) and ``--input``'s host
pipeline throughput (``measure_input``). Cases are built and timed in
bcjax.benchmark.steps, tables and files written by bcjax.benchmark.report, the
clinical report's time and cold/warm compiles reported by bcjax.benchmark.fixed_costs.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import logging
import pathlib
import sys
import time
from collections.abc import Sequence

from bcjax.benchmark import fixed_costs
from bcjax.benchmark.report import (
    COLUMNS,
    anchor_rows,
    case_line,
    load_anchors,
    markdown_table,
    ring_predictions,
    to_row,
    write_outputs,
)
from bcjax.benchmark.steps import _model_and_state, random_batch, run_case


def _csv_ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bcjax.benchmark", description=__doc__.split("\n")[0]
    )
    p.add_argument("--models", default="resnet18,resnet50,mobilenet_v2,mobilenet_v3_large")
    p.add_argument("--batch", default="32,128", help="per-device batch sizes, comma separated")
    p.add_argument("--devices", default="1", help="device counts, comma separated")
    p.add_argument("--strategy", default="shard_map", choices=("shard_map", "pmap", "jit"))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--steps", type=int, default=20, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--width", type=int, default=None, help="ResNet stem width (tiny tests)")
    p.add_argument("--width-multiplier", type=float, default=None, help="MobileNet width")
    p.add_argument("--augment", action="store_true", help="include on-device augmentation")
    p.add_argument(
        "--compile-cache",
        action="store_true",
        help="also time cold/warm compiles with a persistent cache (2 more compiles)",
    )
    p.add_argument(
        "--clinical",
        action="store_true",
        help="also time the clinical report (bootstrap) on a BUSI-sized test part "
        "(alone: --models= --clinical)",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="record a jax.profiler trace per case under DIR and sum collectives",
    )
    p.add_argument(
        "--ring",
        default="pcie4,nvlink_h100",
        help="interconnect presets for the ring all-reduce prediction ('' = none)",
    )
    p.add_argument(
        "--anchors",
        default=None,
        metavar="JSONL",
        help="JSON lines {fw, model, batch, img_s} of other frameworks' steps timed on the "
        "same machine (e.g. tools/torch_cpu_step.py's): adds ratios",
    )
    p.add_argument(
        "--ablate",
        action="store_true",
        help="one device: time the step ladder of bcjax.timing.ablation instead",
    )
    p.add_argument("--input", action="store_true", help="also measure the host input pipeline")
    p.add_argument("--input-images", type=int, default=512)
    p.add_argument("--input-workers", type=int, default=None)
    p.add_argument(
        "--input-decode-images",
        type=int,
        default=64,
        help="synthetic images decoded once, then tiled to --input-images",
    )
    p.add_argument(
        "--out", default=None, help="folder for benchmark.csv / benchmark.json / benchmark.md"
    )
    return p.parse_args(argv)


def measure_input(args) -> dict | None:
    try:
        from bcjax.data import throughput
    except ImportError as e:
        print(f"input pipeline: bcjax.data.throughput is not available ({e})")
        return None
    kwargs = dict(
        image_size=args.image_size,
        batch_size=max(_csv_ints(args.batch)),
        num_images=args.input_images,
        decode_images=args.input_decode_images,
    )
    if args.input_workers is not None:
        kwargs["workers"] = args.input_workers
    result = throughput.measure(**kwargs)
    print(
        "input pipeline: "
        + ", ".join(
            f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in result.items()
            if not isinstance(v, (dict, list))
        )
    )
    return result


def run_ablation(args, models: Sequence[str], batches: Sequence[int], header: str) -> list[dict]:
    """--ablate: the step ladder per model x batch on one device; tables and files."""
    import jax

    from bcjax.timing import ablation

    anchors = load_anchors(args.anchors) if args.anchors else {}
    rows, lines, facts = [], [], {}
    for model_name in models:
        for b in batches:
            t0 = time.perf_counter()
            try:
                _, model, _, state = _model_and_state(model_name, 1, args)
                result = ablation.ladder(
                    model,
                    state,
                    random_batch(b, args.image_size),
                    jax.random.key(0),
                    warmup=args.warmup,
                    iters=args.steps,
                )
            except Exception as e:  # e.g. out of memory: keep the other cases
                logging.exception("ablation %s b=%d failed", model_name, b)
                lines.append(
                    f"{model_name} b={b}: ERROR {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                )
                print(lines[-1], flush=True)
                continue
            facts = {k: v for k, v in result.items() if k != "rows"}
            case = [{"model": model_name, **r} for r in ablation.format_rows(result["rows"])]
            rows.extend(case)
            print(
                markdown_table(case, ablation.COLUMNS) + f"\n[{time.perf_counter() - t0:.0f} s]",
                flush=True,
            )
            line = ablation.anchor_line(model_name, b, result["rows"], anchors)
            if line:
                lines.append(line)
                print(line, flush=True)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "ablation.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=ablation.COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow({c: r.get(c) for c in ablation.COLUMNS})
        (out / "ablation.json").write_text(
            json.dumps(
                {
                    "header": header,
                    "device": facts,
                    "args": vars(args),
                    "rows": rows,
                    "anchor_lines": lines,
                },
                indent=1,
                default=str,
            )
        )
        (out / "ablation.md").write_text(
            f"{header}\n\n{markdown_table(rows, ablation.COLUMNS)}\n\n"
            + "".join(f"- {line}\n" for line in lines)
        )
        print(f"\nwrote {out / 'ablation.csv'}, ablation.json, ablation.md")
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    batches = _csv_ints(args.batch)
    device_counts = [1] if args.ablate else _csv_ints(args.devices)

    from bcjax.parallel import mesh as mesh_lib

    mesh_lib.ensure_devices(max(device_counts))  # before JAX starts

    import jax

    import bcjax.models
    from bcjax.timing import breakdown

    unknown = [m for m in models if m not in bcjax.models.list_models()]
    if unknown:
        sys.exit(f"unknown model(s) {unknown}; valid: {', '.join(bcjax.models.list_models())}")
    have = len(jax.devices())
    if max(device_counts) > have:
        sys.exit(
            f"--devices {args.devices} but only {have} {jax.devices()[0].platform} device(s) exist"
        )
    from bcjax.timing import devices as devices_lib

    info = devices_lib.describe()
    simulated = info["platform"] == "cpu" and max(device_counts) > 1
    header = (
        f"bcjax benchmark {datetime.datetime.now():%Y-%m-%d %H:%M}, jax {jax.__version__}, "
        f"{have} x {info['device_kind']} ({info['platform']}), strategy {args.strategy}, "
        f"{args.steps} timed steps after {args.warmup} warm-up, synthetic in-memory data"
        + (", with augmentation" if args.augment else "")
    )
    if args.ablate:  # one device, its own strategies, no augmentation
        header = (
            f"bcjax step ablation {datetime.datetime.now():%Y-%m-%d %H:%M}, jax {jax.__version__}, "
            f"1 x {info['device_kind']} ({info['platform']}), {args.dtype}, {args.image_size} px, "
            f"{args.steps} timed steps after {args.warmup} warm-up, synthetic in-memory data"
        )
        print(header, flush=True)
        if info["platform"] == "cpu":
            print(
                "NOTE: on a CPU the rungs' step times say little about an accelerator; "
                "FLOPs and bytes "
                "accessed are XLA:CPU's count of the compiled programs",
                flush=True,
            )
        return run_ablation(args, models, batches, header)
    print(header, flush=True)
    if simulated:
        print("NOTE: " + breakdown.SIMULATED_NOTE, flush=True)

    rows, results = [], []
    for model_name in models:
        for b in batches:
            for n in device_counts:
                t0 = time.perf_counter()
                try:
                    r = run_case(model_name, b, n, args)
                    row = to_row(model_name, r, args)
                    results.append({"model": model_name, **r})
                except Exception as e:  # one failing case (e.g. OOM) must not lose the others
                    logging.exception("case %s b=%d n=%d failed", model_name, b, n)
                    row = {c: None for c in COLUMNS}
                    row.update(
                        model=model_name,
                        per_device_batch=b,
                        devices=n,
                        error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                    )
                rows.append(row)
                print(case_line(row) + f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
                if not row.get("error"):
                    for line in fixed_costs.compile_cache_lines(model_name, results[-1]):
                        print("  " + line, flush=True)
                    # Timing relations a quiet machine keeps (unit tests do not ask them).
                    for problem in breakdown.check(results[-1], tolerance=0.25):
                        print(f"  NOTE, a noisy measurement? {problem}", flush=True)
                if args.out:  # after every case: a run cut short keeps what it measured
                    write_outputs(
                        pathlib.Path(args.out), header, simulated, args, rows, results, {}
                    )
                gc.collect()

    if rows:
        print()
        print(markdown_table(rows))
    if simulated:
        print("\n(timings simulated: CPU devices sharing one host)")
    extra = {}
    links = [x for x in args.ring.split(",") if x]
    if links:
        preds = ring_predictions(rows, links)
        if preds:
            extra["scaling_predictions"] = preds
            extra["ring_model"] = preds  # the old name (before scaling_model), for old readers
            print(
                "\nRing all-reduce prediction (bcjax.timing.scaling_model; same per-device batch, "
                "measured 1-device compute, stated interconnect assumptions):"
            )
            print(
                markdown_table(
                    [p for p in preds if "note" not in p],
                    (
                        "model",
                        "interconnect",
                        "devices",
                        "per_device_batch",
                        "compute_ms",
                        "allreduce_ms",
                        "img_s",
                        "efficiency",
                    ),
                )
            )
            for p in preds:
                if "note" in p:
                    print(
                        f"  {p['model']} on {p['interconnect']}: 90% efficiency at 8 devices needs "
                        f"per-device batch >= {p['per_device_batch'] or '> 4096'}"
                    )
    if args.anchors:
        arows = anchor_rows(rows, load_anchors(args.anchors))
        extra["anchors"] = arows
        print("\nAgainst the anchors measured in the same call:")
        print(
            markdown_table(
                arows,
                (
                    "model",
                    "batch",
                    "bcjax_img_s",
                    "torch_img_s",
                    "ratio_vs_torch",
                    "jax-flax-linen_img_s",
                    "ratio_vs_jax-flax-linen",
                ),
            )
        )
    if args.input:
        extra["input"] = measure_input(args)
    if args.clinical:
        extra["clinical"] = fixed_costs.measure_clinical()
        print("\n" + fixed_costs.clinical_line(extra["clinical"]), flush=True)

    if args.out:
        write_outputs(pathlib.Path(args.out), header, simulated, args, rows, results, extra)
        print(f"\nwrote {pathlib.Path(args.out) / 'benchmark.csv'}, benchmark.json, benchmark.md")
    return rows
