"""Step throughput and its breakdown, models x per-device batch x device counts.

    python -m bcjax.benchmark --models resnet18,resnet50,mobilenet_v2,mobilenet_v3_large \\
        --batch 32,128 --devices 1 --dtype bfloat16 --image-size 224 --out runs/bench

Synthetic in-memory data (random uint8 images, already decoded): this times
the training step alone, as compiled for the run (normalisation on device;
``--augment`` adds the on-device augmentation). Each case compiles once and
then times ``--steps`` synchronised steps after ``--warmup``; one line per
case as it finishes, a Markdown table at the end, CSV and JSON in ``--out``.
``--input`` adds the host input pipeline's throughput (bcjax.data.throughput),
``--compile-cache`` cold vs warm compiles of each case, ``--clinical`` the
clinical report's time: figures that unit tests must not assert.
On a CPU, device counts above 1 are simulated: the output says so.

``--ablate`` times instead, on one device, a ladder of steps from a plain
anchor-like step up to bcjax's (bcjax.timing.ablation): what the model
definition and each extra of the step (uint8 input, metrics, gradient norm,
NaN/Inf guard, shard_map) cost. Writes ablation.csv/.json/.md.

The package: bcjax.benchmark.cli (flags, the loop over cases, ``--ablate``,
``--input``), bcjax.benchmark.steps (one case built and timed),
bcjax.benchmark.report (rows, tables, anchors, scaling-model predictions, files),
bcjax.benchmark.fixed_costs (the clinical report's time, cold vs warm compiles).
Their names are importable from ``bcjax.benchmark``; nothing here imports JAX.
"""

from bcjax.benchmark.cli import (  # noqa: F401  (part of this package's API)
    _csv_ints,
    main,
    measure_input,
    parse_args,
    run_ablation,
)
from bcjax.benchmark.fixed_costs import (  # noqa: F401  (part of this package's API)
    clinical_line,
    compile_cache_lines,
    measure_clinical,
)
from bcjax.benchmark.report import (  # noqa: F401  (part of this package's API)
    COLUMNS,
    MD_COLUMNS,
    _fmt,
    anchor_rows,
    case_line,
    load_anchors,
    markdown_table,
    ring_predictions,
    to_row,
    write_outputs,
)
from bcjax.benchmark.steps import (  # noqa: F401  (part of this package's API)
    NUM_CLASSES,
    _model_and_state,
    _model_kwargs,
    random_batch,
    run_case,
)
