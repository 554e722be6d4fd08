"""DICOM images as the readers and the pipeline see them: one uint8 RGB frame, cropped.

What is read (pydicom and its pixel-data decoders):

- photometric interpretations MONOCHROME1 (inverted, so bright is echogenic as in
  MONOCHROME2), MONOCHROME2, RGB, YBR_FULL / YBR_FULL_422 (to RGB by pydicom),
  YBR_RCT / YBR_ICT (JPEG 2000, to RGB by the decoder) and PALETTE COLOR (the file's
  lookup table, ``pydicom.pixels.apply_color_lut``);
- 8 to 16 bits: a value is scaled linearly from its stored range to 0..255
  (``BitsStored`` bits, shifted when signed; a palette's entries from its
  descriptor's bits); no window is applied;
- every transfer syntax pydicom has a decoder for here: uncompressed (little and big
  endian), RLE (pydicom itself), JPEG baseline and JPEG 2000 (Pillow), JPEG
  lossless and JPEG-LS (pylibjpeg-libjpeg). Another one is refused with the
  packages its decoder needs;
- multi-frame (cine) files: the middle frame (``frames // 2``) is the example. One
  frame per file keeps a loop of 120 frames as cheap as a still and its frames out
  of two splits at once; the frame used is recorded.

The ultrasound region: where the file has a Sequence of Ultrasound Regions
(0018,6011), the image is cropped to its largest 2-D tissue region
(RegionSpatialFormat 1, RegionDataType 1; the first of equal ones) before
anything else, so text, calipers, logos and colour bars beside it are gone. A
region that does not lie inside the image is not used (the file is kept whole).

Patient grouping: PatientID, else StudyInstanceUID, becomes the example's group,
as a salted hash (``patient_group``); no header value leaves this module
otherwise. ``FileInfo`` holds only what may be written into a run's files.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import logging
import os
import pathlib
import secrets
import threading
import warnings

import numpy as np

from bcjax.data.busi import BusiError, default_cache_dir

log = logging.getLogger(__name__)

SUFFIXES = (".dcm", ".dicom")
US_REGION_2D = 1  # RegionSpatialFormat: 2D (tissue or flow)
US_REGION_TISSUE = 1  # RegionDataType: tissue (B-mode)
MIN_REGION_INSIDE = 0.9  # a region is clamped to the image when this much of it lies inside
PHOTOMETRIC = (
    "MONOCHROME1",
    "MONOCHROME2",
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_RCT",
    "YBR_ICT",
    "PALETTE COLOR",
)
# $BCJAX_GROUP_SALT, else a secret made once per cache folder: the same patient gets
# the same group in every run on this machine, and a group cannot be looked up.
SALT_ENV = "BCJAX_GROUP_SALT"
SALT_FILE = "patient-group-salt"
_SALT_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class FileInfo:
    """What bcjax keeps of a DICOM header: no patient, institution or device value."""

    rows: int
    columns: int
    frames: int
    frame: int  # the frame used (0-based)
    photometric: str
    bits: int  # BitsStored
    transfer_syntax: str  # its name, e.g. "JPEG Baseline (Process 1)"
    modality: str  # "US", or another (accepted with a notice)
    crop: tuple[int, int, int, int] | None  # (x0, y0, x1, y1), inclusive, of the region used
    region_note: str  # why there is no crop, or "" when there is one
    burned_in: bool  # Burned In Annotation (0028,0301) is YES
    group: str  # salted hash of PatientID / StudyInstanceUID; "" = the file alone
    group_source: str  # "PatientID" | "StudyInstanceUID" | "file"

    def record(self) -> dict:
        """JSON-ready, for the manifest."""
        out = dataclasses.asdict(self)
        out["crop"] = list(self.crop) if self.crop else None
        del out["group"]  # the manifest has the groups already (patient_groups)
        return out


def is_dicom(path) -> bool:
    """A ``.dcm``/``.dicom`` file, or one without a suffix holding the DICM preamble
    (PACS exports are often named by UID only)."""
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix in SUFFIXES:
        return True
    if suffix and not suffix[1:].isdigit():  # UIDs end in ".<digits>"
        return False
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _salt() -> bytes:
    env = os.environ.get(SALT_ENV)
    if env:
        return env.encode()
    path = default_cache_dir() / SALT_FILE
    with _SALT_LOCK:
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass  # another process made it first
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(32))
        return path.read_text().strip().encode()


def patient_group(value: str, source: str) -> str:
    """``"<source>-<16 hex>"``: an HMAC-SHA256 of the value under the salt, never the value."""
    digest = hmac.new(_salt(), f"{source}|{value}".encode(), hashlib.sha256).hexdigest()
    prefix = "patient" if source == "PatientID" else "study"
    return f"{prefix}-{digest[:16]}"


def _fail(path, reason: str) -> BusiError:
    return BusiError(f"cannot use DICOM file {path}: {reason}")


def _quiet_pydicom() -> None:
    """pydicom's warnings about invalid values quote the values (a name, a birth date); as
    log records they would reach a run's log. Only its errors pass; bcjax's own messages
    name the file and the reason instead."""
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def _read_dataset(path):
    """The whole dataset (pixel bytes included, not decoded); BusiError for a bad file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    _quiet_pydicom()
    with warnings.catch_warnings(record=True) as caught:  # quoted values stay here too
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError as e:
            raise _fail(path, f"not a DICOM file ({e})") from e
        except Exception as e:  # pydicom raises many types on damaged files
            raise _fail(path, f"unreadable, damaged or truncated ({type(e).__name__}: {e})") from e
    ended = [w for w in caught if "End of file reached" in str(w.message)]
    if ended:
        raise _fail(path, "truncated (the file ends inside its pixel data)")
    return ds


