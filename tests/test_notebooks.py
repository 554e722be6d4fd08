"""The Colab notebooks run top to bottom on the CPU with tiny parameters."""
import json
import pathlib
import time

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


def execute(name, params, cwd, timeout=300):
    """Runs colab/<name> with `params` set right after its parameters cell (papermill's convention)."""
    nb = nbformat.read(ROOT / "colab" / name, as_version=4)
    (at,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return nb, time.perf_counter() - start


def outputs(nb) -> str:
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text.append(out.get("text", "") or json.dumps(out.get("data", {}).get("text/plain", "")))
    return "\n".join(text)


def test_quickstart_notebook(tmp_path):
    workdir = tmp_path / "run"
    nb, seconds = execute("quickstart.ipynb", dict(
        EPOCHS=2, IMAGE_SIZE=32, SMALL=True, SYNTHETIC_NUM=36, WORKDIR=str(workdir), REPO_DIR=str(ROOT),
        INSTALL=False, SHOW_GRADCAM=2,
        OVERRIDES={"width": 4, "global_batch_size": 8, "timing_breakdown": False}), tmp_path)
    assert seconds < 120
    results = json.loads((workdir / "results.json").read_text())
    assert results["num_epochs"] == 2 and results["dataset"] == "synthetic"
    assert "test accuracy" in outputs(nb) and "compile train_step" in outputs(nb)
    assert len(list((workdir / "predictions").glob("*.png"))) == 2
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # curves, confusion matrix, two Grad-CAM overlays


def test_scaling_notebook(tmp_path):
    workdir = tmp_path / "scaling"
    nb, seconds = execute("scaling.ipynb", dict(
        DEVICES="1,2", EPOCHS=2, IMAGE_SIZE=32, SYNTHETIC_NUM=36, WORKDIR=str(workdir), REPO_DIR=str(ROOT),
        INSTALL=False, EXTRA=["--config.width=4", "--config.global_batch_size=8",
                              "--config.timing_breakdown=False"]), tmp_path)
    assert seconds < 120
    table = json.loads((workdir / "scaling.json").read_text())
    assert [r["devices"] for r in table["rows"]] == [1, 2] and table["simulated"]
    assert list(workdir.glob("*.png")) and "device counts: [1, 2]" in outputs(nb)
