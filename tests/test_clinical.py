"""bcjax.clinical and bcjax.step.gradcam against independent references.

scikit-learn is the oracle for ROC/PR points, AUC and the weighted metrics of a
bootstrap resample; hand computations and planted cases for the rest.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import special
from sklearn import metrics as skm

from bcjax import clinical, models
from bcjax.clinical import bootstrap, calibration, grounding, operating_points, plots, probes
from bcjax.step import gradcam

NAMES = ["normal", "benign", "malignant"]


def simulated_predictions(rng, counts, separation=1.5, scale=2.0, decimals=None):
    """Probabilities [N, 3] of a moderately good classifier, labels [N] with the given
    class counts; `decimals` rounds them to create ties."""
    labels = np.repeat(np.arange(len(counts)), counts)
    logits = rng.normal(size=(len(labels), len(counts)))
    logits[np.arange(len(labels)), labels] += separation
    probs = special.softmax(scale * logits, axis=1)
    if decimals is not None:
        probs = np.round(probs, decimals)
    return probs, labels


# ----------------------------------------------------------------------------- calibration


def test_ece_and_reliability_match_a_hand_computation():
    # 4 at confidence 0.95 (bin 14, 3 right), 4 at 0.55 (bin 8, 2 right),
    # 2 at 0.45 (bin 6, 1 right). Every class of a row but the top one shares the rest.
    rows = [(0.95, True)] * 3 + [(0.95, False)] + [(0.55, True)] * 2 + [(0.55, False)] * 2
    rows += [(0.45, True), (0.45, False)]
    probs, labels = [], []
    for conf, right in rows:
        rest = (1 - conf) / 2
        probs.append([conf, rest, rest])
        labels.append(0 if right else 1)
    # |0.75 - 0.95| * 4/10 + |0.5 - 0.55| * 4/10 + |0.5 - 0.45| * 2/10
    want = 0.2 * 0.4 + 0.05 * 0.4 + 0.05 * 0.2
    assert calibration.expected_calibration_error(probs, labels) == pytest.approx(want, abs=1e-12)
    table = calibration.reliability_bins(probs, labels)
    assert len(table["count"]) == 15
    assert [i for i, n in enumerate(table["count"]) if n] == [6, 8, 14]
    assert table["count"][14] == 4 and table["accuracy"][14] == 0.75
    assert table["confidence"][8] == pytest.approx(0.55)
    assert table["accuracy"][0] is None
    # A confidence of exactly 1 belongs to the last bin, (14/15, 1].
    assert calibration.reliability_bins([[1.0, 0, 0]], [0])["count"][14] == 1


def test_brier_score_is_the_direct_formula():
    rng = np.random.default_rng(1)
    probs, labels = simulated_predictions(rng, (7, 9, 5))
    want = np.mean([sum((p[k] - (k == y)) ** 2 for k in range(3)) for p, y in zip(probs, labels)])
    assert calibration.brier_score(probs, labels) == pytest.approx(want, rel=1e-12)
    assert calibration.brier_score(np.eye(3)[labels], labels) == 0.0


def test_temperature_scaling_recovers_a_planted_temperature():
    rng = np.random.default_rng(2)
    n = 20000
    true_logits = rng.normal(size=(n, 3)) * 1.5
    truth = special.softmax(true_logits, axis=1)
    labels = (rng.random(n)[:, None] > np.cumsum(truth, axis=1)).sum(axis=1)
    overconfident = special.softmax(2.0 * true_logits, axis=1)  # planted T = 2
    val, test = slice(0, n // 2), slice(n // 2, n)
    temperature = calibration.fit_temperature(overconfident[val], labels[val])
    # The fit's spread over seeds is ~0.03 at this size; 0.1 is > 3 of them.
    assert temperature == pytest.approx(2.0, abs=0.1)

    def nll(t):
        scaled = calibration.apply_temperature(overconfident[val], t)
        return calibration.negative_log_likelihood(scaled, labels[val])

    assert nll(temperature) <= min(nll(temperature * 0.98), nll(temperature * 1.02))
    section = calibration.calibration_section(
        overconfident[val], labels[val], overconfident[test], labels[test]
    )
    assert section["temperature"] == temperature
    before, after = section["test"]["before"], section["test"]["after"]
    assert after["ece"] < before["ece"] / 3 and after["nll"] < before["nll"]
    assert after["accuracy"] == before["accuracy"]  # the argmax never changes
    json.dumps(section, allow_nan=False)


# ----------------------------------------------------------------------------- operating points


def brute_force_threshold(scores, positive, target, rate):
    """Every candidate threshold counted by hand, then the module's rule."""
    best = None
    for t in np.r_[np.inf, np.unique(scores)]:
        called = scores >= t
        sens = called[positive].mean()
        spec = (~called[~positive]).mean()
        if rate == "sensitivity" and spec >= target:
            key = (sens, t)  # most sensitive, then the highest threshold
        elif rate == "specificity" and sens >= target:
            key = (spec, -t)  # most specific, then the lowest threshold
        else:
            continue
        best = key if best is None or key > best else best
    return best[1] if rate == "sensitivity" else -best[1]