def _check_pixels(path, ds) -> None:
    """BusiError naming the reason when the pixel data cannot be decoded here."""
    from pydicom.pixels import get_decoder

    if "PixelData" not in ds:
        what = ds.get("SOPClassUID")
        name = getattr(what, "name", str(what)) if what else "unknown SOP class"
        kind = "an encapsulated document" if "EncapsulatedDocument" in ds else "no image"
        raise _fail(path, f"no pixel data: {name} ({kind})")
    syntax = getattr(ds, "file_meta", None) and ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise _fail(path, "no transfer syntax in its file meta information")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise _fail(
            path, f"transfer syntax {syntax.name} ({syntax}) has no pixel-data decoder in pydicom"
        ) from None
    if not decoder.is_available:
        needs = "; or ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise _fail(path, f"{syntax.name} needs a decoder package: {needs}")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in PHOTOMETRIC:
        raise _fail(path, f"photometric interpretation {photometric!r} is not supported")
    for tag in ("Rows", "Columns", "BitsAllocated", "BitsStored"):
        if not ds.get(tag):
            raise _fail(path, f"no {tag} in its header")
    if not syntax.is_compressed:
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
        expected = ds.Rows * ds.Columns * samples * frames * ds.BitsAllocated // 8
        if len(ds.PixelData) < expected:
            raise _fail(
                path,
                f"truncated (pixel data has {len(ds.PixelData)} of {expected} bytes)",
            )


def region_crop(ds, rows: int, columns: int) -> tuple[tuple[int, int, int, int] | None, str]:
    """(x0, y0, x1, y1) inclusive of the largest 2-D tissue region, or (None, why not)."""
    regions = ds.get("SequenceOfUltrasoundRegions")
    if not regions:
        return None, "no ultrasound region in the header"
    best, best_area = None, 0
    for item in regions:
        if (
            item.get("RegionSpatialFormat") != US_REGION_2D
            or item.get("RegionDataType") != US_REGION_TISSUE
        ):
            continue
        try:
            box = tuple(
                int(item[k].value)
                for k in (
                    "RegionLocationMinX0",
                    "RegionLocationMinY0",
                    "RegionLocationMaxX1",
                    "RegionLocationMaxY1",
                )
            )
        except (KeyError, TypeError, ValueError):
            continue
        area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
        if box[2] >= box[0] and box[3] >= box[1] and area > best_area:
            best, best_area = box, area
    if best is None:
        return None, "no 2-D tissue region in the ultrasound regions"
    # Scanners often write a maximum one past the last column; a region mostly
    # outside the image was written for another size (the image was resized since).
    clamped = (best[0], best[1], min(best[2], columns - 1), min(best[3], rows - 1))
    kept = max(0, clamped[2] - clamped[0] + 1) * max(0, clamped[3] - clamped[1] + 1)
    if kept < MIN_REGION_INSIDE * best_area:
        return None, (
            f"the tissue region {list(best)} lies outside the {columns}x{rows} image (not cropped)"
        )
    return clamped, ""


def _group_of(ds) -> tuple[str, str]:
    for tag in ("PatientID", "StudyInstanceUID"):
        value = str(ds.get(tag) or "").strip()
        if value:
            return patient_group(value, tag), tag
    return "", "file"


