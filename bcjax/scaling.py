"""The study's table over device counts: one full training run per count.

    python -m bcjax.scaling --config=configs/quickstart.py --devices=1,2,4 \\
        --mode=same_global --workdir=runs/scaling [--config.num_epochs=5 ...]

Each device count trains in its own process (``python -m bcjax.main``; a
process's CPU device count is fixed when JAX starts) with the same seed, into
``WORKDIR/dev{N}``. Modes:
- ``same_global``: the config's global batch split over N devices (the
  study's setting: same optimisation, smaller per-device batch);
- ``same_per_device``: each device keeps the per-device batch of the smallest
  device count, so the global batch grows with N; the learning rate grows
  with it (linear scaling rule, ``--lr-scaling=none`` to keep it).
Finished runs (a results.json present) are reused, so an interrupted study
resumes; ``--rerun`` trains them again.

Then every run's results.json / timing.json / metrics.jsonl becomes one row
(test accuracy, macro-F1, AUC, wall time, time per epoch, compile time,
speedup, efficiency, compute / collective / input shares) beside the ring
all-reduce model's prediction for real devices (bcjax.timing.ring_model),
written as scaling.md, scaling.csv, scaling.json and scaling.png. On a CPU
the devices are simulated and the output says so.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, Mapping, Optional, Sequence

from bcjax.timing import ring_model

MODES = ("same_global", "same_per_device")
SIMULATED = ("timings simulated: the devices are CPU devices sharing one host's cores; speedup and "
             "efficiency here measure that host, not N accelerators (see the ring-model columns)")
COLUMNS = ("devices", "global_batch", "per_device_batch", "steps_per_epoch", "test_accuracy",
           "test_macro_f1", "test_auc", "best_epoch", "wall_s", "epoch_s", "compile_s", "step_ms",
           "img_s", "speedup", "efficiency", "speedup_step", "efficiency_step", "compute_share",
           "collective_share", "input_share", "other_share", "compute_ms", "exposed_collective_ms",
           "allreduce_ms",
           "pred_step_ms", "pred_speedup", "pred_efficiency", "pred_compute_source", "platform",
           "simulated", "dataset")


# ----------------------------------------------------------------- running

def load_config(path: str):
    """A config file's get_config(), importable the way bcjax.main imports it."""
    path = os.path.abspath(path.split(":")[0])
    root = os.path.dirname(os.path.dirname(path))
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location("_bcjax_scaling_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _override_value(overrides: Sequence[str], field: str) -> Optional[str]:
    value = None
    for o in overrides:
        if o.startswith(f"--config.{field}="):
            value = o.split("=", 1)[1]
    return value


def effective(config, overrides: Sequence[str], field: str):
    """A config field as the runs will see it: the last override, else the file's value."""
    raw = _override_value(overrides, field)
    value = config[field]
    if raw is None:
        return value
    if isinstance(value, bool):
        return raw.lower() in ("1", "true", "yes")
    if isinstance(value, int):
        return int(float(raw))
    if isinstance(value, float):
        return float(raw)
    return raw


def shared_synthetic_data(config, overrides: Sequence[str], workdir: pathlib.Path) -> list[str]:
    """Overrides that point every run at one synthetic set generated here.

    Each run would otherwise generate the same images (same generator, same
    seed) into its own workdir; generating once saves that time N-1 times.
    Real BUSI data (found under data_dir) is left alone.
    """
    from bcjax.data import busi, synthetic

    dataset = effective(config, overrides, "dataset")
    if dataset == "busi" or (dataset == "auto"
                             and busi.find_busi(effective(config, overrides, "data_dir")) is not None):
        return []
    out = workdir / "data"
    if busi.find_busi(out) is None:
        print(f"[scaling] generating the synthetic BUSI-like set once into {out}", flush=True)
        synthetic.generate(out, num=effective(config, overrides, "synthetic_num"),
                           seed=effective(config, overrides, "split_seed"))
    return ["--config.dataset=busi", f"--config.data_dir={out}"]


def plan_runs(devices: Sequence[int], mode: str, global_batch: int, learning_rate: float,
              lr_scaling: str = "linear") -> list[dict]:
    """Per device count: its global batch and learning rate."""
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r}; choose one of {', '.join(MODES)}")
    devices = sorted(set(devices))
    base = devices[0]
    runs = []
    for n in devices:
        if mode == "same_global":
            if global_batch % n:
                raise ValueError(f"global batch {global_batch} does not split over {n} devices; "
                                 f"use a multiple of {n} (--config.global_batch_size=...)")
            gbs, lr = global_batch, learning_rate
        else:
            if global_batch % base:
                raise ValueError(f"global batch {global_batch} does not split over {base} devices")
            gbs = global_batch // base * n
            lr = learning_rate * gbs / global_batch if lr_scaling == "linear" else learning_rate
        runs.append({"devices": n, "global_batch": gbs, "per_device_batch": gbs // n,
                     "learning_rate": lr})
    return runs


