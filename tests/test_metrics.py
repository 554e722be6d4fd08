"""Metrics against independent float64 references written here (slow, obvious
loops and pairwise counts, not the library's vectorised formulas)."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax.eval import accumulators, metrics

NAMES = ("normal", "benign", "malignant")


# ---------------------------------------------------------------- references


def ref_softmax(logits):
    out = []
    for row in np.asarray(logits, np.float64):
        e = [np.exp(v - max(row)) for v in row]
        out.append([v / sum(e) for v in e])
    return np.array(out)


def ref_counts(preds, labels, k):
    tp = sum(1 for p, y in zip(preds, labels) if p == k and y == k)
    fp = sum(1 for p, y in zip(preds, labels) if p == k and y != k)
    fn = sum(1 for p, y in zip(preds, labels) if p != k and y == k)
    return tp, fp, fn


def ref_prf(preds, labels, k):
    tp, fp, fn = ref_counts(preds, labels, k)
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def ref_auc(scores, positive):
    """Probability a random positive outranks a random negative, ties 1/2."""
    pos = [s for s, t in zip(scores, positive) if t]
    neg = [s for s, t in zip(scores, positive) if not t]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def ref_report(probs, labels, num_classes):
    preds = [int(np.argmax(p)) for p in probs]
    labels = [int(y) for y in labels]
    prf = [ref_prf(preds, labels, k) for k in range(num_classes)]
    present = [k for k in range(num_classes) if k in labels]
    seen = [k for k in range(num_classes) if k in labels or k in preds]
    aucs = [ref_auc(probs[:, k], [y == k for y in labels]) for k in range(num_classes)]
    defined = [a for a in aucs if a is not None]
    return {
        "accuracy": sum(p == y for p, y in zip(preds, labels)) / len(labels),
        "balanced_accuracy": np.mean([prf[k][1] for k in present]),
        "macro_f1": np.mean([prf[k][2] for k in seen]),
        "macro_precision": np.mean([prf[k][0] for k in seen]),
        "prf": prf,
        "auc": aucs,
        "auc_macro": np.mean(defined) if defined else None,
        "loss": np.mean([-np.log(probs[i][y]) for i, y in enumerate(labels)]),
    }


def assert_matches_reference(report, probs, labels, num_classes, names):
    ref = ref_report(probs, labels, num_classes)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_precision"):
        assert report[key] == pytest.approx(ref[key], abs=1e-12), key
    for k, name in enumerate(names):
        got = report["per_class"][name]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx(
            ref["prf"][k], abs=1e-12
        )
        assert got["support"] == int(np.sum(np.asarray(labels) == k))
        if ref["auc"][k] is None:
            assert got["auc"] is None
        else:
            assert got["auc"] == pytest.approx(ref["auc"][k], abs=1e-12)
    if ref["auc_macro"] is None:
        assert report["auc_macro"] is None
    else:
        assert report["auc_macro"] == pytest.approx(ref["auc_macro"], abs=1e-12)
    cm = np.zeros((num_classes, num_classes), int)
    for p, y in zip(np.argmax(probs, -1), labels):
        cm[y, p] += 1
    assert report["confusion_matrix"] == cm.tolist()


def random_case(rng, n, c, levels=None):
    logits = rng.normal(size=(n, c)) * 2
    if levels:  # few distinct values -> many tied scores
        logits = np.round(logits * levels) / levels
    labels = rng.integers(0, c, size=n)
    # Make the classifier better than chance so metrics are not all ~1/c.
    logits[np.arange(n), labels] += rng.uniform(0, 2, size=n)
    return logits, labels


# --------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "seed,n,c,levels",
    [(0, 40, 3, None), (1, 7, 3, 1), (2, 100, 4, 2), (3, 25, 2, None), (4, 60, 5, 1)],
)
def test_report_matches_reference(seed, n, c, levels):
    rng = np.random.default_rng(seed)
    logits, labels = random_case(rng, n, c, levels)
    probs = ref_softmax(logits)
    names = [f"c{k}" for k in range(c)]
    report = metrics.classification_report(probs, labels, names)
    assert_matches_reference(report, probs, labels, c, names)
    assert report["num_examples"] == n


def test_auc_with_ties_and_mann_whitney_examples():
    assert metrics.binary_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert metrics.binary_auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    assert metrics.binary_auc([0.2, 0.2, 0.9], [0, 1, 1]) == 0.75
    assert metrics.binary_auc([1, 2, 3], [1, 1, 1]) is None
    assert metrics.binary_auc([1, 2, 3], [0, 0, 0]) is None
    assert metrics.binary_auc([1, np.nan, 3], [0, 1, 0]) is None
    rng = np.random.default_rng(5)
    for _ in range(20):
        scores = rng.integers(0, 4, size=30).astype(float)
        pos = rng.random(30) < 0.4
        assert metrics.binary_auc(scores, pos) == pytest.approx(ref_auc(scores, pos), abs=1e-12)


def test_batches_with_padding_equal_one_shot():
    rng = np.random.default_rng(7)
    logits, labels = random_case(rng, 53, 3, levels=2)
    acc = accumulators.EvalAccumulator(3, NAMES)
    start = 0
    for size in (16, 16, 16, 5):
        b_logits = np.full((16, 3), 50.0)  # garbage rows, would be confident
        b_labels = np.full((16,), -1)  # and out of range if counted
        b_logits[:size] = logits[start : start + size]
        b_labels[:size] = labels[start : start + size]
        valid = np.arange(16) < size
        # Interleave padding too, not just at the end.
        perm = rng.permutation(16)
        acc.update(b_logits[perm], b_labels[perm], valid[perm])
        start += size
    batched = acc.compute()
    probs = ref_softmax(logits)
    one_shot = metrics.classification_report(
        probs, labels, NAMES, loss=ref_report(probs, labels, 3)["loss"]
    )
    assert batched["num_examples"] == 53
    for key, value in one_shot.items():
        if isinstance(value, float):
            assert batched[key] == pytest.approx(value, abs=1e-12), key
        else:
            assert batched[key] == value, key
    assert_matches_reference(batched, probs, labels, 3, NAMES)
    assert batched["loss"] == pytest.approx(ref_report(probs, labels, 3)["loss"], abs=1e-9)


def test_given_per_example_loss_is_masked_and_jax_inputs_work():
    rng = np.random.default_rng(8)
    logits, labels = random_case(rng, 12, 3)
    loss = rng.uniform(size=12)
    valid = np.arange(12) < 9
    loss_with_pad = np.where(valid, loss, 1e6)
    acc = accumulators.EvalAccumulator(3, NAMES)
    acc.update(
        jnp.asarray(logits, jnp.float32),
        jnp.asarray(labels, jnp.int32),
        jnp.asarray(valid),
        jnp.asarray(loss_with_pad, jnp.float32),
    )
    report = acc.compute()
    assert report["loss"] == pytest.approx(loss[:9].mean(), rel=1e-6)
    assert report["num_examples"] == 9
    with pytest.raises(ValueError, match="per example"):
        acc.update(logits, labels, valid, loss=np.float32(1.0))
    # pmap-shaped outputs [devices, per_device, ...] give the same result.
    shaped = accumulators.EvalAccumulator(3, NAMES)
    shaped.update(
        logits.reshape(4, 3, 3),
        labels.reshape(4, 3),
        valid.reshape(4, 3),
        loss_with_pad.reshape(4, 3),
    )
    assert shaped.compute()["confusion_matrix"] == report["confusion_matrix"]
    assert shaped.compute()["loss"] == pytest.approx(report["loss"], rel=1e-6)


def test_probabilities_input_and_absent_class_without_warnings():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    labels = np.array([0, 1, 1, 1])  # class 2 absent and never predicted
    acc = accumulators.EvalAccumulator(3, NAMES, from_logits=False)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        acc.update(probs, labels)
        report = acc.compute()
    assert report["per_class"]["malignant"] == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "auc": None,
        "support": 0,
    }
    assert_matches_reference(report, probs, labels, 3, NAMES)
    text = json.dumps(report, allow_nan=False)  # no NaN anywhere
    assert json.loads(text) == report


def test_empty_accumulator_gives_none_not_nan():
    acc = accumulators.EvalAccumulator(3, NAMES)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        report = acc.compute()
    assert report["num_examples"] == 0
    assert report["accuracy"] is None and report["auc_macro"] is None
    json.dumps(report, allow_nan=False)
    assert "normal" in metrics.format_report(report)


def test_input_validation():
    acc = accumulators.EvalAccumulator(3, NAMES)
    with pytest.raises(ValueError, match="labels outside"):
        acc.update(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="scores"):
        acc.update(np.zeros((2, 4)), np.array([0, 1]))
    with pytest.raises(ValueError, match="class names"):
        accumulators.EvalAccumulator(3, ("a", "b"))


def test_train_accumulator_averages_sums_and_per_step_values():
    acc = accumulators.TrainAccumulator()
    acc.update(
        {
            "loss_sum": jnp.float32(6.0),
            "correct": jnp.int32(3),
            "count": jnp.int32(4),
            "learning_rate": jnp.float32(0.1),
        }
    )
    acc.update(
        {
            "loss_sum": np.float32(2.0),
            "correct": 4,
            "count": 4,
            "learning_rate": 0.3,
            "aux_sum": 8.0,
        }
    )
    # Stacked metrics of two scanned steps are summed.
    acc.update(
        {"loss_sum": np.array([1.0, 1.0]), "correct": np.array([1, 0]), "count": np.array([2, 2])}
    )
    out = acc.compute()
    assert out["loss"] == pytest.approx(10.0 / 12)
    assert out["accuracy"] == pytest.approx(8 / 12)
    assert out["learning_rate"] == pytest.approx(0.2)
    assert out["aux"] == pytest.approx(2.0)
    assert out["count"] == 12 and out["steps"] == 3
    json.dumps(out, allow_nan=False)
    # The step's own "loss" is recomputed from sums, class weights respected.
    weighted = accumulators.TrainAccumulator()
    for finite in (True, False):
        weighted.update(
            {
                "loss": jnp.float32(99.0),
                "loss_sum": jnp.float32(3.0),
                "weight_sum": jnp.float32(1.5),
                "correct": jnp.float32(1),
                "count": jnp.float32(2),
                "grads_finite": jnp.bool_(finite),
                "grad_norm": jnp.float32(2.0 if finite else 4.0),
            }
        )
    assert weighted.compute() == {
        "loss": 2.0,
        "accuracy": 0.5,
        "grads_finite": 0.5,
        "grad_norm": 3.0,
        "count": 4,
        "steps": 2,
    }
    with pytest.raises(KeyError, match="loss_sum"):
        acc.update({"loss": 1.0})
    acc.reset()
    assert acc.compute() == {"count": 0, "steps": 0}


def test_flatten_and_format():
    rng = np.random.default_rng(3)
    logits, labels = random_case(rng, 30, 3)
    report = metrics.classification_report(ref_softmax(logits), labels, NAMES)
    flat = metrics.flatten_scalars(report, prefix="val/")
    assert flat["val/accuracy"] == report["accuracy"]
    assert flat["val/recall/benign"] == report["per_class"]["benign"]["recall"]
    assert all(isinstance(v, float) for v in flat.values())
    assert not any("confusion" in k for k in flat)
    text = metrics.format_report(report)
    assert len(text.splitlines()) == 2 + 3 + 1 + 3
    for name in NAMES:
        assert name in text


def test_class_predicted_but_absent_counts_in_macro_f1():
    # Like scikit-learn's default labels: a class that is predicted but never
    # true scores F1 = 0 and counts in the macro mean; balanced accuracy only
    # averages over true classes.
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1]])
    labels = np.array([0, 0, 1, 1])
    report = metrics.classification_report(probs, labels, NAMES)
    assert report["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert report["balanced_accuracy"] == pytest.approx((0.5 + 1) / 2)
    assert report["per_class"]["malignant"]["auc"] is None
    assert_matches_reference(report, probs, labels, 3, NAMES)


def _random_train_steps(rng, n_steps):
    """Step dicts as a train step might give them (JAX scalars, scanned [k]
    arrays, a pmap-like [2] grad_norm, numpy values, optional keys), and the
    same values as float64 numpy arrays for the reference."""
    steps, plain = [], []
    for i in range(n_steps):
        k = (1, 2, 3)[i % 3]  # 1: a plain scalar step; 2, 3: scanned steps
        shape = () if k == 1 else (k,)
        count = rng.integers(10, 65, size=shape)
        weights = rng.uniform(0.2, 3.0, size=shape)
        values = {
            "loss": rng.uniform(0, 3, size=shape),  # ignored by the accumulator
            "loss_sum": rng.uniform(0, 3, size=shape) * weights * count,
            "weight_sum": weights * count,
            "correct": rng.integers(0, count + 1, size=shape),
            "count": count,
            "grad_norm": rng.uniform(0, 5, size=(2,) if i % 2 else ()),
            "grads_finite": rng.random(size=shape) < 0.7,
        }
        if i % 4 == 1:
            del values["weight_sum"]  # unweighted step: loss_sum / count
        if i % 5 != 2:
            values["aux_sum"] = rng.normal(size=shape) * count
        if i % 3 == 0:
            values["learning_rate"] = rng.uniform(0, 0.1)
        step = {}
        for key, v in values.items():
            v = np.asarray(v)
            dtype = bool if v.dtype == bool else np.int32 if v.dtype.kind == "i" else np.float32
            if key == "aux_sum" and i % 7 == 3:
                step[key] = v.astype(np.float32)  # a numpy value, summed on host
            elif key == "learning_rate":
                step[key] = float(v)  # a Python float
            else:
                step[key] = jnp.asarray(v, dtype)
        steps.append(step)
        plain.append({key: np.asarray(np.asarray(v), np.float64) for key, v in step.items()})
    return steps, plain


def _reference_train_metrics(plain):
    """The docstring's rules, step by step, in float64."""
    num, den = {}, {}

    def add(name, total, n):
        num[name] = num.get(name, 0.0) + total
        den[name] = den.get(name, 0.0) + n

    for s in plain:
        count = s["count"].sum()
        add("loss", s["loss_sum"].sum(), s["weight_sum"].sum() if "weight_sum" in s else count)
        add("accuracy", s["correct"].sum(), count)
        add("count", count, 1)
        for key, v in s.items():
            if key in ("loss", "loss_sum", "weight_sum", "correct", "count"):
                continue
            if key.endswith("_sum"):
                add(key[:-4], v.sum(), count)
            else:
                add(key, v.sum(), v.size)
    ref = {name: num[name] / den[name] for name in num if name != "count"}
    ref["count"] = int(num["count"])
    ref["steps"] = len(plain)
    return ref


