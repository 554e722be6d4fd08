"""The Colab notebooks run top to bottom on the CPU with tiny parameters."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import nbformat
import numpy as np
from nbclient import NotebookClient

from bcjax import models

ROOT = pathlib.Path(__file__).resolve().parents[1]


def execute(name, params, cwd, timeout=300, code=""):
    """Runs colab/<name> with `params` set right after its parameters cell (papermill's
    convention), followed by `code`."""
    nb = nbformat.read(ROOT / "colab" / name, as_version=4)
    (at,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    source = "\n".join([*(f"{k} = {v!r}" for k, v in params.items()), code])
    nb.cells.insert(
        at + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    )
    NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    ).execute()
    return nb


def outputs(nb) -> str:
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            text.append(
                out.get("text", "") or data.get("text/markdown", "") or data.get("text/plain", "")
            )
    return "\n".join(text)


def test_quickstart_notebook_on_kaggle(tmp_path):
    """On a (simulated) Kaggle runtime: BUSI attached under /kaggle/input is found and
    trained on, the run is written to /kaggle/working."""
    from bcjax.data import synthetic

    kaggle_input, kaggle_working = tmp_path / "kaggle" / "input", tmp_path / "kaggle" / "working"
    kaggle_working.mkdir(parents=True)
    busi = synthetic.generate(
        kaggle_input / "breast-ultrasound-images", num=36, seed=0, min_size=40, max_size=56
    )
    nb = execute(
        "quickstart.ipynb",
        dict(
            EPOCHS=2,
            IMAGE_SIZE=32,
            SMALL=True,
            WORKDIR="run",  # relative: under /kaggle/working on Kaggle
            REPO_DIR=str(ROOT),
            INSTALL=False,
            SHOW_GRADCAM=2,
            OVERRIDES={"width": 4, "global_batch_size": 8, "timing_breakdown": False},
        ),
        tmp_path,
        # The kernel sees these folders as Kaggle's.
        code=(
            f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "from bcjax import runtime as _runtime\n"
            f"_runtime.KAGGLE_INPUT, _runtime.KAGGLE_WORKING = {str(kaggle_input)!r}, "
            f"{str(kaggle_working)!r}"
        ),
    )
    workdir = kaggle_working / "run"
    results = json.loads((workdir / "results.json").read_text())
    assert not (tmp_path / "run").exists()
    # Found and read as BUSI (results.json still says the images are generated ones).
    assert results["num_epochs"] == 2 and results["config"]["dataset"] == "busi"
    assert pathlib.Path(results["data_path"]).resolve() == busi.resolve()
    text = outputs(nb)
    assert "on kaggle" in text and "float32" in text  # the CPU's dtype
    # The printed summary is the run's results.json.
    assert f"test accuracy {results['test']['accuracy']:.3f}" in text
    assert "compile train_step" in text
    assert len(list((workdir / "predictions").glob("*.png"))) == 2
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # curves, confusion matrix, two Grad-CAM overlays


def test_scaling_notebook_runs_the_study(tmp_path, monkeypatch):
    """The device-count study (bcjax.scaling) for devices 1, 2, 4 on a tiny config, through the
    notebook."""
    from bcjax.data import synthetic

    data = synthetic.generate(tmp_path / "data", num=48, seed=0, min_size=40, max_size=56)
    # Compile time is what this test waits for: the table needs neither optimised CPU
    # code nor undisturbed timings (two runs at a time).
    monkeypatch.setenv(
        "XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_llvm_disable_expensive_passes=true"
    )
    out = tmp_path / "study"
    nb = execute(
        "scaling.ipynb",
        dict(
            DEVICES="1,2,4",
            EPOCHS=2,
            IMAGE_SIZE=32,
            WORKDIR=str(out),
            REPO_DIR=str(ROOT),
            INSTALL=False,
            JOBS=2,
            EXTRA=[
                "--config.dataset=busi",
                f"--config.data_dir={data}",
                "--config.width=4",
                "--config.global_batch_size=8",
                "--config.warmup_epochs=1",
                "--config.log_every_steps=100",
                "--config.augment.enabled=False",
                "--config.timing_breakdown=False",
            ],
        ),
        tmp_path,
    )
    for n in (1, 2, 4):
        assert (out / f"dev{n}" / "results.json").is_file()
        timing = json.loads((out / f"dev{n}" / "timing.json").read_text())
        assert timing["compile"]["train_step"]["compile_s"] > 0
    for name in ("scaling.md", "scaling.csv", "scaling.json", "scaling.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "scaling.json").read_text())
    rows = saved["rows"]
    assert [r["devices"] for r in rows] == [1, 2, 4] and saved["simulated"]
    assert [r["per_device_batch"] for r in rows] == [8, 4, 2]
    for n, r in zip((1, 2, 4), rows):
        # Each row is its run's own results.json.
        run = json.loads((out / f"dev{n}" / "results.json").read_text())
        assert r["test_accuracy"] == run["test"]["accuracy"] and r["wall_s"] == run["wall_time_s"]
        assert r["compile_s"] > 0 and r["step_ms"] > 0 and r["pred_speedup"] > 0
    # Same seed, same data, same global batch: the runs train the same model
    # up to float reduction order.
    accs = [r["test_accuracy"] for r in rows]
    assert max(accs) - min(accs) <= 0.25
    text = outputs(nb)
    assert "device counts: [1, 2, 4]" in text and "timings simulated" in text
    assert "folds: none" in text and "interconnect for the prediction: pcie4" in text
    # The scaling model's prediction, through its CLI, from the 1-device run.
    assert "bcjax.timing.scaling_model predict" in text and "--link=pcie4" in text
    assert "--devices=1,2,4,8" in text and "| devices | per-device batch |" in text


def test_scaling_notebook_on_two_gpus(tmp_path, monkeypatch):
    """The 2-GPU branch (Kaggle's GPU T4 x2) on 2 simulated CPU devices: the kernel's device
    probe answers what two T4s answer; the notebook's own code then runs 1 and 2 devices
    cross-validated, compares them fold by fold, and prints the scaling model's prediction for
    2 GPUs over PCIe 3 (no peer to peer: this host has no nvidia-smi to report it)."""
    from bcjax import runtime
    from bcjax.data import synthetic
    from bcjax.timing.scaling_model import presets

    data = synthetic.generate(tmp_path / "data", num=60, seed=0, min_size=40, max_size=56)
    monkeypatch.setenv(
        "XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_llvm_disable_expensive_passes=true"
    )
    out = tmp_path / "study"
    nb = execute(
        "scaling.ipynb",
        dict(
            DEVICES="auto",  # the runtime's: 1 and 2
            CV_FOLDS=2,  # "auto" gives 5 on 2 GPUs; 2 keeps this test small
            EPOCHS=2,
            IMAGE_SIZE=32,
            WORKDIR=str(out),
            REPO_DIR=str(ROOT),
            INSTALL=False,
            JOBS=2,
            EXTRA=[
                "--config.dataset=busi",
                f"--config.data_dir={data}",
                "--config.width=4",
                # 4: enough steps per epoch for the loop to time some after its warm-up
                "--config.global_batch_size=4",
                "--config.log_every_steps=100",
                "--config.augment.enabled=False",
                "--config.timing_breakdown=False",
                "--config.clinical_report=False",
            ],
        ),
        tmp_path,
        # What runtime.probe_devices answers on Kaggle's T4 x2 (compute capability 7.5);
        # the runs themselves train on this host's simulated CPU devices.
        code=(
            f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "from bcjax import runtime as _runtime\n"
            "_runtime.probe_devices = lambda timeout=120.0: "
            '("gpu", 2, "Tesla T4", _runtime.dtype_for("gpu", "7.5"))'
        ),
        timeout=600,
    )
    text = outputs(nb)
    link = runtime.two_gpu_link()  # pcie3-2gpu-nop2p without nvidia-smi
    assert "2 x Tesla T4 (gpu)" in text and "device counts: [1, 2]" in text
    assert "dtype: float16" in text and "folds: 2" in text
    assert f"interconnect for the prediction: {link}" in text and "--cv-folds=2" in text
    # Every device count ran the same 2-fold cross-validation, in float16 with loss scaling.
    fold_accuracy = {}
    for n in (1, 2):
        for k in (0, 1):
            run = json.loads((out / f"dev{n}" / f"fold_{k}" / "results.json").read_text())
            assert run["num_devices"] == n and run["config"]["dtype"] == "float16"
            assert run["cv_fold"] == k and run["overflow_skipped_steps"] >= 0
            fold_accuracy[n, k] = run["test"]["accuracy"]
    # The paired comparison: 2 devices against 1, fold by fold, from the folds' own results.
    saved = json.loads((out / "scaling_cv.json").read_text())
    assert [r["devices"] for r in saved["rows"]] == [1, 2] and saved["folds"] == 2
    (paired,) = [p for p in saved["paired"] if p["metric"] == "test_accuracy"]
    assert (paired["devices"], paired["baseline"], paired["same_split"]) == (2, 1, True)
    expected = [fold_accuracy[2, k] - fold_accuracy[1, k] for k in (0, 1)]
    np.testing.assert_allclose(paired["differences"], expected, atol=1e-12)
    assert "| devices |" in text  # the CV table was shown
    # The prediction for this machine, from the 1-device run's first fold: 2 GPUs, PCIe 3,
    # the gradient of the run's model (float32 parameters, counted here from the model).
    assert "bcjax.timing.scaling_model predict" in text
    assert f"--link={link}" in text and "--devices=1,2 " in text
    assert presets.interconnect(link).note in text  # the machine the prediction is for
    model = models.create("resnet18", num_classes=3, width=4)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
    grad_mb = 4 * sum(p.size for p in jax.tree.leaves(params)) / 1e6
    assert f"--grad-mb={grad_mb:.3f}" in text
    assert "| 2 | 2 |" in text  # the 2-GPU row of the predicted table: global batch 4 over 2
