"""bcjax.predict on a tiny trained run: probabilities, CSV and overlays, Grad-CAM
against a hand-split reference, and the errors a user meets first.

One run is trained per module; every prediction uses the same number of
images (N_IMAGES) so each jitted function compiles once.
"""

import csv
import importlib
import json
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bcjax import predict  # noqa: E402
from bcjax.data import synthetic  # noqa: E402
from bcjax.train import loop  # noqa: E402

N_IMAGES = 6
IMAGE_SIZE = 64  # ResNet's last feature map is 2x2 here, so the heat map has structure


@pytest.fixture(scope="module")
def busi_root(tmp_path_factory):
    return synthetic.generate(
        tmp_path_factory.mktemp("busi"), num=36, seed=0, min_size=64, max_size=80
    )


@pytest.fixture(scope="module")
def run(busi_root, tmp_path_factory):
    config = importlib.import_module("configs.quickstart").get_config()
    config.dataset = "busi"
    config.data_dir = str(busi_root)
    config.width = 4
    config.image_size = IMAGE_SIZE
    config.global_batch_size = 8
    config.num_devices = 1
    config.strategy = "jit"  # compiles ~10% faster than shard_map; the workdir is the same
    config.num_epochs = 2
    config.warmup_epochs = 1
    config.checkpoint_every_epochs = 1
    config.timing_breakdown = False
    config.augment.enabled = False  # its code is half of the train step's compile time
    workdir = tmp_path_factory.mktemp("run")
    loop.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def predictor(run):
    return predict.Predictor.from_workdir(run)


@pytest.fixture(scope="module")
def image_paths(busi_root):
    """Two images of each class, masks left out."""
    out = []
    for c in ("normal", "benign", "malignant"):
        out += [p for p in sorted((busi_root / c).iterdir()) if "_mask" not in p.name][:2]
    assert len(out) == N_IMAGES
    return out


def test_predict_api(predictor, run, image_paths):
    from bcjax.train import checkpoint

    config = json.loads((run / "results.json").read_text())["config"]
    with checkpoint.CheckpointManager(
        run / "checkpoints", best_metric=config["best_metric"], async_save=False
    ) as manager:
        assert predictor.step == manager.best_step()
    assert predictor.image_size == IMAGE_SIZE

    probs = predictor.predict(image_paths)
    assert probs.shape == (N_IMAGES, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # uint8 arrays decoded as training does give the same answer as the paths.
    arrays = predict.load_images(image_paths, IMAGE_SIZE)
    assert arrays.dtype == np.uint8 and arrays.shape == (N_IMAGES, IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_allclose(predictor.predict(arrays), probs, atol=1e-6)

    cams = predictor.grad_cam(arrays)
    assert cams.shape == (N_IMAGES, IMAGE_SIZE, IMAGE_SIZE)
    assert np.isfinite(cams).all() and cams.min() >= 0.0 and cams.max() <= 1.0


def test_grad_cam_matches_a_hand_split_model(predictor, image_paths):
    """Features from the last block, the head (pool + fc) applied by hand, its
    gradient by jax.grad: the Grad-CAM recipe written out independently."""
    model, variables = predictor.model, predictor.variables
    images = predict.load_images(image_paths, IMAGE_SIZE)
    last_block = f"layer{len(model.stage_sizes)}_{model.stage_sizes[-1] - 1}"

    @jax.jit
    def reference(images):
        x = (images / 255.0 - jnp.array([0.485, 0.456, 0.406])) / jnp.array([0.229, 0.224, 0.225])
        logits, state = model.apply(
            variables,
            x,
            train=False,
            mutable=["intermediates"],
            capture_intermediates=lambda m, _: m.name == last_block,
        )
        features = state["intermediates"][last_block]["__call__"][0]
        fc = variables["params"]["fc"]
        head = lambda a: jnp.mean(a, axis=(1, 2)) @ fc["kernel"] + fc["bias"]
        maps = []
        for c in range(3):
            grads = jax.grad(lambda a, c=c: head(a)[:, c].sum())(features)
            weights = grads.mean(axis=(1, 2))
            cam = jax.nn.relu(jnp.einsum("nhwc,nc->nhw", features, weights))
            maps.append(jax.image.resize(cam, (len(images), IMAGE_SIZE, IMAGE_SIZE), "bilinear"))
        return logits, head(features), jnp.stack(maps)

    logits, head_logits, raw = map(np.asarray, reference(images))
    # The hand-split head reproduces the model: these are the features it classifies.
    np.testing.assert_allclose(head_logits, logits, rtol=1e-5, atol=1e-5)
    assert raw.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE)
    positive = 0
    for c in range(3):
        peak = raw[c].max(axis=(1, 2), keepdims=True)
        want = np.where(peak > 0, raw[c] / np.where(peak > 0, peak, 1), 0)
        got = predictor.grad_cam(images, class_index=[c] * N_IMAGES)
        np.testing.assert_allclose(got, want, atol=1e-5)
        positive += int((peak > 0).sum())
    assert positive > 0  # not a comparison of zeros
    # Default: the predicted class.
    predicted = logits.argmax(axis=1)
    _, cams, explained = predictor.explain(images)
    np.testing.assert_array_equal(explained, predicted)
    np.testing.assert_allclose(
        cams, predictor.grad_cam(images, class_index=list(predicted)), atol=1e-6
    )


def test_normalise_maps_keeps_zero_maps_zero():
    maps = jnp.stack([jnp.zeros((4, 4)), jnp.arange(16.0).reshape(4, 4)])
    out = np.asarray(predict.normalise_maps(maps))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[0], 0.0)
    assert out[1].max() == 1.0 and out[1].min() == 0.0


