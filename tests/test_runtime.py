"""The compute dtype chosen per chip, from the facts JAX reports (no hardware needed)."""

import pytest

from bcjax import runtime

# (chip, device.platform, device.compute_capability, dtype). Capabilities from
# NVIDIA's CUDA GPU table: K80 3.7, P100 6.0, P40 6.1, V100 7.0, T4 7.5,
# A100 8.0, L4 8.9, H100 9.0. TPUs report no capability.
CHIPS = [
    ("K80", "gpu", "3.7", "float32"),
    ("P100", "gpu", "6.0", "float16"),  # float16 at twice its float32 rate
    ("P40", "gpu", "6.1", "float32"),  # float16 at 1/64 of float32
    ("V100", "gpu", "7.0", "float16"),
    ("T4", "gpu", "7.5", "float16"),
    ("A100", "gpu", "8.0", "bfloat16"),
    ("L4", "gpu", "8.9", "bfloat16"),
    ("H100", "gpu", "9.0", "bfloat16"),
    ("TPU v2", "tpu", "", "bfloat16"),
    ("TPU v3", "tpu", "", "bfloat16"),
    ("TPU v5e", "tpu", "", "bfloat16"),
    ("CPU", "cpu", "", "float32"),
    ("GPU without a capability", "gpu", "", "float32"),
    ("ROCm GPU", "gpu", "gfx90a", "float32"),
]


@pytest.mark.parametrize("chip,platform,capability,dtype", CHIPS, ids=[c[0] for c in CHIPS])
def test_dtype_per_chip(chip, platform, capability, dtype):
    assert runtime.dtype_for(platform, capability) == dtype


def test_auto_resolves_to_this_machines_dtype():
    # The tests run on the CPU (conftest): "auto" is float32 there.
    assert runtime.default_dtype() == "float32"
    assert runtime.resolve_dtype("auto") == "float32"
    for name in ("float32", "bfloat16", "float16"):
        assert runtime.resolve_dtype(name) == name


def test_kaggle_is_told_by_its_folders(tmp_path, monkeypatch):
    kaggle_input, working = tmp_path / "input", tmp_path / "working"
    monkeypatch.setattr(runtime, "KAGGLE_INPUT", str(kaggle_input))
    monkeypatch.setattr(runtime, "KAGGLE_WORKING", str(working))
    assert runtime.notebook_host() != "kaggle" and runtime.kaggle_busi() is None
    kaggle_input.mkdir()
    assert runtime.notebook_host() != "kaggle"  # /kaggle/working must exist and be writable
    working.mkdir()
    assert runtime.notebook_host() == "kaggle"
    assert runtime.kaggle_busi() is None  # nothing attached
    (kaggle_input / "other-dataset" / "images").mkdir(parents=True)
    busi = kaggle_input / "breast-ultrasound-images" / "Dataset_BUSI_with_GT"
    (busi / "benign").mkdir(parents=True)
    assert runtime.kaggle_busi() == str(busi)


def test_kaggle_busi_as_a_zip(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "KAGGLE_INPUT", str(tmp_path))
    (tmp_path / "busi-zip").mkdir()
    (tmp_path / "busi-zip" / "Dataset_BUSI_with_GT.zip").write_bytes(b"PK")
    assert runtime.kaggle_busi() == str(tmp_path / "busi-zip" / "Dataset_BUSI_with_GT.zip")


# `nvidia-smi topo -p2p r` on two GPUs, with and without peer-to-peer reads.
P2P_OK = """        GPU0    GPU1
 GPU0   X       OK
 GPU1   OK      X

Legend:
  X    = Self
  OK   = Status Ok
  NS   = Not supported
"""
P2P_NS = """        GPU0    GPU1
 GPU0   X       NS
 GPU1   NS      X

Legend:
  X    = Self
  OK   = Status Ok
  NS   = Not supported
"""


def test_peer_to_peer_from_nvidia_smi():
    assert runtime.peer_to_peer(P2P_OK)
    assert not runtime.peer_to_peer(P2P_NS)
    assert not runtime.peer_to_peer("")  # no nvidia-smi: assume none
