"""bcjax.predict finds DICOM files in a folder (suffixed or named by UID only) and reads them."""

import shutil

import numpy as np
from pydicom.data import get_testdata_file

from bcjax import predict


def test_a_folder_of_dicom_files_is_found_and_read(tmp_path):
    source = get_testdata_file("US1_UNCR.dcm")
    shutil.copy(source, tmp_path / "scan.dcm")
    shutil.copy(source, tmp_path / "1.2.840.113619.2.1")  # a PACS export named by its UID
    (tmp_path / "notes.txt").write_text("not an image")
    found = predict.find_images(tmp_path)
    assert [p.name for p in found] == ["1.2.840.113619.2.1", "scan.dcm"]
    images = predict.load_images(found, 32)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0], images[1])
    assert images.std() > 0
