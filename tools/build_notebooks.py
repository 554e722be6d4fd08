"""Writes colab/quickstart.ipynb and colab/scaling.ipynb from the cells below.

    python tools/build_notebooks.py

The notebooks are generated so that their code stays reviewable here as plain
Python; tests/test_notebooks.py executes the written files top to bottom.
"""

import pathlib

import nbformat
from nbformat import v4

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLAB_URL = "https://colab.research.google.com/github/bcjax/bcjax/blob/main/colab/{}"

SETUP = """\
# Finds a bcjax checkout (this repository, when the notebook runs from it) or
# clones one (Colab), and makes `bcjax` and its `configs` importable.
import importlib.util, os, pathlib, subprocess, sys

def find_repo():
    if REPO_DIR != "auto":
        return pathlib.Path(REPO_DIR)
    for candidate in (pathlib.Path("."), pathlib.Path(".."), pathlib.Path("bcjax")):
        if (candidate / "configs" / "default.py").is_file() and (candidate / "bcjax").is_dir():
            return candidate
    return pathlib.Path("bcjax")

repo = find_repo().resolve()
if not (repo / "configs" / "default.py").is_file():
    if not INSTALL:
        raise FileNotFoundError(f"No bcjax checkout at {repo}; set REPO_DIR or INSTALL = True.")
    print(f"Cloning {REPO_URL} into {repo} ...")
    subprocess.run(["git", "clone", "--depth=1", REPO_URL, str(repo)], check=True)
import importlib.metadata as metadata

def installed(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None

if INSTALL and installed("bcjax") is None:
    # Colab ships JAX built for its accelerator: pin it, so pip only adds the rest of the stack.
    pins = [f"{p}=={installed(p)}" for p in ("jax", "jaxlib") if installed(p)]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(repo), *pins], check=True)
sys.path.insert(0, str(repo))  # an editable install is only seen after a restart
print("bcjax from", repo)
"""


