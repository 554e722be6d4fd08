"""TFDS builder for BUSI, usable without TensorFlow.

The user places BUSI (folder or zip) in the manual dir; the builder writes
array_record files, read back through ``tfds.data_source`` /
``builder.as_data_source``. TFDS's Image feature needs TensorFlow to encode
PNGs, so images and masks are stored as zlib-compressed uint8 tensors.

    builder = Busi(data_dir=DATA_DIR)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=BUSI_DIR))
    source = builder.as_data_source("train")   # or tfds.data_source("busi", data_dir=DATA_DIR)

BUSI has no official split: everything is in "train"; bcjax.data.splits makes
the train/val/test split by file name (feature "file_name").
"""

from __future__ import annotations

import pathlib

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core.utils import py_utils

from bcjax.data import busi

_DESCRIPTION = """Breast Ultrasound Images (BUSI), Al-Dhabyani et al. 2020: 780 PNG images of
women aged 25-75 (133 normal, 437 benign, 210 malignant) with lesion masks.
Images are stored as uint8 [H, W, 3]; "mask" is the union of all masks of an
image as uint8 {0, 1} [H, W] (all zero for normal images)."""

_CITATION = """@article{aldhabyani2020busi,
  title={Dataset of breast ultrasound images},
  author={Al-Dhabyani, Walid and Gomaa, Mohammed and Khaled, Hussien and Fahmy, Aly},
  journal={Data in Brief}, volume={28}, pages={104863}, year={2020}}"""


class Busi(tfds.core.GeneratorBasedBuilder):
    """BUSI: breast ultrasound images in three classes, with lesion masks."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Images and masks as zlib uint8 tensors (no TensorFlow needed)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download Dataset_BUSI_with_GT (folder or .zip) from "
        "https://scholar.cu.edu.eg/?q=afahmy/pages/dataset and place it in the manual dir "
        "(or pass its parent folder as manual_dir)."
    )

    def __init__(self, *, file_format="array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    @py_utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS's own lookup touches importlib_resources, which TFDS does not
        # install; for a builder in a regular package it fails without it.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly rather than via dataset_info_from_configs, which wants
        # metadata files next to a registered TFDS package.
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(None, None, 3), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
                    ),
                    "mask": tfds.features.Tensor(
                        shape=(None, None), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
                    ),
                    "label": tfds.features.ClassLabel(names=list(busi.CLASSES)),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scholar.cu.edu.eg/?q=afahmy/pages/dataset",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager):
        try:
            manual = pathlib.Path(dl_manager.manual_dir)
        except AssertionError as e:  # TFDS's way of saying it is missing or empty
            raise busi.BusiError(str(e).split(".")[0]) from e
        # Validate everything before TFDS starts writing: a bad file then fails
        # with its path, and no partial dataset is left (TFDS writes to an
        # "incomplete" folder and renames it only on success).
        examples = busi.scan(manual)
        return {"train": self._generate_examples(examples)}

    def _generate_examples(self, examples):
        for ex in examples:
            image = busi.read_image(ex.image_path)
            yield (
                ex.name,
                {
                    "image": image,
                    "mask": busi.read_mask(ex, image.shape[:2]),
                    "label": ex.label,
                    "file_name": ex.name,
                },
            )


def prepare(manual_dir, data_dir) -> Busi:
    """Builds (once) the array_record files from the BUSI folder/zip in manual_dir."""
    manual = pathlib.Path(manual_dir).expanduser()
    if not manual.exists():  # before TFDS creates any folder under data_dir
        raise busi.BusiError(f"manual dir does not exist: {manual}")
    builder = Busi(data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


def file_name(record) -> str:
    name = record["file_name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def to_array_set(source, image_size: int):
    """A pipeline.ArraySet (decoded once, resized to S x S) from a BUSI data source."""
    from PIL import Image

    from bcjax.data.pipeline import ArraySet

    n = len(source)
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    labels = np.empty(n, np.int32)
    names = []
    for i in range(n):
        rec = source[i]
        images[i] = np.asarray(
            Image.fromarray(np.asarray(rec["image"], np.uint8)).resize(
                (image_size, image_size), Image.BILINEAR, reducing_gap=3.0
            )
        )
        labels[i] = int(rec["label"])
        names.append(file_name(rec))
    order = sorted(range(n), key=lambda i: (int(labels[i]), busi._natural_key(names[i])))
    return ArraySet(images[order], labels[order], [names[i] for i in order])