def _info(path, ds) -> FileInfo:
    rows, columns = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames") or 1)
    crop, note = region_crop(ds, rows, columns)
    group, source = _group_of(ds)
    return FileInfo(
        rows=rows,
        columns=columns,
        frames=frames,
        frame=frames // 2,
        photometric=str(ds.PhotometricInterpretation),
        bits=int(ds.BitsStored),
        transfer_syntax=ds.file_meta.TransferSyntaxUID.name,
        modality=str(ds.get("Modality") or ""),
        crop=crop,
        region_note=note,
        burned_in=str(ds.get("BurnedInAnnotation") or "").strip().upper() == "YES",
        group=group,
        group_source=source,
    )


def _file_key(path) -> tuple:
    st = os.stat(path)
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _cached_info(key: tuple) -> FileInfo:
    path = key[0]
    ds = _read_dataset(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # values are converted on access; pydicom may warn
        _check_pixels(path, ds)
        return _info(path, ds)


def read_info(path) -> FileInfo:
    """The header facts of a usable DICOM image; BusiError naming the file and the reason
    (not DICOM, truncated, no pixel data, no decoder for its transfer syntax, ...)."""
    try:
        return _cached_info(_file_key(path))
    except FileNotFoundError as e:
        raise BusiError(f"DICOM file not found: {path}") from e


def _to_uint8(values: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Linear map of the stored range (``bits`` bits) onto 0..255."""
    if values.dtype == np.uint8 and bits == 8 and not signed:
        return values
    v = values.astype(np.float64)
    if signed:
        v = v + 2.0 ** (bits - 1)
    top = 2.0**bits - 1
    return np.clip(np.rint(v * (255.0 / top)), 0, 255).astype(np.uint8)


def palette_bits(ds) -> int:
    """The bits of a palette's entries: its descriptor's, except that a 16-bit table whose
    entries all fit in 8 bits is 8-bit (some writers store 8-bit values so)."""
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    if bits == 16:
        tables = [ds.get(f"{c}PaletteColorLookupTableData") for c in ("Red", "Green", "Blue")]
        if all(tables):  # read as apply_color_lut reads them (native byte order)
            top = max(int(np.frombuffer(t, np.uint16).max()) for t in tables)
            if top <= 255:
                return 8
    return bits


def read_rgb(path) -> np.ndarray:
    """uint8 [H, W, 3]: the file's frame ``FileInfo.frame``, cropped to its tissue region."""
    from pydicom.pixels import apply_color_lut, apply_voi_lut

    info = read_info(path)
    ds = _read_dataset(path)
    try:
        # index: only that frame is decoded; YBR is converted to RGB (as_rgb, the default).
        ds.pixel_array_options(index=info.frame if info.frames > 1 else None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's may quote header values
            pixels = ds.pixel_array
        if info.photometric == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, ds)
            rgb = _to_uint8(pixels, palette_bits(ds), signed=False)
        else:
            signed = int(ds.get("PixelRepresentation") or 0) == 1
            if info.bits > 8 and info.photometric.startswith("MONOCHROME"):
                pixels = apply_voi_lut(pixels, ds)  # the file's window, where it has one
            rgb = _to_uint8(pixels, info.bits, signed)
            if info.photometric == "MONOCHROME1":
                rgb = 255 - rgb
    except BusiError:
        raise
    except Exception as e:
        raise _fail(path, f"pixel data do not decode ({type(e).__name__}: {e})") from e
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=-1)
    if rgb.shape[:2] != (info.rows, info.columns) or rgb.shape[-1] != 3:
        raise _fail(path, f"decoded to shape {rgb.shape}, not {info.rows}x{info.columns}")
    if info.crop is not None:
        x0, y0, x1, y1 = info.crop
        rgb = rgb[y0 : y1 + 1, x0 : x1 + 1]
    return np.ascontiguousarray(rgb)


def image_size(path) -> tuple[int, int]:
    """(width, height) of what ``read_rgb`` returns, from the header alone."""
    info = read_info(path)
    if info.crop is None:
        return info.columns, info.rows
    x0, y0, x1, y1 = info.crop
    return x1 - x0 + 1, y1 - y0 + 1


def notices(info_by_name: dict[str, FileInfo]) -> list[str]:
    """One line per file worth a word: cropped, not cropped with burned-in text, not US."""
    lines = []
    for name, info in info_by_name.items():
        if info.crop is not None:
            lines.append(f"{name}: cropped to its ultrasound tissue region {list(info.crop)}")
        elif info.burned_in:
            lines.append(
                f"{name}: Burned In Annotation is YES and there is no region to crop "
                f"({info.region_note}): its text is a shortcut risk"
            )
        if info.modality != "US":
            lines.append(f"{name}: modality {info.modality or '(none)'}, not US; used as given")
        if info.frames > 1:
            lines.append(f"{name}: {info.frames} frames; frame {info.frame} (the middle) is used")
    return lines
