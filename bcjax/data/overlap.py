"""Exact and near duplicates between two sets of images (external vs training).

Near means within ``threshold`` bits of the perceptual hash the splits use
(``bcjax.data.splits``), so an external image the splits would have grouped with
a training image is reported; exact means byte-identical files.
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Sequence

import numpy as np

from bcjax.data.busi import Example

__all__ = ["find_duplicates"]


def _sha256(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def find_duplicates(
    external: Sequence[Example],
    external_hashes: np.ndarray,
    train: Sequence[Example],
    train_hashes: np.ndarray,
    class_names: Sequence[str],
    threshold: int,
) -> list[dict]:
    """One entry per external image within ``threshold`` bits of a training image."""
    distance = np.bitwise_count(
        np.asarray(external_hashes, np.uint64)[:, None]
        ^ np.asarray(train_hashes, np.uint64)[None, :]
    )
    found = []
    for i, row in enumerate(distance):
        close = np.flatnonzero(row <= threshold)
        if not close.size:
            continue
        digest = _sha256(external[i].image_path)
        matches = [
            {
                "train": train[j].name,
                "file": train[j].image_path,
                "class": class_names[train[j].label],
                "distance": int(row[j]),
                "exact": _sha256(train[j].image_path) == digest,
            }
            for j in sorted(close, key=lambda j: (row[j], j))
        ]
        found.append(
            {
                "external": external[i].name,
                "file": external[i].image_path,
                "kind": "exact" if any(m["exact"] for m in matches) else "near",
                "matches": matches,
            }
        )
    return found
