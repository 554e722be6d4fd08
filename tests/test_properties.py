"""Properties over many inputs (hypothesis): bad configurations explain
themselves; splits keep duplicates together; evaluation sees every example
once; batches depend on the seed alone, not on the process count."""

from __future__ import annotations

import importlib
import math
import pathlib
import re
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bcjax import config_check  # noqa: E402
from bcjax.data import pipeline, splits  # noqa: E402
from bcjax.data.busi import CLASSES, Example  # noqa: E402

DEVICES = 8
# derandomize: CI tries the same examples every run, so a failure is never a fluke.
FAST = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ----------------------------------------------------------------------------- configurations


def _config(variant: str):
    return importlib.import_module(f"configs.{variant}").get_config()


def _leaf_paths(config, prefix="") -> list[str]:
    out = []
    for key in sorted(config.keys()):
        value = config[key]
        if hasattr(value, "keys"):
            out += _leaf_paths(value, f"{prefix}{key}.")
        else:
            out.append(prefix + key)
    return out


FIELDS = _leaf_paths(_config("default"))
VARIANTS = ("default", "quickstart", "resnet_8dev", "mobilenet_1dev")

_edge_ints = st.sampled_from(
    [
        0,
        1,
        2,
        3,
        5,
        7,
        8,
        12,
        31,
        32,
        33,
        4096,
        -1,
        -2,
        -(2**31),
        2**31,
        2**53 + 1,
        2**63 - 1,
        2**63,
        2**64 + 3,
        10**30,
    ]
)
_ints = st.one_of(_edge_ints, st.integers(-100, 100), st.integers())
_floats = st.one_of(
    st.sampled_from(
        [
            0.0,
            -0.0,
            1.0,
            0.5,
            0.999,
            1.5,
            -0.1,
            1e-300,
            1e300,
            5e-324,
            math.nan,
            math.inf,
            -math.inf,
        ]
    ),
    st.floats(allow_nan=True, allow_infinity=True),
)
_texts = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "resnet",
            "RESNET18",
            "resnet18 ",
            "None",
            "0",
            "-1",
            "nan",
            "shard_map\n",
            "é",
            "\x00",
            "/",
            "../..",
            "a" * 300,
        ]
    ),
    st.text(max_size=8),
)
_scalars = st.one_of(_ints, _floats, st.booleans(), _texts, st.none())
_tuples = st.lists(_scalars, max_size=5).map(tuple)


def _values_for(original):
    """Mostly values ConfigDict lets replace `original` (its type, or None), plus anything."""
    if isinstance(original, bool):
        typed = st.booleans()
    elif isinstance(original, int):
        typed = _ints
    elif isinstance(original, float):
        typed = st.one_of(_floats, _ints)
    elif isinstance(original, str):
        typed = _texts
    elif isinstance(original, tuple):
        typed = st.one_of(
            _tuples, st.lists(st.one_of(_floats, _ints), min_size=0, max_size=4).map(tuple)
        )
    else:
        typed = _scalars
    # Values of other types are mostly refused by ConfigDict itself; a few find the ones it
    # lets through.
    return st.one_of(typed, typed, typed, st.none(), _scalars, _tuples)


def _assign(config, path: str, value) -> bool:
    """Sets config.<path>; False when ConfigDict's type check refuses the value
    (the command line never gets that far either: the flag parser refuses it)."""
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
        node = node[p]
    try:
        node[leaf] = value
    except (TypeError, ValueError):
        return False
    return True


def _get(config, path):
    node = config
    for p in path.split("."):
        node = node[p]
    return node


DEFAULTS = {path: _get(_config("default"), path) for path in FIELDS}


