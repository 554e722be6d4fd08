"""BUSI data: folder/zip reader, TFDS builder, synthetic generator, splits, Grain pipeline.

Submodules are imported on use (``from bcjax.data import pipeline``) so that
reading folders does not pull in Grain or TFDS.
"""
from bcjax.data.busi import CLASSES, BusiError, Example, find_busi, scan

__all__ = ["CLASSES", "BusiError", "Example", "find_busi", "scan"]
