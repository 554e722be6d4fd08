"""Step throughput and its breakdown, models x per-device batch x device counts.

    python -m bcjax.benchmark --models resnet18,resnet50,mobilenet_v2,mobilenet_v3_large \\
        --batch 32,128 --devices 1 --dtype bfloat16 --image-size 224 --out runs/bench

Synthetic in-memory data (random uint8 images, already decoded): this times
the training step alone, as compiled for the run (normalisation on device;
``--augment`` adds the on-device augmentation). Each case compiles once and
then times ``--steps`` synchronised steps after ``--warmup``; one line per
case as it finishes, a Markdown table at the end, CSV and JSON in ``--out``.
``--input`` adds the host input pipeline's throughput (bcjax.data.throughput).
On a CPU, device counts above 1 are simulated: the output says so.

``--ablate`` times instead, on one device, a ladder of steps from a plain
anchor-like step up to bcjax's (bcjax.timing.ablation): what the model
definition and each extra of the step (uint8 input, metrics, gradient norm,
NaN/Inf guard, shard_map) cost. Writes ablation.csv/.json/.md.
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

from bcjax.data import busi

COLUMNS = (
    "model",
    "strategy",
    "devices",
    "per_device_batch",
    "global_batch",
    "image_size",
    "dtype",
    "step_ms",
    "step_ms_p10",
    "step_ms_p90",
    "img_s",
    "img_s_per_device",
    "img_s_pipelined",
    "compute_ms",
    "exposed_collective_ms",
    "allreduce_ms",
    "lower_s",
    "compile_s",
    "gflop_per_device_step",
    "tflop_s_per_device",
    "utilisation",
    "peak_mem_mb",
    "params",
    "gradient_mb",
    "platform",
    "device_kind",
    "simulated",
    "error",
)


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
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
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
        help="JSON lines of ../shared/bench/anchor_step.py from the same machine: adds ratios",
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


def _model_kwargs(name: str, args) -> dict:
    if name.startswith("resnet"):
        return {} if args.width is None else {"width": args.width}
    return {} if args.width_multiplier is None else {"width_multiplier": args.width_multiplier}


# The benchmark times BUSI's setting: its classes.
NUM_CLASSES = len(busi.CLASSES)


def random_batch(global_batch: int, image_size: int, seed: int = 0) -> dict:
    """Decoded uint8 images and labels, as the host pipeline hands them over."""
    import numpy as np

    rs = np.random.default_rng(seed)
    return {
        "image": rs.integers(0, 256, (global_batch, image_size, image_size, 3), dtype=np.uint8),
        "label": rs.integers(0, NUM_CLASSES, (global_batch,), dtype=np.int32),
        "index": np.arange(global_batch, dtype=np.int32),
    }


def _model_and_state(model_name: str, num_devices: int, args):
    """The model, its optimizer and a fresh TrainState on a mesh of num_devices."""
    import jax.numpy as jnp

    import bcjax.models
    from bcjax.parallel import mesh as mesh_lib
    from bcjax.step import optim
    from bcjax.step import state as state_lib

    mesh = mesh_lib.make_mesh(num_devices)
    model = bcjax.models.create(
        model_name,
        num_classes=NUM_CLASSES,
        dtype=jnp.dtype(args.dtype),
        **_model_kwargs(model_name, args),
    )
    tx, _ = optim.make_optimizer(
        steps_per_epoch=100, num_epochs=1, optimizer="sgd", learning_rate=0.01, momentum=0.9
    )
    return mesh, model, tx, state_lib.create_train_state(model, tx, 0, args.image_size, mesh)


def run_case(model_name: str, per_device_batch: int, num_devices: int, args) -> dict:
    """One model x batch x device count: the breakdown dict plus the case."""
    import jax

    from bcjax.parallel import strategies
    from bcjax.timing import breakdown

    mesh, model, tx, state = _model_and_state(model_name, num_devices, args)
    augment_cfg = None
    if args.augment:
        from bcjax.data import augment

        augment_cfg = augment.settings()

    def build(collectives: bool):
        return strategies.build_steps(
            args.strategy, mesh, model, augment_cfg=augment_cfg, collectives=collectives
        )

    batch = random_batch(per_device_batch * num_devices, args.image_size)
    profile_dir = None
    if args.profile:
        profile_dir = str(
            pathlib.Path(args.profile) / f"{model_name}_b{per_device_batch}_n{num_devices}"
        )
    return breakdown.measure(
        build,
        state,
        batch,
        jax.random.key(0),
        warmup=args.warmup,
        iters=args.steps,
        eval_step=False,
        allreduce=num_devices > 1,
        compile_cache=args.compile_cache,
        dtype=args.dtype,
        profile_dir=profile_dir,
    )


def to_row(model_name: str, r: dict, args) -> dict:
    ms = lambda s: None if s is None else round(s * 1e3, 3)  # noqa: E731
    train = r["compile"]["train_step"]
    flops = r.get("flops_per_device_step")
    achieved = r.get("achieved_flops_per_s_per_device")
    return {
        "model": model_name,
        "strategy": r["strategy"],
        "devices": r["num_devices"],
        "per_device_batch": r["per_device_batch"],
        "global_batch": r["global_batch_size"],
        "image_size": args.image_size,
        "dtype": args.dtype,
        "step_ms": ms(r["step_time_s"]["median"]),
        "step_ms_p10": ms(r["step_time_s"]["p10"]),
        "step_ms_p90": ms(r["step_time_s"]["p90"]),
        "img_s": round(r["images_per_s"], 1),
        "img_s_per_device": round(r["images_per_s_per_device"], 1),
        "img_s_pipelined": round(r["images_per_s_pipelined"], 1),
        "compute_ms": ms(r["compute_time_s"]["median"]),
        "exposed_collective_ms": ms(r["exposed_collective_s"]),
        "allreduce_ms": ms((r.get("allreduce_s") or {}).get("median")),
        "lower_s": round(train["lower_s"], 2),
        "compile_s": round(train["compile_s"], 2),
        "gflop_per_device_step": None if flops is None else round(flops / 1e9, 3),
        "tflop_s_per_device": None if achieved is None else round(achieved / 1e12, 4),
        "utilisation": None if r.get("utilisation") is None else round(r["utilisation"], 4),
        "peak_mem_mb": (
            None if r.get("peak_memory_bytes") is None else round(r["peak_memory_bytes"] / 2**20, 1)
        ),
        "params": r["num_params"],
        "gradient_mb": round(r["gradient_bytes"] / 1e6, 2),
        "platform": r["platform"],
        "device_kind": r["device_kind"],
        "simulated": r["simulated"],
        "error": None,
    }


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def case_line(row: dict) -> str:
    """One compact line per case, printed as soon as it finishes."""
    if row.get("error"):
        return (
            f"{row['model']:<20} b={row['per_device_batch']:<4} x{row['devices']} dev  "
            f"ERROR {row['error']}"
        )
    u = row["utilisation"]
    return (
        f"{row['model']:<20} b={row['per_device_batch']:<4} x{row['devices']} dev {row['dtype']} "
        f"{row['image_size']}px | {row['img_s_pipelined']:>9,.1f} img/s pipelined, "
        f"{row['img_s']:,.1f} synced | step {row['step_ms']:.2f} ms "
        f"(p10 {row['step_ms_p10']:.2f}, p90 {row['step_ms_p90']:.2f}) | compute "
        f"{row['compute_ms']:.2f} ms, exposed collective {row['exposed_collective_ms']:.2f} ms | "
        f"compile {row['lower_s'] + row['compile_s']:.1f} s"
        + (
            f" | {row['tflop_s_per_device']:.3g} TFLOP/s"
            if row["tflop_s_per_device"] is not None
            else ""
        )
        + (f" ({u:.1%} of peak)" if u is not None else "")
    )


MD_COLUMNS = (
    "model",
    "devices",
    "per_device_batch",
    "img_s_pipelined",
    "img_s",
    "step_ms",
    "step_ms_p10",
    "step_ms_p90",
    "compute_ms",
    "exposed_collective_ms",
    "allreduce_ms",
    "compile_s",
    "gflop_per_device_step",
    "utilisation",
    "peak_mem_mb",
)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] = MD_COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def load_anchors(path: str) -> dict:
    """{(model, batch): {fw: img_s}} from anchor_step.py's JSON lines."""
    out: dict = {}
    for line in pathlib.Path(path).read_text().splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "img_s" in rec and "model" in rec and "batch" in rec:
            out.setdefault((rec["model"], int(rec["batch"])), {})[rec["fw"]] = float(rec["img_s"])
    return out