def _child_env(cache_dir: Optional[str]) -> dict:
    env = dict(os.environ)
    # The child sets its own simulated device count; an inherited one (a test
    # session's) would override it.
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    root = str(pathlib.Path(__file__).resolve().parent.parent)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([root] + rest)
    if cache_dir and "BCJAX_CACHE_DIR" not in os.environ:
        env["BCJAX_CACHE_DIR"] = cache_dir
    return env


def run_one(config_path: str, workdir: pathlib.Path, run: dict, overrides: Sequence[str], *,
            timeout: Optional[float] = None, cache_dir: Optional[str] = None) -> float:
    """Trains one device count in a subprocess; returns its wall seconds."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "bcjax.main", f"--config={config_path}", f"--workdir={workdir}",
           *overrides,
           f"--config.num_devices={run['devices']}",
           f"--config.global_batch_size={run['global_batch']}",
           f"--config.learning_rate={run['learning_rate']!r}"]
    log_path = workdir / "scaling_run.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_env(cache_dir),
                              timeout=timeout)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-25:])
        raise RuntimeError(f"training on {run['devices']} device(s) failed (exit {proc.returncode}); "
                           f"log {log_path}:\n{tail}")
    return elapsed


def probe_compute(config, overrides: Sequence[str], batches: Sequence[int], out_dir: pathlib.Path,
                  *, timeout: Optional[float] = None) -> dict[int, float]:
    """1-device compute seconds per step at each batch, from bcjax.benchmark
    run in a subprocess (same model, image size, dtype, augmentation)."""
    model = effective(config, overrides, "model")
    cmd = [sys.executable, "-m", "bcjax.benchmark", f"--models={model}",
           f"--batch={','.join(map(str, batches))}", "--devices=1",
           f"--image-size={effective(config, overrides, 'image_size')}",
           f"--dtype={effective(config, overrides, 'dtype')}", "--steps=10", "--warmup=2", "--ring=",
           f"--out={out_dir}"]
    if model.startswith("resnet"):
        cmd.append(f"--width={effective(config, overrides, 'width')}")
    else:
        cmd.append(f"--width-multiplier={effective(config, overrides, 'width_multiplier')}")
    if config.augment.enabled and _override_value(overrides, "augment.enabled") in (None, "True", "true"):
        cmd.append("--augment")
    print(f"[scaling] probing 1-device compute at batches {list(batches)}", flush=True)
    subprocess.run(cmd, check=True, env=_child_env(None), timeout=timeout,
                   stdout=subprocess.DEVNULL)
    rows = json.loads((out_dir / "benchmark.json").read_text())["rows"]
    return {int(r["per_device_batch"]): r["compute_ms"] / 1e3 for r in rows if not r.get("error")}


# ----------------------------------------------------------------- reading

def _get(d: Any, *path, default=None):
    for p in path:
        if not isinstance(d, Mapping) or p not in d or d[p] is None:
            return default
        d = d[p]
    return d


def _median(xs: Sequence[float]) -> Optional[float]:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else 0.5 * (xs[m - 1] + xs[m])


def read_run(workdir: pathlib.Path) -> dict:
    """results.json, timing.json and the epoch times of metrics.jsonl."""
    workdir = pathlib.Path(workdir)
    results = json.loads((workdir / "results.json").read_text())
    timing_path = workdir / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    epoch_times = []
    metrics_path = workdir / "metrics.jsonl"
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            t = rec.get("epoch_time_s")
            if isinstance(t, (int, float)):
                epoch_times.append(float(t))
    return {"results": results, "timing": timing, "epoch_times": epoch_times}


def _compile_s(timing: Mapping) -> Optional[float]:
    comp = timing.get("compile") or {}
    total = 0.0
    for t in comp.values():
        if isinstance(t, Mapping):
            total += float(t.get("lower_s", 0.0)) + float(t.get("compile_s", 0.0))
    return total or None


def _param_bytes(config: Mapping) -> Optional[int]:
    """Gradient bytes (fp32) of the run's model, without running it."""
    try:
        import jax
        import jax.numpy as jnp

        import bcjax.models
        kw = ({"width": config["width"]} if config["model"].startswith("resnet")
              else {"width_multiplier": config["width_multiplier"]})
        model = bcjax.models.create(config["model"], num_classes=3, **kw)
        size = int(config.get("image_size", 64))
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                                   train=False))
        return int(sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(shapes["params"])))
    except Exception:
        return None


