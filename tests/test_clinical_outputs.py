"""bcjax.eval.clinical_outputs: the clinical sections of a run and of a CV study.

A randomly initialised ResNet-18 (width 8) on 12 generated images at 64 px:
the numbers mean nothing, the wiring (sections, files, mask alignment) is tested.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import bcjax.models
from bcjax import clinical
from bcjax.clinical import plots as clinical_plots
from bcjax.data import augment, pipeline, readers, synthetic
from bcjax.eval import clinical_outputs

SIZE = 64
NAMES = ("normal", "benign", "malignant")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # Wider than SIZE and not square: the masks are squashed like the images.
    root = synthetic.generate(
        tmp_path_factory.mktemp("busi"), num=12, seed=2, min_size=80, max_size=120
    )
    examples = readers.read("busi", root).examples
    arrays = pipeline.load_arrays(examples, SIZE)
    return examples, arrays.images, arrays.labels


@pytest.fixture(scope="module")
def model_and_variables():
    model = bcjax.models.create("resnet18", num_classes=3, width=8)
    # Jitted: eager init dispatches op by op, twice as slow on a CPU.
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
    return model, variables


def random_probs(n, seed):
    logits = np.random.default_rng(seed).normal(size=(n, 3)) * 2
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def test_masks_are_squashed_like_the_images(data):
    examples, images, _ = data
    masks = clinical_outputs.load_masks(examples, SIZE)
    assert masks.shape == (len(examples), SIZE, SIZE)
    for example, mask, image in zip(examples, masks, images):
        # Independently: the mask PNG resized as pipeline.decode_resize resizes an image.
        expected = np.zeros((SIZE, SIZE), bool)
        for path in example.mask_paths:
            with Image.open(path) as im:
                small = im.convert("L").resize((SIZE, SIZE), Image.BILINEAR, reducing_gap=3.0)
            expected |= np.asarray(small) > 127
        assert mask.mean() == expected.mean()
        np.testing.assert_array_equal(mask, expected)
        if NAMES[example.label] == "normal":
            assert not mask.any()
        else:
            # The synthetic lesions are hypoechoic: on the image, the mask covers dark pixels.
            assert mask.any()
            assert image[mask].mean() < image[~mask].mean()


def test_clinical_sections(data, model_and_variables, tmp_path):
    examples, images, labels = data
    model, variables = model_and_variables
    seen = []

    def eval_fn(batch):
        seen.append(batch)
        return random_probs(len(batch), len(seen))

    sections = clinical_outputs.clinical_sections(
        model=model,
        variables=variables,
        test_examples=examples,
        test_images=images,
        val_probs=random_probs(len(labels), 10),
        val_labels=labels,
        test_probs=random_probs(len(labels), 11),
        test_labels=labels,
        class_names=NAMES,
        positive_class="malignant",
        out_dir=tmp_path,
        seed=0,
        eval_fn=eval_fn,
        resamples=200,
    )
    assert tuple(sections) == clinical_outputs.SECTIONS
    assert all(sections[k] is not None for k in clinical_outputs.SECTIONS)
    assert {"temperature", "test"} <= set(sections["calibration"])
    assert sections["operating_points"]["positive_class"] == "malignant"
    assert sections["bootstrap"]["resamples"] == 200

    # The probes ran the two altered copies through eval_fn, in this order.
    masks = clinical_outputs.load_masks(examples, SIZE)
    altered = clinical.probe_images(images, masks)
    assert len(seen) == 2
    np.testing.assert_array_equal(seen[0], altered["lesion_removed"])
    np.testing.assert_array_equal(seen[1], altered["lesion_only"])
    assert set(sections["probes"]["versions"]) == {"original", "lesion_removed", "lesion_only"}
    assert sections["probes"]["lesion_images"] == int(masks.any(axis=(1, 2)).sum()) == 10

    # ResNet at 64 px: a 2x2 map, reported with the note that it cannot judge.
    grounding = sections["grounding"]
    assert grounding["map_grid"] == [2, 2]
    assert grounding["all"]["images"] == 10
    assert "too coarse to judge" in grounding["note"]
    text = clinical_outputs.format_sections(sections)
    assert "2x2 grid" in text and "too coarse to judge" in text and "ECE" in text

    for name in clinical_plots.FILE_NAMES.values():
        assert (tmp_path / name).stat().st_size > 1000, name
    # The ROC/PR points went to curves.json; results keep the per-class summary only.
    curves = json.loads((tmp_path / clinical_outputs.CURVES_FILE).read_text())
    assert set(curves) == set(NAMES)
    assert len(curves["malignant"]["roc"]["fpr"]) >= 2
    summary = sections["operating_points"]["curves"]["malignant"]
    assert set(summary) == {"auc", "average_precision", "positives"}
    assert summary["auc"] == curves["malignant"]["auc"]
    json.dumps(sections, allow_nan=False)  # results.json can hold it as is


def test_probes_default_to_the_models_own_forward(data, model_and_variables):
    examples, images, labels = data
    model, variables = model_and_variables
    sections = clinical_outputs.clinical_sections(
        model=model,
        variables=variables,
        test_examples=examples,
        test_images=images,
        val_probs=random_probs(len(labels), 10),
        val_labels=labels,
        test_probs=random_probs(len(labels), 11),
        test_labels=labels,
        class_names=NAMES,
        positive_class="malignant",
        resamples=200,
    )
    removed = clinical.probe_images(images, clinical_outputs.load_masks(examples, SIZE))
    forward = jax.jit(functools.partial(model.apply, train=False))
    logits = forward(variables, augment.normalize(removed["lesion_removed"]))
    expected = np.mean(np.argmax(logits, axis=1) == labels)
    assert sections["probes"]["versions"]["lesion_removed"]["accuracy"] == expected


def test_no_masks_leaves_grounding_and_probes_out(data, model_and_variables, tmp_path):
    examples, images, labels = data
    model, variables = model_and_variables
    bare = [e.__class__(e.name, e.label, e.image_path) for e in examples]
    sections = clinical_outputs.clinical_sections(
        model=model,
        variables=variables,
        test_examples=bare,
        test_images=images,
        val_probs=random_probs(len(labels), 10),
        val_labels=labels,
        test_probs=random_probs(len(labels), 11),
        test_labels=labels,
        class_names=NAMES,
        positive_class="malignant",
        out_dir=tmp_path,
        resamples=200,
    )
    assert sections["grounding"] is None and sections["probes"] is None
    assert not (tmp_path / clinical_plots.FILE_NAMES["least_grounded"]).exists()
    assert "no test image has a lesion mask" in clinical_outputs.format_sections(sections)


def fold_results(seed, labels):
    """A results dict with the five sections, from made-up predictions and maps."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    sections = clinical.clinical_report(
        random_probs(n, seed),
        labels,
        random_probs(n, seed + 100),
        labels,
        NAMES,
        positive_class="malignant",
        seed=seed,
        resamples=200,
    )
    masks = np.zeros((n, 16, 16), bool)
    masks[labels > 0, 4:10, 5:12] = True
    predicted = rng.integers(0, 3, n)
    sections["grounding"] = clinical.grounding_report(
        rng.random((n, 4, 4)), masks, labels, predicted, NAMES, resamples=200
    )
    sections["probes"] = clinical.probe_report(
        labels,
        labels > 0,
        {v: random_probs(n, seed + k) for k, v in enumerate(("original", "lesion_removed"))},
        NAMES,
    )
    return sections


