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

Cross-validation mode (``--cv-folds=K``): every device count runs the same
K-fold cross-validation (bcjax.cv; same data folder, split and seeds) in
``WORKDIR/dev{N}``, so each count has K paired measurements instead of one.
The table gives the mean and Student-t 95% interval over folds of test and
validation accuracy, macro-F1, AUC and wall time per fold, and each count is
compared with the smallest count fold by fold (paired difference, its
interval, and whether it excludes 0, i.e. exceeds the fold-to-fold noise):
scaling_cv.md, scaling_cv.csv, scaling_cv.json and scaling_cv.png.
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
                           seed=effective(config, overrides, "synthetic_seed"))
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


# ----------------------------------------------------------------- cross-validation mode

CV_METRICS = (("test_accuracy", "test accuracy"), ("test_macro_f1", "test macro-F1"),
              ("test_auc_macro", "test AUC"), ("val_accuracy", "val accuracy"),
              ("val_macro_f1", "val macro-F1"), ("val_auc_macro", "val AUC"),
              ("wall_time_s", "wall s per fold"))
CV_DONE = "cv_summary.json"  # written by bcjax.cv once every fold is trained
CV_CSV_COLUMNS = ("devices", "global_batch", "per_device_batch", "learning_rate", "folds", "complete",
                  *(f"{k}_{s}" for k, _ in CV_METRICS for s in ("mean", "sd", "low", "high")),
                  "ensemble_test_accuracy", "ensemble_test_macro_f1", "ensemble_test_auc_macro",
                  "total_wall_s", "speedup", "platform", "simulated", "dataset")


def _is_done(path: pathlib.Path) -> bool:
    """results.json exists; a cv_summary.json also says every fold is complete."""
    if not path.exists():
        return False
    return path.name != CV_DONE or bool(json.loads(path.read_text()).get("complete"))


def cv_overrides(folds: int) -> list[str]:
    if folds < 2:
        raise ValueError(f"--cv-folds={folds}: cross-validation needs at least 2 folds")
    return [f"--config.cv.folds={folds}", "--config.cv.fold=-1"]


def fold_val_sets(cv_dir: pathlib.Path) -> dict[int, list[str]]:
    """Each finished fold's validation images, from its manifest."""
    out = {}
    for path in pathlib.Path(cv_dir).glob("fold_*/manifest.json"):
        k = path.parent.name.split("_", 1)[1]
        if k.isdigit():
            out[int(k)] = sorted(json.loads(path.read_text())["val"])
    return out


def cv_rows(summaries: Mapping[int, Mapping], plan: Sequence[Mapping]) -> list[dict]:
    """One row per device count: mean, sd and t-interval over folds of every
    CV metric, the fold ensemble's test scores and the summed wall time."""
    by_n = {r["devices"]: r for r in plan}
    rows = []
    for n in sorted(summaries):
        s, run = summaries[n], by_n.get(n, {})
        walls = [r.get("wall_time_s") for r in s["per_fold"]]
        ens = s.get("ensemble_test") or {}
        row = {"devices": n, "global_batch": run.get("global_batch"),
               "per_device_batch": run.get("per_device_batch"), "learning_rate": run.get("learning_rate"),
               "folds": len(s["completed_folds"]), "complete": bool(s.get("complete")),
               "stats": {k: s["stats"][k] for k, _ in CV_METRICS},
               "ensemble_test_accuracy": ens.get("accuracy"), "ensemble_test_macro_f1": ens.get("macro_f1"),
               "ensemble_test_auc_macro": ens.get("auc_macro"),
               "total_wall_s": None if None in walls else float(sum(walls)),
               "platform": s.get("platform"), "simulated": s.get("platform") == "cpu" and n > 1,
               "dataset": s.get("dataset")}
        for k, _ in CV_METRICS:
            for stat, key in (("mean", "mean"), ("sd", "sd"), ("low", "low"), ("high", "high")):
                row[f"{k}_{stat}"] = s["stats"][k][key]
        rows.append(row)
    if rows:
        # Per-fold totals differ only by the device count when every count ran
        # the same folds; a partial study's speedup would compare different work.
        base = rows[0]
        for r in rows:
            same_work = r["folds"] == base["folds"]
            r["speedup"] = (base["total_wall_s"] / r["total_wall_s"]
                            if same_work and r["total_wall_s"] and base["total_wall_s"] else None)
    return rows


