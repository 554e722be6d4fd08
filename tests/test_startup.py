"""Start-up imports only what a run uses: TFDS, the torchvision converter and torch only
when asked for, and the model zoo without the data and checkpoint stack.

Each check runs in a fresh interpreter, since this test process has imported everything."""

import subprocess
import sys

import pytest

# Never needed by a training run unless it asks: the TFDS builder (config/CLI), the
# converter and torch (config.pretrained).
ON_REQUEST = (
    "tensorflow_datasets",
    "tensorflow",
    "torch",
    "torchvision",
    "bcjax.data.busi_tfds",
    "bcjax.models.convert",
    "bcjax.models.weights_file",
)
# Not needed to build or apply a model (DESIGN.md: research code imports the zoo alone).
RUN_STACK = (
    "grain",
    "orbax",
    "clu",
    "matplotlib",
    "optax",
    "tensorboardX",
    "bcjax.data",
    "bcjax.train",
)

# What bcjax.main.main imports before it trains (after runtime.prepare).
RUN_MODULES = (
    "bcjax.config_check",
    "bcjax.runtime",
    "bcjax.cv",
    "bcjax.data.busi",
    "bcjax.train.checkpoint",
    "bcjax.train.loop",
)


def loaded_after_import(*modules: str) -> set[str]:
    """Every module in sys.modules after a fresh interpreter imports ``modules``."""
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print('\\n'.join(sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    return set(out.split())


def _present(loaded: set[str], names) -> list[str]:
    """``names`` (packages or modules) that are in ``loaded``, with any of their submodules."""
    return [n for n in names if any(m == n or m.startswith(n + ".") for m in loaded)]


def test_bcjax_main_imports_no_framework():
    # Parsing flags (and failing on a wrong one) needs neither JAX nor any data stack.
    loaded = loaded_after_import("bcjax.main")
    assert _present(loaded, ON_REQUEST + RUN_STACK + ("jax", "flax")) == []


def test_a_run_imports_nothing_on_request():
    loaded = loaded_after_import("bcjax.main", *RUN_MODULES)
    assert "bcjax.train.loop" in loaded  # the check below looked at a run's modules
    assert _present(loaded, ON_REQUEST) == []


@pytest.mark.parametrize("module", ["bcjax.models", "bcjax.data"])
def test_library_imports_stay_light(module):
    loaded = loaded_after_import(module)
    assert module in loaded
    heavy = ON_REQUEST + ("grain", "orbax", "clu", "matplotlib")
    if module == "bcjax.models":
        heavy += ("optax", "tensorboardX", "bcjax.data", "bcjax.train")
    assert _present(loaded, heavy) == []


# Loaded by the runs that use them, not by importing the training loop: the checks at the
# config boundary (bcjax.main), the code that makes a new split (a resumed run reads its
# manifest), each model family (a run builds one), the reports run after training, float16's
# loss scaling and the pmap strategy (runs that ask for them).
NOT_IN_THE_LOOP = (
    "bcjax.step.loss_scale",
    "bcjax.parallel.pmap",
    "bcjax.config_check",
    "bcjax.data.splits",
    "bcjax.models.layers",
    "bcjax.models.mobilenet",
    "bcjax.models.resnet",
    "bcjax.eval.clinical_outputs",
    "bcjax.clinical",
    "bcjax.timing.breakdown",
)


def test_the_loop_imports_what_every_run_uses_only():
    loaded = loaded_after_import("bcjax.train.loop")
    assert {"bcjax.train.loop", "bcjax.train.run_lock", "bcjax.data.manifest"} <= loaded
    assert _present(loaded, NOT_IN_THE_LOOP) == []


def test_a_model_family_is_imported_when_first_used():
    code = (
        "import sys\n"
        "import bcjax.models\n"
        "family = lambda: sorted(m for m in sys.modules if m in "
        "('bcjax.models.resnet', 'bcjax.models.mobilenet'))\n"
        "print(family())\n"
        "bcjax.models.create('mobilenet_v2', num_classes=2)\n"
        "print(family())\n"
        "from bcjax.models import ResNet18\n"
        "print(family(), ResNet18 is sys.modules['bcjax.models.resnet'].ResNet18)\n"
        "print(sorted(set(bcjax.models.__all__) - set(dir(bcjax.models))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    ).stdout.splitlines()
    assert out == [
        "[]",
        "['bcjax.models.mobilenet']",
        "['bcjax.models.mobilenet', 'bcjax.models.resnet'] True",
        "[]",  # every exported name is listed by dir()
    ]


def test_reading_png_files_never_loads_the_dicom_reader(tmp_path):
    code = (
        "import sys\n"
        "from bcjax.data import pipeline, readers, synthetic\n"
        f"root = synthetic.generate({str(tmp_path)!r}, num=12, seed=0, min_size=40, max_size=48)\n"
        "labelled = readers.read('busi', root)\n"
        "arrays = pipeline.load_arrays(labelled.examples, 16)\n"
        "print(len(arrays.labels), 'bcjax.data.dicom' in sys.modules, 'pydicom' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    ).stdout.split()
    assert out == ["12", "False", "False"]