@pytest.mark.parametrize("chunk", [None, 4])
def test_train_accumulator_matches_float64_reference(monkeypatch, chunk):
    if chunk is not None:  # several chunks, the last one partly filler
        monkeypatch.setattr(accumulators, "_CHUNK", chunk)
    steps, plain = _random_train_steps(np.random.default_rng(11), 21)
    acc = accumulators.TrainAccumulator()
    for step in steps:
        acc.update(step)
    out = acc.compute()
    ref = _reference_train_metrics(plain)
    assert set(out) == set(ref)
    assert out["count"] == ref["count"] and out["steps"] == 21
    for key in ref:
        assert isinstance(out[key], int if key in ("count", "steps") else float)
        assert out[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), key
    assert out == acc.compute()  # compute does not consume the buffer
    # A NaN step makes the mean undefined (None), not NaN.
    acc.update({**steps[0], "loss_sum": jnp.float32(np.nan)})
    assert acc.compute()["loss"] is None
    json.dumps(acc.compute(), allow_nan=False)


def test_train_accumulator_update_does_no_device_work(monkeypatch):
    @jax.jit
    def train_step(i):
        f = i.astype(jnp.float32)
        return {
            "loss": f,
            "loss_sum": 64 * f,
            "weight_sum": 64 + f,
            "correct": 3 * i,
            "count": 64 + 0 * i,
            "grad_norm": 2 * f,
            "grads_finite": f > 0,
        }

    calls = []
    reduce_chunk = accumulators._reduce_chunk
    monkeypatch.setattr(
        accumulators, "_reduce_chunk", lambda *a: calls.append(1) or reduce_chunk(*a)
    )
    acc = accumulators.TrainAccumulator()
    # Any computation on, or read of, a deleted array raises, and the guard
    # refuses every implicit transfer: update may only keep references.
    dead = [train_step(jnp.int32(i)) for i in range(5)]
    jax.block_until_ready(dead)
    for step in dead:
        for value in step.values():
            value.delete()
    with jax.transfer_guard("disallow"):
        for step in dead:
            acc.update(step)
    assert calls == []
    assert len(acc._buffer) == 5

    # compute(): one reducer call per chunk of steps, compiled once for a set
    # of keys and shapes whatever the number of steps of the epoch.
    cache_before = None
    for n_steps in (2 * accumulators._CHUNK + 3, accumulators._CHUNK + 5):
        acc.reset()
        calls.clear()
        live = [train_step(jnp.int32(i)) for i in range(n_steps)]
        for step in live:
            acc.update(step)
        assert calls == []
        out = acc.compute()
        assert len(calls) == -(-n_steps // accumulators._CHUNK)
        if cache_before is None:
            cache_before = reduce_chunk._cache_size()
        else:
            assert reduce_chunk._cache_size() == cache_before
        assert out["count"] == 64 * n_steps and out["steps"] == n_steps
        assert out["grads_finite"] == pytest.approx((n_steps - 1) / n_steps)
        assert out["accuracy"] == pytest.approx(3 * sum(range(n_steps)) / (64 * n_steps))


def test_two_class_report_names_the_positive_class_and_its_auc():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])
    labels = np.array([0, 1, 1, 1, 0])
    names = ("benign", "malignant")
    report = metrics.classification_report(probs, labels, names)
    assert report["positive_class"] == "malignant"  # the last class by default
    # Reference: the share of (positive, negative) pairs the positive's score ranks higher.
    pos, neg = probs[labels == 1, 1], probs[labels == 0, 1]
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    assert report["binary_auc"] == pytest.approx(sum(pairs) / len(pairs)) == pytest.approx(5 / 6)
    assert "positive class malignant: binary AUC 0.8333" in metrics.format_report(report)
    assert "binary_auc" in metrics.flatten_scalars(report)

    acc = accumulators.EvalAccumulator(2, names, from_logits=False, positive_class="benign")
    acc.update(probs, labels)
    streamed = acc.compute()
    assert streamed["positive_class"] == "benign"
    assert streamed["binary_auc"] == pytest.approx(report["binary_auc"])
    with pytest.raises(ValueError, match="positive class 'normal'"):
        metrics.classification_report(probs, labels, names, positive_class="normal")
    three = metrics.classification_report(np.full((2, 3), 1 / 3), np.array([0, 1]), NAMES)
    assert "positive_class" not in three and "binary_auc" not in three