def quickstart():
    cells = [
        v4.new_markdown_cell(
            "# bcjax quickstart: breast-ultrasound classification on a free accelerator\n\n"
            f"[Open in Colab]({COLAB_URL.format('quickstart.ipynb')})\n\n"
            "Trains ResNet-18 or MobileNetV2 on BUSI (normal / benign / malignant), or on your own labelled "
            "images with the classes they have, and shows the learning "
            "curves, the confusion matrix, where the time went (compile, compute, collectives, input) and "
            "Grad-CAM maps of a few test images.\n\n"
            "* **Runtime**: Colab: *Runtime → Change runtime type* → a GPU (one device) or a TPU (all its "
            "cores). Kaggle: *Settings → Accelerator* → GPU T4 x2 or P100 (the notebook trains on one), and "
            "*Settings → Internet* on, to fetch bcjax. "
            "On a CPU the notebook trains a small model on 64 px images so that a first look takes minutes. "
            "The compute dtype follows the chip: bfloat16 on TPUs and A100/L4/H100, float16 with dynamic "
            "loss scaling on T4/V100/P100, float32 elsewhere.\n"
            "* **Data**: BUSI is not downloaded for you. On Kaggle, attach it: *Add Input* → search the "
            'datasets for BUSI (`Dataset_BUSI_with_GT`, e.g. "Breast Ultrasound Images Dataset") → *Add*; '
            '`DATA = "auto"` finds it under `/kaggle/input` and the run is written to `/kaggle/working`. '
            'On Colab set `DATA = "upload"` to upload `Dataset_BUSI_with_GT.zip`, or give a path (e.g. on '
            'Google Drive). Without BUSI, `"auto"` (and `"synthetic"`) '
            "generates a BUSI-like set of 780 images: its accuracy says nothing about real ultrasound. "
            "Your own data: a folder with one sub-folder of images per class (e.g. `benign/`, `malignant/`), "
            "or a CSV with the columns `image`, `label` and optionally `mask` and `group` (a patient id)."
        ),
        v4.new_code_cell(
            "# Parameters (tests override them to run tiny)\n"
            'MODEL = "resnet18"       # or "mobilenet_v2", "resnet50", "mobilenet_v3_large", ...\n'
            'DATA = "auto"            # "auto": BUSI attached on Kaggle, else synthetic | "synthetic" | "upload" |\n'
            "                         # a path: BUSI (folder or zip), class folders, a .csv\n"
            "EPOCHS = 0               # 0: the runtime's default (100 on an accelerator, 20 on a CPU)\n"
            "IMAGE_SIZE = 0           # 0: 224 on an accelerator, 64 on a CPU\n"
            "SMALL = None             # None: small model on a CPU only; True/False forces it\n"
            "SYNTHETIC_NUM = 780\n"
            'PRETRAINED = ""          # torchvision weights as .npz/.pth (full-size model only)\n'
            'WORKDIR = "runs/colab_quickstart"\n'
            'REPO_URL = "https://github.com/bcjax/bcjax.git"  # your fork, if you have one\n'
            'REPO_DIR = "auto"        # a bcjax checkout; "auto" finds or clones one\n'
            "INSTALL = True\n"
            "SHOW_GRADCAM = 3         # test images to explain with Grad-CAM (0: none)\n"
            'OVERRIDES = {}           # any other config fields, e.g. {"learning_rate": 0.02}',
            metadata={"tags": ["parameters"]},
        ),
        v4.new_code_cell(SETUP),
        v4.new_markdown_cell("## The runtime and its defaults"),
        v4.new_code_cell(
            "import jax\n"
            "from bcjax import runtime\n\n"
            "device = jax.devices()[0]\n"
            "platform = device.platform  # 'gpu', 'tpu' or 'cpu'\n"
            'host = runtime.notebook_host()  # "kaggle" (/kaggle/input, writable /kaggle/working), "colab" or "local"\n'
            'print(f"{jax.device_count()} x {device.device_kind} ({platform}) on {host}, JAX {jax.__version__}")\n'
            'if host == "kaggle" and not os.path.isabs(WORKDIR):\n'
            "    WORKDIR = os.path.join(runtime.KAGGLE_WORKING, WORKDIR)  # kept with the notebook's output\n"
            'small = (platform == "cpu") if SMALL is None else SMALL\n\n'
            "from configs import default, quickstart\n"
            "config = quickstart.get_config() if small else default.get_config()\n"
            "config.model = MODEL\n"
            "# bfloat16 on TPUs and A100/L4/H100; float16 with loss scaling on T4/V100/P100; else float32.\n"
            "config.dtype = runtime.default_dtype()\n"
            "# A TPU trains on all its cores; a Colab GPU is one device; the CPU runs one device here.\n"
            'config.num_devices = jax.device_count() if platform == "tpu" else 1\n'
            "config.global_batch_size = max(32 // config.num_devices, 1) * config.num_devices\n"
            "if EPOCHS:\n"
            "    config.num_epochs = EPOCHS\n"
            "    config.warmup_epochs = min(config.warmup_epochs, max(EPOCHS - 1, 0))\n"
            "if IMAGE_SIZE:\n"
            "    config.image_size = IMAGE_SIZE\n"
            'if small and MODEL.startswith("mobilenet"):\n'
            "    config.width_multiplier = 0.5\n"
            "config.synthetic_num = SYNTHETIC_NUM\n"
            "config.pretrained = PRETRAINED\n"
            "for field, value in OVERRIDES.items():\n"
            "    config[field] = value\n"
            'print(f"{config.model}, {config.image_size} px, {config.dtype}, {config.num_epochs} epochs, "\n'
            '      f"global batch {config.global_batch_size} on {config.num_devices} device(s)")'
        ),
        v4.new_markdown_cell("## The data"),
        v4.new_code_cell(
            "data = DATA\n"
            'if data == "auto":\n'
            '    data = (runtime.kaggle_busi() if host == "kaggle" else None) or "synthetic"\n'
            '    if host == "kaggle" and data == "synthetic":\n'
            '        print("No BUSI under /kaggle/input: Add Input -> search the datasets for "\n'
            '              "Dataset_BUSI_with_GT -> Add, then run this cell again. Synthetic data meanwhile.")\n'
            'if data == "synthetic":\n'
            '    config.dataset = "synthetic"\n'
            'elif data == "upload":\n'
            "    from google.colab import files  # Colab only\n"
            "    uploaded = files.upload()  # choose Dataset_BUSI_with_GT.zip\n"
            '    os.makedirs("data", exist_ok=True)\n'
            "    for name, payload in uploaded.items():\n"
            '        pathlib.Path("data", name).write_bytes(payload)\n'
            '    config.dataset, config.data_dir = "busi", "data"\n'
            "else:  # the classes come from the data: BUSI's three, the folder names or the CSV's labels\n"
            "    from bcjax.data import readers\n"
            '    config.dataset = readers.detect(data)  # "busi", "folder" or "csv"\n'
            '    if config.dataset == "csv":\n'
            "        config.data_csv = data\n"
            "    else:\n"
            "        config.data_dir = data\n"
            "from bcjax import config_check\n"
            "config_check.validate(config, num_devices_available=jax.device_count())\n"
            'print("dataset:", config.dataset, {"synthetic": "", "csv": config.data_csv}.get(config.dataset, config.data_dir))'
        ),
        v4.new_markdown_cell(
            "## Train\n\nProgress lines show the epoch, steps/s and the time left. Re-running this cell "
            "resumes from the last checkpoint in `WORKDIR` (after a Colab disconnect, too)."
        ),
        v4.new_code_cell(
            "import logging\n"
            'logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)\n'
            'logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax\'s per-save lines\n'
            "runtime.enable_compilation_cache()\n"
            "from bcjax.train import loop\n"
            "results = loop.train_and_evaluate(config, WORKDIR)\n"
            "print(f\"best epoch {results['best_epoch']}, test accuracy {results['test']['accuracy']:.3f}, \"\n"
            "      f\"macro-F1 {results['test']['macro_f1']:.3f}, {results['wall_time_s']:.0f} s\")"
        ),
        v4.new_markdown_cell("## Learning curves, confusion matrix and the test report"),
        v4.new_code_cell(
            "from IPython.display import Image, display\n"
            "from bcjax.eval import metrics\n"
            'display(Image(filename=f"{WORKDIR}/learning_curves.png"))\n'
            'display(Image(filename=f"{WORKDIR}/confusion_matrix.png"))\n'
            'print(metrics.format_report(results["test"]))'
        ),
        v4.new_markdown_cell(
            "## Where the time went\n\nCompile time is kept apart from the step times; the breakdown "
            "splits a step into per-device compute and exposed collective time (zero on one device)."
        ),
        v4.new_code_cell(
            "import json\n"
            "from bcjax.timing import breakdown\n"
            'timing = json.loads(pathlib.Path(WORKDIR, "timing.json").read_text())\n'
            'for name, entry in timing.get("compile", {}).items():\n'
            "    print(f\"compile {name}: {entry.get('compile_s', 0):.1f} s\")\n"
            'if "breakdown" in timing:\n'
            '    print(breakdown.format_summary(timing["breakdown"]))'
        ),
        v4.new_markdown_cell(
            "## Grad-CAM: where the model looked\n\nThe class probabilities of a few test images and the "
            "regions that drove the predicted class."
        ),
        v4.new_code_cell(
            "if SHOW_GRADCAM:\n"
            "    from bcjax import predict\n"
            '    manifest = json.loads(pathlib.Path(WORKDIR, "manifest.json").read_text())\n'
            '    data_root = pathlib.Path(results["data_path"])\n'
            "    if data_root.is_file():  # a CSV: the images are named relative to its folder\n"
            "        data_root = data_root.parent\n"
            '    images = [str(data_root / name) for name in manifest["test"][:SHOW_GRADCAM]]\n'
            '    rows = predict.predict_files(WORKDIR, images, pathlib.Path(WORKDIR, "predictions"))\n'
            '    for png in sorted(pathlib.Path(WORKDIR, "predictions").glob("*.png"))[:SHOW_GRADCAM]:\n'
            "        display(Image(filename=str(png)))"
        ),
    ]
    return cells