_VERDICT = {"a > b": "higher", "a < b": "lower", "no clear difference": "within fold-to-fold noise",
            "too few pairs": "too few folds", "identical": "identical on every fold"}


def paired_comparisons(summaries: Mapping[int, Mapping], *, confidence: float = 0.95,
                       val_sets: Optional[Mapping[int, Mapping[int, list]]] = None) -> list[dict]:
    """Each device count against the smallest, fold by fold, for every CV metric.

    Folds pair up by index: with the same data, split seed and fold count the
    fold-k images are the same for every count (checked on the manifests when
    `val_sets` is given), so the pairing removes the fold-to-fold spread.
    """
    from bcjax import stats

    ns = sorted(summaries)
    if len(ns) < 2:
        return []
    base = ns[0]
    base_rows = {r["fold"]: r for r in summaries[base]["per_fold"]}
    out = []
    for n in ns[1:]:
        rows = {r["fold"]: r for r in summaries[n]["per_fold"]}
        folds = sorted(base_rows.keys() & rows.keys())
        same_split = None
        if val_sets is not None and base in val_sets and n in val_sets:
            same_split = all(val_sets[n].get(k) == val_sets[base].get(k) for k in folds)
        for key, label in CV_METRICS:
            d = stats.paired_difference([rows[k][key] for k in folds], [base_rows[k][key] for k in folds],
                                        confidence)
            verdict = _VERDICT[d["verdict"]]
            if d["verdict"] in ("a > b", "a < b"):
                verdict += f" on {n} device(s)"
            out.append({"devices": n, "baseline": base, "metric": key, "label": label, "folds": folds,
                        "differences": d["differences"], "mean": d["mean"], "sd": d["sd"], "low": d["low"],
                        "high": d["high"], "excludes_zero": d["excludes_zero"], "verdict": verdict,
                        "same_split": same_split})
    return out


def _pm(mean, half, digits=3) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" if half is None else f"{mean:.{digits}f} ± {half:.{digits}f}"


