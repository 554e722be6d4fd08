"""The command line of the scaling study: its flags, the config as the runs will read it, main."""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import sys
from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

from bcjax import config_check, specs
from bcjax.scaling import paired_cv, runs, tables

DESCRIPTION = "The study's table over device counts: one full training run per count."


def _make_configs_importable(config_arg: str) -> None:
    # Variant configs do `from configs import default`, as in bcjax.main: put the
    # folder above configs/ on the path.
    root = os.path.dirname(os.path.dirname(os.path.abspath(config_arg.split(":")[0])))
    if root not in sys.path:
        sys.path.insert(0, root)


def read_config(config_arg: str, overrides: Sequence[str]):
    """The config every run's ``bcjax.main`` will see: the file, then ``overrides``.

    Parsed by ml_collections.config_flags on a locked config, the machinery
    bcjax.main parses its own command line with, so a value the child would
    refuse is refused here and one it accepts reads the same (``t`` for a
    bool, no ``1e3`` for an int). Raises ValueError with the reason.
    """
    _make_configs_importable(config_arg)
    argv = ["bcjax.scaling", f"--config={config_arg}", *overrides]
    # A FlagValues of its own: the process-wide absl FLAGS stay untouched.
    flag_values = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file(
        "config",
        None,
        "Configuration file.",
        flag_values=flag_values,
        lock_config=True,
        sys_argv=argv,
    )
    try:
        leftover = flag_values(argv)
    except flags.Error as e:
        raise ValueError(str(e)) from None
    except AttributeError as e:  # an override of a field the locked config does not have
        raise ValueError(config_check.unknown_field_message(e)) from None
    if len(leftover) > 1:
        raise ValueError(f"unrecognized arguments: {' '.join(leftover[1:])}")
    return config_flag.value


def parse_args(argv: Sequence[str] | None = None):
    """(the tool's flags, the config as the runs read it, the user's override strings)."""
    p = argparse.ArgumentParser(
        prog="python -m bcjax.scaling",
        description=DESCRIPTION,
        epilog="Other --config.FIELD=VALUE flags go to every run.",
    )
    p.add_argument("--config", required=True)
    p.add_argument("--devices", default="1,2,4")
    p.add_argument("--mode", default="same_global", choices=runs.MODES)
    p.add_argument("--workdir", required=True)
    p.add_argument(
        "--lr-scaling",
        default="linear",
        choices=("linear", "none"),
        help="same_per_device: scale the learning rate with the global batch",
    )
    p.add_argument("--interconnect", default="pcie4", choices=tables.INTERCONNECTS)
    p.add_argument(
        "--overlap",
        type=float,
        default=None,
        help="fraction of the all-reduce hidden behind the backward pass for the pred_* "
        "columns; default: as the scaling model schedules its buckets (0 = none hidden)",
    )
    p.add_argument(
        "--probe-compute",
        action="store_true",
        help="measure 1-device compute at every per-device batch (bcjax.benchmark) "
        "for the pred_* (scaling model) columns, instead of assuming compute proportional "
        "to batch",
    )
    p.add_argument(
        "--rerun",
        action="store_true",
        help="train again even where results.json exists (CV mode keeps finished "
        "folds: remove WORKDIR/dev{N} to retrain them)",
    )
    p.add_argument(
        "--report-only", action="store_true", help="only rebuild the table from the runs"
    )
    p.add_argument("--timeout", type=float, default=None, help="seconds per run")
    p.add_argument(
        "--cv-folds",
        type=int,
        default=0,
        help="K >= 2: every device count runs the same K-fold cross-validation and "
        "the table compares them fold by fold (scaling_cv.*)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time (a quick accuracy look on a CPU; timings then disturb each other)",
    )
    args, overrides = p.parse_known_args(argv)
    try:
        config = read_config(args.config, overrides)
    except ValueError as e:
        p.error(str(e))
    return args, config, overrides


