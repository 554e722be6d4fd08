"""bcjax.data.dicom on real files of public DICOM test suites (pydicom's own and pydicom-data):
pixels against pydicom's own decoding, the ultrasound region crop against each file's region
tags, patient groups as salted hashes, and every bad input with its one-line reason."""

import logging
import shutil
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut, convert_color_space, get_decoder, pixel_array

from bcjax.data import busi, dicom, pipeline, readers

# Every ultrasound file the issue lists that the installed packages hold (US1_RLE.dcm is not
# in pydicom-data 1.0.0), plus a JPEG-LS file: JPEG lossless and JPEG-LS both come from
# pylibjpeg-libjpeg.
US_FILES = [
    "examples_palette.dcm",  # palette, regions written for another size
    "examples_ybr_color.dcm",  # 30-frame YBR_FULL_422 JPEG baseline cine
    "examples_rgb_color.dcm",
    "examples_jpeg2k.dcm",  # JPEG 2000 lossless, YBR_RCT
    "ExplVR_BigEnd.dcm",
    "OBXXXX1A.dcm",  # palette with regions
    "OBXXXX1A_2frame.dcm",
    "OBXXXX1A_rle.dcm",
    "OBXXXX1A_rle_2frame.dcm",
    "OBXXXX1A_expb.dcm",  # big endian; its 16-bit palette holds 8-bit values
    "US1_UNCR.dcm",
    "US1_J2KR.dcm",
    "US1_J2KI.dcm",  # JPEG 2000 lossy, YBR_ICT
    "gdcm-US-ALOKA-16.dcm",  # 16-bit palette, two equal tissue regions
    "gdcm-US-ALOKA-16_big.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm",  # monochrome JPEG lossless with a region
    "color-px.dcm",
    "color3d_jpeg_baseline.dcm",  # 120 frames
    "emri_small_jpeg_ls_lossless.dcm",  # MR, 16-bit monochrome JPEG-LS, 10 frames
]


def _path(name):
    path = get_testdata_file(name)
    assert path is not None, f"{name} is not installed (pydicom-data is a test dependency)"
    return path


def _expected_region(ds):
    """The region of the module doc, from the tags: largest 2-D tissue one, first on ties,
    clamped where it overhangs by little; None when none or mostly outside the image."""
    best, area = None, 0
    for r in ds.get("SequenceOfUltrasoundRegions") or []:
        if r.RegionSpatialFormat == 1 and r.RegionDataType == 1:
            box = (
                r.RegionLocationMinX0,
                r.RegionLocationMinY0,
                r.RegionLocationMaxX1,
                r.RegionLocationMaxY1,
            )
            a = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
            if a > area:
                best, area = box, a
    if best is None:
        return None
    clamped = (best[0], best[1], min(best[2], ds.Columns - 1), min(best[3], ds.Rows - 1))
    inside = (clamped[2] - clamped[0] + 1) * (clamped[3] - clamped[1] + 1)
    return clamped if inside >= 0.9 * area else None


def _reference(path):
    """uint8 RGB from pydicom's own functions, by the module doc's rules (independent code)."""
    ds = pydicom.dcmread(path)
    frames = int(ds.get("NumberOfFrames") or 1)
    index = frames // 2 if frames > 1 else None
    photometric = ds.PhotometricInterpretation
    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        # raw: as stored (pydicom 3 converts YBR to RGB unless asked not to); the 4:2:2
        # subsampling is already undone, so the conversion is YBR_FULL's.
        raw = pixel_array(path, index=index, raw=True)
        rgb = convert_color_space(raw, "YBR_FULL", "RGB")
    else:
        rgb = pixel_array(path, index=index)
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(rgb, ds)
        bits = ds.RedPaletteColorLookupTableDescriptor[2]
        tables = [ds.get(f"{c}PaletteColorLookupTableData") for c in ("Red", "Green", "Blue")]
        if bits == 16 and all(tables):  # not for segmented tables (ALOKA's)
            top = max(int(np.frombuffer(t, np.uint16).max()) for t in tables)
            bits = 8 if top <= 255 else bits
        signed = False
    else:
        bits, signed = ds.BitsStored, ds.PixelRepresentation == 1
        if bits > 8 and photometric.startswith("MONOCHROME"):
            from pydicom.pixels import apply_voi_lut

            rgb = apply_voi_lut(rgb, ds)
    value = rgb.astype(np.float64) + (2.0 ** (bits - 1) if signed else 0.0)
    out = np.clip(np.rint(value * 255.0 / (2.0**bits - 1)), 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        out = 255 - out
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=-1)
    box = _expected_region(ds)
    if box is not None:
        out = out[box[1] : box[3] + 1, box[0] : box[2] + 1]
    return out, box, ds