def row_from_run(run: Mapping) -> dict:
    """The measured part of one table row."""
    res, timing = run["results"], run["timing"]
    bd = timing.get("breakdown") or {}
    n = int(res["num_devices"])
    gbs = int(res["global_batch_size"])
    # The synchronised breakdown is the cleaner step time; the loop's dispatch
    # intervals (which include input waits) stand in when it is absent.
    step = _get(bd, "step_time_s", "median") or _get(timing, "step_time_s", "median")
    compute = _get(bd, "compute_time_s", "median")
    collective = bd.get("exposed_collective_s")
    interval = _get(timing, "step_time_s", "median")
    wait = _get(timing, "input_wait_s", "mean") or _get(timing, "input_wait_s", "median")
    # Shares of the loop's own time per step (its dispatch interval). Input is
    # fetched while the device runs the previous step, so only the part of the
    # wait the device step did not cover is charged to input.
    per_step = interval or step
    synced = _get(bd, "step_time_s", "median")
    if wait is not None and synced and interval:
        exposed_wait = min(wait, max(interval - synced, 0.0))
    else:
        exposed_wait = wait  # no synchronised step to compare with: an upper bound
    share = (lambda x: None if x is None or not per_step else min(x / per_step, 1.0))  # noqa: E731
    epoch_s = _median(run["epoch_times"])
    if epoch_s is None and interval is not None:
        epoch_s = interval * res["steps_per_epoch"]
    test = res.get("test") or {}
    ms = (lambda s: None if s is None else s * 1e3)  # noqa: E731
    return {
        "devices": n, "global_batch": gbs, "per_device_batch": gbs // n,
        "steps_per_epoch": res.get("steps_per_epoch"),
        "test_accuracy": test.get("accuracy"), "test_macro_f1": test.get("macro_f1"),
        "test_auc": test.get("auc_macro"), "best_epoch": res.get("best_epoch"),
        "wall_s": res.get("wall_time_s"), "epoch_s": epoch_s, "compile_s": _compile_s(timing),
        "step_ms": ms(step), "img_s": gbs / step if step else None,
        "compute_share": share(compute), "collective_share": share(collective),
        "input_share": share(exposed_wait),
        # What is left: host-side work per step the device did not hide
        # (dispatch, metric transfers, logging), or idle device time.
        "other_share": (None if compute is None or collective is None or not per_step else
                        max(1.0 - (compute + collective + (exposed_wait or 0.0)) / per_step, 0.0)),
        "compute_ms": ms(compute), "exposed_collective_ms": ms(collective),
        "allreduce_ms": ms(_get(bd, "allreduce_s", "median")),
        "platform": res.get("platform"),
        "simulated": res.get("platform") == "cpu" and n > 1,
        "dataset": res.get("dataset"),
        "_gradient_bytes": bd.get("gradient_bytes"),
        "_compute_s": compute if compute is not None else step,
        "_config": res.get("config") or {},
    }