def test_roc_points_and_thresholds_match_sklearn():
    rng = np.random.default_rng(3)
    probs, labels = simulated_predictions(rng, (40, 70, 50), decimals=2)  # ties
    scores, positive = probs[:, 2], labels == 2
    roc = operating_points.roc_points(scores, positive)
    fpr, tpr, thresholds = skm.roc_curve(positive, scores, drop_intermediate=False)
    np.testing.assert_allclose(roc["fpr"], fpr)
    np.testing.assert_allclose(roc["tpr"], tpr)
    np.testing.assert_array_equal(roc["thresholds"], thresholds)
    auc = operating_points.auc_from_roc(roc)
    assert auc == pytest.approx(skm.roc_auc_score(positive, scores), abs=1e-12)

    for target in (0.9, 0.95):
        t = operating_points.threshold_for_specificity(scores, positive, target)
        # sklearn's points: the best sensitivity with 1 - fpr >= target, first reached.
        ok = 1 - fpr >= target
        first = np.flatnonzero(ok & (tpr == tpr[ok].max()))[0]
        assert t == thresholds[first]
        assert t == brute_force_threshold(scores, positive, target, "sensitivity")
        t = operating_points.threshold_for_sensitivity(scores, positive, target)
        ok = tpr >= target
        last = np.flatnonzero(ok & (fpr == fpr[ok].min()))[-1]
        assert t == thresholds[last]
        assert t == brute_force_threshold(scores, positive, target, "specificity")


def test_operating_points_are_chosen_on_validation_and_applied_to_test():
    rng = np.random.default_rng(4)
    val_probs, val_labels = simulated_predictions(rng, (30, 60, 40), decimals=3)
    test_probs, test_labels = simulated_predictions(rng, (25, 55, 35), decimals=3)
    section = operating_points.operating_points_section(
        val_probs, val_labels, test_probs, test_labels, NAMES, "malignant"
    )
    assert set(section["points"]) == {
        "sensitivity_at_90_specificity",
        "sensitivity_at_95_specificity",
        "specificity_at_90_sensitivity",
        "specificity_at_95_sensitivity",
    }
    for name, point in section["points"].items():
        t = point["threshold"]
        for split, probs, labels in (
            ("validation", val_probs, val_labels),
            ("test", test_probs, test_labels),
        ):
            called = probs[:, 2] >= t
            truth = labels == 2
            assert point[split]["sensitivity"] == pytest.approx(skm.recall_score(truth, called))
            assert point[split]["specificity"] == pytest.approx(skm.recall_score(~truth, ~called))
        rate = name.split("_at_")[0]
        assert point["rate"] == rate
        target = next(iter(point["target"].values()))
        other = "specificity" if rate == "sensitivity" else "sensitivity"
        assert point["validation"][other] >= target
    assert section["test_auc"] == pytest.approx(
        skm.roc_auc_score(test_labels == 2, test_probs[:, 2])
    )
    for k, name in enumerate(NAMES):
        curve = section["curves"][name]
        truth = test_labels == k
        assert curve["auc"] == pytest.approx(skm.roc_auc_score(truth, test_probs[:, k]))
        want_ap = skm.average_precision_score(truth, test_probs[:, k])
        assert curve["average_precision"] == pytest.approx(want_ap)
        precision, recall, _ = skm.precision_recall_curve(truth, test_probs[:, k])
        np.testing.assert_allclose(curve["pr"]["precision"], precision)
        np.testing.assert_allclose(curve["pr"]["recall"], recall)
    json.dumps(section, allow_nan=False)


