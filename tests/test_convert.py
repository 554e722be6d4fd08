"""torchvision -> bcjax weight conversion, without torch.

tests/data/torchvision_keys.json holds the state_dict key names and shapes of
torchvision's eight models (1000 classes), written by
`tools/torchvision_check.py export` from real torchvision. Synthetic state_dicts
of those shapes (random values, so every tensor is distinguishable) must land
on the bcjax tree of jax.eval_shape exactly once each, transposed as torch ->
Flax layouts require. The numbers against torchvision's own forward pass come
from the same tool's `compare` half (BUILD_NOTES.md), not from CI.

Only eval_shape here: no model is initialised or run (XLA:CPU compile times).
"""

import functools
import json
import pathlib
import sys
import zipfile

import jax
import numpy as np
import pytest

import bcjax.models
from bcjax.models import convert

MANIFEST = json.loads(
    (pathlib.Path(__file__).parent / "data" / "torchvision_keys.json").read_text()
)
MODELS = bcjax.models.list_models()

# torchvision's trainable parameter counts at 1000 classes (DESIGN.md).
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "mobilenet_v2": 3_504_872,
    "mobilenet_v3_large": 5_483_032,
    "mobilenet_v3_small": 2_542_856,
}

# Spot checks written out by hand from torchvision's module structure, so the
# renaming is not only checked against itself: bcjax leaf <- torch key, layout.
CONV, DENSE, SAME = "conv", "dense", "same"
SPOTS = {
    "resnet18": [
        (("params", "conv_init", "kernel"), "conv1.weight", CONV),
        (("params", "bn_init", "scale"), "bn1.weight", SAME),
        (("params", "layer1_1", "conv2", "kernel"), "layer1.1.conv2.weight", CONV),
        (
            ("batch_stats", "layer2_0", "downsample_bn", "var"),
            "layer2.0.downsample.1.running_var",
            SAME,
        ),
        (("batch_stats", "layer4_1", "bn2", "mean"), "layer4.1.bn2.running_mean", SAME),
        (("params", "layer3_0", "downsample_conv", "kernel"), "layer3.0.downsample.0.weight", CONV),
        (("params", "fc", "kernel"), "fc.weight", DENSE),
        (("params", "fc", "bias"), "fc.bias", SAME),
    ],
    "resnet50": [
        (("params", "layer1_0", "conv3", "kernel"), "layer1.0.conv3.weight", CONV),
        (("params", "layer1_0", "downsample_bn", "bias"), "layer1.0.downsample.1.bias", SAME),
        (("params", "layer3_5", "conv2", "kernel"), "layer3.5.conv2.weight", CONV),
    ],
    "mobilenet_v2": [
        (("params", "features_0", "conv", "kernel"), "features.0.0.weight", CONV),
        (
            ("params", "features_1", "depthwise", "conv", "kernel"),
            "features.1.conv.0.0.weight",
            CONV,
        ),
        (("params", "features_1", "project", "conv", "kernel"), "features.1.conv.1.weight", CONV),
        (("params", "features_1", "project", "bn", "scale"), "features.1.conv.2.weight", SAME),
        (
            ("batch_stats", "features_2", "expand", "bn", "mean"),
            "features.2.conv.0.1.running_mean",
            SAME,
        ),
        (
            ("params", "features_2", "depthwise", "conv", "kernel"),
            "features.2.conv.1.0.weight",
            CONV,
        ),
        (("params", "features_2", "project", "conv", "kernel"), "features.2.conv.2.weight", CONV),
        (
            ("batch_stats", "features_17", "project", "bn", "var"),
            "features.17.conv.3.running_var",
            SAME,
        ),
        (("batch_stats", "features_18", "bn", "var"), "features.18.1.running_var", SAME),
        (("params", "classifier", "kernel"), "classifier.1.weight", DENSE),
    ],
    "mobilenet_v3_small": [
        (
            ("params", "features_1", "depthwise", "conv", "kernel"),
            "features.1.block.0.0.weight",
            CONV,
        ),
        (("params", "features_1", "se", "fc2", "kernel"), "features.1.block.1.fc2.weight", CONV),
        (
            ("params", "features_1", "project", "conv", "kernel"),
            "features.1.block.2.0.weight",
            CONV,
        ),
        (("params", "features_4", "se", "fc1", "bias"), "features.4.block.2.fc1.bias", SAME),
        (("batch_stats", "features_12", "bn", "mean"), "features.12.1.running_mean", SAME),
        (("params", "pre_logits", "kernel"), "classifier.0.weight", DENSE),
        (("params", "classifier", "bias"), "classifier.3.bias", SAME),
    ],
    "mobilenet_v3_large": [
        (("params", "features_1", "depthwise", "bn", "bias"), "features.1.block.0.1.bias", SAME),
        (("params", "features_2", "expand", "conv", "kernel"), "features.2.block.0.0.weight", CONV),
        (("params", "features_4", "se", "fc1", "kernel"), "features.4.block.2.fc1.weight", CONV),
        (
            ("batch_stats", "features_4", "project", "bn", "var"),
            "features.4.block.3.1.running_var",
            SAME,
        ),
        (
            ("params", "features_7", "project", "conv", "kernel"),
            "features.7.block.2.0.weight",
            CONV,
        ),
        (("params", "classifier", "kernel"), "classifier.3.weight", DENSE),
    ],
}