def _train_all(todo: Sequence[dict], args, workdir: pathlib.Path, overrides: Sequence[str]):
    def train(run):
        wd = workdir / f"dev{run['devices']}"
        cv_note = f", {args.cv_folds}-fold CV" if args.cv_folds else ""
        print(
            f"[scaling] {run['devices']} device(s): global batch {run['global_batch']} "
            f"({run['per_device_batch']}/device), lr {run['learning_rate']:.4g}{cv_note} "
            f"-> {wd}",
            flush=True,
        )
        elapsed = runs.run_one(
            args.config,
            wd,
            run,
            overrides,
            timeout=args.timeout,
            cache_dir=str(workdir / "jax_cache"),
        )
        print(f"[scaling] {run['devices']} device(s) done in {elapsed:.1f} s", flush=True)

    if args.jobs > 1:
        print(
            f"[scaling] {args.jobs} runs at a time: their timings disturb each other "
            "(use --jobs=1 for the timing columns)",
            flush=True,
        )
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(train, todo))
    else:
        for run in todo:
            train(run)


def _device_count_report(
    plan: Sequence[dict], args, config, workdir: pathlib.Path, overrides: Sequence[str]
) -> list[dict]:
    finished = []
    for run in plan:
        wd = workdir / f"dev{run['devices']}"
        if (wd / "results.json").exists():
            finished.append(runs.read_run(wd))
        else:
            print(f"[scaling] no results.json in {wd}; skipped", flush=True)
    compute_points = None
    if args.probe_compute and finished:
        batches = sorted({r["per_device_batch"] for r in plan} | {r["global_batch"] for r in plan})
        compute_points = runs.probe_compute(
            config, batches, workdir / "compute_probe", timeout=args.timeout
        )
    rows = tables.build_table(
        finished,
        args.mode,
        link=args.interconnect,
        overlap=args.overlap,
        compute_points=compute_points,
    )
    if not rows:
        sys.exit("no finished runs to tabulate")
    first = finished[0]["results"]
    title = (
        f"bcjax scaling: {first.get('model')} on {first.get('dataset')} data, "
        f"{first.get('num_epochs')} epochs, strategy {first.get('strategy')}, "
        f"mode {args.mode}"
    )
    md = tables.write_outputs(
        rows, workdir, mode=args.mode, link=args.interconnect, overlap=args.overlap, title=title
    )
    print(md)
    print(f"\nwrote {workdir / 'scaling.md'}, scaling.csv, scaling.json, scaling.png")
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args, config, overrides = parse_args(argv)
    devices = sorted({int(x) for x in args.devices.split(",") if x.strip()})
    workdir = pathlib.Path(args.workdir).expanduser().resolve()
    run_specs = specs.from_config(config)
    folds = run_specs.data.cv_folds
    if folds and not args.cv_folds:
        sys.exit(
            f"error: --config.cv.folds={folds} makes every run a cross-validation; "
            f"use --cv-folds={folds} so the tool compares the folds"
        )
    try:
        plan = runs.plan_runs(
            devices,
            args.mode,
            run_specs.run.global_batch_size,
            run_specs.optimizer.learning_rate,
            args.lr_scaling,
        )
        # The user's strings go to the children unchanged; the tool's own follow.
        overrides = list(overrides) + (runs.cv_overrides(args.cv_folds) if args.cv_folds else [])
    except ValueError as e:
        sys.exit(f"error: {e}")
    # A CV run is complete once bcjax.cv has written its summary.
    done_file = runs.CV_DONE if args.cv_folds else "results.json"
    todo = [
        r
        for r in plan
        if args.rerun or not runs.is_done(workdir / f"dev{r['devices']}" / done_file)
    ]
    if todo and not args.report_only:
        overrides += runs.shared_synthetic_data(config, workdir)
        _train_all(todo, args, workdir, overrides)
    if args.cv_folds:
        rows, _ = paired_cv.cv_report(workdir, plan, mode=args.mode, folds=args.cv_folds)
        return rows
    return _device_count_report(plan, args, config, workdir, overrides)