@pytest.mark.parametrize("name", US_FILES)
def test_pixels_equal_pydicoms_and_the_region_crop_follows_the_tags(name):
    path = _path(name)
    expected, box, ds = _reference(path)
    got = dicom.read_rgb(path)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    info = dicom.read_info(path)
    assert info.crop == box
    if box is not None:  # the size the readers check masks against is the crop's
        assert busi.image_size(path) == (box[2] - box[0] + 1, box[3] - box[1] + 1)
    frames = int(ds.get("NumberOfFrames") or 1)
    assert info.frames == frames and info.frame == frames // 2
    # The same pixels reach the pipeline (resized) and the duplicate hashes.
    small = pipeline.decode_resize(path, 24)
    assert small.shape == (24, 24, 3)


def test_the_crop_keeps_the_tissue_and_drops_the_rest():
    """ALOKA's file holds two equal B-mode regions side by side, a third non-tissue one; the
    first is used; OBXXXX1A's region overhangs by one column and is clamped; the downscaled
    cine's regions were written for 640x480, so it is not cropped, and says why."""
    aloka = dicom.read_info(_path("gdcm-US-ALOKA-16.dcm"))
    assert aloka.crop == (32, 24, 335, 415) and aloka.region_note == ""
    ob = dicom.read_info(_path("OBXXXX1A.dcm"))
    assert ob.crop == (120, 60, 799, 518)
    small = dicom.read_info(_path("examples_ybr_color.dcm"))
    assert small.crop is None and "lies outside the 320x240 image" in small.region_note
    plain = dicom.read_info(_path("US1_UNCR.dcm"))
    assert plain.crop is None and plain.region_note == "no ultrasound region in the header"


def test_cine_decodes_one_frame():
    """The 120-frame loop: the middle frame, equal to pydicom's decoding of that frame alone."""
    path = _path("color3d_jpeg_baseline.dcm")
    info = dicom.read_info(path)
    assert (info.frames, info.frame) == (120, 60)
    x0, y0, x1, y1 = info.crop
    expected = pixel_array(path, index=60)[y0 : y1 + 1, x0 : x1 + 1]
    np.testing.assert_array_equal(dicom.read_rgb(path), expected)
    assert any("120 frames; frame 60" in line for line in dicom.notices({"cine": info}))


