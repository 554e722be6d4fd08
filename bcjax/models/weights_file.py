"""Reading weights files for bcjax.models.convert: a torchvision state_dict as
{name: numpy array} from a mapping, a `.npz` (np.savez; numpy only) or a
`.pth`/`.pt` (torch.save; torch, imported only then).

A file that cannot be read (empty, truncated, damaged, an HTML page saved by a
failed download, ...) is a ``WeightsFileError``: one line naming the file and
what is wrong with it, found from its first bytes where possible, before torch
is needed. What the names mean, and the conversion, are convert.py's.

Not imported by bcjax.models, like convert.py.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

StateDict = Mapping[str, Any]


class WeightsFileError(ValueError):
    """A weights file that cannot be read: empty, truncated, damaged or of another kind.

    One line naming the file and what is wrong with it (a ValueError, so that
    the training loop reports it as a config error of config.pretrained).
    """

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")


_ZIP_MAGIC = b"PK\x03\x04"  # .npz and torch.save's format since torch 1.6 are zip archives
_PICKLE_MAGIC = b"\x80"  # the legacy torch.save format starts as a pickle


def _check_container(path: str) -> None:
    """WeightsFileError when ``path`` cannot be a weights file of its kind (.npz, .pth, .pt),
    from its first bytes and the zip's end record, without torch and without reading it all."""
    kind = os.path.splitext(path)[1]
    size = os.path.getsize(path)
    if size == 0:
        raise WeightsFileError(path, "the file is empty (0 bytes); download or save it again.")
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise WeightsFileError(
                path,
                f"truncated or damaged: a zip archive ({size:,} bytes) "
                "without its end record, as when a download or copy stopped "
                "early.",
            )
        return
    if kind != ".npz" and head.startswith(_PICKLE_MAGIC):
        return  # torch's legacy format: only torch can tell more
    if kind == ".npz":
        expected = "a zip archive (np.savez)"
    else:
        expected = "a zip archive or pickle (torch.save)"
    if head.lstrip()[:1] == b"<":
        what = "text (an HTML error page from a failed download?)"
    else:
        what = f"something else: it starts with {head!r}"
    raise WeightsFileError(
        path, f"not a {kind} weights file: expected {expected}; the file is {what}."
    )


def _read_npz(path: str) -> dict:
    _check_container(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as e:
        # e.g. a damaged member (bad CRC, cut deflate stream) or an object array
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsFileError(path, f"damaged .npz: {reason}") from e


def _read_pth(path: str):
    _check_container(path)
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"Reading {path!r} needs torch, which is not installed. Either `pip install "
            "torch`, or convert it once where torch is: `python -m bcjax.models.convert "
            f"--model <name> --weights {path} --out weights.npz` (or np.savez the "
            "state_dict) and pass the .npz instead."
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # RuntimeError, EOFError, UnpicklingError, ...: torch's own words
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsFileError(path, f"torch cannot read it ({type(e).__name__}: {reason})") from e


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if not value.is_floating_point():  # num_batches_tracked (int64)
            return value.numpy()
        return value.float().numpy()
    return np.asarray(value)


def read_state_dict(source: StateDict | str | os.PathLike) -> dict:
    """A torchvision state_dict as {name: numpy array} from a mapping or a file.

    `.npz` needs only numpy; `.pth`/`.pt` needs torch (imported here, lazily).
    A checkpoint dict holding the weights under "state_dict" or "model" is
    unwrapped, and DataParallel's "module." prefix is stripped.
    """
    if isinstance(source, Mapping):
        state = {str(k): _numpy(v) for k, v in source.items()}
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No weights file at {path!r}.")
        if path.endswith(".npz"):
            state = _read_npz(path)
        elif path.endswith((".pth", ".pt")):
            loaded = _read_pth(path)
            for wrapper in ("state_dict", "model"):
                if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
                    loaded = loaded[wrapper]
            if not isinstance(loaded, Mapping):
                raise ValueError(f"{path!r} holds a {type(loaded).__name__}, not a state_dict.")
            state = {str(k): _numpy(v) for k, v in loaded.items()}
        else:
            raise ValueError(f"{path!r}: weights must be a .npz, .pth or .pt file.")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state