def anchor_rows(rows: Sequence[dict], anchors: dict) -> list[dict]:
    """bcjax's pipelined img/s beside each anchor measured in the same call."""
    out = []
    for r in rows:
        if r.get("error") or r["devices"] != 1:
            continue
        a = anchors.get((r["model"], r["per_device_batch"]), {})
        row = {
            "model": r["model"],
            "batch": r["per_device_batch"],
            "bcjax_img_s": r["img_s_pipelined"],
        }
        for fw in ("torch", "torch+compile", "jax-flax-linen"):
            row[f"{fw}_img_s"] = a.get(fw)
            row[f"ratio_vs_{fw}"] = round(r["img_s_pipelined"] / a[fw], 2) if a.get(fw) else None
        out.append(row)
    return out


def ring_predictions(rows: Sequence[dict], links: Sequence[str]) -> list[dict]:
    """Weak-scaling predictions at N = 2, 4, 8 from each model's 1-device rows."""
    from bcjax.timing import scaling_model

    out = []
    by_model: dict = {}
    for r in rows:
        if not r.get("error") and r["devices"] == 1:
            by_model.setdefault(r["model"], []).append(r)
    for model, rs in by_model.items():
        compute = scaling_model.ComputeModel.fit(
            (r["per_device_batch"], r["compute_ms"] / 1e3) for r in rs
        )
        grad_bytes = rs[0]["gradient_mb"] * 1e6
        for link in links:
            for r in rs:
                t1 = r["compute_ms"] / 1e3  # measured, not the fit, at measured batches
                for n in (2, 4, 8):
                    p = scaling_model.predict(
                        t1, grad_bytes, n, link, per_device_batch=r["per_device_batch"]
                    )
                    out.append(
                        {
                            "model": model,
                            "interconnect": link,
                            "devices": n,
                            "per_device_batch": r["per_device_batch"],
                            "compute_ms": round(t1 * 1e3, 3),
                            "allreduce_ms": round(p["allreduce_s"] * 1e3, 3),
                            "img_s": round(p["images_per_s"], 1),
                            "efficiency": round(p["efficiency"], 3),
                        }
                    )
            eff_batch = scaling_model.batch_for_efficiency(compute, grad_bytes, 8, 0.9, link=link)
            out.append(
                {
                    "model": model,
                    "interconnect": link,
                    "devices": 8,
                    "per_device_batch": eff_batch,
                    "note": "smallest power-of-two batch for 90% efficiency",
                }
            )
    return out


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