def test_an_unreachable_specificity_means_calling_nothing_positive():
    # Validation: the highest negative outscores every positive, and there are
    # 10 negatives, so 95% specificity needs the threshold above all scores.
    scores = np.r_[np.linspace(0.1, 0.5, 9), 0.99, np.linspace(0.3, 0.9, 5)]
    positive = np.r_[np.zeros(10, bool), np.ones(5, bool)]
    probs = np.stack([1 - scores, np.zeros_like(scores), scores], axis=1)
    labels = np.where(positive, 2, 0)
    section = operating_points.operating_points_section(
        probs, labels, probs, labels, NAMES, "malignant"
    )
    point = section["points"]["sensitivity_at_95_specificity"]
    assert point["threshold"] is None  # +inf
    assert point["validation"] == {"sensitivity": 0.0, "specificity": 1.0}


# ----------------------------------------------------------------------------- bootstrap


def test_weighted_metrics_of_resamples_match_sklearn_with_sample_weights():
    rng = np.random.default_rng(5)
    probs, labels = simulated_predictions(rng, (20, 50, 30), decimals=2)
    thresholds = {"point": 0.4}
    weights = bootstrap.stratified_weights(labels, resamples=5, seed=0)
    for k in range(3):  # stratified: every class keeps its size
        np.testing.assert_array_equal(weights[:, labels == k].sum(axis=1), (labels == k).sum())
    got = bootstrap.weighted_metrics(
        weights, probs, labels, positive_index=2, thresholds=thresholds
    )
    preds = probs.argmax(axis=1)
    for b, w in enumerate(weights):
        drawn = w > 0  # sklearn sees the drawn examples only, each with its count
        y, p, s, w = labels[drawn], preds[drawn], probs[drawn], w[drawn]
        assert got["accuracy"][b] == pytest.approx(skm.accuracy_score(y, p, sample_weight=w))
        want = skm.balanced_accuracy_score(y, p, sample_weight=w)
        assert got["balanced_accuracy"][b] == pytest.approx(want)
        want = skm.f1_score(y, p, average="macro", sample_weight=w)
        assert got["macro_f1"][b] == pytest.approx(want)
        want = np.mean([skm.roc_auc_score(y == k, s[:, k], sample_weight=w) for k in range(3)])
        assert got["auc_macro"][b] == pytest.approx(want)
        called = s[:, 2] >= 0.4
        want = skm.recall_score(y == 2, called, sample_weight=w)
        assert got["point/sensitivity"][b] == pytest.approx(want)
        want = skm.recall_score(y != 2, ~called, sample_weight=w)
        assert got["point/specificity"][b] == pytest.approx(want)


