"""Default bcjax configuration: ResNet-18 on BUSI-sized data, the study's setting.

Hardware and model variants import this file and override a few fields
(flax examples/imagenet style). Every value is checked by
`bcjax.config_check.validate` before anything compiles.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # Model (bcjax.models.create): width / width_multiplier shrink the zoo's
    # networks for quick CPU runs; 64 and 1.0 are torchvision's widths.
    c.model = "resnet18"
    c.width = 64  # ResNet stem channels
    c.width_multiplier = 1.0  # MobileNet
    # Compute dtype: "float32" | "bfloat16" | "float16" (dynamic loss scaling,
    # bcjax.step.loss_scale) | "auto" (the chip's fast one, bcjax.runtime.dtype_for).
    # Parameters, optimizer state and BN statistics stay float32.
    # bfloat16 on TPUs and GPUs >= 8.0, float16 with dynamic loss scaling on 7.x and
    # the P100, float32 elsewhere (bcjax.runtime.dtype_for).
    c.dtype = "auto"
    c.bn_sync = True  # average BatchNorm statistics over all devices
    c.dropout_rate = 0.2  # MobileNet head
    # torchvision ImageNet weights to fine-tune from: a state_dict saved as .npz
    # (or .pth when torch is installed); see bcjax.models.convert. Needs the
    # full-width model (width 64 / width_multiplier 1.0). Empty = from scratch.
    c.pretrained = ""

    # Data. dataset: "auto" uses BUSI when found under data_dir, otherwise the
    # synthetic BUSI-like set (loudly); "folder" reads one sub-folder per class
    # under data_dir (masks beside their images as <name>_mask.png); "csv" reads
    # data_csv. The synthetic set is generated once into a cache shared by all
    # workdirs: $BCJAX_CACHE_DIR/synthetic (default ~/.cache/bcjax/synthetic).
    c.dataset = "auto"  # "auto" | "busi" | "synthetic" | "folder" | "csv"
    c.data_dir = "data"  # BUSI: Dataset_BUSI_with_GT, a folder holding it, or its zip
    # dataset="csv": columns image, label, optional mask (several joined by ";") and
    # group (a patient/case id: one group never straddles splits); relative paths are
    # read against the CSV's folder.
    c.data_csv = ""
    # The classes and their order (label k is class_names[k]). Empty = from the
    # data: BUSI's normal, benign, malignant; a folder's sub-folders or a CSV's
    # labels in sorted order. Given, data of a class not named here is an error.
    c.class_names = ()
    c.positive_class = ""  # what two-class reports call positive; empty = the last class
    c.synthetic_num = 780
    c.synthetic_seed = 0  # the generated images; independent of the split
    # A planted shortcut (for testing that a model looks at the lesion): "calliper"
    # or "text" stamped into a corner of malignant images with synthetic_mark_prob.
    c.synthetic_mark = ""  # "" | "calliper" | "text"
    c.synthetic_mark_prob = 0.9
    c.image_size = 224
    c.split_seed = 0
    c.split_fractions = (0.7, 0.1, 0.2)
    c.split_manifest = ""  # a saved manifest.json reproduces a split exactly
    c.exclude_conflicts = False  # drop duplicate groups filed under two classes
    c.balanced_sampling = False
    # Keep the training images on every device and send only indices per step:
    # "auto" does so on accelerators when they take at most 1 GiB; "yes" | "no".
    c.input_on_device = "auto"

    # k-fold cross-validation (bcjax.cv): folds >= 2 trains one model per fold
    # in workdir/fold_<k>, validating on that fold; the test part
    # (split_fractions[2]) is held out and the same for every fold. fold = -1
    # runs all folds and the aggregate report; 0..folds-1 runs only that fold.
    c.cv = ml_collections.ConfigDict()
    c.cv.folds = 0
    c.cv.fold = -1

    c.augment = ml_collections.ConfigDict()
    c.augment.enabled = True
    c.augment.crop_scale = (0.6, 1.0)  # fraction of the image area a random crop keeps
    c.augment.crop_ratio = (3 / 4, 4 / 3)  # its aspect ratio range (log-uniform)
    c.augment.flip = True
    c.augment.rotate_deg = 10.0
    c.augment.brightness = 0.2
    c.augment.contrast = 0.2

    # Parallelism: one mesh axis "data" over all devices of all processes.
    c.strategy = "shard_map"  # "shard_map" | "pmap" | "jit"
    c.num_devices = 0  # 0 = all available; on a CPU-only host N simulated devices
    c.coordinator_address = ""  # multi-process: "host:port"; empty = auto-detect
    c.num_processes = 0
    c.process_id = -1

    # Optimisation.
    c.global_batch_size = 32
    c.num_epochs = 100
    c.optimizer = "sgd"  # "sgd" | "adamw"
    c.learning_rate = 0.05  # for the global batch
    c.momentum = 0.9
    c.nesterov = True
    c.weight_decay = 1e-4  # spares BatchNorm parameters and biases
    c.warmup_epochs = 5
    c.label_smoothing = 0.1
    c.class_weights = ()  # e.g. (1.0, 0.6, 1.2); empty = unweighted
    c.clip_norm = 0.0  # 0 = no clipping
    # A step whose loss or gradients are NaN/Inf is never applied; then "stop"
    # ends the run naming the step and the last good checkpoint, "skip" goes on.
    c.nan_policy = "stop"
    c.seed = 0

    # Evaluation, logging, checkpoints.
    c.eval_every_epochs = 1
    c.log_every_steps = 20
    c.checkpoint_every_epochs = 5
    c.keep_latest = 2
    c.keep_best = 1
    c.best_metric = "macro_f1"  # validation metric that picks the best checkpoint
    # Stop when best_metric has not improved for this many evaluations (0 = never).
    c.early_stopping_patience = 0
    # A workdir holding another run's checkpoints is refused; True moves that
    # run aside (to workdir/replaced-<time>/) and starts afresh. A run of this
    # same model/batch/data is resumed even then (a restart after a kill keeps
    # its work); to retrain it from scratch, use a new workdir.
    c.fresh_start = False
    c.compilation_cache = True
    # After training: synchronised step time, compute vs collective time, the
    # gradient all-reduce alone, FLOPs and memory (bcjax.timing.breakdown) into timing.json.
    c.timing_breakdown = True
    # For the best checkpoint's test part: calibration, operating points, bootstrap
    # intervals, mask-grounded Grad-CAM and the lesion probes (bcjax.clinical) into
    # results.json, with their PNGs.
    c.clinical_report = True
    # Locked: a variant or an override that names an unknown field (a typo)
    # fails at once instead of being silently ignored.
    c.lock()
    return c