def scaling():
    cells = [
        v4.new_markdown_cell(
            "# bcjax scaling study: does more hardware train faster?\n\n"
            f"[Open in Colab]({COLAB_URL.format('scaling.ipynb')})\n\n"
            "The 2024 study found that more GPUs did not always train ResNet-18 and MobileNetV2 faster on "
            "BUSI. This notebook trains the same configuration on 1, 2, 4, ... devices with the same seed "
            "and tabulates accuracy, wall time, speedup and efficiency, with each step split into "
            "compute, exposed collective time and input wait.\n\n"
            "* A **TPU** runtime: real measurements on 1, 2, 4, ... up to its core count.\n"
            "* A **GPU** runtime with one GPU (Colab's T4): it runs one device and predicts 2-8 GPUs with "
            "the scaling model (`bcjax.timing.scaling_model`) from the measured compute.\n"
            "* A runtime with **two GPUs** (Kaggle's free *GPU T4 x2*: two GPUs over PCIe, no NVLink, the "
            "study's own setting): the study on 1 and 2 GPUs, cross-validated (5 folds, each compared "
            "fold by fold), and beside it the scaling model's prediction for that machine (2 GPUs over "
            "PCIe 3, peer to peer only when `nvidia-smi` reports it), to check the model in one sitting. "
            "On Kaggle turn *Settings → Internet* on, to fetch bcjax.\n"
            "* A **CPU** runtime simulates the devices on the host's cores: the accuracy columns are real, "
            "the timings are labelled simulated."
        ),
        v4.new_code_cell(
            "# Parameters (tests override them to run tiny)\n"
            'MODEL = "resnet18"\n'
            'DEVICES = "auto"         # e.g. "1,2,4,8"; auto: what the runtime has\n'
            'MODE = "same_global"     # the study\'s setting; or "same_per_device"\n'
            "EPOCHS = 0               # 0: 30 on an accelerator, 5 on a CPU\n"
            "IMAGE_SIZE = 0           # 0: 224 on an accelerator, 64 on a CPU\n"
            'CV_FOLDS = "auto"        # >= 2: cross-validated, paired comparisons between device counts;\n'
            "                         # auto: 5 on a 2-GPU runtime, else 0\n"
            "SYNTHETIC_NUM = 780\n"
            "EXTRA = []               # more --config.field=value overrides\n"
            "JOBS = 1                 # runs at a time; 2 gives a quicker accuracy look on a CPU (timings disturbed)\n"
            'WORKDIR = "runs/colab_scaling"\n'
            'REPO_URL = "https://github.com/bcjax/bcjax.git"\n'
            'REPO_DIR = "auto"\n'
            "INSTALL = True\n"
            'INTERCONNECT = "auto"    # for the prediction: pcie3, pcie3-2gpu-nop2p, pcie4, pcie5, nvlink_h100, ...\n'
            "                         # auto: PCIe 3 (P2P as nvidia-smi reports) on a 2-GPU runtime, else pcie4",
            metadata={"tags": ["parameters"]},
        ),
        v4.new_code_cell(SETUP),
        v4.new_markdown_cell(
            "## The runtime\n\nEach device count runs in its own process (a TPU can only be held by one "
            "process at a time), so this kernel asks a short-lived process what the runtime has."
        ),
        v4.new_code_cell(
            "from bcjax import runtime\n"
            "platform, count, kind, dtype = runtime.probe_devices()\n"
            'print(f"{count} x {kind} ({platform})")\n'
            'if DEVICES == "auto":\n'
            '    top = count if platform != "cpu" else 4\n'
            "    devices = [n for n in (1, 2, 4, 8) if n <= top]\n"
            "else:\n"
            '    devices = [int(n) for n in DEVICES.split(",")]\n'
            'accelerator = platform != "cpu"\n'
            'two_gpus = platform == "gpu" and count == 2  # e.g. Kaggle\'s T4 x2\n'
            'cv_folds = (5 if two_gpus else 0) if CV_FOLDS == "auto" else int(CV_FOLDS)\n'
            'link = (runtime.two_gpu_link() if two_gpus else "pcie4") if INTERCONNECT == "auto" else INTERCONNECT\n'
            "epochs = EPOCHS or (30 if accelerator else 5)\n"
            "size = IMAGE_SIZE or (224 if accelerator else 64)\n"
            'config_file = repo / "configs" / ("default.py" if accelerator else "quickstart.py")\n'
            'overrides = [f"--config.model={MODEL}", f"--config.num_epochs={epochs}",\n'
            '             f"--config.warmup_epochs={min(5, epochs - 1)}", f"--config.image_size={size}",\n'
            '             f"--config.dtype={dtype}",  # float16 (loss-scaled) on a T4/V100/P100\n'
            '             "--config.dataset=synthetic", f"--config.synthetic_num={SYNTHETIC_NUM}", *EXTRA]\n'
            'print("device counts:", devices, "| epochs:", epochs, "| image size:", size, "| dtype:", dtype,\n'
            '      "| folds:", cv_folds or "none", "| interconnect for the prediction:", link)'
        ),
        v4.new_markdown_cell(
            "## Run the study\n\nOne training per device count (per fold with `CV_FOLDS`), same seed and "
            "data; finished runs are reused when the cell is run again."
        ),
        v4.new_code_cell(
            'cmd = [sys.executable, "-m", "bcjax.scaling", f"--config={config_file}",\n'
            '       f"--devices={\',\'.join(map(str, devices))}", f"--mode={MODE}", f"--workdir={WORKDIR}",\n'
            '       f"--interconnect={link}", f"--jobs={JOBS}",\n'
            '       *([f"--cv-folds={cv_folds}"] if cv_folds else []),\n'
            "       *overrides]\n"
            'print(" ".join(cmd))\n'
            'env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))\n'
            'if platform == "cpu":\n'
            '    env["JAX_PLATFORMS"] = "cpu"  # simulated devices, even where a GPU plugin is installed\n'
            "# Streamed line by line: a notebook does not show a child process's own output.\n"
            "proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)\n"
            "for line in proc.stdout:\n"
            '    print(line, end="")\n'
            "if proc.wait():\n"
            '    raise RuntimeError(f"bcjax.scaling failed (exit code {proc.returncode}); see the lines above.")'
        ),
        v4.new_markdown_cell("## The table and the plot"),
        v4.new_code_cell(
            "from IPython.display import Image, Markdown, display\n"
            "out = pathlib.Path(WORKDIR)\n"
            'for md in sorted(out.glob("*.md")):\n'
            "    display(Markdown(md.read_text()))\n"
            'for png in sorted(out.glob("*.png")):\n'
            "    display(Image(filename=str(png)))"
        ),
        v4.new_markdown_cell(
            "## What the scaling model predicts for this machine\n\nA step on N devices costs the "
            "per-device compute plus the ring all-reduce of the gradients, 2(N-1)/N × gradient bytes / bus "
            "bandwidth (with NCCL's latencies and the wait for the slowest device). From the 1-device "
            "run's measured compute and its gradient size, `python -m bcjax.timing.scaling_model predict` "
            "gives the step time, speedup and efficiency on this machine's interconnect: on a 2-GPU "
            "runtime, compare its 2-device row with the measured one above. With BUSI's small batches "
            "the compute per device shrinks as N grows while the all-reduce does not, which is why the "
            "study saw little or no speedup."
        ),
        v4.new_code_cell(
            "from bcjax import scaling\n\n"
            "def gradient_mb(run_dir):\n"
            '    """float32 gradient size of a run\'s model, from its checkpoint, read in a CPU process:\n'
            '    this kernel leaves the accelerator to the study\'s runs."""\n'
            '    code = ("import sys, jax; from bcjax.train import checkpoint; print(4 * sum(p.size for p in "\n'
            '            "jax.tree.leaves(checkpoint.read_params(sys.argv[1]))))")\n'
            '    child = subprocess.run([sys.executable, "-c", code, str(run_dir / "checkpoints")],\n'
            '                           env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True, text=True, check=True)\n'
            "    return int(child.stdout.split()[-1]) / 1e6\n\n"
            'one_dir = out / "dev1" / ("fold_0" if cv_folds else "")  # the 1-device run (its first fold)\n'
            'one = scaling.row_from_run(scaling.read_run(one_dir)) if (one_dir / "results.json").is_file() else None\n'
            "# On one device a step is all compute; the breakdown's figure is preferred when it ran.\n"
            'compute_ms = one and (one["compute_ms"] or one["step_ms"])\n'
            "if one is None:\n"
            '    print("No 1-device run: nothing to predict from.")\n'
            "elif not compute_ms:\n"
            "    # The loop times the steps after an epoch's first few: a run this short timed none.\n"
            '    print("The 1-device run timed no step (too few steps per epoch); more images or "\n'
            '          "epochs, or a smaller batch, give the prediction its compute time.")\n'
            "else:\n"
            '    predict = [sys.executable, "-m", "bcjax.timing.scaling_model", "predict",\n'
            '               f"--grad-mb={gradient_mb(one_dir):.3f}",\n'
            "               f\"--per-image-ms={compute_ms / one['per_device_batch']:.4f}\",\n"
            "               f\"--link={link}\", f\"--devices={'1,2' if two_gpus else '1,2,4,8'}\",\n"
            "               f\"--global-batch={one['global_batch']}\"]\n"
            '    print(" ".join(predict))\n'
            "    print(subprocess.run(predict, env=env, capture_output=True, text=True, check=True).stdout)"
        ),
    ]
    return cells


def write(name, cells):
    # Fixed cell ids: regenerating an unchanged notebook leaves the file unchanged.
    for i, cell in enumerate(cells):
        cell.id = f"{pathlib.Path(name).stem}-{i}"
    nb = v4.new_notebook(cells=cells)
    nb.metadata.update(
        {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
            "accelerator": "GPU",
            "colab": {"provenance": []},
        }
    )
    path = ROOT / "colab" / name
    path.parent.mkdir(exist_ok=True)
    nbformat.write(nb, path)
    print("wrote", path)


if __name__ == "__main__":
    write("quickstart.ipynb", quickstart())
    write("scaling.ipynb", scaling())