def _finite_number(x):
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def _invariants(c) -> None:
    """What the rest of bcjax relies on once validate() has passed."""
    devices = c.num_devices or DEVICES
    assert c.global_batch_size >= 1 and c.global_batch_size % devices == 0
    assert 0 <= c.num_devices <= DEVICES
    assert c.model in config_check.MODELS and c.strategy in config_check.STRATEGIES
    assert 0 <= c.warmup_epochs < c.num_epochs
    assert c.checkpoint_every_epochs % c.eval_every_epochs == 0
    fractions = tuple(c.split_fractions)
    assert len(fractions) == 3 and all(_finite_number(f) and f > 0 for f in fractions)
    assert abs(sum(fractions) - 1) <= 1e-6
    assert all(_finite_number(w) and w > 0 for w in c.class_weights)
    # Classes: BUSI's three for its data sets; folder/CSV data's are known once read.
    classes = tuple(c.class_names) or (CLASSES if c.dataset in config_check.BUSI_DATASETS else ())
    assert len(set(classes)) == len(classes) != 1
    assert all(isinstance(n, str) and n and n == n.strip() for n in classes)
    if c.dataset in config_check.BUSI_DATASETS:
        assert sorted(classes) == sorted(CLASSES)
    if classes:
        assert len(c.class_weights) in (0, len(classes))
        assert c.positive_class in ("",) + classes
    assert bool(c.data_csv) == (c.dataset == "csv")
    assert c.synthetic_mark in ("", "calliper", "text") and 0 <= c.synthetic_mark_prob <= 1
    assert not c.synthetic_mark or c.dataset in ("auto", "synthetic")
    assert 0 <= c.seed < 2**63  # jax.random.key
    for path in FIELDS:
        value, default = _get(c, path), DEFAULTS[path]
        if isinstance(default, bool):
            assert isinstance(value, bool), path
        elif isinstance(default, (int, float)):
            assert _finite_number(value), path
        elif isinstance(default, str):
            assert isinstance(value, str), path
        elif path == "class_names":
            assert all(isinstance(v, str) for v in value), path
        elif isinstance(default, tuple):
            assert all(_finite_number(v) for v in value), path
    lo, hi = c.augment.crop_scale
    assert 0 < lo <= hi <= 1
    lo, hi = c.augment.crop_ratio  # the crop's aspect ratio range (log-uniform in augment)
    assert 0 < lo <= hi


def _check(config, changed: list[str]) -> None:
    try:
        config_check.validate(config, num_devices_available=DEVICES)
    except config_check.ConfigError as e:
        # The message names a field that was changed (and, for a clash between
        # two fields, may name the other one too).
        assert any(f"config.{p}" in str(e) for p in changed), (changed, str(e))
    else:
        _invariants(config)


@settings(FAST, max_examples=250)
@given(variant=st.sampled_from(VARIANTS), path=st.sampled_from(FIELDS), data=st.data())
def test_one_bad_field_is_refused_with_its_name_or_the_config_is_sound(variant, path, data):
    config = _config(variant)
    value = data.draw(_values_for(_get(config, path)), label="value")
    assume(_assign(config, path, value))
    _check(config, [path])


@settings(FAST, max_examples=120)
@given(
    variant=st.sampled_from(VARIANTS),
    paths=st.lists(st.sampled_from(FIELDS), min_size=2, max_size=3, unique=True),
    data=st.data(),
)
def test_several_bad_fields_never_raise_anything_but_config_error(variant, paths, data):
    config = _config(variant)
    changed = [
        p for p in paths if _assign(config, p, data.draw(_values_for(_get(config, p)), label=p))
    ]
    assume(changed)
    _check(config, changed)


