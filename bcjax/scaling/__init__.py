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
speedup, efficiency, compute / collective / input shares) beside the
scaling model's prediction for real devices (bcjax.timing.scaling_model),
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

# Modules: runs (the child processes and what they write), tables (the
# device-count table), paired_cv (the cross-validation table), cli (flags, main).
from bcjax.scaling.cli import main, parse_args, read_config
from bcjax.scaling.paired_cv import (
    CV_METRICS,
    cv_markdown,
    cv_report,
    cv_rows,
    paired_comparisons,
    write_cv_outputs,
)
from bcjax.scaling.runs import (
    MODES,
    child_command,
    cv_overrides,
    fold_val_sets,
    plan_runs,
    probe_compute,
    read_run,
    run_one,
    shared_synthetic_data,
)
from bcjax.scaling.tables import COLUMNS, build_table, markdown, row_from_run, write_outputs

__all__ = [
    "COLUMNS",
    "CV_METRICS",
    "MODES",
    "build_table",
    "child_command",
    "cv_markdown",
    "cv_overrides",
    "cv_report",
    "cv_rows",
    "fold_val_sets",
    "main",
    "markdown",
    "paired_comparisons",
    "parse_args",
    "plan_runs",
    "probe_compute",
    "read_config",
    "read_run",
    "row_from_run",
    "run_one",
    "shared_synthetic_data",
    "write_cv_outputs",
    "write_outputs",
]