def build_table(runs: Sequence[Mapping], mode: str, *, link: str = "pcie4",
                overlap: float = 0.0, compute_points: Optional[Mapping[int, float]] = None) -> list[dict]:
    """Rows sorted by device count with speedups against the smallest count
    and the ring model's prediction for real devices.

    The prediction needs 1-device compute at each per-device batch:
    ``compute_points`` ({batch: seconds}, measured by ``--probe-compute``)
    where given, else the smallest run's compute scaled in proportion to the
    batch (no fixed per-step cost: optimistic for small batches).
    """
    rows = sorted((row_from_run(r) for r in runs), key=lambda r: r["devices"])
    if not rows:
        return []
    ref = rows[0]
    grad_bytes = next((r["_gradient_bytes"] for r in rows if r["_gradient_bytes"]), None)
    if grad_bytes is None:
        grad_bytes = _param_bytes(ref["_config"])
    if compute_points:
        fit = ring_model.ComputeModel.fit(compute_points.items())
        compute = lambda b: compute_points.get(b) or fit(b)  # noqa: E731
        source = "measured 1-device compute per batch"
    elif ref["_compute_s"]:
        # The smallest run's compute is per device at its per-device batch.
        compute = ring_model.ComputeModel.proportional(ref["_compute_s"], ref["per_device_batch"])
        source = "compute proportional to batch (optimistic)"
    else:
        compute, source = None, None
    for r in rows:
        scale = r["devices"] / ref["devices"]
        r["speedup"] = ref["wall_s"] / r["wall_s"] if r.get("wall_s") and ref.get("wall_s") else None
        r["efficiency"] = r["speedup"] / scale if r["speedup"] is not None else None
        if r["img_s"] and ref["img_s"]:
            r["speedup_step"] = r["img_s"] / ref["img_s"]
            r["efficiency_step"] = r["speedup_step"] / scale
        else:
            r["speedup_step"] = r["efficiency_step"] = None
        if compute is not None and grad_bytes:
            # Against one device: same global batch -> t1 at the whole batch.
            t1 = compute(r["global_batch"] if mode == "same_global" else r["per_device_batch"])
            p = ring_model.predict(compute(r["per_device_batch"]), grad_bytes, r["devices"], link,
                                   overlap=overlap, single_device_step_s=t1,
                                   global_batch_scaling=mode == "same_global")
            r["pred_step_ms"] = p["step_s"] * 1e3
            r["pred_speedup"] = p["speedup"]
            r["pred_efficiency"] = p["efficiency"]
        else:
            r["pred_step_ms"] = r["pred_speedup"] = r["pred_efficiency"] = None
        r["gradient_bytes"] = grad_bytes
        r["pred_compute_source"] = source
    return rows


# ----------------------------------------------------------------- writing