def test_groups_are_salted_hashes(monkeypatch, tmp_path):
    monkeypatch.setenv("BCJAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(dicom.SALT_ENV, raising=False)
    dicom._cached_info.cache_clear()
    a, b = _path("US1_UNCR.dcm"), _path("US1_J2KR.dcm")  # one patient, 13US1
    info = dicom.read_info(a)
    assert info.group_source == "PatientID" and info.group.startswith("patient-")
    assert info.group == dicom.read_info(b).group
    assert "13US1" not in info.group and "13US1" not in str(info.record())
    assert (tmp_path / "cache" / dicom.SALT_FILE).is_file()  # made once, kept for later runs
    monkeypatch.setenv(dicom.SALT_ENV, "another site's salt")
    dicom._cached_info.cache_clear()
    assert dicom.read_info(a).group != info.group
    dicom._cached_info.cache_clear()


def _edited(tmp_path, name, out_name, edit):
    ds = pydicom.dcmread(_path(name))
    edit(ds)
    out = tmp_path / out_name
    ds.save_as(out)
    return out


def test_missing_patient_id_falls_back_to_the_study_then_the_file(tmp_path):
    def no_patient(ds):
        del ds.PatientID

    def nothing(ds):
        del ds.PatientID
        del ds.StudyInstanceUID

    study = dicom.read_info(_edited(tmp_path, "US1_UNCR.dcm", "a.dcm", no_patient))
    assert study.group_source == "StudyInstanceUID" and study.group.startswith("study-")
    alone = dicom.read_info(_edited(tmp_path, "US1_UNCR.dcm", "b.dcm", nothing))
    assert alone.group_source == "file" and alone.group == ""


def _bad(tmp_path):
    """name -> (path, the reason its error must give)."""
    out = {}
    out["structured report"] = (_path("test-SR.dcm"), "no pixel data: Comprehensive SR Storage")
    pdf = pydicom.Dataset()
    pdf.file_meta = pydicom.dataset.FileMetaDataset()
    pdf.file_meta.MediaStorageSOPClassUID = pydicom.uid.EncapsulatedPDFStorage
    pdf.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    pdf.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    pdf.SOPClassUID = pydicom.uid.EncapsulatedPDFStorage
    pdf.SOPInstanceUID = pdf.file_meta.MediaStorageSOPInstanceUID
    pdf.Modality = "DOC"
    pdf.MIMETypeOfEncapsulatedDocument = "application/pdf"
    pdf.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    pdf.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    out["encapsulated PDF"] = (
        tmp_path / "report.dcm",
        "no pixel data: Encapsulated PDF Storage (an encapsulated document)",
    )
    for name, fraction in (("OBXXXX1A.dcm", 0.6), ("examples_ybr_color.dcm", 0.6)):
        data = open(_path(name), "rb").read()
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(data[: int(len(data) * fraction)])
        out[f"truncated {name}"] = (cut, "truncated")

    def private_syntax(ds):
        ds.file_meta.TransferSyntaxUID = pydicom.uid.UID("1.2.3.4.5.6.7")

    out["unknown transfer syntax"] = (
        _edited(tmp_path, "examples_ybr_color.dcm", "private.dcm", private_syntax),
        "has no pixel-data decoder in pydicom",
    )
    (tmp_path / "text.dcm").write_text("not DICOM at all")
    out["not DICOM"] = (tmp_path / "text.dcm", "not a DICOM file")
    return out


def test_bad_files_get_one_line_naming_file_and_reason(tmp_path):
    for case, (path, reason) in _bad(tmp_path).items():
        for read in (dicom.read_info, busi.read_image, busi.image_size):
            dicom._cached_info.cache_clear()
            with pytest.raises(busi.BusiError) as error:
                read(path)
            message = str(error.value)
            assert str(path) in message and reason in message, (case, message)
            assert "\n" not in message, (case, message)


def test_a_transfer_syntax_without_its_package_names_the_package(tmp_path):
    """HTJ2K needs pylibjpeg-openjpeg, which bcjax does not install (Pillow decodes JPEG 2000)."""

    def htj2k(ds):
        ds.file_meta.TransferSyntaxUID = pydicom.uid.HTJ2KLossless

    path = _edited(tmp_path, "US1_J2KR.dcm", "ht.dcm", htj2k)
    decoder = get_decoder(pydicom.uid.HTJ2KLossless)
    if decoder.is_available:  # someone installed it: then the file is at least read
        assert dicom.read_info(path).transfer_syntax.startswith("High-Throughput")
        return
    with pytest.raises(busi.BusiError) as error:
        dicom.read_info(path)
    message = str(error.value)
    assert message.startswith(f"cannot use DICOM file {path}: ")
    assert "High-Throughput JPEG 2000" in message and "pylibjpeg-openjpeg" in message


def test_bad_file_in_a_class_folder_is_named_at_scan(tmp_path):
    for cls in ("benign", "malignant"):
        (tmp_path / cls).mkdir()
        shutil.copy(_path("US1_UNCR.dcm"), tmp_path / cls / "a.dcm")
    shutil.copy(_path("test-SR.dcm"), tmp_path / "benign" / "report.dcm")
    with pytest.raises(busi.BusiError, match=r"report\.dcm: no pixel data"):
        readers.read_folder(tmp_path)


def test_folder_of_dicoms_groups_patients_and_accepts_other_modalities(tmp_path, caplog):
    """A non-US file is read with a notice; a file named by UID only is found by its preamble;
    the two files of patient 13US1 get one group."""
    (tmp_path / "benign").mkdir()
    (tmp_path / "malignant").mkdir()
    shutil.copy(_path("US1_UNCR.dcm"), tmp_path / "benign" / "us1.dcm")
    shutil.copy(_path("US1_J2KI.dcm"), tmp_path / "benign" / "1.2.826.0.1.3680043.2.1143.77")
    shutil.copy(_path("OBXXXX1A.dcm"), tmp_path / "malignant" / "ob.DCM")
    shutil.copy(_path("SC_rgb_jpeg_dcmtk.dcm"), tmp_path / "malignant" / "other.dcm")  # OT
    labelled = readers.read_folder(tmp_path)
    names = [ex.name for ex in labelled.examples]
    assert names == [
        "benign/1.2.826.0.1.3680043.2.1143.77",
        "benign/us1.dcm",
        "malignant/ob.DCM",
        "malignant/other.dcm",
    ]
    groups = {ex.name: ex.group for ex in labelled.examples}
    assert groups["benign/us1.dcm"] == groups["benign/1.2.826.0.1.3680043.2.1143.77"]
    assert len(set(groups.values())) == 3
    other = labelled.dicom_files["malignant/other.dcm"]
    assert other.modality == "OT"
    lines = dicom.notices(labelled.dicom_files)
    assert "malignant/other.dcm: modality OT, not US; used as given" in lines
    assert any(line.startswith("malignant/ob.DCM: cropped to") for line in lines)
    # The manifest's record of the files: header facts, never the patient's.
    from bcjax.data import datasets

    meta = {}
    with caplog.at_level(logging.INFO, logger="bcjax.data.datasets"):
        datasets.record_labelled(meta, labelled)
    assert meta["dicom"]["malignant/other.dcm"]["modality"] == "OT"
    assert "group" not in meta["dicom"]["benign/us1.dcm"]
    assert "DICOM malignant/other.dcm: modality OT, not US" in caplog.text
    text = str(meta)
    for ds_name in ("US1_UNCR.dcm", "OBXXXX1A.dcm", "SC_rgb_jpeg_dcmtk.dcm"):
        ds = pydicom.dcmread(_path(ds_name), stop_before_pixels=True)
        for tag in ("PatientID", "PatientName", "InstitutionName"):
            value = str(ds.get(tag) or "")
            if len(value) >= 4:
                assert value not in text, (ds_name, tag)


def test_monochrome1_is_inverted(tmp_path):
    """MONOCHROME1 means 0 is white: read so that bright is echogenic, as MONOCHROME2."""

    def to_monochrome1(ds):
        ds.PhotometricInterpretation = "MONOCHROME1"

    original = _path("JPGLosslessP14SV1_1s_1f_8b.dcm")
    inverted = _edited(tmp_path, "JPGLosslessP14SV1_1s_1f_8b.dcm", "m1.dcm", to_monochrome1)
    np.testing.assert_array_equal(dicom.read_rgb(inverted), 255 - dicom.read_rgb(original))
    expected, _, _ = _reference(inverted)
    np.testing.assert_array_equal(dicom.read_rgb(inverted), expected)


def test_pydicoms_warnings_about_a_header_reach_no_log(tmp_path, caplog, recwarn):
    """pydicom warns about values it finds invalid (its messages may quote them); reading
    through bcjax lets none of that out, as a warning or as a log record."""

    def long_id(ds):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds["PatientID"] = pydicom.DataElement(0x00100020, "LO", "SECRETID" * 12)

    path = _edited(tmp_path, "US1_UNCR.dcm", "long_id.dcm", long_id)
    with warnings.catch_warnings(record=True) as plain:  # the control: pydicom alone warns
        warnings.simplefilter("always")
        pydicom.dcmread(path).PatientID  # noqa: B018
    assert any("exceeds the maximum length" in str(w.message) for w in plain)
    dicom._cached_info.cache_clear()
    recwarn.clear()
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        dicom.read_info(path)
        dicom.read_rgb(path)
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]
    assert not [w for w in recwarn if "maximum length" in str(w.message)]


