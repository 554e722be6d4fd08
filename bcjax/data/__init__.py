"""Labelled ultrasound images: BUSI's folder/zip, class folders, a CSV (PNG, JPEG or
DICOM files, bcjax.data.dicom); the synthetic set, splits, the Grain pipeline and the
TFDS builder.

Submodules are imported on use (``from bcjax.data import pipeline``) so that
reading folders does not pull in Grain or TFDS.
"""

from bcjax.data.busi import CLASSES, BusiError, Example, find_busi, scan
from bcjax.data.readers import LabelledSet, detect, read

__all__ = ["CLASSES", "BusiError", "Example", "LabelledSet", "detect", "find_busi", "read", "scan"]
