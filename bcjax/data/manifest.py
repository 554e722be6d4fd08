"""A run's split as a file: which image is in train, val and test (``manifest.json``).

Every run reads or writes one; only a run that makes a new split needs
bcjax.data.splits (duplicate hashes, grouping, stratified assignment). A resumed
run, or one given ``config.split_manifest``, reads its parts from here.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

from bcjax import files
from bcjax.data.busi import CLASSES, BusiError, Example

SPLITS = ("train", "val", "test")
MANIFEST_VERSION = 1
# Manifests written before classes came from the data hold no class names: they are BUSI's.
BUSI_CLASSES = CLASSES


def save_manifest(manifest: dict, path) -> pathlib.Path:
    """Writes the split as JSON (atomically); load_manifest + select reproduce it."""
    return files.write_json(manifest, path)


def load_manifest(path) -> dict:
    path = pathlib.Path(path)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise BusiError(f"split manifest does not exist: {path}") from e
    except json.JSONDecodeError as e:
        raise BusiError(f"split manifest is not valid JSON: {path} ({e})") from e
    missing = [p for p in SPLITS if p not in manifest]
    if missing:
        raise BusiError(f"split manifest {path} lacks {', '.join(missing)}")
    return manifest


def manifest_class_names(manifest: dict) -> tuple[str, ...]:
    """The class names a manifest's labels index; BUSI's three for manifests
    written before they were recorded (old workdirs still resume)."""
    return tuple(manifest.get("meta", {}).get("class_names") or BUSI_CLASSES)


def select(examples: Sequence[Example], names: Sequence[str]) -> list[Example]:
    """The examples named, in the order named; BusiError listing names not in ``examples``."""
    by_name = {ex.name: ex for ex in examples}
    missing = [n for n in names if n not in by_name]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5])
        raise BusiError(
            f"{len(missing)} name(s) from the manifest are not in the data set: {shown}"
            + (" ..." if len(missing) > 5 else "")
        )
    return [by_name[n] for n in names]