def cv_markdown(rows: Sequence[dict], comparisons: Sequence[dict], *, title: str = "",
                confidence: float = 0.95) -> str:
    lines = [title, ""] if title else []
    head = ["devices", "global batch", "per device", "folds", *(label for _, label in CV_METRICS),
            "ensemble test accuracy", "total wall s", "speedup"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        cells = [str(r["devices"]), _fmt(r["global_batch"]), _fmt(r["per_device_batch"]),
                 f"{r['folds']}" + ("" if r["complete"] else " (incomplete)")]
        for k, _ in CV_METRICS:
            st = r["stats"][k]
            cells.append(_pm(st["mean"], st["half_width"], 1 if k == "wall_time_s" else 3))
        cells += [_fmt(r["ensemble_test_accuracy"], "accuracy"), _fmt(r["total_wall_s"]), _fmt(r["speedup"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Mean ± half-width of the Student-t {confidence:.0%} interval over folds (sd ddof=1). "
                  "Ensemble: the fold models' test probabilities averaged. speedup: total training wall "
                  f"time against {rows[0]['devices'] if rows else 1} device(s). Each count's first fold "
                  "also pays its compile (later folds load it from the compilation cache)."]
    if comparisons:
        base = comparisons[0]["baseline"]
        lines += ["", f"Paired against {base} device(s), fold by fold (difference = N devices minus {base}):",
                  "", "| devices | metric | per-fold differences | mean | "
                      f"{confidence:.0%} CI | verdict |", "|---|---|---|---|---|---|"]
        for c in comparisons:
            digits = 1 if c["metric"] == "wall_time_s" else 3
            diffs = ", ".join("–" if d is None else f"{d:+.{digits}f}" for d in c["differences"])
            ci = "–" if c["low"] is None else f"[{c['low']:+.{digits}f}, {c['high']:+.{digits}f}]"
            mean = "–" if c["mean"] is None else f"{c['mean']:+.{digits}f}"
            verdict = ("**" + c["verdict"] + "**") if c["excludes_zero"] else c["verdict"]
            lines.append(f"| {c['devices']} | {c['label']} | {diffs} | {mean} | {ci} | {verdict} |")
        lines += ["", "A difference counts (bold) only when its interval excludes 0, i.e. it is larger "
                      "than the fold-to-fold noise."]
        if any(c["same_split"] is False for c in comparisons):
            lines += ["", "**Warning: the device counts did not validate on the same folds (their "
                          "manifests differ), so the pairing is not valid.**"]
    if any(r.get("simulated") for r in rows):
        lines += ["", f"**{SIMULATED}.**"]
    if any(r.get("dataset") == "synthetic" for r in rows):
        lines += ["", "Data: the SYNTHETIC BUSI-like set; accuracies say nothing about real ultrasound."]
    return "\n".join(lines)


def cv_plot(rows: Sequence[dict], comparisons: Sequence[dict], summaries: Mapping[int, Mapping],
            path: pathlib.Path, *, title: str = "") -> None:
    """Test metrics (folds, mean and interval), paired differences against the
    smallest count, and wall time per fold, over the device counts."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = [r["devices"] for r in rows]
    fig = Figure(figsize=(13, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    pos = {d: i for i, d in enumerate(n)}  # evenly spaced: counts are usually powers of two

    def with_ci(ax, key, offset, marker, label, color):
        for r in rows:
            ys = [f.get(key) for f in summaries[r["devices"]]["per_fold"] if f.get(key) is not None]
            ax.plot([pos[r["devices"]] + offset] * len(ys), ys, marker, alpha=0.25, ms=4, color=color)
        means = [r["stats"][key]["mean"] for r in rows]
        halves = [r["stats"][key]["half_width"] or 0.0 for r in rows]
        ax.errorbar([pos[d] + offset for d in n], [math.nan if m is None else m for m in means], yerr=halves,
                    fmt=marker + "-", capsize=3, label=label, color=color)

    for i, (key, marker, label) in enumerate((("test_accuracy", "o", "test accuracy"),
                                              ("test_macro_f1", "s", "test macro-F1"),
                                              ("test_auc_macro", "^", "test AUC"))):
        with_ci(ax1, key, 0.1 * i, marker, label, f"C{i}")
    # Metrics live in [0, 1]; with few folds a t-interval can be far wider,
    # and the clipped bar then says just that.
    ax1.set_ylim(-0.02, 1.05)
    ax1.set_title("test metrics over folds (mean, 95% CI)")
    ax1.legend(fontsize=8)

    ax2.axhline(0.0, color="k", lw=0.8)
    for off, (key, marker) in zip((0.0, 0.1), (("test_accuracy", "o"), ("test_macro_f1", "s"))):
        cs = [c for c in comparisons if c["metric"] == key and c["mean"] is not None]
        xs = [pos[c["devices"]] + off for c in cs]
        lows = [c["mean"] - c["low"] if c["low"] is not None else 0.0 for c in cs]
        highs = [c["high"] - c["mean"] if c["high"] is not None else 0.0 for c in cs]
        ax2.errorbar(xs, [c["mean"] for c in cs], yerr=[lows, highs], fmt=marker, capsize=3,
                     label=key.replace("_", " "))
    ax2.set_title(f"paired difference vs {n[0]} device(s), 95% CI")
    ax2.legend(fontsize=8)

    with_ci(ax3, "wall_time_s", 0.0, "o", "wall s per fold", "C0")
    walls = [f["wall_time_s"] for d in n for f in summaries[d]["per_fold"] if f.get("wall_time_s") is not None]
    if walls:
        ax3.set_ylim(0, max(walls) * 1.3)
    ax3.set_title("training wall time per fold (s)")
    for ax in (ax1, ax2, ax3):
        ax.set_xlim(-0.4, len(n) - 0.4)
        ax.set_xticks(range(len(n)))
        ax.set_xticklabels([str(d) for d in n])
        ax.set_xlabel("devices")
        ax.grid(alpha=0.3)
    fig.suptitle(title or "bcjax scaling, cross-validation")
    fig.tight_layout()
    fig.savefig(path)


def write_cv_outputs(rows: Sequence[dict], comparisons: Sequence[dict], summaries: Mapping[int, Mapping],
                     out_dir: pathlib.Path, *, title: str = "", mode: str = "", folds: int = 0) -> str:
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = cv_markdown(rows, comparisons, title=title)
    (out_dir / "scaling_cv.md").write_text(md + "\n")
    with open(out_dir / "scaling_cv.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CV_CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c) for c in CV_CSV_COLUMNS})
    paired_cols = ("devices", "baseline", "metric", "mean", "sd", "low", "high", "excludes_zero", "verdict",
                   "same_split", "differences")
    with open(out_dir / "scaling_cv_paired.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=paired_cols)
        w.writeheader()
        for c in comparisons:
            w.writerow({k: (" ".join(f"{d:.6g}" if d is not None else "nan" for d in c[k])
                            if k == "differences" else c.get(k)) for k in paired_cols})
    (out_dir / "scaling_cv.json").write_text(json.dumps(
        {"mode": mode, "folds": folds, "rows": rows, "paired": comparisons,
         "simulated": any(r.get("simulated") for r in rows)}, indent=1, default=str))
    cv_plot(rows, comparisons, summaries, out_dir / "scaling_cv.png", title=title)
    return md


def cv_report(workdir: pathlib.Path, plan: Sequence[Mapping], *, mode: str, folds: int) -> tuple[list, list]:
    """Recomputes every count's CV summary from its fold folders, then the
    table and the paired comparison."""
    from bcjax import cv

    summaries, val_sets = {}, {}
    for run in plan:
        wd = workdir / f"dev{run['devices']}"
        if not list(wd.glob("fold_*/results.json")):
            print(f"[scaling] no finished fold in {wd}; skipped", flush=True)
            continue
        # A summary file marks a count as done (see main): a look at a half-finished
        # study must not write one, or its missing folds would never be trained.
        summary = cv.aggregate(wd, write=False)
        summaries[run["devices"]] = cv.aggregate(wd) if summary["complete"] else summary
        val_sets[run["devices"]] = fold_val_sets(wd)
    if not summaries:
        sys.exit("no finished cross-validation folds to tabulate")
    rows = cv_rows(summaries, plan)
    comparisons = paired_comparisons(summaries, val_sets=val_sets)
    s0 = summaries[rows[0]["devices"]]
    title = (f"bcjax scaling, {folds}-fold cross-validation: {s0.get('model')} on {s0.get('dataset')} data, "
             f"mode {mode}")
    md = write_cv_outputs(rows, comparisons, summaries, workdir, title=title, mode=mode, folds=folds)
    print(md)
    print(f"\nwrote {workdir / 'scaling_cv.md'}, scaling_cv.csv, scaling_cv_paired.csv, scaling_cv.json, "
          "scaling_cv.png")
    return rows, comparisons


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
    p.add_argument("--rerun", action="store_true",
                   help="train again even where results.json exists (CV mode keeps finished folds: "
                        "remove WORKDIR/dev{N} to retrain them)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table from the runs")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run")
    p.add_argument("--cv-folds", type=int, default=0,
                   help="K >= 2: every device count runs the same K-fold cross-validation and the "
                        "table compares them fold by fold (scaling_cv.*)")
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
    cv_mode = args.cv_folds != 0
    if cv_mode:
        try:
            overrides = list(overrides) + cv_overrides(args.cv_folds)
        except ValueError as e:
            sys.exit(f"error: {e}")
    # A CV run is complete once bcjax.cv has written its summary.
    done_file = CV_DONE if cv_mode else "results.json"
    todo = [r for r in plan if args.rerun or not _is_done(workdir / f"dev{r['devices']}" / done_file)]
    if todo and not args.report_only:
        overrides = list(overrides) + shared_synthetic_data(config, overrides, workdir)
    def train(run):
        wd = workdir / f"dev{run['devices']}"
        print(f"[scaling] {run['devices']} device(s): global batch {run['global_batch']} "
              f"({run['per_device_batch']}/device), lr {run['learning_rate']:.4g}"
              f"{f', {args.cv_folds}-fold CV' if cv_mode else ''} -> {wd}", flush=True)
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
    if cv_mode:
        rows, _ = cv_report(workdir, plan, mode=args.mode, folds=args.cv_folds)
        return rows
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