def _fmt(v, col: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if "share" in col or "efficiency" in col:
            return f"{v:.1%}"
        if col.endswith(("accuracy", "f1", "auc")):
            return f"{v:.3f}"
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


MD_COLUMNS = ("devices", "global_batch", "per_device_batch", "test_accuracy", "test_macro_f1", "test_auc",
              "wall_s", "epoch_s", "compile_s", "step_ms", "speedup", "efficiency", "speedup_step",
              "efficiency_step", "compute_share", "collective_share", "input_share", "other_share",
              "pred_speedup", "pred_efficiency")


def markdown(rows: Sequence[dict], *, mode: str, link: str, overlap: float, title: str = "") -> str:
    lines = []
    if title:
        lines += [title, ""]
    lines.append("| " + " | ".join(MD_COLUMNS) + " |")
    lines.append("|" + "---|" * len(MD_COLUMNS))
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c), c) for c in MD_COLUMNS) + " |")
    lines.append("")
    lines.append(f"Mode {mode}. speedup/efficiency: wall time of the whole run against "
                 f"{rows[0]['devices'] if rows else 1} device(s); *_step: steady-state images/s. "
                 f"Shares: of the training loop's time per step; input counts the wait not hidden behind "
                 f"the device step. pred_*: ring all-reduce model for real "
                 f"devices ({(rows[0].get('pred_compute_source') or 'no compute measured') if rows else ''}; "
                 f"{ring_model.interconnect(link).note}, overlap {overlap:.0%}), against 1 device.")
    if any(r.get("simulated") for r in rows):
        lines.append("")
        lines.append(f"**{SIMULATED}.**")
    if any(r.get("dataset") == "synthetic" for r in rows):
        lines.append("")
        lines.append("Data: the SYNTHETIC BUSI-like set; accuracies say nothing about real ultrasound.")
    return "\n".join(lines)


def write_csv(rows: Sequence[dict], path: pathlib.Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c) for c in COLUMNS})