def test_burned_in_text_without_a_region_is_reported(tmp_path, caplog):
    def burned_in_no_region(ds):
        ds.BurnedInAnnotation = "YES"
        del ds.SequenceOfUltrasoundRegions

    path = _edited(tmp_path, "JPGLosslessP14SV1_1s_1f_8b.dcm", "text.dcm", burned_in_no_region)
    info = dicom.read_info(path)
    assert info.burned_in and info.crop is None
    assert dicom.notices({"x.dcm": info}) == [
        "x.dcm: Burned In Annotation is YES and there is no region to crop (no ultrasound "
        "region in the header): its text is a shortcut risk"
    ]
    labelled = readers.LabelledSet((), ("a", "b"), "folder", "here", dicom_files={"x.dcm": info})
    from bcjax.data import datasets

    meta = {}
    with caplog.at_level(logging.WARNING, logger="bcjax.data.datasets"):
        datasets.record_labelled(meta, labelled)
    assert meta["dicom"]["x.dcm"]["burned_in"] is True
    assert "1 DICOM file(s) have burned-in annotation and no ultrasound region" in caplog.text
    assert "(e.g. x.dcm)" in caplog.text


def test_csv_of_dicoms_groups_by_patient_unless_it_has_groups(tmp_path):
    for k, name in enumerate(("US1_UNCR.dcm", "US1_J2KR.dcm", "OBXXXX1A.dcm", "color-px.dcm")):
        shutil.copy(_path(name), tmp_path / f"{k}.dcm")
    (tmp_path / "no_groups.csv").write_text(
        "image,label\n0.dcm,benign\n1.dcm,malignant\n2.dcm,benign\n3.dcm,malignant\n"
    )
    labelled = readers.read_csv(tmp_path / "no_groups.csv")
    group = {ex.name: ex.group for ex in labelled.examples}
    assert group["0.dcm"] == group["1.dcm"] != group["2.dcm"]  # patient 13US1 twice
    assert group["3.dcm"].startswith("study-")  # color-px.dcm has no PatientID
    (tmp_path / "groups.csv").write_text(
        "image,label,group\n0.dcm,benign,A\n1.dcm,malignant,B\n2.dcm,benign,\n3.dcm,malignant,C\n"
    )
    given = {ex.name: ex.group for ex in readers.read_csv(tmp_path / "groups.csv").examples}
    assert given == {"0.dcm": "A", "1.dcm": "B", "2.dcm": group["2.dcm"], "3.dcm": "C"}