# The data fields added with classes from the data (issue 15) and the planted mark (issue 16),
# each bad value named, and what they accept together.
@pytest.mark.parametrize(
    "overrides,named",
    [
        ({"class_names": ("benign",)}, "config.class_names"),
        ({"class_names": ("benign", "benign", "malignant")}, "config.class_names"),
        ({"class_names": ("normal", " benign", "malignant")}, "config.class_names"),
        ({"class_names": (1, 2, 3)}, "config.class_names"),
        ({"class_names": ("benign", "malignant")}, "config.class_names"),  # BUSI has three
        ({"positive_class": "cancer"}, "config.positive_class"),
        (
            {"dataset": "folder", "class_names": ("a", "b"), "positive_class": "c"},
            "config.positive_class",
        ),
        ({"dataset": "csv"}, "config.data_csv"),
        ({"data_csv": "labels.csv"}, "config.data_csv"),
        ({"synthetic_mark": "arrow"}, "config.synthetic_mark"),
        ({"dataset": "folder", "synthetic_mark": "text"}, "config.synthetic_mark"),
        ({"synthetic_mark_prob": 1.5}, "config.synthetic_mark_prob"),
        ({"synthetic_mark_prob": -0.1}, "config.synthetic_mark_prob"),
        ({"synthetic_mark_prob": math.nan}, "config.synthetic_mark_prob"),
        ({"class_weights": (1.0, 2.0)}, "config.class_weights"),
        (
            {"dataset": "folder", "class_names": ("a", "b"), "class_weights": (1.0, 2.0, 3.0)},
            "config.class_weights",
        ),
    ],
)
def test_data_fields_refuse_bad_values_by_name(overrides, named):
    config = _config("default")
    for path, value in overrides.items():
        assert _assign(config, path, value), path
    with pytest.raises(config_check.ConfigError, match=re.escape(named)):
        config_check.validate(config, num_devices_available=DEVICES)


@pytest.mark.parametrize(
    "overrides",
    [
        {
            "dataset": "folder",
            "class_names": ("benign", "malignant"),
            "class_weights": (1.0, 2.0),
            "positive_class": "benign",
        },
        {
            "dataset": "folder",
            "class_weights": (1.0, 2.0, 0.5, 4.0),
        },  # the count is checked once read
        {"dataset": "csv", "data_csv": "labels.csv", "positive_class": "anything"},
        {"class_names": ("malignant", "normal", "benign"), "positive_class": "normal"},
        {"dataset": "synthetic", "synthetic_mark": "calliper", "synthetic_mark_prob": 1},
    ],
)
def test_data_fields_accept_what_the_data_layer_reads(overrides):
    config = _config("default")
    for path, value in overrides.items():
        assert _assign(config, path, value), path
    config_check.validate(config, num_devices_available=DEVICES)
    _invariants(config)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # absl's config-file loader
@pytest.mark.parametrize(
    "override,names",
    [
        ("--config.learning_rate=abc", "learning_rate"),  # the flag parser refuses it
        ("--config.width=None", "width"),
        ("--config.model=", "config.model"),  # validate() refuses it
        ("--config.split_fractions=abc", "config.split_fractions"),
        ("--config.augment.crop_scale=(0.5,)", "config.augment.crop_scale"),
        ("--config.seed=99999999999999999999", "config.seed"),
        ("--config.num_devices=3", "config.num_devices"),
        ("--config.learning_rte=0.1", "learning_rte"),  # no such field
        ("--config.augment.flipp=1", "flipp"),
    ],
)
def test_command_line_refuses_bad_overrides_without_a_traceback(
    override, names, monkeypatch, capsys
):
    # main.run() in this process: what `python -m bcjax.main` runs, without a
    # few seconds of interpreter start per case. A refused config never gets
    # as far as asking for devices.
    from bcjax import main

    monkeypatch.setattr(main, "_FLAGS_PARSED", False)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "bcjax.main",
            f"--config={ROOT / 'configs' / 'quickstart.py'}",
            "--workdir=/nonexistent/never-written",
            override,
        ],
    )
    with pytest.raises(SystemExit) as exit_:
        main.run()
    err = capsys.readouterr().err
    message = exit_.value.code if isinstance(exit_.value.code, str) else err
    assert exit_.value.code not in (0, None)
    assert names in message and "Traceback" not in message + err
    assert "\\n" not in message and "\\'" not in message  # plain text, not a repr


