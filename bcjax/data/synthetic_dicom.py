"""The synthetic set as DICOM files, the way a scanner exports them.

    python -m bcjax.data.synthetic --out DIR --num 60 --format dicom

writes ``DIR/Dataset_BUSI_with_GT/<class>/<class> (N).dcm`` (masks stay PNG beside
them). Each image sits in a larger frame under a band of burned-in "text" blocks,
with a Sequence of Ultrasound Regions whose B-mode tissue region is exactly the
image, and a larger spectral-Doppler region that must not be chosen; so the crop
of bcjax.data.dicom gives back the PNG set's pixels. Every file carries fake
patient data: each patient (1 to 3 images of one class) has a random name, ID,
birth date, institution, device and station name, so a run can be searched for
header values that must never reach its outputs.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile

import numpy as np
from PIL import Image

from bcjax import files
from bcjax.data import busi
from bcjax.data.busi import CLASSES, DATASET_DIRNAME, SYNTHETIC_MARKER

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
BAND = 24  # rows of burned-in text above the image
MARGIN = 8  # columns left and right of it


def _letters(rng, n: int) -> str:
    return "".join(chr(ord("A") + int(k)) for k in rng.integers(0, 26, n))


def fake_patients(seed: int, counts: dict[str, int]) -> dict[str, dict]:
    """{"<class>/<class> (N)": patient} with 1 to 3 consecutive images per patient."""
    from pydicom.uid import generate_uid

    rng = np.random.default_rng([seed, 0xD1C0])
    out = {}
    for cls in CLASSES:
        number = 1
        while number <= counts.get(cls, 0):
            size = int(rng.integers(1, 4))
            tag = f"{int(rng.integers(0, 2**48)):012X}"
            patient = {
                "PatientName": f"{_letters(rng, 7)}^{_letters(rng, 6)}",
                "PatientID": f"SYN{tag}",
                "PatientBirthDate": f"{int(rng.integers(1940, 1995))}"
                f"{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
                "InstitutionName": f"Hospital {_letters(rng, 9)}",
                "Manufacturer": f"Vendor{_letters(rng, 8)}",
                "ManufacturerModelName": f"Model{_letters(rng, 8)}",
                "StationName": f"STN{_letters(rng, 8)}",
                "ReferringPhysicianName": f"{_letters(rng, 8)}^{_letters(rng, 5)}",
                "StudyInstanceUID": generate_uid(entropy_srcs=[str(seed), tag, "study"]),
            }
            for k in range(number, min(number + size, counts[cls] + 1)):
                out[f"{cls}/{cls} ({k})"] = patient
            number += size
    return out


def _region(x0, y0, x1, y1, spatial: int, data_type: int):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.RegionSpatialFormat = spatial
    item.RegionDataType = data_type
    item.RegionFlags = 0
    item.RegionLocationMinX0 = x0
    item.RegionLocationMinY0 = y0
    item.RegionLocationMaxX1 = x1
    item.RegionLocationMaxY1 = y1
    return item


def write_dicom(gray: np.ndarray, path, patient: dict, uid_seed: str, rng) -> None:
    """One uint8 [H, W] image as an uncompressed US DICOM with its region and text band."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    h, w = gray.shape
    frame = np.zeros((h + BAND, w + 2 * MARGIN), np.uint8)
    frame[BAND:, MARGIN : MARGIN + w] = gray
    for _ in range(int(rng.integers(3, 7))):  # "text": bright blocks in the band
        x = int(rng.integers(0, max(1, frame.shape[1] - 12)))
        frame[4 : BAND - 6, x : x + int(rng.integers(4, 12))] = 255
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = US_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid_seed])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = US_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    for key, value in patient.items():
        setattr(ds, key, value)
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, "series"])
    ds.BurnedInAnnotation = "YES"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = frame.shape
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SequenceOfUltrasoundRegions = Sequence(
        [
            # A spectral Doppler region over the whole frame: larger, but not tissue.
            _region(0, 0, frame.shape[1] - 1, frame.shape[0] - 1, 3, 3),
            _region(MARGIN, BAND, MARGIN + w - 1, BAND + h - 1, 1, 1),
        ]
    )
    ds.PixelData = frame.tobytes()
    ds.save_as(path, enforce_file_format=True)


def to_dicom(png_root, out_dir, seed: int) -> pathlib.Path:
    """The PNG set at ``png_root`` (a Dataset_BUSI_with_GT folder) as DICOM files in
    ``out_dir/Dataset_BUSI_with_GT``; masks and SYNTHETIC.json (with "format": "dicom")
    copied. Returns that folder."""
    png_root = pathlib.Path(png_root)
    info = busi.synthetic_info(png_root) or {}
    counts = info.get("class_counts") or {
        c: sum(1 for p in (png_root / c).glob("*.png") if "_mask" not in p.stem) for c in CLASSES
    }
    patients = fake_patients(seed, counts)
    target = pathlib.Path(out_dir).expanduser() / DATASET_DIRNAME
    rng = np.random.default_rng([seed, 0x7E47])
    with files.atomic_dir(target, replace=True) as tmp:
        for cls in CLASSES:
            (tmp / cls).mkdir()
            for png in sorted((png_root / cls).glob("*.png")):
                if "_mask" in png.stem:
                    shutil.copy2(png, tmp / cls / png.name)
                    continue
                with Image.open(png) as im:
                    gray = np.asarray(im.convert("L"))
                key = f"{cls}/{png.stem}"
                write_dicom(gray, tmp / cls / f"{png.stem}.dcm", patients[key], key, rng)
        files.write_json({**info, "format": "dicom"}, tmp / SYNTHETIC_MARKER)
    return target


def generate_dicom(out_dir, num: int, seed: int, **options) -> pathlib.Path:
    """``synthetic.generate`` of these arguments, written as DICOM (see ``to_dicom``)."""
    from bcjax.data import synthetic

    with tempfile.TemporaryDirectory(prefix="bcjax-synthetic-png-") as tmp:
        png_root = synthetic.generate(tmp, num, seed, **options)
        return to_dicom(png_root, out_dir, seed)
