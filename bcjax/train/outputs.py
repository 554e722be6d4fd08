"""What a run leaves in its workdir once trained: the summary, predictions, plots, timing.

results.json is written last (``write_results``): its presence means the run is complete.
"""

from __future__ import annotations

import json
import logging
import pathlib

import jax
import numpy as np

from bcjax import files
from bcjax.train.run_setup import Progress, RunContext

log = logging.getLogger(__name__)


def summarize(
    ctx: RunContext,
    progress: Progress,
    best: dict,
    wall_time_s: float,
    wall_time_s_this_process: float,
) -> dict:
    """results.json's dict."""
    run_specs, data = ctx.specs, ctx.data
    history, stopped = progress.history, progress.stopped
    return {
        "model": run_specs.model.name,
        "strategy": run_specs.run.strategy,
        "num_devices": ctx.mesh.devices.size,
        "num_processes": jax.process_count(),
        "platform": jax.devices()[0].platform,
        "global_batch_size": run_specs.run.global_batch_size,
        "num_epochs": run_specs.run.num_epochs,
        "steps_per_epoch": ctx.steps_per_epoch,
        "input_on_device": ctx.images_on_device,
        "dataset": data.source["dataset"],
        "data_path": data.source["path"],
        "warning": data.source["warning"],
        # What the labels and the probability columns of the predictions mean.
        "class_names": list(data.class_names),
        "positive_class": data.positive_class,
        "best_epoch": best["epoch"],
        "best_metric": run_specs.run.best_metric,
        "epochs_trained": history[-1]["epoch"] if history else 0,
        "stopped_epoch": stopped["epoch"] if stopped else None,
        "stop_reason": stopped["reason"] if stopped else None,
        "pretrained": run_specs.model.pretrained or None,
        "cv_fold": run_specs.data.cv_fold if run_specs.data.cv_folds >= 2 else None,
        "val_best": next(
            (h["val"] for h in history if h["epoch"] == best["epoch"] and "val" in h), None
        ),
        "test": best["test"],
        **best["clinical"],  # calibration, operating_points, bootstrap, grounding, probes
        "wall_time_s": wall_time_s,
        "wall_time_s_this_process": wall_time_s_this_process,
        "skipped_steps": progress.skipped_steps,  # NaN/Inf
        "overflow_skipped_steps": progress.total("overflow_skipped_steps"),  # float16
        "config": run_specs.config,
    }


def previous_walls(workdir: pathlib.Path) -> dict:
    """The wall times of the process that trained (results.json, else timing.json)."""
    if (workdir / "results.json").exists():
        saved = json.loads((workdir / "results.json").read_text())
    elif (workdir / "timing.json").exists():
        timing = json.loads((workdir / "timing.json").read_text())
        saved = {
            "wall_time_s": timing.get("train_wall_s"),
            "wall_time_s_this_process": timing.get("train_wall_s_this_process"),
        }
    else:
        saved = {}
    return {
        k: v
        for k, v in saved.items()
        if k in ("wall_time_s", "wall_time_s_this_process") and v is not None
    }


def write_outputs(ctx: RunContext, progress: Progress, best: dict) -> None:
    """The predictions of the best checkpoint, the learning curves and the confusion matrix."""
    if not ctx.is_main:
        return
    from bcjax.eval import plots  # matplotlib: loaded once training is over

    for part, predictions in best["predictions"].items():
        files.save_npz(ctx.workdir / f"{part}_predictions.npz", **predictions)
    stopped = progress.stopped
    curves = [
        {"epoch": h["epoch"], "train": h["train"], **({"val": h["val"]} if "val" in h else {})}
        for h in progress.history
    ]
    plots.plot_learning_curves(
        curves,
        ctx.workdir / "learning_curves.png",
        best_epoch=best["epoch"],
        stop_epoch=stopped["epoch"] if stopped else None,
        title=f"early stop: {stopped['reason']}" if stopped else None,
    )
    plots.plot_confusion_matrix(
        np.asarray(best["test"]["confusion_matrix"]),
        best["test"]["class_names"],
        ctx.workdir / "confusion_matrix.png",
    )


def write_timing(ctx: RunContext, timing: dict) -> None:
    if ctx.is_main:
        files.write_json(timing, ctx.workdir / "timing.json", default=str)


def write_results(ctx: RunContext, results: dict) -> None:
    """results.json, a run's last file: its presence means the run is complete (bcjax.cv relies
    on it). Then the data's warning again, so that it is the last line a user reads."""
    if ctx.is_main:
        files.write_json(results, ctx.workdir / "results.json", default=str)
    if ctx.data.source["warning"]:
        log.warning(ctx.data.source["warning"])
