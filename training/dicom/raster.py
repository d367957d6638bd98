"""Mammograms that are not DICOM: PNG, JPEG and TIFF files as a :class:`training.dicom.image.MammoImage`.

Public collections often ship mammograms as raster files (DDSM's preprocessed PNGs, CDD-CESM's JPEGs).
They enter the pipeline exactly like a DICOM file: a lazy dask array with one chunk, a
:class:`RasterSource` whose ``read(0)`` decodes the file, and a synthetic pydicom header (Modality MG,
MONOCHROME2, BodyPartExamined BREAST, PatientID, ImageLaterality and ViewPosition parsed from the file
name where it says so, no spacing), so :func:`training.dicom.metadata.build_meta`, tissue segmentation, the
sampler, the preprocessing cache and the encoder work unchanged.

Values: 8-bit files stay uint8, 16-bit ones uint16, 32-bit integer TIFFs int32; colour (RGB, palette,
with or without alpha) becomes luminance (ITU-R 601, Pillow's ``convert("L")``), 8-bit. Pillow reduces
48-bit RGB PNGs to 8 bits per channel when it opens them. Opening reads the file's header only, and
its size is checked against :data:`training.dicom.image.MAX_SIDE` / ``MAX_FRAME_PIXELS`` before anything is
decoded, so a huge or lying file gives one line, not an allocation.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from training.errors import MammoInputError
from training.dicom.image import MAX_FRAME_PIXELS, MAX_SIDE, FrameRef, FrameSource, MammoImage, lazy_stack
from training.dicom.metadata import _laterality_from_text, _view_from_text, build_meta

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
FORMATS = {"PNG", "JPEG", "MPO", "TIFF"}  # MPO: a JPEG with extra frames (some cameras); frame 0 is the JPEG
UID_NAMESPACE = "mammodino-raster"

# Pillow mode -> (bits allocated, pixel representation) of the decoded 2D array. Colour and
# palette modes become 8-bit luminance.
_MODES: dict[str, tuple[int, int]] = {
    "1": (8, 0), "L": (8, 0), "LA": (8, 0), "La": (8, 0), "P": (8, 0), "PA": (8, 0), "RGB": (8, 0),
    "RGBA": (8, 0), "RGBa": (8, 0), "RGBX": (8, 0), "CMYK": (8, 0), "YCbCr": (8, 0), "LAB": (8, 0),
    "HSV": (8, 0), "I;16": (16, 0), "I;16L": (16, 0), "I;16B": (16, 0), "I;16N": (16, 0),
    "I;16S": (16, 1), "I": (32, 1),
}


def is_raster_file(path: str | os.PathLike) -> bool:
    """True for a file whose suffix says PNG, JPEG or TIFF (the contents are checked when opened)."""
    return Path(path).suffix.lower() in RASTER_SUFFIXES and os.path.isfile(path)


@dataclass(frozen=True)
class RasterSource(FrameSource):
    """A raster file's one frame: ``read(0)`` decodes the whole file (a PNG or JPEG cannot be read in
    parts) into the array the header promised."""

    format: str = ""
    mode: str = ""

    def read(self, index: int) -> np.ndarray:
        if index != 0:
            raise MammoInputError(f"{self.path}: a {self.format} file holds one frame; frame {index} does not exist")
        from PIL import Image

        rows, cols = self.options["rows"], self.options["columns"]
        try:
            with Image.open(self.path) as im:
                if (im.height, im.width) != (rows, cols) or im.mode != self.mode:
                    raise MammoInputError(f"{self.path}: the file changed since it was opened "
                                          f"({im.height} x {im.width} {im.mode}, was {rows} x {cols} {self.mode})")
                array = _pixels(im)
        except MammoInputError:
            raise
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for damaged data
            raise MammoInputError(f"{self.path}: cannot decode the {self.format} pixels ({_short(exc)}); "
                                  "the file is damaged or truncated") from None
        if array.shape != (rows, cols):
            raise MammoInputError(f"{self.path}: decoded {array.shape}, header says {rows} x {cols}")
        return array


def _pixels(im: Any) -> np.ndarray:
    """The decoded 2D array of an open Pillow image (colour -> 8-bit luminance)."""
    mode = im.mode
    bits, signed = _MODES[mode]
    if bits == 8 and mode != "L":
        im = im.convert("L")  # RGB: L = (299 R + 587 G + 114 B) / 1000; palette through its colours
    array = np.asarray(im)
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}")
    if array.dtype != dtype:  # "I;16B" comes big-endian, "I" as int32 already
        array = array.astype(dtype)
    return array


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def raster_header(path: str | os.PathLike) -> tuple[str, str, int, int]:
    """(format, mode, rows, cols) from the file's header, checked against the size limits; nothing
    is decoded."""
    from PIL import Image, UnidentifiedImageError

    path = str(path)
    if not os.path.exists(path):
        raise MammoInputError(f"{path}: no such file or folder")
    if not os.path.isfile(path):
        raise MammoInputError(f"{path}: not a file")
    try:
        with warnings.catch_warnings():  # Pillow's bomb warning: our own limits below say it in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                fmt, mode, (cols, rows) = str(im.format), im.mode, im.size
                frames = int(getattr(im, "n_frames", 1) or 1)
    except Image.DecompressionBombError:
        raise MammoInputError(f"{path}: header claims an implausibly large image (over "
                              f"{MAX_FRAME_PIXELS} pixels); the file is corrupt") from None
    except UnidentifiedImageError:
        raise MammoInputError(f"{path}: not a readable PNG, JPEG or TIFF image (damaged, or another format)") from None
    except Exception as exc:  # a damaged header: Pillow raises SyntaxError, OSError, struct.error...
        raise MammoInputError(f"{path}: damaged image header ({_short(exc)})") from None
    if fmt not in FORMATS:
        raise MammoInputError(f"{path}: a {fmt} image; mammograms are read from PNG, JPEG or TIFF files")
    if fmt == "TIFF" and frames > 1:
        raise MammoInputError(f"{path}: a TIFF with {frames} pages; save one mammogram per file "
                              "(tomosynthesis volumes are read from DICOM)")
    if mode not in _MODES:
        raise MammoInputError(f"{path}: pixel mode {mode} (e.g. floating point) is not a stored-value "
                              "mammogram; save it as 8- or 16-bit grey-scale")
    if not (0 < rows <= MAX_SIDE and 0 < cols <= MAX_SIDE) or rows * cols > MAX_FRAME_PIXELS:
        raise MammoInputError(f"{path}: header claims an implausible {rows} x {cols} image "
                              f"(at most {MAX_SIDE} per side and {MAX_FRAME_PIXELS} pixels); the file is corrupt")
    return fmt, mode, rows, cols


def view_from_name(name: str) -> tuple[str | None, str | None]:
    """(view, laterality) from a file name such as ``A_0002_1.RIGHT_MLO.png`` or
    ``flipped_P150_L_DM_CC.jpg`` (None where the name does not say)."""
    stem = Path(name).name
    for suffix in RASTER_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    return _view_from_text(stem), _laterality_from_text(stem)


_SIDE_TOKENS = {"L", "R", "LEFT", "RIGHT"}


def patient_from_name(path: str | os.PathLike) -> str:
    """A patient id from a file name: the stem without its laterality and view tokens
    (``P12_L_CC`` -> ``P12``), so both breasts and views of one patient share it; a name that is
    nothing but a view (``P12/LCC.png``) takes its folder's name."""
    path = Path(path)
    stem = path.stem
    kept = [t for t in re.split(r"[^A-Za-z0-9]+", stem) if t]
    rest = [t for t in kept if t.upper() not in _SIDE_TOKENS and not _view_from_text(t)]
    if rest:
        return "_".join(rest)
    return path.parent.name or stem


