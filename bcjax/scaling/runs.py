"""Runs the study's trainings, one child process per device count, and reads what they wrote.

A process's CPU device count is fixed when JAX starts, so every device count
trains in its own ``python -m bcjax.main``. The child receives the user's
``--config.*`` strings unchanged, followed by the few fields the plan sets for
its device count.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Sequence

from bcjax import specs
from bcjax.models import family

MODES = ("same_global", "same_per_device")
CV_DONE = "cv_summary.json"  # written by bcjax.cv once every fold is trained
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def plan_runs(
    devices: Sequence[int],
    mode: str,
    global_batch: int,
    learning_rate: float,
    lr_scaling: str = "linear",
) -> list[dict]:
    """Per device count: its global batch, per-device batch and learning rate."""
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r}; choose one of {', '.join(MODES)}")
    devices = sorted(set(devices))
    smallest = devices[0]
    runs = []
    for n in devices:
        if mode == "same_global":
            if global_batch % n:
                raise ValueError(
                    f"global batch {global_batch} does not split over {n} devices; "
                    f"use a multiple of {n} (--config.global_batch_size=...)"
                )
            batch, lr = global_batch, learning_rate
        else:
            if global_batch % smallest:
                raise ValueError(
                    f"global batch {global_batch} does not split over {smallest} devices"
                )
            batch = global_batch // smallest * n
            lr = learning_rate * batch / global_batch if lr_scaling == "linear" else learning_rate
        runs.append(
            {
                "devices": n,
                "global_batch": batch,
                "per_device_batch": batch // n,
                "learning_rate": lr,
            }
        )
    return runs


def cv_overrides(folds: int) -> list[str]:
    """What turns a child's run into a whole K-fold cross-validation (bcjax.cv)."""
    if folds < 2:
        raise ValueError(f"--cv-folds={folds}: cross-validation needs at least 2 folds")
    return [f"--config.cv.folds={folds}", "--config.cv.fold=-1"]


def shared_synthetic_data(config, workdir: pathlib.Path) -> list[str]:
    """Overrides that point every run at one synthetic set generated here.

    Each run would otherwise generate the same images (same generator, same
    seed) into its own workdir; generating once saves that time N-1 times.
    Real BUSI data (found under data_dir) is left alone.
    """
    from bcjax.data import busi, synthetic

    data = specs.from_config(config).data
    if data.dataset == "busi" or (
        data.dataset == "auto" and busi.find_busi(data.data_dir) is not None
    ):
        return []
    out = pathlib.Path(workdir) / "data"
    if busi.find_busi(out) is None:
        print(f"[scaling] generating the synthetic BUSI-like set once into {out}", flush=True)
        synthetic.generate(out, num=data.synthetic_num, seed=data.synthetic_seed)
    return ["--config.dataset=busi", f"--config.data_dir={out}"]


def child_env(cache_dir: str | None) -> dict:
    env = dict(os.environ)
    # The child sets its own simulated device count; an inherited one (a test
    # session's) would override it.
    xla_flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join(xla_flags)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *rest])
    if cache_dir and "BCJAX_CACHE_DIR" not in os.environ:
        env["BCJAX_CACHE_DIR"] = cache_dir
    return env


def child_command(
    config_path: str, workdir: pathlib.Path, run: dict, overrides: Sequence[str]
) -> list[str]:
    """The training command of one device count.

    The user's overrides come first and unchanged; the plan's fields come
    last, so they win over a user's value for the same field.
    """
    return [
        sys.executable,
        "-m",
        "bcjax.main",
        f"--config={config_path}",
        f"--workdir={workdir}",
        *overrides,
        f"--config.num_devices={run['devices']}",
        f"--config.global_batch_size={run['global_batch']}",
        f"--config.learning_rate={run['learning_rate']!r}",
    ]


def run_one(
    config_path: str,
    workdir: pathlib.Path,
    run: dict,
    overrides: Sequence[str],
    *,
    timeout: float | None = None,
    cache_dir: str | None = None,
) -> float:
    """Trains one device count in a child process; returns its wall seconds."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = child_command(config_path, workdir, run, overrides)
    # A progress log the child appends to while it runs (not a result file).
    log_path = workdir / "scaling_run.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(cache_dir), timeout=timeout
        )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-25:])
        raise RuntimeError(
            f"training on {run['devices']} device(s) failed "
            f"(exit {proc.returncode}); log {log_path}:\n{tail}"
        )
    return elapsed


def probe_compute(
    config, batches: Sequence[int], out_dir: pathlib.Path, *, timeout: float | None = None
) -> dict[int, float]:
    """1-device compute seconds per step at each batch, from bcjax.benchmark
    run in a child process (same model, image size, dtype, augmentation)."""
    run_specs = specs.from_config(config)
    model = run_specs.model
    cmd = [
        sys.executable,
        "-m",
        "bcjax.benchmark",
        f"--models={model.name}",
        f"--batch={','.join(map(str, batches))}",
        "--devices=1",
        f"--image-size={run_specs.data.image_size}",
        f"--dtype={model.dtype}",
        "--steps=10",
        "--warmup=2",
        "--ring=",
        f"--out={out_dir}",
    ]
    knob = family.width_of(model.name, width=model.width, width_multiplier=model.width_multiplier)
    for field, value in knob.items():  # the one width knob of the model's family
        cmd.append(f"--{field.replace('_', '-')}={value}")
    if run_specs.data.augment is not None:
        cmd.append("--augment")
    print(f"[scaling] probing 1-device compute at batches {list(batches)}", flush=True)
    subprocess.run(cmd, check=True, env=child_env(None), timeout=timeout, stdout=subprocess.DEVNULL)
    rows = json.loads((pathlib.Path(out_dir) / "benchmark.json").read_text())["rows"]
    return {int(r["per_device_batch"]): r["compute_ms"] / 1e3 for r in rows if not r.get("error")}


def is_done(path: pathlib.Path) -> bool:
    """results.json exists; a cv_summary.json must also say every fold is complete."""
    if not path.exists():
        return False
    return path.name != CV_DONE or bool(json.loads(path.read_text()).get("complete"))


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
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed run
                continue
            seconds = record.get("epoch_time_s")
            if isinstance(seconds, (int, float)):
                epoch_times.append(float(seconds))
    return {"results": results, "timing": timing, "epoch_times": epoch_times}


def fold_val_sets(cv_dir: pathlib.Path) -> dict[int, list[str]]:
    """Each finished fold's validation images, from its manifest."""
    out = {}
    for path in pathlib.Path(cv_dir).glob("fold_*/manifest.json"):
        k = path.parent.name.split("_", 1)[1]
        if k.isdigit():
            out[int(k)] = sorted(json.loads(path.read_text())["val"])
    return out