def plot(rows: Sequence[dict], path: pathlib.Path, *, mode: str, title: str = "") -> None:
    """Wall/epoch time, speedup (measured, ideal, ring model) and test metrics
    against the device count."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = [r["devices"] for r in rows]
    fig = Figure(figsize=(13, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)

    def series(key):
        return [math.nan if r.get(key) is None else r[key] for r in rows]

    ax1.plot(n, series("wall_s"), "o-", label="wall time (s)")
    ax1.plot(n, [math.nan if r.get("epoch_s") is None else r["epoch_s"] * 10 for r in rows], "s--",
             label="time per epoch x10 (s)")
    ax1.plot(n, series("compile_s"), "^:", label="compile (s)")
    ax1.set_xlabel("devices")
    ax1.set_title("time")
    ax1.legend(fontsize=8)

    ideal = [x / n[0] for x in n]
    ax2.plot(n, ideal, "k:", label="ideal")
    ax2.plot(n, series("speedup"), "o-", label="measured (wall)")
    ax2.plot(n, series("speedup_step"), "s--", label="measured (steady-state img/s)")
    ax2.plot(n, series("pred_speedup"), "^-.", label="ring model, real devices")
    ax2.set_xlabel("devices")
    ax2.set_title("speedup" + (" (simulated devices)" if any(r.get("simulated") for r in rows) else ""))
    ax2.legend(fontsize=8)

    ax3.plot(n, series("test_accuracy"), "o-", label="test accuracy")
    ax3.plot(n, series("test_macro_f1"), "s--", label="test macro-F1")
    ax3.plot(n, series("test_auc"), "^:", label="test AUC (macro)")
    ax3.set_ylim(0, 1.02)
    ax3.set_xlabel("devices")
    ax3.set_title("test metrics")
    ax3.legend(fontsize=8)
    for ax in (ax1, ax2, ax3):
        ax.set_xticks(n)
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"bcjax scaling, {mode}")
    fig.tight_layout()
    fig.savefig(path)


def write_outputs(rows: Sequence[dict], out_dir: pathlib.Path, *, mode: str, link: str,
                  overlap: float, title: str = "") -> str:
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown(rows, mode=mode, link=link, overlap=overlap, title=title)
    (out_dir / "scaling.md").write_text(md + "\n")
    write_csv(rows, out_dir / "scaling.csv")
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    (out_dir / "scaling.json").write_text(json.dumps(
        {"mode": mode, "interconnect": link, "overlap": overlap, "rows": clean,
         "simulated": any(r.get("simulated") for r in rows)}, indent=1, default=str))
    plot(rows, out_dir / "scaling.png", mode=mode, title=title)
    return md


# ----------------------------------------------------------------- CLI

def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(prog="python -m bcjax.scaling", description=__doc__.split("\n")[0],
                                epilog="Other --config.FIELD=VALUE flags go to every run.")
    p.add_argument("--config", required=True)
    p.add_argument("--devices", default="1,2,4")
    p.add_argument("--mode", default="same_global", choices=MODES)
    p.add_argument("--workdir", required=True)
    p.add_argument("--lr-scaling", default="linear", choices=("linear", "none"),
                   help="same_per_device: scale the learning rate with the global batch")
    p.add_argument("--interconnect", default="pcie4", choices=sorted(ring_model.INTERCONNECTS))
    p.add_argument("--overlap", type=float, default=0.0)
    p.add_argument("--probe-compute", action="store_true",
                   help="measure 1-device compute at every per-device batch (bcjax.benchmark) for "
                        "the ring-model columns, instead of assuming compute proportional to batch")
    p.add_argument("--rerun", action="store_true", help="train again even where results.json exists")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table from the runs")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time (a quick accuracy look on a CPU; timings then disturb each other)")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    return args, rest


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    args, overrides = parse_args(argv)
    devices = sorted({int(x) for x in args.devices.split(",") if x.strip()})
    workdir = pathlib.Path(args.workdir).expanduser().resolve()
    config = load_config(args.config)
    gbs = int(_override_value(overrides, "global_batch_size") or config.global_batch_size)
    lr = float(_override_value(overrides, "learning_rate") or config.learning_rate)
    plan = plan_runs(devices, args.mode, gbs, lr, args.lr_scaling)
    todo = [r for r in plan if args.rerun or not (workdir / f"dev{r['devices']}" / "results.json").exists()]
    if todo and not args.report_only:
        overrides = list(overrides) + shared_synthetic_data(config, overrides, workdir)
    def train(run):
        wd = workdir / f"dev{run['devices']}"
        print(f"[scaling] {run['devices']} device(s): global batch {run['global_batch']} "
              f"({run['per_device_batch']}/device), lr {run['learning_rate']:.4g} -> {wd}", flush=True)
        elapsed = run_one(args.config, wd, run, overrides, timeout=args.timeout,
                          cache_dir=str(workdir / "jax_cache"))
        print(f"[scaling] {run['devices']} device(s) done in {elapsed:.1f} s", flush=True)

    if todo and not args.report_only:
        if args.jobs > 1:
            print(f"[scaling] {args.jobs} runs at a time: their timings disturb each other "
                  "(use --jobs=1 for the timing columns)", flush=True)
            with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
                list(pool.map(train, todo))
        else:
            for run in todo:
                train(run)
    runs = []
    for run in plan:
        wd = workdir / f"dev{run['devices']}"
        if (wd / "results.json").exists():
            runs.append(read_run(wd))
        else:
            print(f"[scaling] no results.json in {wd}; skipped", flush=True)
    compute_points = None
    if args.probe_compute and runs:
        compute_points = probe_compute(config, overrides, sorted({r["per_device_batch"] for r in plan}
                                                                | {r["global_batch"] for r in plan}),
                                       workdir / "compute_probe", timeout=args.timeout)
    rows = build_table(runs, args.mode, link=args.interconnect, overlap=args.overlap,
                       compute_points=compute_points)
    if not rows:
        sys.exit("no finished runs to tabulate")
    res0 = runs[0]["results"]
    title = (f"bcjax scaling: {res0.get('model')} on {res0.get('dataset')} data, "
             f"{res0.get('num_epochs')} epochs, strategy {res0.get('strategy')}, mode {args.mode}")
    md = write_outputs(rows, workdir, mode=args.mode, link=args.interconnect, overlap=args.overlap,
                       title=title)
    print(md)
    print(f"\nwrote {workdir / 'scaling.md'}, scaling.csv, scaling.json, scaling.png")
    return rows


if __name__ == "__main__":
    main()