def test_bootstrap_is_deterministic_for_a_seed_and_covers_the_truth():
    rng = np.random.default_rng(6)
    counts = (30, 80, 50)

    def draw():
        """A test set of a classifier right with probability 0.8 on every class."""
        labels = np.repeat(np.arange(3), counts)
        right = rng.random(len(labels)) < 0.8
        preds = np.where(right, labels, (labels + rng.integers(1, 3, len(labels))) % 3)
        probs = np.full((len(labels), 3), 0.2)
        probs[np.arange(len(labels)), preds] = 0.6
        return probs, labels

    probs, labels = draw()
    first = bootstrap.bootstrap_section(probs, labels, resamples=2000, seed=11)
    assert first == bootstrap.bootstrap_section(probs, labels, resamples=2000, seed=11)
    assert first != bootstrap.bootstrap_section(probs, labels, resamples=2000, seed=12)
    acc = first["metrics"]["accuracy"]
    assert acc["low"] <= 0.8 <= acc["high"]
    assert acc["value"] == pytest.approx(skm.accuracy_score(labels, probs.argmax(axis=1)))

    # Over many simulated test sets the 95% interval holds the true 0.8 about
    # 95% of the time (binomial sd 1.3% over 300 sets).
    covered = 0
    for seed in range(300):
        probs, labels = draw()
        weights = bootstrap.stratified_weights(labels, resamples=500, seed=seed)
        accuracy = weights @ (probs.argmax(axis=1) == labels) / len(labels)
        low, high = bootstrap.percentile_interval(accuracy)
        covered += low <= 0.8 <= high
    assert 0.90 <= covered / 300 <= 0.99


def test_clinical_report_sections():
    # Its time (2,000 resamples of 160 images) is a benchmark's figure, not a test's:
    # python -m bcjax.benchmark --models= --clinical
    rng = np.random.default_rng(7)
    val = simulated_predictions(rng, (25, 80, 40))
    test = simulated_predictions(rng, (27, 87, 46))
    report = clinical.clinical_report(*val, *test, NAMES, positive_class="malignant", seed=0)
    assert set(report) == {"calibration", "operating_points", "bootstrap"}
    boot = report["bootstrap"]
    assert boot["resamples"] == 2000
    assert set(boot["operating_points"]) == set(report["operating_points"]["points"])
    probs, labels = test
    want = skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert boot["metrics"]["auc_macro"]["value"] == pytest.approx(want)
    for entry in boot["metrics"].values():
        assert entry["low"] <= entry["value"] <= entry["high"]
    json.dumps(report, allow_nan=False)
    text = clinical.format_clinical(report)
    assert "ECE" in text and "sensitivity at 90% specificity" in text and "macro-F1" in text
    without = clinical.clinical_report(*val, *test, NAMES, positive_class=None, resamples=50)
    assert without["operating_points"] is None and without["bootstrap"]["operating_points"] == {}


# ----------------------------------------------------------------------------- grounding