def _layout(array, kind):
    # torch OIHW -> HWIO; Linear (out, in) -> (in, out).
    return {CONV: lambda a: a.transpose(2, 3, 1, 0), DENSE: lambda a: a.T, SAME: lambda a: a}[kind](
        array
    )


@functools.cache
def _random_pool(seed):
    # One draw, sliced into every tensor: distinct values everywhere without
    # paying numpy's RNG again for each model (ResNet-152 has 60M values).
    size = max(sum(int(np.prod(shape)) for _, shape in MANIFEST[name]) for name in MODELS)
    return np.random.default_rng(seed).random(size + 1000, dtype=np.float32)


def _synthetic(name, seed=0):
    """A state_dict with torchvision's keys and shapes, random values."""
    pool, offset, state = _random_pool(seed), seed * 7, {}
    for key, shape in MANIFEST[name]:
        if key.endswith("num_batches_tracked"):
            state[key] = np.array(7, np.int64)
            continue
        size = int(np.prod(shape))
        state[key] = pool[offset : offset + size].reshape(shape)
        offset += size
    return state


def _leaves(tree):
    return dict(convert._flatten(tree))


def _eval_shape(name, num_classes):
    return {
        path: tuple(shape) for path, shape in convert.abstract_shapes(name, num_classes).items()
    }


def test_manifest_is_torchvisions():
    assert set(MODELS) <= set(MANIFEST)
    for name in MODELS:
        trainable = sum(
            int(np.prod(shape))
            for key, shape in MANIFEST[name]
            if not key.endswith(("running_mean", "running_var", "num_batches_tracked"))
        )
        assert trainable == TORCHVISION_PARAMS[name], name


def test_abstract_shapes_is_eval_shape():
    model = bcjax.models.create("resnet18", num_classes=3)
    shapes = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32),
    )
    direct = {
        (c,) + p: s.shape for c in ("params", "batch_stats") for p, s in convert._flatten(shapes[c])
    }
    assert convert.abstract_shapes("resnet18", 3) == direct


@pytest.mark.parametrize("name", MODELS)
def test_every_tensor_lands_once(name):
    state = _synthetic(name)
    variables = convert.convert_state_dict(name, state, num_classes=1000)
    leaves = {
        (c,) + p: v for c in ("params", "batch_stats") for p, v in _leaves(variables[c]).items()
    }
    assert {p: v.shape for p, v in leaves.items()} == _eval_shape(name, 1000)
    assert set(variables) == {"params", "batch_stats"}
    assert all(v.dtype == np.float32 for v in leaves.values())

    key_map = convert.torch_key_map(name, 1000)
    used = list(key_map.values())
    assert len(used) == len(set(used)), "a torch tensor used twice"
    assert set(used) == {k for k, _ in MANIFEST[name] if not k.endswith("num_batches_tracked")}
    for path, key in key_map.items():
        leaf = path[-1]
        kind = (
            CONV
            if leaf == "kernel" and state[key].ndim == 4
            else DENSE
            if leaf == "kernel"
            else SAME
        )
        # np.array_equal, not assert_array_equal: a quarter of the time on 60M values.
        assert np.array_equal(leaves[path], _layout(state[key], kind)), f"{path} <- {key}"
    for path, key, kind in SPOTS.get(name, []):
        assert key_map[path] == key
        assert np.array_equal(leaves[path], _layout(state[key], kind)), f"{path} <- {key}"


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobilenet_v3_small"])
def test_fresh_head_for_three_classes(name):
    state = _synthetic(name)
    variables = convert.convert_state_dict(name, state, num_classes=3, rng_seed=1)
    leaves = {
        (c,) + p: v for c in ("params", "batch_stats") for p, v in _leaves(variables[c]).items()
    }
    assert {p: v.shape for p, v in leaves.items()} == _eval_shape(name, 3)
    head = "fc" if name.startswith("resnet") else "classifier"
    kernel, bias = leaves["params", head, "kernel"], leaves["params", head, "bias"]
    torch_head = state[
        "fc.weight" if head == "fc" else f"{head}.{1 if name == 'mobilenet_v2' else 3}.weight"
    ]
    assert kernel.shape == (torch_head.shape[1], 3)
    # The zoo's own initial distributions (layers.py): torch Linear default for
    # ResNet's fc, N(0, 0.01) and zero bias for MobileNet classifiers.
    if head == "fc":
        bound = 1 / np.sqrt(kernel.shape[0])
        assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
        assert np.abs(kernel).max() > 0.9 * bound
    else:
        assert 0.008 < kernel.std() < 0.012 and not bias.any()
    again = convert.convert_state_dict(name, state, num_classes=3, rng_seed=1)
    np.testing.assert_array_equal(again["params"][head]["kernel"], kernel)
    other = convert.convert_state_dict(name, state, num_classes=3, rng_seed=2)
    assert not np.array_equal(other["params"][head]["kernel"], kernel)
    # The trunk is torchvision's whatever the head.
    stem = (
        ("params", "conv_init", "kernel")
        if head == "fc"
        else ("params", "features_0", "conv", "kernel")
    )
    stem_key = "conv1.weight" if head == "fc" else "features.0.0.weight"
    np.testing.assert_array_equal(leaves[stem], _layout(state[stem_key], CONV))