def synthetic_header(path: str, rows: int, cols: int, bits: int, signed: int, *, fmt: str, mode: str,
                     patient_id: str | None = None) -> Dataset:
    """The DICOM attributes a raster file lacks, as a pydicom Dataset (no pixel data, no spacing)."""
    name = Path(path).name
    view, laterality = view_from_name(name)
    patient = patient_id or patient_from_name(name)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()  # no transfer syntax: the pixels are not DICOM-encoded
    ds.SOPClassUID = SecondaryCaptureImageStorage  # what a scanned or converted image is in DICOM
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[UID_NAMESPACE, os.path.abspath(path)])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[UID_NAMESPACE, "study", patient])
    ds.SeriesInstanceUID = ds.SOPInstanceUID
    ds.Modality = "MG"
    ds.BodyPartExamined = "BREAST"
    ds.PatientID = patient
    if laterality:
        ds.ImageLaterality = laterality
    if view:
        ds.ViewPosition = view
    ds.ImageComments = f"not DICOM: {fmt} file ({mode}); header made by training.dicom.raster from the file name"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = signed
    return ds


def open_raster(path: str | os.PathLike, patient_id: str | None = None) -> MammoImage:
    """A PNG/JPEG/TIFF mammogram as a lazy :class:`MammoImage` (header read, pixels not decoded)."""
    path = str(path)
    fmt, mode, rows, cols = raster_header(path)
    bits, signed = _MODES[mode]
    options = dict(rows=rows, columns=cols, samples_per_pixel=1, bits_allocated=bits, bits_stored=bits,
                   pixel_representation=signed, photometric_interpretation="MONOCHROME2", number_of_frames=1)
    source = RasterSource(path, 0, "", 1, options, ((1.0, 0.0),), format=fmt, mode=mode)
    ds = synthetic_header(path, rows, cols, bits, signed, fmt=fmt, mode=mode, patient_id=patient_id)
    frames = [FrameRef(source, 0)]
    data = lazy_stack(frames, volume=False)
    return MammoImage(data, build_meta(ds, path, data.shape, str(data.dtype), 1), ds, frames)


__all__ = ["RASTER_SUFFIXES", "RasterSource", "is_raster_file", "open_raster", "patient_from_name",
           "raster_header", "synthetic_header", "view_from_name"]