def square_mask(size, y0, y1, x0, x1):
    mask = np.zeros((size, size), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_grounding_scores_one_and_zero_on_planted_maps():
    mask = square_mask(40, 10, 20, 10, 20)
    on_lesion = mask.astype(np.float32)
    far_away = square_mask(40, 30, 40, 30, 40).astype(np.float32)
    maps = np.stack([on_lesion, far_away])
    masks = np.stack([mask, mask])
    np.testing.assert_array_equal(grounding.mass_inside(maps, masks), [1.0, 0.0])
    target = grounding.dilate(masks, 2)
    np.testing.assert_array_equal(grounding.pointing_hits(maps, target), [1.0, 0.0])


def test_grounding_chance_levels_on_a_uniform_map():
    mask = square_mask(50, 5, 25, 10, 20)  # 200 of 2500 pixels
    uniform = np.ones((1, 50, 50))
    assert grounding.mass_inside(uniform, mask[None])[0] == pytest.approx(200 / 2500)
    radius = grounding.tolerance_pixels(mask.shape)
    assert radius == 2  # 5% of 50 px
    dilated = grounding.dilate(mask[None], radius)
    # A disk of radius 2 grows a 20x10 rectangle by 2 px on each side, corners rounded:
    # (24 x 14) minus the 4 corner cells outside the disk in each corner.
    assert dilated.sum() == 24 * 14 - 4 * 3
    hit = grounding.pointing_hits(uniform, dilated)[0]
    assert hit == pytest.approx(dilated.mean())
    report = clinical.grounding_report(uniform, mask[None], [1], [1], NAMES, resamples=100)
    benign = report["per_class"]["benign"]
    assert benign["mass_inside"]["mean"] == pytest.approx(benign["mass_chance"]["mean"])
    assert benign["pointing"]["mean"] == pytest.approx(benign["pointing_chance"]["mean"])
    assert benign["mass_above_chance"]["mean"] == pytest.approx(0.0, abs=1e-12)


def test_pointing_tolerance_and_coarse_maps():
    mask = square_mask(64, 20, 30, 20, 30)
    radius = grounding.tolerance_pixels(mask.shape)  # 3 px at 64 px
    target = grounding.dilate(mask[None], radius)
    near, far = np.zeros((64, 64)), np.zeros((64, 64))
    near[25, 30 + radius - 1] = 1.0  # inside the tolerance, outside the mask
    far[25, 30 + radius + 1] = 1.0
    np.testing.assert_array_equal(
        grounding.pointing_hits(np.stack([near, far]), target[[0, 0]]), [1.0, 0.0]
    )
    # A 2x2 map (ResNet at 64 px) is upsampled as jax.image.resize does.
    coarse = np.array([[[0.0, 1.0], [0.25, 0.5]]])
    want = np.asarray(jax.image.resize(jnp.asarray(coarse), (1, 64, 64), "bilinear"))
    np.testing.assert_allclose(grounding.resize_maps(coarse, (64, 64)), want, atol=1e-6)


def test_pointing_chance_knows_where_a_coarse_map_can_peak():
    # A 2x2 map upsampled to 64 px peaks in the outer half of one quadrant: where
    # the bilinear weights are clamped, pixels 0..15 (centres before 16 = 0.5 * 32).
    regions = grounding.peak_regions((2, 2), (64, 64))
    np.testing.assert_array_equal(regions[0], square_mask(64, 0, 16, 0, 16))
    np.testing.assert_array_equal(regions[3], square_mask(64, 48, 64, 48, 64))
    central = square_mask(64, 20, 44, 20, 44)
    top_left = square_mask(64, 0, 24, 0, 24)
    chance = grounding.pointing_chance(np.stack([central, top_left]), (2, 2))
    np.testing.assert_allclose(chance, [0.0, 0.25])  # no cell can hit; one of four can
    # On the pixel grid the chance is the area fraction.
    assert grounding.pointing_chance(central[None])[0] == central.mean()


def test_grounding_report_per_class_and_least_grounded():
    rng = np.random.default_rng(8)
    size, n = 32, 14
    labels = np.array([0, 0] + [1] * 6 + [2] * 6)
    masks = np.zeros((n, size, size), bool)
    cams = np.zeros((n, 8, 8))  # coarse maps, upsampled inside
    for i in range(2, n):
        y, x = rng.integers(4, 20, size=2)
        masks[i, y : y + 8, x : x + 8] = True
        cams[i] = rng.random((8, 8))
    cams[3] = 0.0  # no positive evidence: counted as empty, left out
    report = clinical.grounding_report(cams, masks, labels, labels, NAMES, resamples=500, seed=3)
    assert set(report["per_class"]) == {"benign", "malignant"}  # normal has no masks
    assert report["per_class"]["benign"]["images"] == 6
    assert report["per_class"]["benign"]["empty_maps"] == 1
    assert report["all"]["images"] == 12
    mass = grounding.mass_inside(cams[2:], masks[2:])
    malignant = report["per_class"]["malignant"]["mass_inside"]
    assert malignant["mean"] == pytest.approx(mass[6:].mean())
    assert malignant["low"] <= malignant["mean"] <= malignant["high"]
    worst = report["least_grounded"]
    assert len(worst) == 8
    order = np.argsort(np.where(np.isfinite(mass), mass, np.inf))[:8] + 2
    assert [w["index"] for w in worst] == order.tolist()
    assert report == clinical.grounding_report(
        cams, masks, labels, labels, NAMES, resamples=500, seed=3
    )
    json.dumps(report, allow_nan=False)


# ----------------------------------------------------------------------------- probes


def ultrasound_like(rng, size=64):
    """Depth-darkening speckle with a bright disk lesion and a bright corner mark."""
    rows = np.linspace(100, 40, size)[:, None]
    image = rows * rng.gamma(16.0, 1 / 16, (size, size))  # below 250: brighter is planted
    yy, xx = np.mgrid[:size, :size]
    lesion = (yy - 30) ** 2 + (xx - 34) ** 2 <= 8**2
    image[lesion] = 250
    image[:4, :4] = 255  # a calliper-like mark in the corner
    image = np.round(image).astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=2), lesion