def test_head_of_matching_size_is_kept_or_may_be_absent():
    state = _synthetic("resnet18")
    state["fc.weight"], state["fc.bias"] = state["fc.weight"][:3], state["fc.bias"][:3]
    kept = convert.convert_state_dict("resnet18", state, num_classes=3)
    np.testing.assert_array_equal(kept["params"]["fc"]["kernel"], state["fc.weight"].T)
    del state["fc.weight"], state["fc.bias"]  # a backbone-only checkpoint
    fresh = convert.convert_state_dict("resnet18", state, num_classes=3)
    assert fresh["params"]["fc"]["kernel"].shape == (512, 3)
    with pytest.raises(ValueError, match=r"missing key\(s\): fc.bias, fc.weight"):
        convert.convert_state_dict("resnet18", state, num_classes=1000)


def test_errors_name_keys_shapes_and_likely_model():
    state = _synthetic("resnet18")
    broken = dict(state)
    del broken["layer1.0.bn1.running_var"]
    broken["layer9.weight"] = np.zeros(3, np.float32)
    broken["conv1.weight"] = np.zeros((64, 3, 5, 5), np.float32)
    with pytest.raises(ValueError) as error:
        convert.convert_state_dict("resnet18", broken, num_classes=1000)
    message = str(error.value)
    assert "missing key(s): layer1.0.bn1.running_var" in message
    assert "unexpected key(s): layer9.weight" in message
    assert "conv1.weight: weights (64, 3, 5, 5) vs resnet18 (64, 3, 7, 7)" in message

    with pytest.raises(ValueError) as error:
        convert.convert_state_dict("resnet18", _synthetic("resnet50"), num_classes=1000)
    message = str(error.value)
    assert "layer1.0.conv1.weight: weights (64, 64, 1, 1) vs resnet18 (64, 64, 3, 3)" in message
    assert "look like torchvision's 'resnet50'" in message

    with pytest.raises(ValueError, match="look like torchvision's 'mobilenet_v3_small'"):
        convert.convert_state_dict("resnet18", _synthetic("mobilenet_v3_small"), num_classes=1000)
    for name in MODELS:
        assert convert.guess_model(dict(MANIFEST[name])) == name


def test_files_prefix_and_cli_round_trip(tmp_path, monkeypatch):
    state = _synthetic("resnet18")
    direct = convert.convert_state_dict("resnet18", state, num_classes=1000)
    np.savez(
        tmp_path / "r18.npz", **{"module." + k: v for k, v in state.items()}
    )  # DataParallel names
    from_file = convert.convert_state_dict("resnet18", tmp_path / "r18.npz", num_classes=1000)
    jax.tree.map(np.testing.assert_array_equal, from_file, direct)

    # CLI output (bcjax layout) loads back, and still gets a fresh head for 3 classes.
    convert.main(
        [
            "--model",
            "resnet18",
            "--weights",
            str(tmp_path / "r18.npz"),
            "--out",
            str(tmp_path / "out.npz"),
        ]
    )
    assert "params/layer1_0/conv1/kernel" in np.load(tmp_path / "out.npz").files
    three = convert.convert_state_dict("resnet18", tmp_path / "out.npz", num_classes=3)
    jax.tree.map(
        np.testing.assert_array_equal,
        three,
        convert.convert_state_dict("resnet18", state, num_classes=3),
    )

    _torch_like_zip(tmp_path / "r18.pth")  # a sound file: only torch is missing
    monkeypatch.setitem(sys.modules, "torch", None)  # as on CI: no torch
    with pytest.raises(ImportError, match="needs torch.*pip install torch.*npz"):
        convert.convert_state_dict("resnet18", tmp_path / "r18.pth")