def test_cli_writes_table_csv_and_overlays(run, image_paths, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for p in image_paths[:-1]:
        shutil.copy(p, folder / p.name)
    # A jpg is found too; a BUSI mask next to its image is not an image.
    Image.open(image_paths[-1]).convert("RGB").save(folder / "last.jpg", quality=95)
    mask = next(image_paths[2].parent.glob("*_mask*.png"))
    shutil.copy(mask, folder / mask.name)

    out = tmp_path / "out"
    assert (
        predict.main(
            [
                "--workdir",
                str(run),
                "--images",
                str(folder),
                "--out",
                str(out),
                "--class",
                "malignant",
            ]
        )
        == 0
    )
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == N_IMAGES
    assert list(rows[0]) == ["file", "p_normal", "p_benign", "p_malignant", "predicted"]
    assert not any("_mask" in r["file"] for r in rows)
    for r in rows:
        assert abs(sum(float(r[f"p_{c}"]) for c in ("normal", "benign", "malignant")) - 1) < 1e-4
        assert r["predicted"] in ("normal", "benign", "malignant")
    overlays = sorted(out.glob("*_gradcam.png"))
    assert len(overlays) == N_IMAGES
    assert Image.open(overlays[0]).size[0] > 2 * IMAGE_SIZE
    table = capsys.readouterr().out
    assert "p_malignant" in table and "last.jpg" in table

    # The Python API writes the same rows; default out folder is RUN/predictions.
    rows_api = predict.predict_files(run, [folder], overlays=False)
    assert [r["file"] for r in rows_api] == [r["file"] for r in rows]
    assert (run / "predictions" / "predictions.csv").is_file()


def test_errors_name_what_is_missing(run, image_paths, tmp_path, capsys):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(predict.PredictError, match="results.json is missing"):
        predict.Predictor.from_workdir(empty)
    (empty / "results.json").write_text((run / "results.json").read_text())
    with pytest.raises(predict.PredictError, match="No checkpoint in .*checkpoints"):
        predict.Predictor.from_workdir(empty)

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(predict.PredictError, match="broken.png"):
        predict.load_images([image_paths[0], bad], IMAGE_SIZE)
    with pytest.raises(predict.PredictError, match="missing.png"):
        predict.load_images([tmp_path / "missing.png"], IMAGE_SIZE)

    assert (
        predict.main(["--workdir", str(run), "--images", str(bad), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "broken.png" in capsys.readouterr().err