def test_lesion_removal_fills_with_same_depth_texture():
    rng = np.random.default_rng(9)
    image, lesion = ultrasound_like(rng)
    out = probes.remove_lesion(image, lesion)
    region = grounding.dilate(lesion[None], 3)[0]  # 4% of 64 px, rounded
    np.testing.assert_array_equal(out[~region], image[~region])
    filled = out[region][:, 0].astype(float)
    assert filled.std() > 10  # speckle, not a flat colour
    # The bright lesion is gone: the region looks like the tissue of its rows.
    rows = np.flatnonzero(region.any(axis=1))
    tissue = image[rows][~region[rows]][:, 0].astype(float)
    assert abs(filled.mean() - tissue.mean()) < 0.15 * tissue.mean()
    assert filled.mean() < 0.7 * 250
    np.testing.assert_array_equal(out[:4, :4], image[:4, :4])  # the corner mark stays


def test_lesion_only_keeps_the_margin_and_fills_the_rest():
    rng = np.random.default_rng(10)
    image, lesion = ultrasound_like(rng)
    out = probes.keep_lesion_only(image, lesion)
    kept = grounding.dilate(lesion[None], 5)[0]  # 8% of 64 px, rounded
    np.testing.assert_array_equal(out[kept], image[kept])
    outside = out[~kept][:, 0].astype(float)
    assert outside.std() > 10
    assert outside.max() < 250  # no lesion copied outwards, and no corner mark left
    assert out[:4, :4, 0].mean() < 200
    ring = kept & ~lesion
    assert set(outside) <= set(image[ring][:, 0].astype(float))  # drawn from the ring
    # Same depth: rows above the ring get its upper (brighter) tissue, rows below its
    # lower tissue; draws from the whole ring would give both the same mean.
    assert out[:10, :, 0].mean() > out[54:, :, 0].mean() + 10
    np.testing.assert_array_equal(out, probes.keep_lesion_only(image, lesion))  # seeded


def test_probe_images_leave_normals_alone_and_report_scores():
    rng = np.random.default_rng(11)
    image, lesion = ultrasound_like(rng)
    images = np.stack([image, image])
    masks = np.stack([np.zeros_like(lesion), lesion])
    out = clinical.probe_images(images, masks)
    np.testing.assert_array_equal(out["has_lesion"], [False, True])
    for version in ("lesion_removed", "lesion_only"):
        np.testing.assert_array_equal(out[version][0], image)
        assert (out[version][1] != image).any()
    labels = np.array([0, 2, 2, 1])
    has_lesion = np.array([False, True, True, True])
    probs = {"original": np.eye(3)[[0, 2, 2, 1]], "lesion_removed": np.eye(3)[[0, 1, 2, 1]]}
    report = clinical.probe_report(labels, has_lesion, probs, NAMES)
    removed = report["versions"]["lesion_removed"]
    assert removed["accuracy"] == 0.75 and removed["recall"]["malignant"] == 0.5
    assert removed["lesion_images_accuracy"] == pytest.approx(2 / 3)
    assert report["versions"]["original"]["auc_macro"] == 1.0
    assert "shadowing" in report["limits"]
    assert "lesion_removed: acc 0.750" in clinical.format_clinical({"probes": report})


# ----------------------------------------------------------------------------- Grad-CAM and plots