def _torch_like_zip(path, size=4096):
    """A zip archive laid out as torch.save writes one (archive/data.pkl, archive/data/0)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        zf.writestr("archive/data/0", np.random.default_rng(0).bytes(size))
    return path


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _one_line_error(call, path, fragment):
    with pytest.raises(convert.WeightsFileError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(path)) and fragment in message, message
    return message


def test_bad_weight_files_are_one_line_errors_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # every case is caught before torch is needed
    np.savez(tmp_path / "good.npz", **_synthetic("resnet18"))
    read = convert.read_state_dict

    empty_pth = tmp_path / "empty.pth"
    empty_pth.write_bytes(b"")
    _one_line_error(lambda: read(empty_pth), empty_pth, "the file is empty")
    truncated_pth = _truncate(_torch_like_zip(tmp_path / "truncated.pth"))
    _one_line_error(lambda: read(truncated_pth), truncated_pth, "truncated or damaged")
    html_pth = tmp_path / "page.pt"
    html_pth.write_text("<!DOCTYPE html><html>Not Found</html>")
    _one_line_error(lambda: read(html_pth), html_pth, "not a .pt weights file")

    truncated_npz = _truncate(tmp_path / "good.npz")
    _one_line_error(lambda: read(truncated_npz), truncated_npz, "truncated or damaged")
    empty_npz = tmp_path / "empty.npz"
    empty_npz.write_bytes(b"")
    _one_line_error(lambda: read(empty_npz), empty_npz, "the file is empty")
    # A damaged member inside a whole archive: found when the array is read.
    damaged = tmp_path / "damaged.npz"
    np.savez_compressed(damaged, weight=np.random.default_rng(1).random(4096))
    data = bytearray(damaged.read_bytes())
    data[200:260] = bytes(60)
    damaged.write_bytes(bytes(data))
    _one_line_error(lambda: read(damaged), damaged, "damaged .npz")
    # What the training loop turns into a ConfigError of config.pretrained.
    assert issubclass(convert.WeightsFileError, ValueError)


def test_convert_cli_reports_a_bad_file_in_one_line(tmp_path):
    np.savez(tmp_path / "r18.npz", **_synthetic("resnet18"))
    bad = _truncate(tmp_path / "r18.npz", keep=0.9)
    with pytest.raises(SystemExit) as exit_:
        convert.main(
            ["--model", "resnet18", "--weights", str(bad), "--out", str(tmp_path / "out.npz")]
        )
    message = str(exit_.value.code)
    assert message.startswith(f"error: {bad}: truncated or damaged") and "\n" not in message
    assert not (tmp_path / "out.npz").exists()


def test_truncated_torch_save_file(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "r18.pth"
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in _synthetic("resnet18").items()}, path)
    _one_line_error(lambda: convert.read_state_dict(_truncate(path)), path, "truncated or damaged")
    # A whole zip archive that is not torch's: only torch's own reader can tell.
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("notes.txt", "not a state_dict")
    _one_line_error(lambda: convert.read_state_dict(path), path, "torch cannot read it")


def test_load_pretrained_keeps_structure_dtypes_and_placement():
    shapes = convert.abstract_shapes("resnet18", 3)
    flat = {path: np.zeros(shape, np.float32) for path, shape in shapes.items()}
    flat["params", "fc", "bias"] = flat["params", "fc", "bias"].astype(jax.numpy.bfloat16)
    variables = convert._unflatten({p: jax.device_put(v) for p, v in flat.items()})
    # As a data-parallel run holds them: replicated over a mesh of all devices.
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    variables["params"]["layer1_0"] = jax.device_put(variables["params"]["layer1_0"], replicated)
    variables["perturbations"] = {"marker": np.ones(2)}
    state = _synthetic("resnet18")
    loaded = convert.load_pretrained("resnet18", state, 3, variables)
    assert jax.tree.structure(loaded) == jax.tree.structure(variables)
    for got, before in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
        assert got.dtype == before.dtype and got.shape == before.shape
        assert isinstance(got, jax.Array) == isinstance(before, jax.Array)
        assert getattr(got, "sharding", None) == getattr(before, "sharding", None)
    assert loaded["perturbations"] is variables["perturbations"]
    np.testing.assert_array_equal(loaded["batch_stats"]["bn_init"]["var"], state["bn1.running_var"])
    np.testing.assert_array_equal(
        loaded["params"]["conv_init"]["kernel"], state["conv1.weight"].transpose(2, 3, 1, 0)
    )

    narrow = jax.tree.map(lambda x: x, variables)
    narrow["params"]["conv_init"]["kernel"] = np.zeros((7, 7, 3, 32), np.float32)  # width=32
    with pytest.raises(
        ValueError,
        match=r"params/conv_init/kernel: variables \(7, 7, 3, 32\) vs "
        r"weights \(7, 7, 3, 64\).*width=64",
    ):
        convert.load_pretrained("resnet18", state, 3, narrow)