# ----------------------------------------------------------------------------- splits


@st.composite
def _planted(draw, max_groups=25):
    """Examples with 64-bit hashes: groups of near duplicates (within the
    threshold of their first member), some filed under two classes."""
    groups = draw(
        st.lists(
            st.tuples(st.integers(1, 4), st.integers(0, 2), st.booleans()),
            min_size=1,
            max_size=max_groups,
        )
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    examples, hashes = [], []
    for g, (size, label, conflict) in enumerate(groups):
        base = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
        for m in range(size):
            flips = rng.choice(
                64, size=int(rng.integers(0, splits.DEFAULT_HASH_THRESHOLD + 1)), replace=False
            )
            h = base if m == 0 else base ^ int(sum(1 << int(b) for b in flips))
            lab = (label + 1) % 3 if conflict and m == size - 1 and size > 1 else label
            examples.append(
                Example(f"{CLASSES[lab]}/{CLASSES[lab]} ({g}-{m}).png", lab, "/nonexistent")
            )
            hashes.append(h)
    return examples, np.array(hashes, np.uint64)


def _near_pairs(hashes):
    dist = splits.hamming_matrix(hashes)
    return list(zip(*np.nonzero(np.triu(dist <= splits.DEFAULT_HASH_THRESHOLD, k=1))))


def _assert_partition_keeps_duplicates_together(split, examples, hashes):
    names = [ex.name for ex in examples]
    part = {}
    for p in splits.SPLITS:
        for n in split[p]:
            assert n not in part, f"{n} in {part[n]} and {p}"
            part[n] = p
    excluded = set(split["meta"]["excluded"])
    assert set(part) | excluded == set(names) and not set(part) & excluded
    for i, j in _near_pairs(hashes):
        a, b = names[i], names[j]
        if a not in excluded and b not in excluded:
            assert part[a] == part[b], (a, part[a], b, part[b])
        else:
            assert a in excluded and b in excluded  # a conflicting group goes as a whole
    return part


_fractions = st.tuples(st.integers(1, 10), st.integers(0, 10), st.integers(0, 10)).map(
    lambda t: tuple(x / sum(t) for x in t)
)


@FAST
@given(planted=_planted(), seed=st.integers(0, 2**32), fractions=_fractions, exclude=st.booleans())
def test_make_split_keeps_duplicate_groups_whole_and_is_seeded(planted, seed, fractions, exclude):
    examples, hashes = planted
    split = splits.make_split(
        examples, seed=seed, fractions=fractions, exclude_conflicts=exclude, hashes=hashes
    )
    _assert_partition_keeps_duplicates_together(split, examples, hashes)
    assert split == splits.make_split(
        examples, seed=seed, fractions=fractions, exclude_conflicts=exclude, hashes=hashes
    )


@FAST
@given(
    planted=_planted(),
    folds=st.integers(2, 5),
    seed=st.integers(0, 2**32),
    test_fraction=st.sampled_from([0.0, 0.1, 0.2, 0.5]),
    exclude=st.booleans(),
)
def test_kfold_folds_keep_groups_whole_and_validate_every_example_once(
    planted, folds, seed, test_fraction, exclude
):
    examples, hashes = planted
    runs = [
        splits.kfold_split(
            examples,
            folds,
            k,
            seed=seed,
            test_fraction=test_fraction,
            exclude_conflicts=exclude,
            hashes=hashes,
        )
        for k in range(folds)
    ]
    for split in runs:
        _assert_partition_keeps_duplicates_together(split, examples, hashes)
        assert split["test"] == runs[0]["test"]  # held out once, the same for every fold
    validated = [n for split in runs for n in split["val"]]
    assert sorted(validated) == sorted(runs[0]["train"] + runs[0]["val"])  # each exactly once
    assert runs[1] == splits.kfold_split(
        examples,
        folds,
        1,
        seed=seed,
        test_fraction=test_fraction,
        exclude_conflicts=exclude,
        hashes=hashes,
    )


# ----------------------------------------------------------------------------- pipeline


def _array_set(n: int, size: int = 2) -> pipeline.ArraySet:
    # Every pixel of row i holds i (mod 256), so a batch shows which rows it gathered.
    images = np.broadcast_to(
        (np.arange(n) % 256).astype(np.uint8)[:, None, None, None], (n, size, size, 3)
    ).copy()
    return pipeline.ArraySet(
        images, (np.arange(n) % 3).astype(np.int32), [f"x{i}" for i in range(n)]
    )


@FAST
@given(n=st.integers(0, 45), per_process=st.integers(1, 6), processes=st.integers(1, 4))
def test_evaluation_sees_every_example_exactly_once(n, per_process, processes):
    data = _array_set(n)
    gbs = per_process * processes
    streams = [
        list(pipeline.eval_batches(data, gbs, p, processes, num_threads=0))
        for p in range(processes)
    ]
    assert len({len(s) for s in streams}) == 1  # every process runs the same number of steps
    assert len(streams[0]) == -(-n // gbs)
    seen = []
    for batches in zip(*streams):
        for b in batches:
            assert b["image"].shape[0] == per_process
            valid = b["valid"]
            np.testing.assert_array_equal(b["image"][valid][:, 0, 0, 0], b["index"][valid] % 256)
            np.testing.assert_array_equal(b["label"][valid], data.labels[b["index"][valid]])
            assert (b["index"][~valid] == -1).all()
            seen += b["index"][valid].tolist()
    assert sorted(seen) == list(range(n))


def _take(it, k):
    return [next(it) for _ in range(k)]


@FAST
@given(
    n=st.integers(1, 40),
    per_process=st.integers(1, 4),
    processes=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**32),
    balanced=st.booleans(),
    data=st.data(),
)
def test_train_batches_depend_on_the_seed_not_on_the_process_count(
    n, per_process, processes, seed, balanced, data
):
    gbs = per_process * processes
    assume(gbs <= n)
    arrays = _array_set(n)
    spe = pipeline.steps_per_epoch(n, gbs)
    steps = min(2 * spe + 1, 12)
    one = _take(pipeline.train_iterator(arrays, gbs, seed, balanced=balanced, num_threads=0), steps)
    again = _take(
        pipeline.train_iterator(arrays, gbs, seed, balanced=balanced, num_threads=0), steps
    )
    sliced = [
        _take(
            pipeline.train_iterator(
                arrays, gbs, seed, p, processes, balanced=balanced, num_threads=0
            ),
            steps,
        )
        for p in range(processes)
    ]
    for step in range(steps):
        np.testing.assert_array_equal(one[step]["index"], again[step]["index"])
        np.testing.assert_array_equal(
            one[step]["index"], np.concatenate([s[step]["index"] for s in sliced])
        )
        np.testing.assert_array_equal(one[step]["image"][:, 0, 0, 0], one[step]["index"] % 256)
    if not balanced:  # one epoch draws each example at most once, n - n % gbs of them
        for e in range(len(one) // spe):
            epoch = np.concatenate([b["index"] for b in one[e * spe : (e + 1) * spe]])
            assert len(set(epoch.tolist())) == len(epoch) == spe * gbs
    # A restored iterator continues with the very next batch.
    at = data.draw(st.integers(0, steps - 1), label="restore at")
    it = pipeline.train_iterator(arrays, gbs, seed, balanced=balanced, num_threads=0)
    _take(it, at)
    restored = pipeline.train_iterator(arrays, gbs, seed, balanced=balanced, num_threads=0)
    restored.set_state(it.get_state())
    np.testing.assert_array_equal(next(restored)["index"], one[at]["index"])