def random_variables(model, shape, seed=0):
    """Random weights (BatchNorm: mean 0, variance 1) without running model.init,
    which alone would cost more than this file's budget on a loaded CPU."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))

    def fill(path, leaf):
        name = path[-1].key
        if name == "var":
            return np.ones(leaf.shape, np.float32)
        if name in ("mean", "bias"):
            return np.zeros(leaf.shape, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) or 1
        return (rng.normal(size=leaf.shape) * np.sqrt(2 / fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def test_batched_grad_cam_equals_one_batch_and_feeds_the_plots(tmp_path):
    model = models.create("resnet18", width=4)
    images = np.random.default_rng(12).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    variables = random_variables(model, (1, 64, 64, 3))
    chunked = gradcam.explain_in_batches(model, variables, images, batch_size=2, upsample=False)
    # The padded last chunk and the order of chunks change nothing: each image
    # explained beside another one (the same compiled shape) gives the same answer.
    for i in range(5):
        pair = images[[i, (i + 1) % 5]]
        alone = gradcam.explain_jit(
            model, variables, pair, jnp.full((2,), -1, jnp.int32), upsample=False
        )
        for a, b in zip(alone, chunked):
            np.testing.assert_allclose(np.asarray(a)[0], b[i], atol=1e-6)
    probs, maps, explained = chunked
    np.testing.assert_array_equal(explained, probs.argmax(axis=1))
    # ResNet's feature grid at 64 px: 2x2 cells, each map scaled to a peak of 1.
    assert maps.shape == (5, 2, 2) and maps.min() >= 0 and maps.max() == 1

    masks = np.zeros((5, 64, 64), bool)
    masks[1:, 4:20, 40:60] = True  # inside the top-right quadrant's outer half
    labels = np.array([0, 1, 2, 1, 2])
    rng = np.random.default_rng(13)
    report = clinical.clinical_report(
        *simulated_predictions(rng, (10, 20, 15)), probs, labels, NAMES, resamples=100
    )
    report["grounding"] = clinical.grounding_report(
        maps, masks, labels, explained, NAMES, resamples=100
    )
    assert report["grounding"]["map_grid"] == [2, 2]
    assert "Grad-CAM on a 2x2 grid" in clinical.format_clinical(report)
    assert report["grounding"]["all"]["pointing_chance"]["mean"] > 0
    written = plots.write_clinical_plots(report, tmp_path, images=images, masks=masks, cams=maps)
    assert set(written) == {"reliability", "roc", "pr", "least_grounded"}
    for path in written.values():
        with Image.open(path) as png:
            assert png.format == "PNG" and png.size[0] >= 400


def test_figure_titles_sit_where_automatic_placement_puts_them(tmp_path, monkeypatch):
    # The figures give their titles' height (y=1.0), which spares matplotlib's search of
    # each axes' decorations; no axes has any above it, so the pixels are those of the
    # automatic placement.
    from matplotlib.axes import Axes

    rng = np.random.default_rng(21)
    n = 9
    labels = np.arange(n) % 3
    probs, _ = simulated_predictions(rng, (3, 3, 3))
    images = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    masks = np.zeros((n, 64, 64), bool)
    masks[:, 10:30, 20:50] = True
    maps = rng.random((n, 4, 4)).astype(np.float32)
    report = clinical.clinical_report(
        *simulated_predictions(rng, (10, 20, 15)), probs, labels, NAMES, resamples=100
    )
    report["grounding"] = clinical.grounding_report(
        maps, masks, labels, probs.argmax(axis=1), NAMES, resamples=100
    )
    given = plots.write_clinical_plots(
        report, tmp_path / "given", images=images, masks=masks, cams=maps
    )
    real_set_title = Axes.set_title

    def automatic(self, label, *args, y=None, **kwargs):
        return real_set_title(self, label, *args, **kwargs)

    monkeypatch.setattr(Axes, "set_title", automatic)
    placed = plots.write_clinical_plots(
        report, tmp_path / "auto", images=images, masks=masks, cams=maps
    )
    assert set(given) == set(placed) == {"reliability", "roc", "pr", "least_grounded"}
    for name in given:
        with Image.open(given[name]) as a, Image.open(placed[name]) as b:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
