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
from bcjax.eval import plots
from bcjax.train.run_setup import Run

log = logging.getLogger(__name__)


def summarize(run: Run, best: dict, wall_time_s: float, wall_time_s_this_process: float) -> dict:
    """results.json's dict."""
    config, data, progress = run.config, run.data, run.progress
    history, stopped = progress.history, progress.stopped
    return {
        "model": config.model,
        "strategy": config.strategy,
        "num_devices": run.mesh.devices.size,
        "num_processes": jax.process_count(),
        "platform": jax.devices()[0].platform,
        "global_batch_size": config.global_batch_size,
        "num_epochs": config.num_epochs,
        "steps_per_epoch": run.steps_per_epoch,
        "input_on_device": run.images_on_device,
        "dataset": data.source["dataset"],
        "data_path": data.source["path"],
        "warning": data.source["warning"],
        # What the labels and the probability columns of the predictions mean.
        "class_names": list(data.class_names),
        "positive_class": data.positive_class,
        "best_epoch": best["epoch"],
        "best_metric": config.best_metric,
        "epochs_trained": history[-1]["epoch"] if history else 0,
        "stopped_epoch": stopped["epoch"] if stopped else None,
        "stop_reason": stopped["reason"] if stopped else None,
        "pretrained": config.pretrained or None,
        "cv_fold": config.cv.fold if config.cv.folds >= 2 else None,
        "val_best": next(
            (h["val"] for h in history if h["epoch"] == best["epoch"] and "val" in h), None
        ),
        "test": best["test"],
        **best["clinical"],  # calibration, operating_points, bootstrap, grounding, probes
        "wall_time_s": wall_time_s,
        "wall_time_s_this_process": wall_time_s_this_process,
        "skipped_steps": progress.skipped_steps,
        "config": config.to_dict(),
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


def write_outputs(run: Run, best: dict) -> None:
    """The predictions of the best checkpoint, the learning curves and the confusion matrix."""
    if not run.is_main:
        return
    for part, predictions in best["predictions"].items():
        files.save_npz(run.workdir / f"{part}_predictions.npz", **predictions)
    stopped = run.progress.stopped
    curves = [
        {"epoch": h["epoch"], "train": h["train"], **({"val": h["val"]} if "val" in h else {})}
        for h in run.progress.history
    ]
    plots.plot_learning_curves(
        curves,
        run.workdir / "learning_curves.png",
        best_epoch=best["epoch"],
        stop_epoch=stopped["epoch"] if stopped else None,
        title=f"early stop: {stopped['reason']}" if stopped else None,
    )
    plots.plot_confusion_matrix(
        np.asarray(best["test"]["confusion_matrix"]),
        best["test"]["class_names"],
        run.workdir / "confusion_matrix.png",
    )


def write_timing(run: Run, timing: dict) -> None:
    if run.is_main:
        files.write_json(timing, run.workdir / "timing.json", default=str)


def write_results(run: Run, results: dict) -> None:
    """results.json, a run's last file: its presence means the run is complete (bcjax.cv relies
    on it). Then the data's warning again, so that it is the last line a user reads."""
    if run.is_main:
        files.write_json(results, run.workdir / "results.json", default=str)
    if run.data.source["warning"]:
        log.warning(run.data.source["warning"])