def test_aggregate_folds_means_the_folds():
    labels = np.repeat([0, 1, 2], 20)
    folds = [fold_results(seed, labels) for seed in (1, 2, 3)]
    ensemble = np.mean([random_probs(len(labels), s) for s in (7, 8, 9)], axis=0)
    out = clinical_outputs.aggregate_folds(
        folds, ensemble, labels, NAMES, "malignant", seed=0, folds=[0, 2, 3]
    )
    assert len(out["per_fold"]) == 3

    def mean_of(get):
        return np.mean([get(f) for f in folds])

    expected = {
        "ece": mean_of(lambda f: f["calibration"]["test"]["before"]["ece"]),
        "temperature": mean_of(lambda f: f["calibration"]["temperature"]),
        "test_sensitivity_at_90_specificity": mean_of(
            lambda f: f["operating_points"]["points"]["sensitivity_at_90_specificity"]["test"][
                "sensitivity"
            ]
        ),
        "grounding_mass_inside": mean_of(lambda f: f["grounding"]["all"]["mass_inside"]["mean"]),
        "probe_lesion_removed_recall_malignant": mean_of(
            lambda f: f["probes"]["versions"]["lesion_removed"]["recall"]["malignant"]
        ),
    }
    for key, value in expected.items():
        assert out["stats"][key]["mean"] == pytest.approx(value, rel=1e-12), key
        assert out["stats"][key]["n"] == 3

    boot = out["ensemble"]["bootstrap"]["metrics"]["accuracy"]
    assert boot["value"] == np.mean(ensemble.argmax(axis=1) == labels)
    assert boot["low"] <= boot["value"] <= boot["high"]
    table = clinical_outputs.format_folds(out)
    assert "| fold 0 | fold 2 | fold 3 | mean |" in table
    assert "Fold ensemble on test" in table


def test_gradcam_compiled_ahead_from_shapes_leaves_the_report_nothing_to_trace(
    data, model_and_variables, monkeypatch
):
    # What a run does while it trains (bcjax.train.loop): the report's Grad-CAM program
    # lowered from shapes alone and compiled on another thread. The report's own calls (the
    # maps, the probes' forward) then trace nothing: the executable is JAX's cached one.
    import threading

    from bcjax.step import gradcam

    examples, images, labels = data
    model, variables = model_and_variables
    traced_on = []
    real = gradcam._logits_and_features

    def counted(*args):
        traced_on.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(gradcam, "_logits_and_features", counted)
    gradcam.explain_jit.clear_cache()  # whatever earlier tests compiled
    shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), variables)
    ahead = threading.Thread(
        target=lambda: clinical_outputs.gradcam_lowered(model, shapes, images.shape, 8).compile(),
        name="ahead",
    )
    ahead.start()
    ahead.join()
    assert traced_on == ["ahead"]
    sections = clinical_outputs.clinical_sections(
        model=model,
        variables=variables,
        test_examples=examples,
        test_images=images,
        val_probs=random_probs(len(labels), 10),
        val_labels=labels,
        test_probs=random_probs(len(labels), 11),
        test_labels=labels,
        class_names=NAMES,
        positive_class="malignant",
        batch_size=8,
        resamples=200,
    )
    assert sections["grounding"] is not None and sections["probes"] is not None
    assert traced_on == ["ahead"]  # 12 images: a batch of 8 and a padded one, one program
    # Another batch size is another program: the check above can fail.
    host = jax.device_get(variables)
    gradcam.explain_in_batches(model, host, images[:4], batch_size=4, upsample=False)
    assert traced_on == ["ahead", threading.current_thread().name]
