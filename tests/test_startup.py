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