def write_outputs(
    out: pathlib.Path,
    header: str,
    simulated: bool,
    args,
    rows: Sequence[dict],
    results: Sequence[dict],
    extra: dict,
) -> None:
    """benchmark.csv, benchmark.json (rows, full breakdowns, extras), benchmark.md."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "benchmark.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c) for c in COLUMNS})
    (out / "benchmark.json").write_text(
        json.dumps(
            {
                "header": header,
                "simulated": simulated,
                "args": vars(args),
                "rows": list(rows),
                "breakdowns": list(results),
                **extra,
            },
            indent=1,
            default=str,
        )
    )
    note = "\n(timings simulated: CPU devices sharing one host)\n" if simulated else ""
    (out / "benchmark.md").write_text(f"{header}\n\n{markdown_table(rows)}\n{note}")


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
                if args.out:  # after every case: a run cut short keeps what it measured
                    write_outputs(
                        pathlib.Path(args.out), header, simulated, args, rows, results, {}
                    )
                gc.collect()

    table = markdown_table(rows)
    print()
    print(table)
    if simulated:
        print("\n(timings simulated: CPU devices sharing one host)")
    extra = {}
    links = [x for x in args.ring.split(",") if x]
    if links:
        preds = ring_predictions(rows, links)
        if preds:
            extra["ring_model"] = preds
            print(
                "\nRing all-reduce prediction (same per-device batch; measured 1-device compute, "
                "stated interconnect assumptions):"
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

    if args.out:
        write_outputs(pathlib.Path(args.out), header, simulated, args, rows, results, extra)
        print(f"\nwrote {pathlib.Path(args.out) / 'benchmark.csv'}, benchmark.json, benchmark.md")
    return rows


if __name__ == "__main__":
    main()
